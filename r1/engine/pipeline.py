"""Pipeline stages: a model split by decoder layers, each stage with its own KV cache.

`ModelStage` holds a contiguous range of decoder layers of a Llama/Qwen2-family causal LM (the
first stage also holds the token embeddings, the last the final norm and LM head) and implements
add/step/remove on hidden states, keeping a `BatchedKVCache` for the requests it has seen.
`PipelineRunner` chains stages into a `ModelRunner` the scheduler can drive, so the scheduler and
sampling are the same whether the model runs whole or split. Stages may live in this process
(tests) or in Ray actors (`actors/model_shard.py`), which pass their outputs to the next stage
without a round trip through the caller.

Models without a `model.layers` list of decoder layers (and `model.norm`, `lm_head`) cannot be
split; asking for more stages than layers is an error that names the limit.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch import nn
from transformers import DynamicCache

from r1.engine.runner import (BatchedKVCache, attention_kernels, cache_kwarg, decode_attention_mask, decode_mask_kind,
                              left_pad, new_cache)


def split_layers(num_layers: int, num_stages: int) -> list[range]:
    """Contiguous, as-even-as-possible layer ranges, earlier stages taking the remainder."""
    if num_stages < 1:
        raise ValueError(f"pipeline_stages={num_stages} must be >= 1")
    if num_stages > num_layers:
        raise ValueError(f"pipeline_stages={num_stages} exceeds num_hidden_layers={num_layers}; use pipeline_stages <= {num_layers}")
    base, extra = divmod(num_layers, num_stages)
    ranges, start = [], 0
    for stage in range(num_stages):
        size = base + (1 if stage < extra else 0)
        ranges.append(range(start, start + size))
        start += size
    return ranges


class _NoEmbedding(nn.Module):
    def forward(self, *_: Any) -> torch.Tensor:
        raise AssertionError("only the first pipeline stage embeds tokens")


def slice_model(model: Any, layers: range, first: bool, last: bool) -> Any:
    """Keep only `layers` of `model` (in place), re-indexed from 0 for the stage's own cache."""
    base = getattr(model, "model", None)
    if base is None or not hasattr(base, "layers") or not hasattr(base, "norm"):
        raise ValueError(f"{type(model).__name__} cannot be split into pipeline stages (no model.layers); use pipeline_stages=1")
    kept = [base.layers[i] for i in layers]
    for new_index, layer in enumerate(kept):
        attention = getattr(layer, "self_attn", None)
        if attention is not None and hasattr(attention, "layer_idx"):
            attention.layer_idx = new_index
    base.layers = nn.ModuleList(kept)
    config = model.config
    layer_types = getattr(config, "layer_types", None)
    config.num_hidden_layers = len(kept)
    if layer_types:
        config.layer_types = [layer_types[i] for i in layers]
    if not first:
        base.embed_tokens = _NoEmbedding()
    if not last:
        base.norm = nn.Identity()
        model.lm_head = nn.Identity()
    return model


