"""Model runners: the part of the engine that runs the model, with no knowledge of sampling.

The scheduler drives a runner through three calls:

- `add(seq_ids, prompts)` prefills new sequences and returns their next-token logits;
- `step(seq_ids, token_ids)` feeds one token per running sequence and returns next-token logits;
- `remove(seq_ids)` frees finished or aborted sequences.

`LocalModelRunner` keeps one batched KV cache for all running sequences, left-padded to a common
length with an attention mask, and position ids counted per sequence, so a sequence decodes to the
same logits whether it runs alone or beside others. New sequences are prefilled as their own
left-padded batch and then merged into the running batch; rows leave by index selection, and
columns that became padding for every row are trimmed. Identical prompts admitted together are
prefilled once.

The KV cache grows in place (`GrowingLayer`): each layer keeps its keys and values in a buffer
with spare positions and a decode step writes one position into it, where a plain `DynamicCache`
concatenates (copies) the whole cache of every layer at every step. Merging, removing or
selecting rows replaces a layer's tensors; the next step moves them into a new buffer.

The sharded runner (model split into pipeline stages held by Ray actors) implements the same
protocol in `actors/`, using `BatchedKVCache` and `forward_with_cache` from this module per stage.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
from collections.abc import Iterator
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from r1.engine.lora import BASE, AdapterRows
from r1.engine.prefix_cache import LayerKV, PrefixCache


class ModelRunner(Protocol):
    vocab_size: int
    on_gpu: bool  # the model runs on GPUs (the engine's warm-up then covers every shape it can)

    def add(self, seq_ids: list[str], prompts: list[list[int]], all_logits: bool = False,
            adapters: list[int] | None = None) -> torch.Tensor:
        """Prefill: each prompt's next-token logits [n, vocab]; with `all_logits`, the logits at every
        (left-padded) prompt position [n, length, vocab], for the prompt's log-probabilities.
        `adapters`: each sequence's LoRA adapter index (`r1.engine.lora`; None: all the base model),
        kept for its decode steps."""
        ...

    def step(self, seq_ids: list[str], token_ids: list[int]) -> torch.Tensor: ...

    def remove(self, seq_ids: list[str]) -> None: ...


def attention_kernels(device: torch.device) -> contextlib.AbstractContextManager:
    """The context a forward pass of the engine runs in: on CUDA, SDPA without cuDNN's backend.

    cuDNN's attention builds an execution plan for every new shape, and decoding changes the key
    length at every step. On an H200 (torch 2.11, cuDNN chosen for half-precision attention with
    a padding mask) that cost about 8 ms of CPU per layer and step: r1-tiny in bf16 decoded its
    first 64-prompt batch at ~40 ms a step against ~4 ms in fp32, which never reaches cuDNN
    (`bench/first_batch.py`, BENCHMARKS.md "GPU check"). The flash and memory-efficient kernels
    have no per-shape set-up. On CPU nothing changes.
    """
    if device.type != "cuda":
        return contextlib.nullcontext()
    return _without_cudnn_attention()


@contextlib.contextmanager
def _without_cudnn_attention() -> Iterator[None]:
    enabled = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(enabled)


def cache_kwarg(model: Any) -> str:
    """transformers renamed `past_key_values` to `cache`; accept either."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into (input_ids, attention_mask)."""
    length = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, length - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, length - len(prompt) :] = 1
    return input_ids.to(device), mask.to(device)


def decode_mask_kind(model: Any) -> str | None:
    """Which 4D mask `decode_attention_mask` builds for `model`: "sdpa", "eager", or None (leave the
    2D mask to transformers). None for flash attention (its unpadding reads the 2D mask), sliding-
    window layers (their mask differs per layer) and compiled models (mask building is inside the
    compiled graph there, and the graph was traced with a 2D mask)."""
    if getattr(model.forward, "r1_compiled", False):
        return None
    config = model.config
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:  # a config without per-layer kinds slides whenever it has a window
        if getattr(config, "sliding_window", None) is not None:
            return None
    elif any(kind != "full_attention" for kind in layer_types):
        return None
    kind = getattr(config, "_attn_implementation", None)
    return kind if kind in ("sdpa", "eager") else None


