"""Requests → one packed token stream → per-request results.

Each Triton request carries its sequences in one of two forms: padded, ``input_ids`` ``[n, T]`` (one
sequence per batch item) optionally right-padded with an ``attention_mask``, or flat, ``input_ids``
``[1, total_tokens]`` (the sequences back to back) with ``sequence_lengths`` ``[1, n]``.
All sequences of all requests in an ``execute()`` are concatenated into one stream with
``cu_seqlens``; results are split back per request with ``torch.split``. Bodies that run HF's
padded forward lay a stream's sequences out as rows again and back (:class:`PaddedRows`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from poolserve_contract.wire import LORA_NOT_LOADED


class InvalidRequest(ValueError):
    """A request the model cannot serve; it fails alone, the rest of the batch is answered."""


@dataclass(frozen=True)
class SequenceLimits:
    """What a request must satisfy for this checkpoint."""

    vocab_size: int
    max_model_len: int
    type_vocab_size: int  # 1: the model has no token types (zeros are still accepted)


@dataclass(frozen=True)
class RequestSequences:
    """The sequences of one request, already unpadded."""

    input_ids: torch.Tensor  # [tokens] int64
    lengths: torch.Tensor  # [n] int64
    token_type_ids: torch.Tensor | None  # [tokens] int64
    # [n] int32: each sequence's LoRA id, internal to the runtime (0 the base model, i the i-th adapter, read from
    # the request's adapter names by read_lora_names); None: all on the base model
    lora_ids: torch.Tensor | None = None


class LoraNotLoaded(InvalidRequest):
    """A request naming a LoRA adapter its model does not hold (never loaded, or unloaded since)."""


def read_lora_names(names: torch.Tensor | None, sequences: RequestSequences, adapter_ids: dict[str, int],
                    model: str) -> RequestSequences:
    """``sequences`` with each one's LoRA id, from the request's ``lora_names`` (wire.LORA_NAMES_INPUT: UINT8, each
    sequence's name in UTF-8 zero-padded to one width, ``[n, width]`` padded or ``[1, n * width]`` flat; zeros the
    base model) through ``adapter_ids`` (the ``model``'s adapters by name: id ``i`` the ``i``-th). Raises
    :class:`InvalidRequest`, and :class:`LoraNotLoaded` for a name the model does not hold."""
    if names is None:
        return sequences
    if names.dtype != torch.uint8:
        raise InvalidRequest(f"lora_names must be UINT8, got {names.dtype}")
    count = sequences.lengths.numel()
    if names.dim() != 2 or (names.shape[0] != count and names.shape[0] != 1) or not names.numel() or names.numel() % count:
        raise InvalidRequest(f"lora_names must hold one zero-padded name per sequence ({count}): [{count}, width] or "
                             f"[1, {count} * width], got shape {list(names.shape)}")
    rows = names.reshape(count, -1)
    distinct, positions = torch.unique(rows, dim=0, return_inverse=True)  # a request names few adapters
    ids = []
    for row in distinct:
        try:
            name = bytes(row.tolist()).rstrip(b"\0").decode()
        except UnicodeDecodeError:
            raise InvalidRequest("lora_names must be UTF-8") from None
        if name and name not in adapter_ids:
            raise LoraNotLoaded(LORA_NOT_LOADED.format(name=name, model=model))
        ids.append(adapter_ids.get(name, 0))
    lora_ids = torch.tensor(ids, dtype=torch.int32)[positions]
    return RequestSequences(sequences.input_ids, sequences.lengths, sequences.token_type_ids,
                            lora_ids if bool(lora_ids.any()) else None)


def _as_rows(name: str, tensor: torch.Tensor) -> torch.Tensor:
    if tensor.dtype != torch.int64:
        raise InvalidRequest(f"{name} must be INT64, got {tensor.dtype}")
    if tensor.dim() == 1:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 2:
        raise InvalidRequest(f"{name} must be [batch, tokens], got shape {list(tensor.shape)}")
    return tensor


def read_sequences(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    token_type_ids: torch.Tensor | None,
    limits: SequenceLimits,
    sequence_lengths: torch.Tensor | None = None,
) -> RequestSequences:
    """Validate one request's tensors and unpad them (padded form), or split them by
    ``sequence_lengths`` (flat form). Raises :class:`InvalidRequest`."""
    if sequence_lengths is not None:
        if attention_mask is not None:
            raise InvalidRequest("a request sends attention_mask (padded rows) or sequence_lengths (flat), not both")
        return _read_flat(input_ids, sequence_lengths, token_type_ids, limits)
    input_ids = _as_rows("input_ids", input_ids)
    rows, width = input_ids.shape
    if rows == 0:
        raise InvalidRequest("input_ids holds no sequence")
    if attention_mask is not None:
        attention_mask = _as_rows("attention_mask", attention_mask)
        if attention_mask.shape != input_ids.shape:
            raise InvalidRequest(
                f"attention_mask shape {list(attention_mask.shape)} does not match input_ids {list(input_ids.shape)}"
            )
        if bool(((attention_mask != 0) & (attention_mask != 1)).any()):
            raise InvalidRequest("attention_mask must hold only 0 and 1")
        if width > 1 and bool((attention_mask[:, 1:] > attention_mask[:, :-1]).any()):
            raise InvalidRequest("attention_mask must be right padding: ones, then zeros")
        keep = attention_mask.bool()
        lengths = attention_mask.sum(dim=1)
    else:
        keep = None
        lengths = torch.full((rows,), width, dtype=torch.int64)
    _check_lengths(lengths, limits)

    # masked_select, not input_ids[keep]: the same row-major tokens, 5x faster on CPU (0.06 vs 0.3 ms
    # for a 64-document request) because boolean indexing goes through the general index path.
    flat_ids = input_ids.masked_select(keep) if keep is not None else input_ids.reshape(-1)
    _check_vocabulary(flat_ids, limits)

    flat_types = None
    if token_type_ids is not None:
        token_type_ids = _token_types_like(token_type_ids, input_ids)
        flat_types = token_type_ids.masked_select(keep) if keep is not None else token_type_ids.reshape(-1)
        _check_token_types(flat_types, limits)
    return RequestSequences(input_ids=flat_ids.contiguous(), lengths=lengths, token_type_ids=flat_types)


def _read_flat(input_ids: torch.Tensor, sequence_lengths: torch.Tensor, token_type_ids: torch.Tensor | None,
               limits: SequenceLimits) -> RequestSequences:
    """The flat form: one batch item holding all the request's tokens, cut by ``sequence_lengths``."""
    input_ids = _as_rows("input_ids", input_ids)
    if input_ids.shape[0] != 1:
        raise InvalidRequest(
            f"with sequence_lengths, input_ids must be [1, total_tokens], got shape {list(input_ids.shape)}"
        )
    sequence_lengths = _as_rows("sequence_lengths", sequence_lengths)
    if sequence_lengths.shape[0] != 1:
        raise InvalidRequest(
            f"sequence_lengths must be [1, sequences], got shape {list(sequence_lengths.shape)}"
        )
    lengths = sequence_lengths[0]
    if lengths.numel() == 0:
        raise InvalidRequest("sequence_lengths holds no sequence")
    negative = (lengths < 0).nonzero().flatten()
    if negative.numel():
        index = int(negative[0])
        raise InvalidRequest(f"sequence_lengths must be positive: sequence {index} has {int(lengths[index])}")
    _check_lengths(lengths, limits)
    total = int(lengths.sum())
    if total != input_ids.shape[1]:
        raise InvalidRequest(f"sequence_lengths sum to {total} tokens but input_ids holds {input_ids.shape[1]}")

    flat_ids = input_ids[0]
    _check_vocabulary(flat_ids, limits)
    flat_types = None
    if token_type_ids is not None:
        flat_types = _token_types_like(token_type_ids, input_ids)[0]
        _check_token_types(flat_types, limits)
    return RequestSequences(input_ids=flat_ids.contiguous(), lengths=lengths.contiguous(), token_type_ids=flat_types)


def _check_lengths(lengths: torch.Tensor, limits: SequenceLimits) -> None:
    empty = (lengths == 0).nonzero().flatten()
    if empty.numel():
        raise InvalidRequest(f"sequence {int(empty[0])} of the request is empty")
    too_long = (lengths > limits.max_model_len).nonzero().flatten()
    if too_long.numel():
        index = int(too_long[0])
        raise InvalidRequest(
            f"sequence {index} has {int(lengths[index])} tokens, more than the model's maximum "
            f"of {limits.max_model_len}"
        )


def _check_vocabulary(flat_ids: torch.Tensor, limits: SequenceLimits) -> None:
    out_of_vocab = (flat_ids < 0) | (flat_ids >= limits.vocab_size)
    if bool(out_of_vocab.any()):
        bad = int(flat_ids[out_of_vocab][0])
        raise InvalidRequest(f"token id {bad} is out of vocabulary (size {limits.vocab_size})")


def _token_types_like(token_type_ids: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    token_type_ids = _as_rows("token_type_ids", token_type_ids)
    if token_type_ids.shape != input_ids.shape:
        raise InvalidRequest(
            f"token_type_ids shape {list(token_type_ids.shape)} does not match input_ids {list(input_ids.shape)}"
        )
    return token_type_ids


def _check_token_types(flat_types: torch.Tensor, limits: SequenceLimits) -> None:
    if bool(((flat_types < 0) | (flat_types >= limits.type_vocab_size)).any()):
        raise InvalidRequest(f"token_type_ids must be in [0, {limits.type_vocab_size}) for this model")


@dataclass(frozen=True)
class PackedBatch:
    """All sequences of an ``execute()`` call in one token stream."""

    input_ids: torch.Tensor  # [total_tokens] int64
    cu_seqlens: torch.Tensor  # [num_seqs + 1] int32, starts at 0
    token_type_ids: torch.Tensor | None  # [total_tokens] int64, None if no request sent any
    sequences_per_request: list[int]
    lora_ids: torch.Tensor | None = None  # [num_seqs] int32 (0: the base model), None if all on the base model

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def lengths(self) -> torch.Tensor:
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()

    @classmethod
    def pack(cls, requests: list[RequestSequences]) -> PackedBatch:
        lengths = torch.cat([r.lengths for r in requests])
        cu_seqlens = torch.zeros(lengths.numel() + 1, dtype=torch.int32)
        torch.cumsum(lengths, dim=0, out=cu_seqlens[1:])
        token_types = None
        if any(r.token_type_ids is not None for r in requests):
            token_types = torch.cat(
                [r.token_type_ids if r.token_type_ids is not None else torch.zeros_like(r.input_ids) for r in requests]
            )
        lora_ids = None
        if any(r.lora_ids is not None for r in requests):
            lora_ids = torch.cat([r.lora_ids if r.lora_ids is not None else torch.zeros(r.lengths.numel(), dtype=torch.int32)
                                  for r in requests])
        return cls(
            input_ids=torch.cat([r.input_ids for r in requests]),
            cu_seqlens=cu_seqlens,
            token_type_ids=token_types,
            sequences_per_request=[r.lengths.numel() for r in requests],
            lora_ids=lora_ids,
        )

    def split(self, outputs: dict[str, torch.Tensor], per_token: tuple[str, ...] = ()) -> list[dict[str, torch.Tensor]]:
        """Per-sequence outputs ``[num_seqs, ...]`` back to one dict per request. The outputs named in
        ``per_token`` hold one row per token ``[total_tokens, ...]``: each request's become
        ``[its sequences, its longest sequence, ...]``, zeros past each sequence's end."""
        pieces = {name: torch.split(tensor, self.sequences_per_request) for name, tensor in outputs.items()
                  if name not in per_token}
        if per_token:
            lengths = torch.split(self.lengths, self.sequences_per_request)
            tokens = [int(request.sum()) for request in lengths]
            for name in outputs.keys() & set(per_token):  # one not computed (not asked for) stays absent
                pieces[name] = [padded_per_sequence(rows, request)
                                for rows, request in zip(torch.split(outputs[name], tokens), lengths)]
        return [{name: pieces[name][i] for name in outputs} for i in range(len(self.sequences_per_request))]


def padded_per_sequence(rows: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Packed ``[tokens, ...]`` of sequences of ``lengths`` → ``[sequences, longest, ...]``, zero-padded."""
    keep = torch.arange(int(lengths.max()), device=rows.device).unsqueeze(0) < lengths.to(rows.device).unsqueeze(1)
    padded = rows.new_zeros(*keep.shape, *rows.shape[1:])
    padded[keep] = rows
    return padded


def token_budget_chunks(lengths: torch.Tensor, max_tokens: int) -> list[tuple[int, int]]:
    """Split sequences ``[0, n)`` into consecutive ranges of at most ``max_tokens`` tokens.

    A sequence longer than the budget gets a range of its own (the model's maximum length, not
    the budget, bounds a sequence). Loops once per chunk, not per sequence.
    """
    cumulative = torch.cumsum(lengths.long(), dim=0)
    count = lengths.numel()
    chunks: list[tuple[int, int]] = []
    start, consumed = 0, 0
    while start < count:
        end = int(torch.searchsorted(cumulative, consumed + max_tokens, right=True))
        end = max(end, start + 1)
        chunks.append((start, end))
        consumed = int(cumulative[end - 1])
        start = end
    return chunks


@dataclass(frozen=True)
class PaddedRows:
    """Packed sequences laid out as right-padded rows ``[n, width]`` (HF's padded forward), and back."""

    keep: torch.Tensor  # [n, width] bool: True where a row holds one of its sequence's tokens

    @classmethod
    def of(cls, cu_seqlens: torch.Tensor, width: int) -> PaddedRows:
        """Rows as wide as ``width`` (the longest sequence, known on the host) on ``cu_seqlens``' device."""
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        return cls(torch.arange(width, device=cu_seqlens.device).unsqueeze(0) < lengths.unsqueeze(1))

    @property
    def attention_mask(self) -> torch.Tensor:
        return self.keep.long()

    def pad(self, tokens: torch.Tensor, fill: int) -> torch.Tensor:
        """Packed ``[tokens]`` → ``[n, width]``, each row ``fill`` after its sequence ends."""
        rows = torch.full(self.keep.shape, fill, dtype=tokens.dtype, device=self.keep.device)
        return rows.masked_scatter_(self.keep, tokens)

    def unpad(self, rows: torch.Tensor) -> torch.Tensor:
        """``[n, width, ...]`` → packed ``[tokens, ...]``, in stream order."""
        return rows[self.keep]
