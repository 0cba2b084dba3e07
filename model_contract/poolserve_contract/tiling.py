"""LlamaNemotronVL's image tiling (upstream's ``dynamic_preprocess``) as an image processor, in numpy.

Images are cut into tiles: the grid (i x j, min..max tiles) whose aspect ratio fits best (upstream's
area-aware rule), the image resized to it (bicubic) and cropped row by row, plus a thumbnail of the
whole image when there is more than one tile; each tile normalised with mean = std = 0.5.
:class:`TilingImageProcessor` returns them as ``pixel_values`` ``[tiles, 3 * S * S]`` and one
``image_grid_thw`` row ``(1, 1, tiles)`` per image (the shared vision wire contract: an image's rows
are the product of its grid). The adapter runs it without torch.
"""

from __future__ import annotations

import numpy as np


def tile_grid(width: int, height: int, size: int, min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """(columns, rows) of the tiling, upstream's area-aware best-ratio rule."""
    aspect = width / height
    ratios = sorted({(i, j) for n in range(min_tiles, max_tiles + 1) for i in range(1, n + 1)
                     for j in range(1, n + 1) if min_tiles <= i * j <= max_tiles}, key=lambda r: r[0] * r[1])
    best, best_factor = (1, 1), -1.0
    for columns, rows in ratios:
        ratio = columns / rows
        factor = min(columns * rows * size * size / (width * height), 0.6) * min(ratio / aspect, aspect / ratio)
        if factor > best_factor:
            best, best_factor = (columns, rows), factor
    return best


class TilingImageProcessor:
    """Upstream's tiling and normalisation as an image processor (``pixel_values``, ``image_grid_thw``)."""

    def __init__(self, size: int, min_tiles: int, max_tiles: int, use_thumbnail: bool = True,
                 tokens_per_tile: int = 256):
        self.size, self.min_tiles, self.max_tiles, self.use_thumbnail = size, min_tiles, max_tiles, use_thumbnail
        self.tokens_per_tile = tokens_per_tile

    def tiles(self, image) -> list:
        from PIL import Image

        columns, rows = tile_grid(image.width, image.height, self.size, self.min_tiles, self.max_tiles)
        resized = image.resize((self.size * columns, self.size * rows), Image.BICUBIC)
        tiles = [resized.crop((c * self.size, r * self.size, (c + 1) * self.size, (r + 1) * self.size))
                 for r in range(rows) for c in range(columns)]
        if self.use_thumbnail and len(tiles) != 1:
            tiles.append(image.resize((self.size, self.size), Image.BICUBIC))
        return tiles

    def __call__(self, images, return_tensors: str = "np") -> dict:
        """``pixel_values`` and ``image_grid_thw`` as numpy arrays (``return_tensors`` other than "np" is
        the runtime's: :class:`poolserve_runtime.native.llama_nemotron_vl.TorchTilingImageProcessor`)."""
        from PIL import Image

        arrays, grids = [], []
        for image in images:
            tiles = self.tiles(image.convert("RGB"))
            for tile in tiles:
                if tile.size != (self.size, self.size):
                    tile = tile.resize((self.size, self.size), Image.BICUBIC)
                pixels = (np.asarray(tile, dtype=np.float32) / 255.0 - 0.5) / 0.5  # [S, S, 3]
                arrays.append(pixels.transpose(2, 0, 1).reshape(-1))
            grids.append((1, 1, len(tiles)))
        pixel_values = np.stack(arrays) if arrays else np.zeros((0, 3 * self.size * self.size), np.float32)
        if return_tensors != "np":
            raise ValueError(f"return_tensors {return_tensors!r}: this processor returns numpy arrays")
        return {"pixel_values": pixel_values, "image_grid_thw": np.array(grids, dtype=np.int64).reshape(-1, 3)}


def tiles_processor_for(config: dict) -> TilingImageProcessor:
    """The processor a LlamaNemotronVL config.json describes (tile size, tile counts, tokens per tile)."""
    vision = config["vision_config"]
    size = int(config.get("force_image_size") or vision.get("image_size", 512))
    ratio = float(config.get("downsample_ratio", 0.5))
    tokens = int((size // int(vision.get("patch_size", 16))) ** 2 * ratio * ratio)
    max_tiles = int(config.get("max_dynamic_patch", 6)) if config.get("dynamic_image_size", True) else 1
    return TilingImageProcessor(size, int(config.get("min_dynamic_patch", 1)), max_tiles,
                                bool(config.get("use_thumbnail", True)), tokens)