def decode_attention_mask(mask: torch.Tensor, kind: str | None, dtype: torch.dtype) -> torch.Tensor | None:
    """The attention mask for a decode step (one new token per row) from the batch's 2D padding mask.

    Given a 2D mask, transformers builds the 4D mask its attention takes on every forward
    (`create_causal_mask`); for one query token per row that is the padding mask broadcast over
    heads, and building it through transformers cost about a tenth of a 16-sequence decode step
    of r1-tiny on CPU. SDPA takes a boolean mask (True = attend), eager attention an additive float
    one. A batch without padding gets None, as transformers would give it (SDPA's mask-free kernels
    then apply); `kind` None returns the 2D mask for transformers to handle.
    """
    if kind is None:
        return mask
    if bool(mask.all()):
        return None
    keep = mask.bool()[:, None, None, :]
    if kind == "sdpa":
        return keep
    return torch.zeros(keep.shape, dtype=dtype, device=mask.device).masked_fill_(~keep, torch.finfo(dtype).min)


class GrowingLayer(DynamicLayer):
    """A DynamicLayer that appends into a preallocated buffer instead of concatenating.

    `keys`/`values` are views of the first `length` positions of `[batch, heads, capacity, dim]`
    buffers. When the buffer is full, or when someone replaced `keys`/`values` (row merge, removal
    or selection assign new tensors), `update` moves the current tensors into a new buffer with
    room for `max(MIN_SPARE, length // 4)` more positions: one copy per reallocation instead of
    one per step, at most a quarter more memory than the tokens held.
    """

    MIN_SPARE = 64

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None
        self._key_view: torch.Tensor | None = None
        self._length = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        added = key_states.shape[-2]
        buffer = self._key_buffer
        if buffer is None or self.keys is not self._key_view or self._length + added > buffer.shape[-2]:
            self._reallocate(key_states, value_states, added)
        start, end = self._length, self._length + added
        assert self._key_buffer is not None and self._value_buffer is not None
        self._key_buffer[:, :, start:end].copy_(key_states)
        self._value_buffer[:, :, start:end].copy_(value_states)
        self._length = end
        self.keys = self._key_view = self._key_buffer[:, :, :end]
        self.values = self._value_buffer[:, :, :end]
        return self.keys, self.values

    def _reallocate(self, key_states: torch.Tensor, value_states: torch.Tensor, added: int) -> None:
        """Move the current keys/values (whoever set them) into buffers with spare positions."""
        keys, values = self.keys, self.values
        held = keys.shape[-2] if keys.numel() else 0
        capacity = held + added + max(self.MIN_SPARE, (held + added) // 4)
        batch, heads, _, key_dim = key_states.shape
        self._key_buffer = key_states.new_empty((batch, heads, capacity, key_dim))
        self._value_buffer = value_states.new_empty((batch, heads, capacity, value_states.shape[-1]))
        if held:
            self._key_buffer[:, :, :held].copy_(keys)
            self._value_buffer[:, :, :held].copy_(values)
        self._length = held

    def reset(self) -> None:
        self._key_buffer = self._value_buffer = self._key_view = None
        self._length = 0
        super().reset()


def new_cache(growing: bool = True) -> DynamicCache:
    """An empty cache whose layers are `GrowingLayer`s (or plain `DynamicLayer`s)."""
    cache = DynamicCache()
    if growing:
        cache.layer_class_to_replicate = GrowingLayer
    return cache


def pad_left(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """`tensor` zero-padded on the left of dimension `dim` to `length`."""
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    pad = [0, 0] * (tensor.dim() - dim - 1 if dim >= 0 else -dim - 1) + [missing, 0]
    return F.pad(tensor, pad)


class BatchedKVCache:
    """A DynamicCache over many sequences plus the padding mask and per-row positions.

    Rows are identified by sequence id; `order` is the row order of every tensor.
    """

    def __init__(self) -> None:
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [rows, cached_len], 1 = real token
        self.positions: torch.Tensor | None = None  # [rows], position id of the next token
        self.order: list[str] = []

    def __len__(self) -> int:
        return len(self.order)

    def merge(self, seq_ids: list[str], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Append freshly prefilled rows (their own cache and mask) to the batch."""
        positions = mask.sum(-1)
        if self.cache is None or not self.order:
            self.cache, self.mask, self.positions, self.order = cache, mask, positions, list(seq_ids)
            return
        length = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([pad_left(mine.keys, length, -2), pad_left(theirs.keys, length, -2)])
            mine.values = torch.cat([pad_left(mine.values, length, -2), pad_left(theirs.values, length, -2)])
        self.mask = torch.cat([pad_left(self.mask, length, -1), pad_left(mask, length, -1)])
        self.positions = torch.cat([self.positions, positions])
        self.order.extend(seq_ids)

    def remove(self, seq_ids: list[str]) -> None:
        gone = set(seq_ids)
        keep = [i for i, seq_id in enumerate(self.order) if seq_id not in gone]
        if len(keep) == len(self.order):
            return
        self.order = [self.order[i] for i in keep]
        if not keep:
            self.cache, self.mask, self.positions = None, None, None
            return
        index = torch.tensor(keep, device=self.mask.device)
        # Columns that are padding for every remaining row can go.
        mask = self.mask.index_select(0, index)
        first = int(mask.any(0).long().argmax())
        self.mask = mask[:, first:]
        self.positions = self.positions.index_select(0, index)
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, first:]
            layer.values = layer.values.index_select(0, index)[:, :, first:]

    def rows_for(self, seq_ids: list[str]) -> list[int]:
        """Row index of each sequence id (the scheduler's order may differ from the cache's)."""
        where = {seq_id: i for i, seq_id in enumerate(self.order)}
        return [where[s] for s in seq_ids]

    def extend_for_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask and position ids for feeding one more token per row; advances positions."""
        assert self.mask is not None and self.positions is not None
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=1)
        position_ids = self.positions.unsqueeze(1).clone()
        self.positions = self.positions + 1
        return self.mask, position_ids


class LocalModelRunner:
    """Runs a whole Hugging Face causal LM in this process."""

    def __init__(self, model: Any, pad_token_id: int = 0, growing_cache: bool | None = None,
                 adapter_rows: AdapterRows | None = None, prefix_cache: PrefixCache | None = None):
        self.model = model
        # Finished sequences' keys and values for later prompts that start the same way (None: off),
        # and for that each running sequence's tokens so far (prompt and fed outputs).
        self.prefix_cache = prefix_cache
        self.tokens: dict[str, list[int]] = {}
        # Of the last `add`'s sequences, those prefilled from the cache: sequence id -> cached tokens.
        self.cached_tokens: dict[str, int] = {}
        # The model's LoRA layers read each row's adapter from here (None: the model has none).
        self.adapter_rows = adapter_rows
        self.adapter_of: dict[str, int] = {}  # sequence id -> its adapter, for sequences not of the base
        self.device = next(model.parameters()).device
        self.on_gpu = self.device.type == "cuda"
        self.pad_token_id = pad_token_id
        self.vocab_size = model.config.vocab_size
        self.kv = BatchedKVCache()
        self._cache_kwarg = cache_kwarg(model)
        # `growing_cache`: GrowingLayer caches (default) or transformers' concatenating ones. The
        # default keeps concatenating layers for a torch.compile'd model: the compiled graph guards
        # on the cache's strides (r1/engine/optimize.py), and buffer views change them.
        if growing_cache is None:
            growing_cache = not getattr(model.forward, "r1_compiled", False)
        self.growing_cache = growing_cache
        self.dtype = next(model.parameters()).dtype
        self._mask_kind = decode_mask_kind(model)

    def _forward(self, *, all_logits: bool = False, adapters: list[int] | None = None, **kwargs: Any) -> torch.Tensor:
        cache = kwargs.pop("cache")
        if adapters is not None:
            self.adapter_rows.set(adapters, self.device, self.dtype)
        try:
            with attention_kernels(self.device):
                out = self.model(**kwargs, **{self._cache_kwarg: cache}, use_cache=True, logits_to_keep=0 if all_logits else 1)
        finally:
            if adapters is not None:
                self.adapter_rows.clear()
        return out.logits if all_logits else out.logits[:, -1, :]

    @torch.inference_mode()
    def add(self, seq_ids: list[str], prompts: list[list[int]], all_logits: bool = False,
            adapters: list[int] | None = None) -> torch.Tensor:
        """Prefill; identical prompts (a GRPO group, a request with n > 1) are computed once and
        their cache rows repeated (identical prompts of the same adapter). With a prefix cache, the
        prompts that start with a cached prefix are prefilled from it, as a batch of their own
        (`_prefill_from_cache`)."""
        if adapters is None:
            adapters = [BASE] * len(prompts)
        elif self.adapter_rows is None and any(adapters):
            raise ValueError("this model runner has no LoRA adapters")
        if self.prefix_cache is None:
            return self._prefill(seq_ids, prompts, all_logits, adapters)
        self.tokens.update((seq_id, list(prompt)) for seq_id, prompt in zip(seq_ids, prompts))
        # A prompt given more than once (n > 1) is prefilled once by `_prefill`, cached prefix or not.
        counts = collections.Counter((adapter, tuple(prompt)) for adapter, prompt in zip(adapters, prompts))
        matches = [None if all_logits or counts[adapter, tuple(prompt)] > 1 else self.prefix_cache.match(prompt, adapter)
                   for prompt, adapter in zip(prompts, adapters)]
        hits = [i for i, match in enumerate(matches) if match is not None]
        self.cached_tokens = {seq_ids[i]: matches[i][0] for i in hits}
        if not hits:
            return self._prefill(seq_ids, prompts, all_logits, adapters)
        rest = [i for i, match in enumerate(matches) if match is None]
        parts = [self._prefill([seq_ids[i] for i in rest], [prompts[i] for i in rest], False,
                               [adapters[i] for i in rest])] if rest else []
        parts.append(self._prefill_from_cache([seq_ids[i] for i in hits], [prompts[i] for i in hits],
                                              [adapters[i] for i in hits], [matches[i] for i in hits]))
        computed = torch.cat(parts)
        logits = torch.empty_like(computed)
        logits[torch.tensor(rest + hits, device=computed.device)] = computed
        return logits

    def _prefill_from_cache(self, seq_ids: list[str], prompts: list[list[int]], adapters: list[int],
                            matches: list[tuple[int, LayerKV]]) -> torch.Tensor:
        """Prefill prompts whose first tokens' keys and values the prefix cache holds (`matches`:
        (cached length, per-layer keys and values)) in one forward of their other tokens.

        Each row is [padding][cached prefix | padding][its own tokens]: the prefixes left-padded to
        the longest in the cache the forward starts from, the rest left-padded to the longest rest
        as the forward's input, so a row may have padding between the two, which the attention mask
        hides (every query still sees its prefix). Position ids continue each row's prefix. Next-token
        logits [rows, vocab]."""
        cached = [length for length, _ in matches]
        rests = [prompt[length:] for prompt, length in zip(prompts, cached)]
        width, span = max(cached), max(len(rest) for rest in rests)
        rows = len(prompts)
        mask = torch.zeros((rows, width + span), dtype=torch.long)
        input_ids = torch.full((rows, span), self.pad_token_id, dtype=torch.long)
        position_ids = torch.zeros((rows, span), dtype=torch.long)
        for row, (length, rest) in enumerate(zip(cached, rests)):
            mask[row, width - length : width] = 1
            mask[row, width + span - len(rest) :] = 1
            input_ids[row, span - len(rest) :] = torch.tensor(rest)
            position_ids[row] = torch.arange(length + len(rest) - span, length + len(rest)).clamp(min=length)
        cache = new_cache(self.growing_cache)
        for layer in range(len(matches[0][1])):
            keys = [match[1][layer][0] for match in matches]
            values = [match[1][layer][1] for match in matches]
            cache.update(torch.stack([pad_left(k, width, -2) for k in keys]),
                         torch.stack([pad_left(v, width, -2) for v in values]), layer)
        mask = mask.to(self.device)
        logits = self._forward(input_ids=input_ids.to(self.device), attention_mask=mask,
                               position_ids=position_ids.to(self.device), cache=cache,
                               adapters=adapters if any(adapters) else None)
        self.adapter_of.update((seq_id, adapter) for seq_id, adapter in zip(seq_ids, adapters) if adapter != BASE)
        self.kv.merge(seq_ids, cache, mask)
        return logits

    def _prefill(self, seq_ids: list[str], prompts: list[list[int]], all_logits: bool, adapters: list[int]) -> torch.Tensor:
        """Prefill whole prompts as one left-padded batch (`add`'s arguments, adapters given)."""
        distinct: dict[tuple[int, tuple[int, ...]], int] = {}
        rows = [distinct.setdefault((adapter, tuple(prompt)), len(distinct)) for adapter, prompt in zip(adapters, prompts)]
        input_ids, mask = left_pad([list(prompt) for _, prompt in distinct], self.pad_token_id, self.device)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = new_cache(self.growing_cache)
        logits = self._forward(all_logits=all_logits, input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                               cache=cache, adapters=[adapter for adapter, _ in distinct] if any(adapters) else None)
        self.adapter_of.update((seq_id, adapter) for seq_id, adapter in zip(seq_ids, adapters) if adapter != BASE)
        if len(distinct) < len(prompts):
            index = torch.tensor(rows, device=self.device)
            cache.batch_select_indices(index)
            mask, logits = mask.index_select(0, index), logits.index_select(0, index)
        self.kv.merge(seq_ids, cache, mask)
        return logits

    @torch.inference_mode()
    def step(self, seq_ids: list[str], token_ids: list[int]) -> torch.Tensor:
        """One decode step for every running sequence; `seq_ids` must be exactly the running set."""
        assert len(seq_ids) == len(self.kv), "step() takes one token for every running sequence"
        rows = self.kv.rows_for(seq_ids)
        tokens = torch.empty(len(rows), dtype=torch.long)
        tokens[rows] = torch.tensor(token_ids, dtype=torch.long)
        mask, position_ids = self.kv.extend_for_step()
        adapter_of = self.adapter_of
        logits = self._forward(
            input_ids=tokens.to(self.device).unsqueeze(1), attention_mask=decode_attention_mask(mask, self._mask_kind, self.dtype),
            position_ids=position_ids, cache=self.kv.cache,
            adapters=[adapter_of.get(seq_id, BASE) for seq_id in self.kv.order] if adapter_of else None,
        )
        if self.prefix_cache is not None:  # after the forward: a failed step's sequences are not cached
            for seq_id, token_id in zip(seq_ids, token_ids):
                self.tokens[seq_id].append(token_id)
        return logits[rows]

    def remove(self, seq_ids: list[str]) -> None:
        if self.prefix_cache is not None:
            self._cache_prefixes(seq_ids)
        self.kv.remove(seq_ids)
        for seq_id in seq_ids:
            self.adapter_of.pop(seq_id, None)

    def _cache_prefixes(self, seq_ids: list[str]) -> None:
        """Put the leaving sequences' keys and values into the prefix cache: their rows' unpadded
        positions (padding is on a row's left, and between its cached prefix and the rest for a row
        prefilled from the cache). Skipped when a failed step left the cache out of step with the
        tokens fed (its layers' lengths or the row's position differ from what the tokens say)."""
        kv = self.kv
        tokens = [self.tokens.pop(seq_id, None) for seq_id in seq_ids]
        if kv.cache is None or kv.mask is None:
            return
        length = kv.mask.shape[1]
        if any(layer.keys.shape[-2] != length for layer in kv.cache.layers):
            return
        where = {seq_id: i for i, seq_id in enumerate(kv.order)}
        for seq_id, seq_tokens in zip(seq_ids, tokens):
            row = where.get(seq_id)
            if seq_tokens is None or row is None or int(kv.positions[row]) != len(seq_tokens):
                continue
            real = kv.mask[row].bool()
            if bool(real[length - len(seq_tokens) :].all()):  # no padding inside: views of its last positions
                start = length - len(seq_tokens)
                layers = [(layer.keys[row, :, start:], layer.values[row, :, start:]) for layer in kv.cache.layers]
            else:
                layers = [(layer.keys[row][:, real], layer.values[row][:, real]) for layer in kv.cache.layers]
            self.prefix_cache.put(seq_tokens, layers, self.adapter_of.get(seq_id, BASE))
