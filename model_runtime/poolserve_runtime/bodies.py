"""The model bodies: how one forward turns a chunk of packed sequences into hidden states.

The engine (:mod:`poolserve_runtime.engine`) picks one body at load, splits each batch into
:class:`Chunk` s by its token budget, and pools and scores what the body returns; a body neither
pools nor scores. Each body's ``hidden_states(chunk)`` returns ``[tokens, hidden]``: one row per
packed token, in stream order, so the engine pools by the chunk's ``cu_seqlens``.

* :class:`VarlenBody`: the chunk as one sequence ``[1, tokens]`` with per-sequence positions; the
  attention function of :mod:`poolserve_runtime.varlen` keeps the sequences apart by ``cu_seqlens``,
  so no padding is computed (the GPU default). On CUDA a chunk of a few hundred tokens replays a
  CUDA graph of this body instead (:mod:`poolserve_runtime.cuda_graphs`).
* :class:`PaddedBody`: the chunk as padded rows ``[n, longest]`` + mask through HF's padded forward,
  unpadded after it (the CPU default, whose results the varlen body matches; the only body of
  architectures without a packed kernel).
* :class:`VisionBody`: the same padded rows through a vision-language model's multimodal forward,
  with the chunk's images.
* :class:`ReusedPrefixBody`: a :class:`~poolserve_runtime.prefix_reuse.ReusedChunk` stream, where the
  documents of a request follow their shared prompt prefix, held once; its rows are stream rows and
  the chunk names the row each sequence is pooled at.
* :class:`GenericBody`: the generic fallback, the checkpoint's own padded forward *and head*. Its
  model pools and applies the head itself, so it returns the head's logits ``[n, labels]``
  (``logits(chunk)``), not hidden states; the engine only calibrates them and applies the activation.

Padding is written once, in :class:`~poolserve_runtime.packing.PaddedRows`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from poolserve_runtime import varlen
from poolserve_runtime.packing import PaddedRows

if TYPE_CHECKING:
    from poolserve_runtime.families import Family
    from poolserve_runtime.prefix_reuse import ReusedChunk


@dataclass(frozen=True)
class Chunk:
    """The sequences of one forward, back to back. The device tensors feed the model; the host copies
    are read on the host (padded widths, the last-token rule) without waiting for the device."""

    input_ids: torch.Tensor  # [tokens] int64, on the device
    cu_seqlens: torch.Tensor  # [n + 1] int32, starts at 0, on the device
    host_ids: torch.Tensor  # [tokens] int64, on the host
    host_cu: torch.Tensor  # [n + 1] int32, on the host
    max_length: int  # the longest sequence
    token_type_ids: torch.Tensor | None = None  # [tokens] int64, on the device
    pixel_values: torch.Tensor | None = None  # vision: the chunk's image patches, on the device, model dtype
    image_grid_thw: torch.Tensor | None = None  # vision: their (t, h, w) grids, on the device
    lora_ids: torch.Tensor | None = None  # [n] int32 on the host: each sequence's LoRA id (None: all base)


class Body(Protocol):
    def hidden_states(self, chunk: Chunk) -> torch.Tensor:
        """``[tokens, hidden]``: one row per packed token of ``chunk``, in stream order."""


class VarlenBody:
    """One packed stream through the stock HF body (:mod:`poolserve_runtime.varlen`'s attention)."""

    def __init__(self, family: Family, model: nn.Module, position_offset: int):
        self.family = family
        self.model = model
        self.position_offset = position_offset
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(varlen.register())

    def hidden_states(self, chunk: Chunk) -> torch.Tensor:
        positions = varlen.packed_positions(chunk.cu_seqlens, chunk.input_ids.numel(), self.position_offset)
        token_types = None if chunk.token_type_ids is None else chunk.token_type_ids.unsqueeze(0)
        return self.packed_forward(chunk.input_ids.unsqueeze(0), positions, chunk.cu_seqlens, chunk.max_length,
                                   token_types)

    def packed_forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cu_seqlens: torch.Tensor,
                       max_length: int, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``[tokens, hidden]`` of the stream ``input_ids`` ``[1, tokens]``, whose sequences ``cu_seqlens``
        bounds; ``max_length`` may be any bound on their lengths (a CUDA graph's bucket passes its size)."""
        inputs = {
            "input_ids": input_ids,
            "position_ids": position_ids,
            "cu_seq_lens_q": cu_seqlens,
            "cu_seq_lens_k": cu_seqlens,
            "max_length_q": max_length,
            "max_length_k": max_length,
        }
        if self.family.caches_kv:
            inputs["use_cache"] = False  # decoders would otherwise build a KV cache nobody reads
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        return self.family.body(self.model)(**inputs).last_hidden_state[0]


class ReusedPrefixBody:
    """Reused-prefix streams through the stock HF body: separate query and key ranges per segment
    (:mod:`poolserve_runtime.prefix_reuse`). It runs on the attention the :class:`VarlenBody` of the
    same model registered: reuse only comes with the varlen body."""

    def __init__(self, family: Family, model: nn.Module, device: torch.device):
        self.family = family
        self.model = model
        self.device = device

    def hidden_states(self, chunk: ReusedChunk, captured: torch.Tensor | None = None) -> torch.Tensor:
        """``[stream tokens, hidden]``; ``chunk.pool_rows`` are the rows its sequences are pooled at.
        The attention reads the chunk's cached prefix keys/values and writes those of
        ``chunk.capture_rows`` to ``captured`` (a :class:`~poolserve_runtime.prefix_cache.PrefixCache`
        capture buffer)."""
        to_device = lambda t: t.to(self.device, non_blocking=True)  # noqa: E731
        inputs = {
            "input_ids": to_device(chunk.input_ids).unsqueeze(0),
            "position_ids": to_device(chunk.positions).unsqueeze(0),
            "cu_seq_lens_q": to_device(chunk.cu_seqlens_q),
            "cu_seq_lens_k": to_device(chunk.cu_seqlens_k),
            "max_length_q": chunk.max_length_q,
            "max_length_k": chunk.max_length_k,
            "key_index": to_device(chunk.key_index),
            "use_cache": False,
        }
        if chunk.cached_kv is not None:
            inputs["cached_kv"] = chunk.cached_kv
        if captured is not None:
            inputs["kv_capture"] = captured
            inputs["kv_capture_rows"] = to_device(chunk.capture_rows)
        return self.family.body(self.model)(**inputs).last_hidden_state[0]


def padded_inputs(chunk: Chunk, pad_token_id: int) -> tuple[PaddedRows, dict[str, torch.Tensor]]:
    """HF's padded inputs of a chunk (ids, mask, token types) and the rows that unpad its outputs."""
    rows = PaddedRows.of(chunk.cu_seqlens, chunk.max_length)
    inputs = {"input_ids": rows.pad(chunk.input_ids, pad_token_id), "attention_mask": rows.attention_mask}
    if chunk.token_type_ids is not None:
        inputs["token_type_ids"] = rows.pad(chunk.token_type_ids, 0)
    return rows, inputs


class PaddedBody:
    """HF's padded forward of the family's body, unpadded after it."""

    def __init__(self, family: Family, model: nn.Module, pad_token_id: int):
        self.family = family
        self.model = model
        self.pad_token_id = pad_token_id

    def hidden_states(self, chunk: Chunk) -> torch.Tensor:
        rows, inputs = padded_inputs(chunk, self.pad_token_id)
        if self.family.caches_kv:
            inputs["use_cache"] = False
        return rows.unpad(self.family.body(self.model)(**inputs).last_hidden_state)


class VisionBody:
    """A vision-language model's padded multimodal forward (``model.hidden_states``: the families of
    :mod:`poolserve_runtime.vision_families` and ``native.llama_nemotron_vl``), unpadded after it."""

    def __init__(self, model: nn.Module, pad_token_id: int):
        self.model = model
        self.pad_token_id = pad_token_id

    def hidden_states(self, chunk: Chunk) -> torch.Tensor:
        rows, inputs = padded_inputs(chunk, self.pad_token_id)
        return rows.unpad(self.model.hidden_states(inputs["input_ids"], inputs["attention_mask"],
                                                   chunk.pixel_values, chunk.image_grid_thw))


class GenericBody:
    """The checkpoint's own padded forward and head (the generic fallback): the model pools and
    applies its head, so this body returns logits, not hidden states."""

    def __init__(self, model: nn.Module, pad_token_id: int):
        self.model = model
        self.pad_token_id = pad_token_id

    def logits(self, chunk: Chunk) -> torch.Tensor:
        """``[n, labels]``: the head's logits, one row per sequence, in the model's dtype."""
        _, inputs = padded_inputs(chunk, self.pad_token_id)
        return self.model(**inputs).logits
