"""Giving back a thread's OpenMP workers, so the engine's decode thread computes at full speed.

torch runs the parallel part of a CPU kernel on an OpenMP team that belongs to the thread that
called it, and every thread that ever did keeps its team's workers, idle, until it exits. GNU
OpenMP (the runtime torch's Linux wheels ship) counts the workers of every team; once there are
more of them than CPUs, a worker waiting for the next parallel region spins 100 times instead of
300,000 before it sleeps (GOMP_SPINCOUNT in its manual; setting that variable does not change the
throttled count), so each of the hundreds of small kernels in a decode step pays for
putting workers to sleep and waking them. So the model ran at about half speed on the engine's
decode thread whenever the thread that loaded, warmed up or benchmarked it had run a parallel
kernel first (r1-tiny, 16 sequences, 2 threads on 2 cores: ~3,000 against ~5,500 tokens/s; with
that thread's team given back, ~5,500).

`release_thread_pool()` gives back the calling thread's team (OpenMP 5's
`omp_pause_resource_all`, which frees only the caller's workers; a later parallel region builds
them again, in microseconds). The engine calls it in the thread that starts its decode loop, and
in the decode thread whenever the loop goes idle. It does nothing where torch runs no OpenMP (one
thread per process, as Ray gives a fractional-CPU replica) or the runtime has no such call.
"""

from __future__ import annotations

import ctypes
import functools
import os
from typing import Callable

OMP_PAUSE_SOFT = 1  # omp_pause_resource_kind: free the threads, keep what is cheap to keep
_RUNTIMES = ("libgomp", "libomp", "libiomp5")  # GNU, LLVM, Intel


@functools.cache
def _pause_functions() -> tuple[Callable[[int], int], ...]:
    """`omp_pause_resource_all` of every OpenMP runtime loaded into this process (Linux: read
    from /proc/self/maps; elsewhere none). Call after torch is imported: it loads the runtime."""
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if "/" in line})
    except OSError:
        return ()
    functions = []
    for path in paths:
        if not os.path.basename(path).startswith(_RUNTIMES):
            continue
        try:
            function = ctypes.CDLL(path).omp_pause_resource_all
        except (OSError, AttributeError):  # not loadable again, or a runtime before OpenMP 5
            continue
        function.argtypes, function.restype = [ctypes.c_int], ctypes.c_int
        functions.append(function)
    return tuple(functions)


def release_thread_pool() -> bool:
    """Give back the calling thread's OpenMP workers (not inside a parallel region). True when an
    OpenMP runtime took the call."""
    return any([pause(OMP_PAUSE_SOFT) == 0 for pause in _pause_functions()])
