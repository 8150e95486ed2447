"""Data-parallel strategies behind one small interface: torch DDP, or DeepSpeed ZeRO 0-3.

A strategy owns the wrapped model, the optimizer, the LR schedule and (DDP + fp16) the gradient
scaler. A stage uses it as:

    with strategy.autocast(): loss = compute(strategy.model, batch)   # forward through the wrapper
    strategy.backward(loss)
    grad_norm = strategy.step()                                         # clip, step, schedule, zero
    strategy.module                                                     # the unwrapped model

torch.distributed must already be initialised when world_size > 1 (Ray Train does it: gloo on CPU,
NCCL on GPUs). With one worker, DDP is skipped and the comm share is 0. DeepSpeed runs the same
way on CPU with gloo, NCCL on GPUs; its checkpoints are its own sharded format (every rank writes
its shard), DDP checkpoints are written by rank 0 alone.

This module does not load models or data; see `r1.train.stage`.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from r1.train.comm_timing import CommTimer, deepspeed_comm_seconds
from r1.train.optim import build_optimizer, lr_factor, trainable_parameters
from r1.train.precision import autocast, grad_scaler

DDP_STATE_FILE = "optimizer_state.pt"
DEEPSPEED_TAG = "deepspeed"


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class DDPStrategy:
    """torch DistributedDataParallel (or the bare module with one worker)."""

    owns_checkpoint_on_every_rank = False

    def __init__(self, module: torch.nn.Module, config: Any, device: torch.device, total_steps: int):
        self.module = module
        self.device = device
        self.precision = config.precision
        self.max_grad_norm = config.optim.max_grad_norm
        self.comm_timer = CommTimer(device)
        if distributed():
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [device.index] if device.type == "cuda" else None
            self.model: torch.nn.Module = DistributedDataParallel(module, device_ids=device_ids)
            self.model.register_comm_hook(None, self.comm_timer.ddp_hook)
        else:
            self.model = module
        self.params = trainable_parameters(module)
        self.optimizer, self.scheduler = build_optimizer(self.params, config.optim, total_steps)
        self.scaler = grad_scaler(self.precision, device)

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.precision, self.device)

    def inference_module(self) -> torch.nn.Module:
        """The module to run inference on (rollouts, evaluation): the trained module itself."""
        return self.module

    def no_sync(self) -> contextlib.AbstractContextManager:
        """Skip gradient all-reduce (for all but the last micro-batch of an accumulated step)."""
        return self.model.no_sync() if hasattr(self.model, "no_sync") else contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self) -> float:
        """Clip, optimizer step, LR schedule, zero grads; returns the gradient norm before clipping."""
        self.scaler.unscale_(self.optimizer)
        max_norm = self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    def comm_seconds(self) -> float:
        return self.comm_timer.collect()

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def gathered(self) -> contextlib.AbstractContextManager:
        """Full parameters available on this rank (always true for DDP)."""
        return contextlib.nullcontext()

    def save_state(self, directory: Path, rank: int) -> None:
        if rank == 0:
            state = {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
            }
            torch.save(state, directory / DDP_STATE_FILE)

    def load_state(self, directory: Path) -> None:
        if not (directory / DDP_STATE_FILE).is_file():
            raise ValueError(f"the checkpoint {directory} is incomplete: it has no {DDP_STATE_FILE} "
                             "(or was written by strategy=deepspeed)")
        state = torch.load(directory / DDP_STATE_FILE, map_location=self.device, weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])


def deepspeed_config(config: Any, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON config for a training config (AdamW and the LR schedule stay ours)."""
    strategy = config.strategy
    zero: dict[str, Any] = {"stage": strategy.zero_stage}
    if strategy.offload in ("optimizer", "optimizer_and_params"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": config.scaling.use_gpu}
    if strategy.offload == "optimizer_and_params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": config.scaling.use_gpu}
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,  # bookkeeping only: stages build their own batches
        "gradient_accumulation_steps": 1,
        "train_batch_size": world_size,
        "gradient_clipping": config.optim.max_grad_norm,
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if config.measure_comm:
        ds["comms_logger"] = {"enabled": True, "prof_all": True, "verbose": False}
    if config.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif config.precision == "fp16":
        ds["fp16"] = {"enabled": True, "initial_scale_power": 16}
    return ds


