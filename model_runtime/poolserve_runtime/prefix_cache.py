"""Prefix cache across requests: the keys and values of prompt prefixes computed before, per layer.

Every request to an LLM reranker renders the same system prompt and instruction before its query
and documents (Qwen3-Reranker: ~100 tokens), and a query may come back. :mod:`poolserve_runtime.
prefix_reuse` already computes a request's shared prefix once for all its documents; this cache
keeps that prefix's keys and values after the request, so a later request starting with the same
tokens reads them instead of computing them again. With causal attention the keys and values of a
token depend only on the tokens before it, and the cached keys are post-rotary at their true
positions, so reading them gives the outputs of computing them (fp32 CPU: to 1e-5).

The cache holds blocks of :data:`BLOCK_TOKENS` tokens, as vLLM's automatic prefix caching: a block
is found by its parent block and its own token ids, so a block stands for every token up to its
end and a hit is the longest run of leading blocks present. A request whose prefix extends a cached
one (the system prompt and instruction every request shares, then its own query) hits on the shared
blocks and computes the rest. Entries are keyed by ``(parent block id, token ids)`` in a dict, so a
hit compares the ids themselves (no hash collision can alias two prefixes), and block ids are never
reused, so a block whose parent was evicted can no longer be reached.

Memory is bounded by ``budget_tokens`` (the ``prefix_cache_tokens`` parameter): least recently used
blocks go first. A chain is touched leaf first, so a parent is always more recent than its children
and eviction takes leaves before the prefixes they extend.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

# vLLM's default block size: hits are whole blocks, so at most 15 tokens of a cached prefix are recomputed.
BLOCK_TOKENS = 16
_ROOT = 0  # the parent id of a prefix's first block


@dataclass
class PrefixCacheStats:
    """Counters since the engine loaded; a benchmark reads them for the hit rate."""

    lookups: int = 0  # request prefixes looked up
    hits: int = 0  # lookups that found at least their first block
    looked_up_tokens: int = 0  # tokens of the prefixes looked up
    hit_tokens: int = 0  # of those, tokens read from the cache instead of computed
    computed_tokens: int = 0  # stream tokens the cached forwards computed (prefixes' rest and documents)
    inserted_tokens: int = 0
    evicted_tokens: int = 0

    @property
    def misses(self) -> int:
        return self.lookups - self.hits

    @property
    def hit_rate(self) -> float:
        """Share of looked-up prefix tokens served from the cache."""
        return self.hit_tokens / self.looked_up_tokens if self.looked_up_tokens else 0.0


@dataclass(eq=False)
class CachedBlock:
    id: int
    key: tuple[int, tuple[int, ...]]  # (parent block id, this block's token ids)
    kv: torch.Tensor  # [layers, 2, BLOCK_TOKENS, kv heads, head dim]: keys then values, post-rotary


@dataclass(frozen=True)
class PendingStore:
    """Blocks of one request's prefix that a forward computes and the cache then keeps."""

    tokens: tuple[int, ...]  # the prefix's ids up to the last new block's end
    hit: tuple[CachedBlock, ...]  # the leading blocks the lookup found; the new blocks follow them
    capture_offset: int  # its row in the forward's captured keys/values


class PrefixCache:
    """An exact, LRU, token-bounded cache of per-layer keys and values of prefix blocks."""

    def __init__(self, budget_tokens: int, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, block_tokens: int = BLOCK_TOKENS):
        self.budget_tokens = budget_tokens
        self.block_tokens = block_tokens
        self.kv_shape = (layers, 2, kv_heads, head_dim)
        self.dtype = dtype
        self.device = device
        self.stats = PrefixCacheStats()
        self._blocks: OrderedDict[tuple[int, tuple[int, ...]], CachedBlock] = OrderedDict()  # oldest first
        self._next_id = _ROOT + 1

    @classmethod
    def for_model(cls, config, budget_tokens: int, dtype: torch.dtype, device: torch.device) -> PrefixCache:
        """A cache shaped for ``config``'s decoder layers (a text config)."""
        heads = int(config.num_attention_heads)
        head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return cls(budget_tokens, int(config.num_hidden_layers), int(kv_heads), int(head_dim), dtype, device)

    @property
    def cached_tokens(self) -> int:
        return len(self._blocks) * self.block_tokens

    def storable_blocks(self, prefix_length: int) -> int:
        """Leading full blocks of a prefix the cache may keep: at most a quarter of the budget, so one
        long prompt cannot flush the prefixes every request shares."""
        return min(prefix_length, self.budget_tokens // 4) // self.block_tokens

    def lookup(self, prefix: list[int]) -> list[CachedBlock]:
        """The longest run of ``prefix``'s leading blocks held, touched as most recently used."""
        chain, parent = [], _ROOT
        for start in range(0, len(prefix) - self.block_tokens + 1, self.block_tokens):
            block = self._blocks.get((parent, tuple(prefix[start:start + self.block_tokens])))
            if block is None:
                break
            chain.append(block)
            parent = block.id
        self._touch(chain)
        stats = self.stats
        stats.lookups += 1
        stats.hits += bool(chain)
        stats.looked_up_tokens += len(prefix)
        stats.hit_tokens += len(chain) * self.block_tokens
        return chain

    def capture_buffer(self, rows: int) -> torch.Tensor:
        """``[layers, 2, rows, kv heads, head dim]``: what the attention writes a forward's new blocks to."""
        layers, two, kv_heads, head_dim = self.kv_shape
        return torch.empty(layers, two, rows, kv_heads, head_dim, dtype=self.dtype, device=self.device)

    def store(self, pending: tuple[PendingStore, ...], captured: torch.Tensor) -> None:
        """Keep the new blocks a forward computed (``captured``: its :meth:`capture_buffer`), then evict
        least recently used blocks down to the budget."""
        size = self.block_tokens
        for request in pending:
            if any(self._blocks.get(block.key) is not block for block in request.hit):
                continue  # the prefix it extends was evicted meanwhile: its blocks could not be reached
            chain, parent = list(request.hit), request.hit[-1].id if request.hit else _ROOT
            offset = request.capture_offset
            for start in range(len(request.hit) * size, len(request.tokens), size):
                key = (parent, request.tokens[start:start + size])
                block = self._blocks.get(key)
                if block is None:  # another request of the batch may have stored it already
                    # A copy: a view would keep the whole capture buffer alive.
                    block = CachedBlock(self._next_id, key, captured[:, :, offset:offset + size].clone())
                    self._next_id += 1
                    self._blocks[key] = block
                    self.stats.inserted_tokens += size
                chain.append(block)
                parent = block.id
                offset += size
            self._touch(chain)
        while self.cached_tokens > self.budget_tokens:
            self._blocks.popitem(last=False)
            self.stats.evicted_tokens += size

    def _touch(self, chain: list[CachedBlock]) -> None:
        for block in reversed(chain):  # leaf first: parents end up more recent than their children
            self._blocks.move_to_end(block.key)
