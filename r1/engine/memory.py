"""CUDA cache-flush policy against allocator fragmentation.

The guide's fix for slow inference caused by fragmented GPU memory is to call
`torch.cuda.empty_cache()`. Flushing on every step would throw away the allocator's cache and slow
decoding down, so the engine flushes only:

- when a request finishes and the reserved-but-unallocated share of CUDA memory is above
  `cuda_fragmentation_flush_ratio` (blocks the allocator holds but cannot reuse for the next batch
  shape), and
- optionally every `cuda_empty_cache_every_steps` decode steps (0 = never).

On CPU, or when CUDA is not initialised, every method is a no-op.
"""

from __future__ import annotations

import torch


class CudaCachePolicy:
    def __init__(self, device: torch.device, every_steps: int = 0, fragmentation_ratio: float = 0.5):
        self.enabled = device.type == "cuda" and torch.cuda.is_available()
        self.every_steps = every_steps
        self.fragmentation_ratio = fragmentation_ratio
        self.num_flushes = 0

    def fragmentation(self) -> float:
        """Share of reserved CUDA memory that is not allocated to tensors."""
        if not self.enabled:
            return 0.0
        reserved = torch.cuda.memory_reserved()
        if reserved == 0:
            return 0.0
        return (reserved - torch.cuda.memory_allocated()) / reserved

    def _flush(self) -> None:
        torch.cuda.empty_cache()
        self.num_flushes += 1

    def after_step(self, step: int) -> None:
        if self.enabled and self.every_steps and step % self.every_steps == 0:
            self._flush()

    def after_finish(self) -> None:
        if self.enabled and self.fragmentation() > self.fragmentation_ratio:
            self._flush()
