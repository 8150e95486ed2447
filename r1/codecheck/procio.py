"""Drive one sandboxed process tree: feed its input, read its outputs with caps, enforce the deadlines.

`pump` is the only place that touches the child's pipes. It does not decide anything about the
result; it returns the bytes it read, which streams were cut, whether the program was seen to
start and whether a deadline hit. `kill` (given by the caller) must SIGKILL the whole tree; it is
called once, as soon as the main process has exited or a deadline has passed, so leftovers holding
pipes cannot stall it.

Two deadlines: starting the sandbox (the launcher, bubblewrap's namespaces) has until
`start_deadline`, and the program's own budget, `run_s`, counts from the moment it is seen to
start. So a host too busy to start processes quickly fails a run as "did not start" instead of
eating the program's time, and a program gets the same budget however long its start took.
"""

from __future__ import annotations

import os
import selectors
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

# The harness channel carries values, not logs; bubblewrap's status is a few JSON lines.
CHANNEL_CAP_BYTES = 8 * 1024 * 1024
STATUS_CAP_BYTES = 64 * 1024
# After the main process exits, how long to keep reading pipes that leftovers may still hold.
EXIT_GRACE_S = 1.0
# stdout/stderr past their cap are read and thrown away, so a chatty but correct program keeps
# running as it would (its writes succeed); only past this many bytes is the pipe closed, so that a
# program printing forever fails its writes (EPIPE) instead of keeping the parent busy until the deadline.
DISCARD_LIMIT_BYTES = 64 * 1024 * 1024


@dataclass
class Pumped:
    outputs: dict[str, bytearray]
    truncated: set[str]
    timed_out: bool
    started_at: float | None  # when the start was seen (time.monotonic(), see `pump`); None if never


def pump(proc: subprocess.Popen, kill: Callable[[], None], *, stdin: bytes | None, channel: dict[str, int],
         status_read: int, channel_input: bytes | None, start_deadline: float, run_s: float,
         start_marker: bytes | None, output_cap: int) -> Pumped:
    """Feed stdin/channel input, read stdout/stderr/channel/status with caps, kill at a deadline.

    The program counts as started when `start_marker` shows up in the status stream (bubblewrap's
    "child-pid" line) or, with no marker, when the status pipe closes (its end is close-on-exec in
    the launcher, so that is the program's exec). Until then the deadline is `start_deadline`;
    from then on it is `run_s` seconds after the start was seen.
    Closes every parent-side fd it was given, kills the process tree and reaps the launcher.
    """
    selector = selectors.DefaultSelector()
    caps = {"stdout": output_cap, "stderr": output_cap, "channel": CHANNEL_CAP_BYTES, "status": STATUS_CAP_BYTES}
    outputs = {name: bytearray() for name in caps}
    discarded = {"stdout": 0, "stderr": 0}
    truncated: set[str] = set()
    # fd -> (role, closer). Popen's pipes are closed through their file objects, raw fds directly.
    endpoints: dict[int, tuple[str, object]] = {
        proc.stdout.fileno(): ("stdout", proc.stdout.close),
        proc.stderr.fileno(): ("stderr", proc.stderr.close),
        status_read: ("status", lambda fd=status_read: os.close(fd)),
    }
    pending: dict[int, memoryview] = {}
    if channel:
        endpoints[channel["out_read"]] = ("channel", lambda fd=channel["out_read"]: os.close(fd))
        endpoints[channel["in_write"]] = ("write", lambda fd=channel["in_write"]: os.close(fd))
        pending[channel["in_write"]] = memoryview(channel_input or b"")
    if stdin:
        endpoints[proc.stdin.fileno()] = ("write", proc.stdin.close)
        pending[proc.stdin.fileno()] = memoryview(stdin)
    for fd, (role, _closer) in endpoints.items():
        os.set_blocking(fd, False)
        selector.register(fd, selectors.EVENT_WRITE if role == "write" else selectors.EVENT_READ, role)
    try:
        pidfd = os.pidfd_open(proc.pid)
        selector.register(pidfd, selectors.EVENT_READ, "exit")
    except (AttributeError, OSError):
        pidfd = None

    def close(fd: int) -> None:
        selector.unregister(fd)
        _role, closer = endpoints.pop(fd)
        closer()

    exited_at = None
    swept = False
    timed_out = False
    started_at = None
    deadline = start_deadline

    def mark_started() -> None:
        nonlocal started_at, deadline
        started_at = time.monotonic()
        deadline = started_at + run_s
    while True:
        now = time.monotonic()
        if exited_at is None and pidfd is None and proc.poll() is not None:
            exited_at = now
        if exited_at is not None and not swept:
            # Kill leftovers as soon as the main process is gone so pipes they hold reach EOF.
            kill()
            swept = True
        reading = [fd for fd, (role, _c) in endpoints.items() if role != "write"]
        if exited_at is not None and (not reading or now - exited_at > EXIT_GRACE_S):
            break
        if exited_at is None and now >= deadline:
            timed_out = True
            exited_at = now
            continue
        wait = (deadline - now) if exited_at is None else EXIT_GRACE_S
        if pidfd is None:
            wait = min(wait, 0.05)
        for key, _events in selector.select(timeout=max(0.0, wait)):
            role, fd = key.data, key.fd
            if role == "exit":
                selector.unregister(fd)
                os.close(fd)
                pidfd = None
                exited_at = exited_at or time.monotonic()
            elif role == "write":
                data = pending[fd]
                try:
                    written = os.write(fd, data[:65536])
                except BlockingIOError:
                    continue
                except OSError:  # the program closed its end
                    written = len(data)
                pending[fd] = data = data[written:]
                if not data:
                    close(fd)
            else:
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                except OSError:
                    chunk = b""
                if not chunk:
                    close(fd)
                    if role == "status" and start_marker is None and started_at is None:
                        mark_started()
                    continue
                room = caps[role] - len(outputs[role])
                outputs[role] += chunk[:room]
                if role == "status" and start_marker is not None and started_at is None and start_marker in outputs[role]:
                    mark_started()
                if len(chunk) > room:
                    truncated.add(role)
                    if role in discarded:
                        discarded[role] += len(chunk) - max(room, 0)
                    if discarded.get(role, DISCARD_LIMIT_BYTES) >= DISCARD_LIMIT_BYTES:
                        # The channel (values, not logs) is closed at its cap; see DISCARD_LIMIT_BYTES.
                        close(fd)
    for fd in list(endpoints):
        close(fd)
    if pidfd is not None:
        selector.unregister(pidfd)
        os.close(pidfd)
    selector.close()
    if not swept:
        kill()
    proc.wait()
    if proc.stdin is not None and not stdin:
        proc.stdin.close()
    return Pumped(outputs, truncated, timed_out, started_at)
