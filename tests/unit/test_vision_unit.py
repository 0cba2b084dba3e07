"""Vision-language plumbing without a server: the wire contract both ways, content parts, tiling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from poolserve_adapter.errors import BadRequestError
from poolserve_adapter.multimodal import parse_item, parse_parts
from poolserve_adapter.tokenization import VisionArrays
from poolserve_contract.tiling import TilingImageProcessor, tile_grid
from poolserve_runtime.native.llama_nemotron_vl import pixel_shuffle
from poolserve_runtime.packing import InvalidRequest
from poolserve_runtime.vision import BatchImages, read_images


def test_adapter_rows_and_model_reading_round_trip():
    """Rows padded by the adapter (VisionArrays.rows) unpad on the model side to the same patches, in order."""
    grids = np.array([[1, 2, 2], [1, 2, 4], [1, 4, 2]], dtype=np.int64)  # 4, 8, 8 patches
    pixels = np.arange(20 * 3, dtype=np.float32).reshape(20, 3)
    arrays = VisionArrays(pixels, grids, np.array([1, 0, 2], dtype=np.int64))
    rows = np.array([0, 2])
    padded, padded_grids = arrays.rows(rows)
    assert padded.shape == (2, 16, 3) and padded_grids.shape == (2, 2, 3)
    assert not padded[0, 4:].any() and not padded_grids[0, 1].any()
    images = read_images(torch.from_numpy(padded), torch.from_numpy(padded_grids), rows=2)
    assert images.images_per_row.tolist() == [1, 2]
    np.testing.assert_array_equal(images.pixel_values.numpy(), pixels[[*range(4), *range(4, 20)]])
    batch = BatchImages.concat([images])
    first, first_grids = batch.rows(0, 1)
    second, second_grids = batch.rows(1, 2)
    assert first.shape[0] == 4 and second.shape[0] == 16 and second_grids.tolist() == grids[1:].tolist()


@pytest.mark.parametrize("pixels, grids, message", [
    (torch.zeros(1, 4, 3), None, "go together"),
    (torch.zeros(1, 4, 3, dtype=torch.float64), torch.ones(1, 1, 3, dtype=torch.int64), "FP32"),
    (torch.zeros(2, 4, 3), torch.ones(1, 1, 3, dtype=torch.int64), "rows=1"),
    (torch.zeros(1, 4, 3), torch.tensor([[[1, 4, 4]]]), "names 16 patches"),
    (torch.zeros(1, 4, 3), torch.tensor([[[0, 0, 0], [1, 2, 2]]]), "images first"),
    (torch.zeros(1, 4, 3), torch.tensor([[[-1, 2, 2]]]), "negative"),
])
def test_bad_pixel_inputs_are_the_request_s_own_error(pixels, grids, message):
    with pytest.raises(InvalidRequest, match=message):
        read_images(pixels, grids, rows=1)


def test_content_parts_become_vllm_s_string_form():
    side = parse_item({"content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "u1"}},
                                   "b", {"image_url": {"url": "u2"}}]})
    assert side.texts == ("a", "b") and side.image_urls == ("u1", "u2")
    assert side.prompt(3) == "\x00image3\x00\x00image4\x00a\nb"  # placeholders first, texts joined by newlines
    for parts, message in (([{"type": "video_url", "video_url": {"url": "x"}}], "not served"),
                           ([{"text": "no type"}], "Missing 'type'"),
                           ([{"type": "audio_url"}], "Unsupported content part type"),
                           ([{"type": "image_url", "image_url": {}}], "image_url.url")):
        with pytest.raises(BadRequestError, match=message):
            parse_parts(parts)


def test_tiling_picks_upstream_s_grid_and_adds_a_thumbnail():
    assert tile_grid(1024, 512, 512, 1, 6) == (2, 1)
    assert tile_grid(500, 500, 512, 1, 6) == (1, 1)
    assert tile_grid(2000, 400, 512, 1, 6) == (5, 1)
    from tests.support.tiny_vision import make_image

    processed = TilingImageProcessor(32, 1, 4)([make_image(64, 32), make_image(20, 20)])
    assert processed["image_grid_thw"].tolist() == [[1, 1, 3], [1, 1, 1]]  # 2 tiles + thumbnail; 1 tile
    assert processed["pixel_values"].shape == (4, 3 * 32 * 32)
    assert processed["pixel_values"].min() >= -1 and processed["pixel_values"].max() <= 1


def test_pixel_shuffle_moves_2x2_neighbours_into_channels():
    x = torch.arange(16, dtype=torch.float32).reshape(1, 4, 4, 1)
    out = pixel_shuffle(x, 0.5)
    assert out.shape == (1, 2, 2, 4)
    assert sorted(out[0, 0, 0].tolist()) == [0.0, 1.0, 4.0, 5.0]  # one 2x2 block per output position
