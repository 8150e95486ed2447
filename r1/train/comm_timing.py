"""How long a training step spends in gradient all-reduce (the "communication share").

`CommTimer.ddp_hook` is a DDP communication hook that does what DDP's default hook does (average
each gradient bucket with an async all-reduce) and records when each bucket's all-reduce was
launched and when it finished: wall-clock on CPU (gloo completes the future when the data is
reduced), CUDA events on GPU (NCCL futures complete on the stream, so only events are accurate).
`collect()` returns the length of the union of those intervals, i.e. the time during which at least
one gradient all-reduce was in flight; dividing it by the step time gives the communication share
(the guide's target is < 15 %). Because DDP overlaps buckets with the rest of backward, this is an
upper bound on the time communication adds to a step.

`deepspeed_comm_seconds` reads DeepSpeed's comms logger timers instead (every collective DeepSpeed
issues, gradient reduce-scatter/all-reduce and ZeRO parameter gathers alike, each timed with a
device sync, so measuring slows a GPU step somewhat). This module does not time collectives outside gradient synchronisation.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import torch
import torch.distributed as dist


def union_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by possibly overlapping [start, end] intervals."""
    total = 0.0
    current_start = current_end = None
    for start, end in sorted(intervals):
        if current_end is None or start > current_end:
            if current_end is not None:
                total += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    if current_end is not None:
        total += current_end - current_start
    return total


class CommTimer:
    """Collects gradient all-reduce intervals of one step at a time."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._lock = threading.Lock()
        self._intervals: list[tuple[Any, Any]] = []

    def ddp_hook(self, process_group, bucket):  # noqa: ANN001, ANN201 - DDP rejects string annotations here
        """A DDP comm hook: average the bucket across ranks, recording the all-reduce's interval."""
        group = process_group if process_group is not None else dist.group.WORLD
        world_size = dist.get_world_size(group)
        tensor = bucket.buffer().div_(world_size)
        if self.cuda:
            start: Any = torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            start = time.perf_counter()
        future = dist.all_reduce(tensor, group=group, async_op=True).get_future()

        def finished(done: torch.futures.Future) -> torch.Tensor:
            if self.cuda:
                end: Any = torch.cuda.Event(enable_timing=True)
                end.record()
            else:
                end = time.perf_counter()
            with self._lock:
                self._intervals.append((start, end))
            return done.value()[0]

        return future.then(finished)

    def collect(self) -> float:
        """Seconds with a gradient all-reduce in flight since the last call (then resets)."""
        with self._lock:
            intervals, self._intervals = self._intervals, []
        if not intervals:
            return 0.0
        if self.cuda:
            torch.cuda.synchronize()
            origin = intervals[0][0]
            spans = [(origin.elapsed_time(s) / 1000.0, origin.elapsed_time(e) / 1000.0) for s, e in intervals]
            return union_length(spans)
        return union_length(intervals)


def deepspeed_comm_seconds() -> float:
    """Seconds DeepSpeed's comms logger timed since the last call (then resets its timers).

    The logger keeps one cumulative timer per collective name; reading and resetting them all gives
    the time of this interval. Its per-message-size records are cleared too (they are cumulative).
    """
    from deepspeed import comm as ds_comm
    from deepspeed.comm import comm as ds_comm_module

    total_ms = 0.0
    for timer in ds_comm_module.timers.get_timers().values():
        total_ms += timer.elapsed(reset=True)
    ds_comm.comms_logger.comms_dict = {}
    return total_ms / 1000.0
