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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
                ) -> list[ReusedChunk] | None:
    """The batch as reused-prefix chunks of at most ``max_tokens`` stream tokens (a request larger
    than that gets a chunk of its own), or None when no request shares a prefix worth reusing."""
    bounds = cu_seqlens.tolist()
    requests, first, any_shared = [], 0, False
    for count in sequences_per_request:
        rows = [input_ids[bounds[i]:bounds[i + 1]] for i in range(first, first + count)]
        prefix = shared_prefix_length(rows)
        if prefix < min_prefix:
            prefix = 0
        any_shared |= prefix > 0
        stream_tokens = sum(int(r.numel()) for r in rows) - prefix * (len(rows) - 1) if prefix else sum(
            int(r.numel()) for r in rows)
        requests.append((rows, prefix, stream_tokens))
        first += count
    if not any_shared:
        return None
    chunks, pending, pending_tokens = [], [], 0
    for request in requests:
        if pending and pending_tokens + request[2] > max_tokens:
            chunks.append(_chunk(pending, position_offset))
            pending, pending_tokens = [], 0
        pending.append(request)
        pending_tokens += request[2]
    chunks.append(_chunk(pending, position_offset))
    return chunks


def _chunk(requests, position_offset: int) -> ReusedChunk:
    ids, positions, pool_rows = [], [], []
    q_lengths, k_indices, k_lengths = [], [], []
    cursor = 0  # stream rows written so far

    def append(tokens: torch.Tensor, start_position: int) -> range:
        nonlocal cursor
        ids.append(tokens)
        positions.append(torch.arange(start_position, start_position + tokens.numel()) + position_offset)
        written = range(cursor, cursor + tokens.numel())
        cursor += tokens.numel()
        return written

    for rows, prefix, _ in requests:
        if prefix:
            shared = append(rows[0][:prefix], 0)
            q_lengths.append(len(shared))
            k_indices.append(torch.arange(shared.start, shared.stop))
            k_lengths.append(len(shared))
        for row in rows:
            own = append(row[prefix:], prefix)
            q_lengths.append(len(own))
            keys = torch.arange(own.start, own.stop)
            if prefix:
                keys = torch.cat([torch.arange(shared.start, shared.stop), keys])
            k_indices.append(keys)
            k_lengths.append(int(keys.numel()))
            pool_rows.append(own.stop - 1)

    def cumulative(lengths: list[int]) -> torch.Tensor:
        out = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        torch.cumsum(torch.tensor(lengths, dtype=torch.int32), dim=0, out=out[1:])
        return out

    return ReusedChunk(
        input_ids=torch.cat(ids), positions=torch.cat(positions), cu_seqlens_q=cumulative(q_lengths),
        key_index=torch.cat(k_indices), cu_seqlens_k=cumulative(k_lengths), max_length_q=max(q_lengths),
        max_length_k=max(k_lengths), pool_rows=torch.tensor(pool_rows, dtype=torch.int64),
        sequences=len(pool_rows),
    )
