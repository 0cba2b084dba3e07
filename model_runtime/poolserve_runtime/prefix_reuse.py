"""Shared-prefix reuse: a request's documents share their prompt up to the document; compute it once.

An LLM reranker's rendered prompts (system prompt, instruction, query, then the document) are
identical up to the document for every document of one rerank request: often 60-150 tokens of
each ~200. With causal attention the keys and values of that prefix are the same for every
document, so the packed stream holds the prefix once, followed by each document's own tokens
(the suffix), and attention runs with separate query and key ranges:

* the prefix segment: queries and keys are the prefix (plain causal attention);
* a document segment: queries are its suffix tokens; keys are the prefix's, gathered, then its own
  suffix's. Causal attention aligned to the last key (FlashAttention's rule when there are more
  keys than queries) lets suffix token i see the whole prefix and suffix tokens up to i.

Positions continue after the prefix, so each document's hidden states equal those of its full
prompt: the outputs are those of the plain packed path up to float rounding. Bidirectional
encoders never take this path (a prefix token would have to see the documents).

Across requests, :mod:`poolserve_runtime.prefix_cache` keeps prefixes' keys and values: a request
whose prefix starts with cached blocks holds only the rest of its prefix in the stream, its
segments' keys start with the cached rows (``ReusedChunk.cached_kv``), and positions continue after
the cached part.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from poolserve_runtime.prefix_cache import CachedBlock, PendingStore, PrefixCache

# Shorter shared prefixes are not worth the gather (a few tokens of each prompt, e.g. a BOS).
MIN_SHARED_PREFIX = 16


@dataclass(frozen=True)
class ReusedChunk:
    """One forward's packed stream with its attention segments (host tensors)."""

    input_ids: torch.Tensor  # [T] the stream: per request, its prefix once, then every suffix
    positions: torch.Tensor  # [T] position ids (each suffix continues after its prefix)
    cu_seqlens_q: torch.Tensor  # [S + 1] int32: query ranges of the segments over the stream
    key_index: torch.Tensor  # [K] int64: stream rows of every segment's keys, segment after segment
    cu_seqlens_k: torch.Tensor  # [S + 1] int32: key ranges over key_index
    max_length_q: int
    max_length_k: int
    pool_rows: torch.Tensor  # [n] int64: the stream row of each sequence's last token, in batch order
    sequences: int  # how many of the batch's sequences this chunk answers
    # The chunk's requests as planned (with LoRA adapters: runs of one adapter), in order: [R + 1] int64 stream
    # rows of each (its prefix and suffixes are contiguous), and how many sequences each holds.
    request_bounds: torch.Tensor
    request_sequences: tuple[int, ...]
    # Prefix cache (poolserve_runtime.prefix_cache): keys/values of the cached blocks the segments
    # read, [layers, 2, C, kv heads, head dim] on the device; key_index counts them as key rows 0..C-1,
    # the stream's rows following (None: no cached block, key_index counts stream rows only).
    cached_kv: torch.Tensor | None = None
    capture_rows: torch.Tensor | None = None  # [N] int64: stream rows of the new blocks the cache keeps
    stores: tuple[PendingStore, ...] = ()  # which requests' blocks those rows are

    @property
    def tokens(self) -> int:
        return int(self.input_ids.numel())


def shared_prefix_length(rows: list[torch.Tensor]) -> int:
    """Tokens every row starts with, leaving each row at least its last token as a suffix."""
    shortest = min(int(row.numel()) for row in rows)
    width = shortest - 1
    if len(rows) < 2 or width <= 0:
        return 0
    heads = torch.stack([row[:width] for row in rows])
    differs = (heads != heads[0]).any(dim=0)
    return int(differs.nonzero()[0]) if bool(differs.any()) else width


def plan_chunks(input_ids: torch.Tensor, cu_seqlens: torch.Tensor, sequences_per_request: list[int],
                max_tokens: int, position_offset: int = 0, min_prefix: int = MIN_SHARED_PREFIX,
                cache: PrefixCache | None = None) -> list[ReusedChunk] | None:
    """The batch as reused-prefix chunks of at most ``max_tokens`` stream tokens (a request larger
    than that gets a chunk of its own), or None when no request shares a prefix worth reusing.

    With a ``cache``, each request's prefix is looked up there: its cached leading blocks are read,
    not computed, and its new full blocks are captured for the cache to keep. A request of one
    document then counts its whole prompt but the last token as its prefix, so that a later request
    may share it (its system prompt and instruction, or the same pair again)."""
    bounds = cu_seqlens.tolist()
    requests, first, any_shared = [], 0, False
    for count in sequences_per_request:
        rows = [input_ids[bounds[i]:bounds[i + 1]] for i in range(first, first + count)]
        prefix = shared_prefix_length(rows)
        if prefix < min_prefix:
            prefix = 0
        if cache is not None and count == 1 and rows[0].numel() - 1 >= cache.block_tokens:
            prefix = rows[0].numel() - 1
        request = _Request(rows, prefix)
        if cache is not None and prefix:
            request.head = rows[0][:prefix].tolist()
            request.hit = cache.lookup(request.head)
            request.new_blocks = max(cache.storable_blocks(prefix) - len(request.hit), 0)
            request.cached = len(request.hit) * cache.block_tokens
        any_shared |= prefix > 0
        requests.append(request)
        first += count
    if not any_shared:
        return None
    chunks, pending, pending_tokens = [], [], 0
    for request in requests:
        if pending and pending_tokens + request.stream_tokens > max_tokens:
            chunks.append(_chunk(pending, position_offset, cache))
            pending, pending_tokens = [], 0
        pending.append(request)
        pending_tokens += request.stream_tokens
    chunks.append(_chunk(pending, position_offset, cache))
    if cache is not None:
        cache.stats.computed_tokens += sum(chunk.tokens for chunk in chunks)
    return chunks


