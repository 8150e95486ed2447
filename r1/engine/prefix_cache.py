"""Prefix caching: the keys and values of finished sequences, reused by prompts that start the same way.

A chat's second turn sends the whole first turn again; requests of one application share a long
system text; an agent's every call repeats the conversation so far. With `engine.prefix_cache_mb`
set, the transformers engine keeps the keys and values of every sequence it finishes (its prompt and
the tokens it generated and fed back) and prefills a new prompt from the longest cached prefix: only
the tokens after it go through the model (`r1.engine.runner.LocalModelRunner.add`). vLLM's automatic
prefix caching does the same.

The cache holds blocks of `BLOCK_TOKENS` tokens, each under a chained hash of the adapter and every
token up to its end (`block_keys`), so a block shared by many sequences (a system text) is kept
once, and finding a prompt's longest cached prefix is one dict lookup per block. A match covers
whole blocks, at least one, and leaves at least the prompt's last token to compute (its logits
start the reply). Each LoRA adapter (`r1.engine.lora`) has blocks of its own: the same tokens have
other keys and values under another adapter. Blocks are evicted least recently used first, to stay
within the budget; a match touches its blocks from the last to the first, so a prefix outlives the
blocks that continue it.

The blocks hold values computed by the model's current weights: whoever changes them in place (a
trainer's rollout engine) must call `clear()` (`TransformersEngine.reset_prefix_cache`).
"""

from __future__ import annotations

import hashlib
import threading
from array import array
from collections import OrderedDict
from dataclasses import dataclass

import torch

from r1.config import DEFAULT_PREFIX_CACHE_MB, EngineConfig

BLOCK_TOKENS = 16

# Per layer: (keys, values), each [kv_heads, tokens, head_dim].
LayerKV = list[tuple[torch.Tensor, torch.Tensor]]


def new_prefix_cache(config: EngineConfig, owns_weights: bool) -> PrefixCache | None:
    """The prefix cache `engine.prefix_cache_mb` asks for (None: none). `owns_weights`: the engine
    loaded its model itself, so nothing else changes the weights ("auto" caches only then)."""
    size = config.prefix_cache_mb
    if size == "auto":
        size = DEFAULT_PREFIX_CACHE_MB if owns_weights else 0
    return PrefixCache(size << 20) if size else None


@dataclass
class Block:
    tokens: tuple[int, ...]
    layers: LayerKV  # each [kv_heads, BLOCK_TOKENS, head_dim]
    nbytes: int


def block_keys(tokens: list[int] | tuple[int, ...], adapter: int, limit: int) -> list[bytes]:
    """The chained hash at the end of each whole block of `tokens[:limit]`: BLAKE2b of the previous
    key and the block's token ids. A cryptographic hash, not Python's: a prompt crafted to collide
    with another client's would otherwise be prefilled from that client's keys and values, and its
    reply could tell what they were."""
    keys, key = [], hashlib.blake2b(f"r1-prefix:{adapter}".encode(), digest_size=16).digest()
    for end in range(BLOCK_TOKENS, limit + 1, BLOCK_TOKENS):
        key = hashlib.blake2b(key + array("q", tokens[end - BLOCK_TOKENS : end]).tobytes(), digest_size=16).digest()
        keys.append(key)
    return keys


class PrefixCache:
    """Blocks of finished sequences' keys and values within `capacity_bytes`, least recently used
    out first. Thread-safe (the decode thread stores and looks up; stats are read elsewhere)."""

    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = capacity_bytes
        self._blocks: OrderedDict[bytes, Block] = OrderedDict()  # key -> block, least recently used first
        self._lock = threading.Lock()
        self.nbytes = 0
        self.queried_tokens = 0  # prompt tokens looked up
        self.hit_tokens = 0  # of those, taken from the cache

    def __len__(self) -> int:
        return len(self._blocks)

    def match(self, tokens: list[int], adapter: int = 0) -> tuple[int, LayerKV] | None:
        """(length, per-layer keys and values of `tokens[:length]`) for the longest cached prefix of
        whole blocks, leaving at least the last token; None when not even one block is cached."""
        with self._lock:
            self.queried_tokens += len(tokens)
            found: list[bytes] = []
            for index, key in enumerate(block_keys(tokens, adapter, len(tokens) - 1)):
                block = self._blocks.get(key)
                start = index * BLOCK_TOKENS
                if block is None or block.tokens != tuple(tokens[start : start + BLOCK_TOKENS]):
                    break
                found.append(key)
            if not found:
                return None
            blocks = [self._blocks[key] for key in found]
            for key in reversed(found):  # the first block ends up the most recently used
                self._blocks.move_to_end(key)
            length = len(found) * BLOCK_TOKENS
            self.hit_tokens += length
        layers = [(torch.cat([block.layers[layer][0] for block in blocks], dim=1),
                   torch.cat([block.layers[layer][1] for block in blocks], dim=1))
                  for layer in range(len(blocks[0].layers))]
        return length, layers

    def put(self, tokens: list[int] | tuple[int, ...], layers: LayerKV, adapter: int = 0) -> int:
        """Keep the whole blocks of a finished sequence (`layers`: per layer its keys and values,
        [kv_heads, len(tokens), head_dim], views are fine: new blocks are copied). Returns how many
        blocks were new; blocks already held are only marked used."""
        keys = block_keys(tokens, adapter, len(tokens))
        if not keys:
            return 0
        block_bytes = sum(k.element_size() * k[:, :BLOCK_TOKENS].numel() + v.element_size() * v[:, :BLOCK_TOKENS].numel()
                          for k, v in layers)
        added = 0
        with self._lock:
            for index in reversed(range(len(keys))):  # the first block ends up the most recently used
                key = keys[index]
                if key in self._blocks:
                    self._blocks.move_to_end(key)
                    continue
                if block_bytes > self.capacity_bytes:
                    break
                start, end = index * BLOCK_TOKENS, (index + 1) * BLOCK_TOKENS
                self._blocks[key] = Block(tuple(tokens[start:end]),
                                          [(k[:, start:end].clone(), v[:, start:end].clone()) for k, v in layers],
                                          block_bytes)
                self.nbytes += block_bytes
                added += 1
            while self.nbytes > self.capacity_bytes:
                _, block = self._blocks.popitem(last=False)
                self.nbytes -= block.nbytes
        return added

    def clear(self) -> None:
        with self._lock:
            self._blocks.clear()
            self.nbytes = 0

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"prefix_cache_blocks": len(self._blocks), "prefix_cache_bytes": self.nbytes,
                    "prefix_cache_queried_tokens": self.queried_tokens, "prefix_cache_hit_tokens": self.hit_tokens}
