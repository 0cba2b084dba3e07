"""Image inputs of a vision-language model: each request's pixel inputs read and checked, then
batched with the token stream, sliced per token-budget chunk for the padded multimodal forward
(:class:`poolserve_runtime.bodies.VisionBody`; the families and their models:
:mod:`poolserve_runtime.vision_families`).

The wire contract (see docs/images.md): ``input_ids`` hold the placeholders already expanded
(one ``<|image_pad|>`` per merged patch, as the checkpoint's processor writes them);
``pixel_values`` ``[rows, patches, patch_dim]`` FP32 holds each row's images' patches in prompt order
(rows right-padded with zeros), ``image_grid_thw`` ``[rows, images, 3]`` INT64 their (t, h, w) patch
grids (a zero row ends the list).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from poolserve_runtime.packing import InvalidRequest


@dataclass(frozen=True)
class RequestImages:
    """One request's images, unpadded: every row's patches in prompt order."""

    pixel_values: torch.Tensor  # [patches, patch_dim]
    grid_thw: torch.Tensor  # [images, 3]
    images_per_row: torch.Tensor  # [rows]

    @classmethod
    def none(cls, rows: int, patch_dim: int = 0) -> RequestImages:
        return cls(torch.zeros(0, patch_dim), torch.zeros(0, 3, dtype=torch.int64), torch.zeros(rows, dtype=torch.int64))


def read_images(pixel_values: torch.Tensor | None, grid_thw: torch.Tensor | None, rows: int) -> RequestImages:
    """Validate one request's ``pixel_values`` [rows, P, D] and ``image_grid_thw`` [rows, K, 3]."""
    if pixel_values is None and grid_thw is None:
        return RequestImages.none(rows)
    if pixel_values is None or grid_thw is None:
        raise InvalidRequest("pixel_values and image_grid_thw go together")
    if pixel_values.dtype != torch.float32:
        raise InvalidRequest(f"pixel_values must be FP32, got {pixel_values.dtype}")
    if grid_thw.dtype != torch.int64:
        raise InvalidRequest(f"image_grid_thw must be INT64, got {grid_thw.dtype}")
    if pixel_values.dim() != 3 or pixel_values.shape[0] != rows:
        raise InvalidRequest(f"pixel_values must be [rows={rows}, patches, patch_dim], got {list(pixel_values.shape)}")
    if grid_thw.dim() != 3 or grid_thw.shape[0] != rows or grid_thw.shape[2] != 3:
        raise InvalidRequest(f"image_grid_thw must be [rows={rows}, images, 3], got {list(grid_thw.shape)}")
    if bool((grid_thw < 0).any()):
        raise InvalidRequest("image_grid_thw must not be negative")
    present = grid_thw.prod(dim=2) > 0  # [rows, K]
    if grid_thw.shape[1] > 1 and bool((present[:, 1:] & ~present[:, :-1]).any()):
        raise InvalidRequest("image_grid_thw rows must list their images first, then zero rows")
    patches = grid_thw.prod(dim=2) * present
    per_row = patches.sum(dim=1)
    if bool((per_row > pixel_values.shape[1]).any()):
        row = int((per_row > pixel_values.shape[1]).nonzero()[0])
        raise InvalidRequest(f"row {row}: image_grid_thw names {int(per_row[row])} patches, pixel_values holds "
                             f"{pixel_values.shape[1]}")
    keep = torch.arange(pixel_values.shape[1]).unsqueeze(0) < per_row.unsqueeze(1)
    return RequestImages(pixel_values[keep], grid_thw[present], present.sum(dim=1))


def check_image_tokens(model: nn.Module, sequences, images: RequestImages) -> None:
    """Each row holds exactly as many image pad tokens as its images have features (and no video pads: videos
    are not read). A mismatch fails this request alone, not the forward of every request batched with it."""
    ids, lengths = sequences.input_ids, sequences.lengths
    owner = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    found = torch.zeros(lengths.numel(), dtype=torch.int64).index_add_(
        0, owner, (ids == model.image_token_id).long())
    video = getattr(model, "video_token_id", None)
    if video is not None and bool((ids == video).any()):
        raise InvalidRequest("the prompt holds video pad tokens; video inputs are not served")
    expected = torch.zeros(lengths.numel(), dtype=torch.int64)
    if images.grid_thw.numel():
        image_owner = torch.repeat_interleave(torch.arange(lengths.numel()), images.images_per_row)
        expected.index_add_(0, image_owner, model.image_tokens(images.grid_thw).long())
    wrong = (found != expected).nonzero().flatten()
    if wrong.numel():
        row = int(wrong[0])
        raise InvalidRequest(f"row {row} holds {int(found[row])} image pad tokens where its images need "
                             f"{int(expected[row])}")


@dataclass(frozen=True)
class BatchImages:
    """The images of a packed batch, in sequence order."""

    pixel_values: torch.Tensor
    grid_thw: torch.Tensor
    images_per_row: torch.Tensor

    @classmethod
    def concat(cls, requests: list[RequestImages]) -> BatchImages:
        dims = {r.pixel_values.shape[1] for r in requests if r.pixel_values.numel()}
        if len(dims) > 1:
            raise InvalidRequest(f"pixel_values patch sizes differ between requests: {sorted(dims)}")
        dim = dims.pop() if dims else 0
        pixels = [r.pixel_values.reshape(-1, dim) if dim else r.pixel_values.reshape(0, 0) for r in requests]
        return cls(torch.cat(pixels) if dim else torch.zeros(0, 0), torch.cat([r.grid_thw for r in requests]),
                   torch.cat([r.images_per_row for r in requests]))

    def rows(self, first: int, last: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Pixels and grids of sequences [first, last) (None, None without images)."""
        image_starts = torch.zeros(self.images_per_row.numel() + 1, dtype=torch.int64)
        torch.cumsum(self.images_per_row, 0, out=image_starts[1:])
        a, b = int(image_starts[first]), int(image_starts[last])
        if a == b:
            return None, None
        patch_starts = torch.zeros(self.grid_thw.shape[0] + 1, dtype=torch.int64)
        torch.cumsum(self.grid_thw.prod(dim=1), 0, out=patch_starts[1:])
        return self.pixel_values[int(patch_starts[a]):int(patch_starts[b])], self.grid_thw[a:b]

