"""What the own packed bodies with rotary positions share (:mod:`poolserve_runtime.native.gte_new`,
:mod:`poolserve_runtime.native.nomic_bert`): the packed stream's defaults, the rotary tables and NeoX's
``rotate_half``."""

from __future__ import annotations

from collections.abc import Callable

import torch

from poolserve_runtime.varlen import packed_positions


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class RotaryFrequencies:
    """A body's rotary inverse frequencies per device, kept in float32 whatever the model's dtype (not a buffer,
    which ``model.to(dtype)`` would round)."""

    def __init__(self, config, build: Callable[..., torch.Tensor]):
        self.config, self.build = config, build
        self.by_device: dict[torch.device, torch.Tensor] = {}

    def on(self, device: torch.device) -> torch.Tensor:
        if device not in self.by_device:
            self.by_device[device] = self.build(self.config).to(device)
        return self.by_device[device]


def packed_stream(input_ids: torch.Tensor, cu_seq_lens_q: torch.Tensor | None, max_length_q: int | None,
                  position_ids: torch.Tensor | None, body: str) -> tuple[torch.Tensor, int, torch.Tensor]:
    """``(cu_seq_lens, longest sequence, position_ids)`` of a packed ``input_ids [1, T]``: without
    ``cu_seq_lens_q`` one sequence, without ``position_ids`` each sequence's own positions from 0."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"the {body} body runs packed: input_ids must be [1, T], got {list(input_ids.shape)}")
    tokens = input_ids.shape[1]
    if cu_seq_lens_q is None:
        cu_seq_lens_q = torch.tensor([0, tokens], dtype=torch.int32, device=input_ids.device)
        max_length_q = tokens
    if position_ids is None:
        position_ids = packed_positions(cu_seq_lens_q, tokens)
    return cu_seq_lens_q, int(max_length_q if max_length_q is not None else tokens), position_ids


def rotary_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """NeoX-layout ``cos, sin [1, T, 1, rotary_dim]``: computed in float32 (the upstream caches'), then cast to
    the activations' dtype as the upstream code does."""
    freqs = position_ids[0].float().unsqueeze(-1) * inv_freq  # [T, rotary_dim / 2]
    angles = torch.cat((freqs, freqs), dim=-1)[None, :, None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)