class ModelStage:
    """One pipeline stage: layers `layers` of the model, with its own batched KV cache."""

    def __init__(self, model: Any, layers: range, first: bool, last: bool, pad_token_id: int = 0):
        self.model = slice_model(model, layers, first, last)
        self.model.eval()
        self.first, self.last = first, last
        self.layers = layers
        self.pad_token_id = pad_token_id
        self.device = next(self.model.parameters()).device
        self.dtype = next(self.model.parameters()).dtype
        self.kv = BatchedKVCache()
        self._cache_kwarg = cache_kwarg(self.model.model)
        self._mask_kind = decode_mask_kind(self.model)

    @classmethod
    def from_full_model(cls, model: Any, stage_index: int, num_stages: int, pad_token_id: int = 0, copy_model: bool = True) -> ModelStage:
        ranges = split_layers(model.config.num_hidden_layers, num_stages)
        source = copy.deepcopy(model) if copy_model else model
        return cls(source, ranges[stage_index], stage_index == 0, stage_index == num_stages - 1, pad_token_id)

    def _run(self, inputs: Any, mask: torch.Tensor | None, position_ids: torch.Tensor, cache: DynamicCache,
             all_logits: bool = False) -> torch.Tensor:
        kwargs: dict[str, Any] = {"attention_mask": mask, "position_ids": position_ids, "use_cache": True, self._cache_kwarg: cache}
        if self.first:
            kwargs["input_ids"] = inputs
        else:
            kwargs["inputs_embeds"] = inputs.to(self.device, self.dtype)
        with attention_kernels(self.device):
            if self.last:
                if all_logits:
                    return self.model(**kwargs, logits_to_keep=0).logits
                return self.model(**kwargs, logits_to_keep=1).logits[:, -1, :]
            return self.model.model(**kwargs).last_hidden_state

    @torch.inference_mode()
    def add(self, seq_ids: list[str], payload: Any, all_logits: bool = False) -> Any:
        """First stage: payload = token lists; later stages: {"hidden", "mask"} from the previous stage.
        `all_logits`: the last stage returns the logits of every prompt position (`ModelRunner.add`)."""
        if self.first:
            inputs, mask = left_pad(payload, self.pad_token_id, self.device)
        else:
            inputs, mask = payload["hidden"], payload["mask"].to(self.device)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = new_cache()
        out = self._run(inputs, mask, position_ids, cache, all_logits)
        self.kv.merge(seq_ids, cache, mask)
        return out if self.last else {"hidden": out, "mask": mask}

    @torch.inference_mode()
    def step(self, seq_ids: list[str], payload: Any) -> Any:
        """First stage: payload = one token per sequence; later stages: hidden states [n, 1, H] in seq_ids order."""
        assert len(seq_ids) == len(self.kv), "step() takes every running sequence"
        rows = self.kv.rows_for(seq_ids)
        if self.first:
            ordered = torch.empty(len(rows), dtype=torch.long)
            ordered[rows] = torch.tensor(payload, dtype=torch.long)
            inputs = ordered.to(self.device).unsqueeze(1)
        else:
            hidden = payload.to(self.device)
            inputs = torch.empty_like(hidden)
            inputs[rows] = hidden
        mask, position_ids = self.kv.extend_for_step()
        out = self._run(inputs, decode_attention_mask(mask, self._mask_kind, self.dtype), position_ids, self.kv.cache)
        return out[rows]

    def remove(self, seq_ids: list[str]) -> None:
        self.kv.remove(seq_ids)


class PipelineRunner:
    """A `ModelRunner` over a chain of stages (local `ModelStage`s or remote proxies).

    Each stage's `add`/`step` output is handed straight to the next stage; `resolve` turns the
    last stage's output into a tensor (identity locally, `ray.get` for actor stages).
    """

    def __init__(self, stages: list[Any], vocab_size: int, resolve: Callable[[Any], torch.Tensor] = lambda x: x,
                 on_gpu: bool = False):
        if not stages:
            raise ValueError("a pipeline needs at least one stage")
        self.stages = stages
        self.vocab_size = vocab_size
        self.resolve = resolve
        # The stages run on GPUs (the engine itself, holding no model, sees only the CPU): the
        # engine's warm-up then covers every batch size and a padded full batch, as on a GPU.
        self.on_gpu = on_gpu

    def add(self, seq_ids: list[str], prompts: list[list[int]], all_logits: bool = False,
            adapters: list[int] | None = None) -> torch.Tensor:
        if adapters is not None and any(adapters):  # the config refuses lora_adapters with pipeline_stages > 1
            raise ValueError("LoRA adapters are not served with pipeline_stages > 1")
        out: Any = prompts
        for stage in self.stages:
            out = stage.add(seq_ids, out, all_logits)
        return self.resolve(out)

    def step(self, seq_ids: list[str], token_ids: list[int]) -> torch.Tensor:
        out: Any = token_ids
        for stage in self.stages:
            out = stage.step(seq_ids, out)
        return self.resolve(out)

    def check_health(self) -> None:
        """Raise if a stage cannot answer (a remote stage whose actor died); local stages always can."""
        for stage in self.stages:
            ping = getattr(stage, "ping", None)
            if ping is not None:
                self.resolve(ping())

    def remove(self, seq_ids: list[str]) -> None:
        results = [stage.remove(seq_ids) for stage in self.stages]
        for result in results:
            self.resolve(result)
