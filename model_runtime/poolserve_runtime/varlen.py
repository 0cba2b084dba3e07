"""Packed (unpadded) forwards through stock Hugging Face models.

The whole batch runs as one sequence of ``total_tokens`` (``input_ids`` ``[1, T]``) with
per-sequence ``position_ids``; an attention function registered in transformers'
``AttentionInterface`` under :data:`ATTENTION_NAME` keeps the sequences apart with
``cu_seqlens``. On CUDA it calls ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention over
the packed stream: non-causal for encoders, ``window_size=(-1, 0)`` for decoders, grouped-query
attention native where torch has it, else by repeating K/V heads). Elsewhere it runs
``scaled_dot_product_attention`` per sequence: slow, but it lets CPU tests check the packed
plumbing against HF's padded path. The mask function registered with it is transformers'
flash-attention one, which builds no dense mask.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

ATTENTION_NAME = "packed_varlen"
_registered = False


def _varlen_supports_gqa() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return False
    return "enable_gqa" in inspect.signature(varlen_attn).parameters


@torch.compiler.disable  # compiled layers call it eagerly: varlen_attn's lengths vary per batch
def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                     softcap=None, **kwargs):
    """transformers attention function: ``query`` ``[1, H, T, D]`` → output ``[1, T, H, D]``.

    ``sliding_window`` follows transformers' flash-attention convention: a token sees keys at most
    ``sliding_window - 1`` positions away (to the left for causal layers, to both sides for
    bidirectional ones: Mistral, Qwen2, Phi3, Gemma2's local layers, ModernBERT's local layers).
    """
    cu_seqlens = kwargs["cu_seq_lens_q"]
    max_length = int(kwargs["max_length_q"])
    causal = bool(getattr(module, "is_causal", False))
    q, k, v = (t.squeeze(0).transpose(0, 1) for t in (query, key, value))  # [T, H, D]
    groups = q.shape[1] // k.shape[1]
    # Shared-prefix reuse (model_runtime/poolserve_runtime/prefix_reuse.py): each segment's keys are gathered rows of
    # the stream (a document's keys are its prefix's, then its own), so key ranges differ from query
    # ranges and causal masking aligns each segment's queries to its last keys.
    cu_keys, max_keys = cu_seqlens, max_length
    key_index = kwargs.get("key_index")
    capture = kwargs.get("kv_capture")
    if capture is not None:
        # Prefix cache (model_runtime/poolserve_runtime/prefix_cache.py): keep this layer's keys (post-rotary)
        # and values of the new prefix blocks for later requests.
        rows = kwargs["kv_capture_rows"]
        capture[module.layer_idx, 0].copy_(k.index_select(0, rows))
        capture[module.layer_idx, 1].copy_(v.index_select(0, rows))
    cached = kwargs.get("cached_kv")
    if cached is not None:  # cached prefix blocks are key rows 0..C-1, the stream's rows follow
        k, v = torch.cat([cached[module.layer_idx, 0], k]), torch.cat([cached[module.layer_idx, 1], v])
    if key_index is not None:
        k, v = k.index_select(0, key_index), v.index_select(0, key_index)
        cu_keys, max_keys = kwargs["cu_seq_lens_k"], int(kwargs["max_length_k"])
    reach = -1 if sliding_window is None else int(sliding_window) - 1  # -1: unlimited

    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):  # FlashAttention has no fp32 kernel
        from torch.nn.attention.varlen import varlen_attn

        if softcap is not None:
            # No softcap in torch's varlen kernel: a family with soft-capping must run padded (Gemma2 does).
            raise NotImplementedError("attention-logit soft-capping has no packed varlen kernel; run this model padded")
        extra = {}
        if groups > 1:
            if _SUPPORTS_GQA:
                extra["enable_gqa"] = True
            else:
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        # q and k come out of the rotary embedding as [H, T, D] blocks, so this lays them out again: two
        # copies per decoder layer, 11% of the compiled Qwen3 forward (profile_qwen3_after_copy_fix_h200.csv;
        # passing them strided instead measured the same, the copy then happens below this call).
        out = varlen_attn(
            q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens, cu_keys, max_length, max_keys,
            scale=scaling, window_size=(reach, 0) if causal else (reach, reach), **extra,
        )
        return out.unsqueeze(0), None

    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    out = torch.empty_like(q)
    bounds, key_bounds = cu_seqlens.tolist(), cu_keys.tolist()
    for start, end, key_start, key_end in zip(bounds[:-1], bounds[1:], key_bounds[:-1], key_bounds[1:]):
        # CPU / fp32 fallback: one attention per sequence
        out[start:end] = _reference_attention(
            q[start:end].transpose(0, 1), k[key_start:key_end].transpose(0, 1), v[key_start:key_end].transpose(0, 1),
            causal, scaling, reach, softcap,
        ).transpose(0, 1)
    return out.unsqueeze(0), None


def _reference_attention(q, k, v, causal: bool, scaling, reach: int, softcap) -> torch.Tensor:
    """One sequence ``[H, Lq, D]`` against keys ``[H, Lk, D]`` (Lk >= Lq, queries being the last Lq
    positions) on the CPU: SDPA with the causal rule and the window as a mask; eager when soft-capped."""
    length, key_length = q.shape[1], k.shape[1]
    mask = None
    if causal or reach >= 0:
        query_positions = torch.arange(key_length - length, key_length, device=q.device)
        offset = query_positions.unsqueeze(1) - torch.arange(key_length, device=q.device).unsqueeze(0)  # query - key
        allowed = torch.ones(length, key_length, dtype=torch.bool, device=q.device)
        if causal:
            allowed &= offset >= 0
        if reach >= 0:
            allowed &= offset.abs() <= reach
        mask = allowed
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
    scale = q.shape[-1] ** -0.5 if scaling is None else scaling
    weights = torch.matmul(q, k.transpose(-1, -2)) * scale
    weights = torch.tanh(weights / softcap) * softcap
    if mask is not None:
        weights = weights.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(weights.float(), dim=-1).to(q.dtype), v)


_SUPPORTS_GQA = _varlen_supports_gqa()


def register() -> str:
    """Register the attention and mask functions once; returns the attn_implementation name."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

        AttentionInterface.register(ATTENTION_NAME, packed_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, flash_attention_mask)
        _registered = True
    return ATTENTION_NAME


def packed_positions(cu_seqlens: torch.Tensor, total_tokens: int, offset: int = 0) -> torch.Tensor:
    """``[1, T]`` positions restarting at ``offset`` for each sequence (vectorised)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lengths, output_size=total_tokens)
    return (torch.arange(total_tokens, device=cu_seqlens.device) - starts + offset).unsqueeze(0)