@dataclass
class _Request:
    rows: list[torch.Tensor]  # its sequences' ids
    prefix: int  # tokens all of them start with, held once in the stream (0: none)
    head: list[int] = field(default_factory=list)  # the prefix's ids (looked up in the cache)
    hit: list[CachedBlock] = field(default_factory=list)  # the prefix's leading blocks found in the cache
    cached: int = 0  # their tokens: read from the cache, not computed
    new_blocks: int = 0  # full blocks after them that the forward computes and the cache keeps

    @property
    def stream_tokens(self) -> int:
        return self.prefix - self.cached + sum(int(row.numel()) - self.prefix for row in self.rows)


def _chunk(requests: list[_Request], position_offset: int, cache: PrefixCache | None) -> ReusedChunk:
    ids, positions, pool_rows = [], [], []
    q_lengths, k_indices, k_lengths = [], [], []
    capture_rows, stores, captured = [], [], 0
    cursor = 0  # stream rows written so far
    # Key rows: the cached blocks first (each once, however many requests read it), then the stream.
    cached_row: dict[int, int] = {}
    cached_kv = []
    for request in requests:
        for block in request.hit:
            if block.id not in cached_row:
                cached_row[block.id] = sum(kv.shape[2] for kv in cached_kv)
                cached_kv.append(block.kv)
    stream_keys = sum(kv.shape[2] for kv in cached_kv)  # key row of the stream's first row

    def append(tokens: torch.Tensor, start_position: int) -> range:
        nonlocal cursor
        ids.append(tokens)
        positions.append(torch.arange(start_position, start_position + tokens.numel()) + position_offset)
        written = range(cursor, cursor + tokens.numel())
        cursor += tokens.numel()
        return written

    request_bounds = [0]
    for request in requests:
        rows, prefix = request.rows, request.prefix
        prefix_keys = torch.cat([torch.empty(0, dtype=torch.int64)] + [
            torch.arange(cached_row[block.id], cached_row[block.id] + block.kv.shape[2]) for block in request.hit])
        if prefix > request.cached:  # the prefix's rest is computed: a segment of its own
            shared = append(rows[0][request.cached:prefix], request.cached)
            q_lengths.append(len(shared))
            prefix_keys = torch.cat([prefix_keys, torch.arange(shared.start, shared.stop) + stream_keys])
            k_indices.append(prefix_keys)
            k_lengths.append(int(prefix_keys.numel()))
            if request.new_blocks:
                new_tokens = request.new_blocks * cache.block_tokens
                stores.append(PendingStore(tokens=tuple(request.head[:request.cached + new_tokens]),
                                           hit=tuple(request.hit),
                                           capture_offset=captured))
                capture_rows.append(torch.arange(shared.start, shared.start + new_tokens))
                captured += new_tokens
        for row in rows:
            own = append(row[prefix:], prefix)
            q_lengths.append(len(own))
            keys = torch.cat([prefix_keys, torch.arange(own.start, own.stop) + stream_keys])
            k_indices.append(keys)
            k_lengths.append(int(keys.numel()))
            pool_rows.append(own.stop - 1)
        request_bounds.append(cursor)

    def cumulative(lengths: list[int]) -> torch.Tensor:
        out = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        torch.cumsum(torch.tensor(lengths, dtype=torch.int32), dim=0, out=out[1:])
        return out

    return ReusedChunk(
        input_ids=torch.cat(ids), positions=torch.cat(positions), cu_seqlens_q=cumulative(q_lengths),
        key_index=torch.cat(k_indices), cu_seqlens_k=cumulative(k_lengths), max_length_q=max(q_lengths),
        max_length_k=max(k_lengths), pool_rows=torch.tensor(pool_rows, dtype=torch.int64),
        sequences=len(pool_rows), request_bounds=torch.tensor(request_bounds, dtype=torch.int64),
        request_sequences=tuple(len(request.rows) for request in requests), cached_kv=torch.cat(cached_kv, dim=2) if cached_kv else None,
        capture_rows=torch.cat(capture_rows) if capture_rows else None, stores=tuple(stores),
    )