def _skip_deepspeed_shm_op() -> None:
    """Keep DeepSpeed from compiling its shared-memory CPU all-reduce op; collectives use gloo.

    The op is built with ninja the first time a process group starts on CPU: about a minute per
    fresh environment, and every worker of a job waits on one file lock meanwhile. It only matters
    for CPU training (GPU workers use NCCL), so it is opt-in (`strategy.cpu_shm_comm`).
    """
    import importlib

    # Not `from deepspeed.comm import torch`: the package re-exports the real torch under that name.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


class DeepSpeedStrategy:
    """DeepSpeed engine with ZeRO stage 0-3 and optional CPU offload."""

    owns_checkpoint_on_every_rank = True

    def __init__(self, module: torch.nn.Module, config: Any, device: torch.device, total_steps: int):
        import deepspeed

        self.device = device
        self.precision = config.precision
        self.zero_stage = config.strategy.zero_stage
        self.measure_comm = config.measure_comm
        world_size = dist.get_world_size() if distributed() else 1
        params = trainable_parameters(module)
        if config.strategy.offload != "none":
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer: Any = DeepSpeedCPUAdam(
                params, lr=config.optim.lr, betas=(config.optim.beta1, config.optim.beta2),
                weight_decay=config.optim.weight_decay,
            )
        else:
            optimizer = torch.optim.AdamW(
                params, lr=config.optim.lr, betas=(config.optim.beta1, config.optim.beta2),
                weight_decay=config.optim.weight_decay,
            )
        optim_config, max_steps = config.optim, total_steps
        scheduler = lambda opt: torch.optim.lr_scheduler.LambdaLR(  # noqa: E731
            opt,
            lambda step: lr_factor(
                step, warmup_steps=optim_config.warmup_steps, max_steps=max_steps, schedule=optim_config.schedule
            ),
        )
        if not config.strategy.cpu_shm_comm:
            _skip_deepspeed_shm_op()
        # ZeRO-3 runs collectives in every forward (its parameter hooks), so ranks could not run
        # different numbers of inference forwards (rollouts of different lengths, rank-0 evaluation)
        # on the trained module: inference runs on a plain replica refreshed from the partitions.
        self._replica = copy.deepcopy(module).eval().requires_grad_(False) if self.zero_stage == 3 else None
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(config, world_size)
        )
        self.model = self.engine
        self.module = self.engine.module

    def autocast(self) -> contextlib.AbstractContextManager:
        # DeepSpeed casts the weights itself for bf16/fp16.
        return contextlib.nullcontext()

    def no_sync(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> float:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def comm_seconds(self) -> float:
        return deepspeed_comm_seconds() if self.measure_comm else float("nan")

    @property
    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def inference_module(self) -> torch.nn.Module:
        """The module to run inference on (rollouts, evaluation) with the current weights.

        Under ZeRO-3: a plain replica (no ZeRO hooks, so ranks may run different numbers of
        forwards), refreshed now from the partitioned parameters; this is a collective, so every
        rank calls it. It holds one full copy of the model per worker. Otherwise the module itself.
        """
        if self._replica is None:
            return self.module
        with self.gathered(), torch.no_grad():
            for mine, trained in zip(self._replica.parameters(), self.module.parameters(), strict=True):
                mine.copy_(trained)
        return self._replica

    def gathered(self) -> contextlib.AbstractContextManager:
        """Gather ZeRO-3 partitioned parameters (export); the module's forward still runs ZeRO hooks."""
        if self.zero_stage == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None)
        return contextlib.nullcontext()

    def save_state(self, directory: Path, rank: int) -> None:
        self.engine.save_checkpoint(str(directory), tag=DEEPSPEED_TAG)

    def load_state(self, directory: Path) -> None:
        load_path, _ = self.engine.load_checkpoint(str(directory), tag=DEEPSPEED_TAG)
        if load_path is None:
            raise ValueError(f"no DeepSpeed state in checkpoint {directory}; it was written by another strategy")


def build_strategy(
    module: torch.nn.Module, config: Any, device: torch.device, total_steps: int
) -> DDPStrategy | DeepSpeedStrategy:
    """The configured strategy; `total_steps` (optimizer steps in the run) sets the LR schedule's horizon."""
    if config.strategy.name == "deepspeed":
        return DeepSpeedStrategy(module, config, device, total_steps)
    return DDPStrategy(module, config, device, total_steps)
