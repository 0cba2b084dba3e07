"""Content parts (text, images) → prompts with image placeholders → token ids + pixels for Triton.

vLLM's rules (``vllm/entrypoints/pooling/scoring/utils.py``, ``chat_utils``): a multimodal item is
``{"content": [parts]}``; each part is ``text`` or ``image_url`` (``video_url`` and ``image_embeds``
are vLLM's too, not served here: a 400 says so). An item becomes one string: one placeholder per
image first, then its texts joined by newlines. The checkpoint's own image processor
(``preprocessor_config.json``: resizing, patching) makes the pixels, and each placeholder's pad token
is repeated once per merged patch, as the checkpoint's processor expands it.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass

import numpy as np

from poolserve_adapter.errors import BadRequestError
from poolserve_adapter.media import MediaLoader
from poolserve_adapter.tokenization import DEFAULT_OPTIONS, Encoded, PromptOptions, TextEncoder, VisionArrays
from poolserve_contract.families import VisionDeclaration

_MARKER = "\x00image{}\x00"  # stands for an image while a prompt is rendered: its order is read back after
_MARKER_PATTERN = re.compile("\x00image(\\d+)\x00")
PART_TYPES = ("text", "image_url")


@dataclass(frozen=True)
class Side:
    """One query or document: its text and its image URLs, in order."""

    texts: tuple[str, ...]
    image_urls: tuple[str, ...]

    def prompt(self, first_image: int) -> str:
        """vLLM's string form with numbered markers for the images (placeholders first)."""
        markers = "".join(_MARKER.format(first_image + i) for i in range(len(self.image_urls)))
        return markers + "\n".join(self.texts)


def is_multimodal(item) -> bool:
    return not isinstance(item, str)


def _text(text: str) -> str:
    """NUL characters dropped: they delimit the image markers, and a text must not pose as an image."""
    return text.replace("\x00", "")


def parse_parts(parts, param: str = "content") -> Side:
    texts, urls = [], []
    for part in parts:
        if isinstance(part, str):
            texts.append(_text(part))
            continue
        if not isinstance(part, dict):
            raise BadRequestError(f"Each {param} part must be an object with a `type`", param=param)
        kind = part.get("type") or ("image_url" if "image_url" in part else None)
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise BadRequestError("A text part needs `text`, a string", param=param)
            texts.append(_text(part["text"]))
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str) or not url:
                raise BadRequestError("An image_url part needs `image_url.url`, a string", param="image_url")
            urls.append(url)
        elif kind in ("video_url", "image_embeds"):
            raise BadRequestError(f"{kind} parts are not served by this server (images are: type image_url)",
                                  param=kind)
        elif kind is None:
            raise BadRequestError("Missing 'type' field in multimodal part.", param="type")
        else:
            raise BadRequestError(f"Unsupported content part type: {kind!r}. Supported types: "
                                  f"{', '.join(PART_TYPES)}", param=param)
    return Side(tuple(texts), tuple(urls))


def parse_item(item) -> Side:
    """A score/rerank item: a string, or ``{"content": [parts]}``."""
    if isinstance(item, str):
        return Side((_text(item),), ())
    content = item.get("content") if isinstance(item, dict) else getattr(item, "content", None)
    if not isinstance(content, list):
        raise BadRequestError("A multimodal item is {\"content\": [parts]}", param="content")
    return parse_parts(content)


class VisionPrompter:
    """A vision-language model's preprocessing: its image processor, placeholders and token rules (the
    family's declaration, :class:`poolserve_contract.families.VisionDeclaration`)."""

    def __init__(self, family: VisionDeclaration, checkpoint: str, encoder: TextEncoder, image_token_id: int):
        self.family = family
        self.encoder = encoder
        self.image_processor = family.image_processor(checkpoint)
        self.image_token_id = image_token_id

    def expand(self, text: str, grids: np.ndarray) -> str:
        """The k-th image marker → the k-th image's expanded placeholder."""
        counter = iter(range(len(grids)))
        return _MARKER_PATTERN.sub(lambda _: self.family.image_text(grids[next(counter)], self.image_processor), text)

    @staticmethod
    def image_order(prompt: str) -> list[int]:
        """Which images a rendered prompt holds, in the order it holds them (a template may reorder sides)."""
        return [int(index) for index in _MARKER_PATTERN.findall(prompt)]

    async def encode(self, prompts: list[str], images: list[list], options: PromptOptions = DEFAULT_OPTIONS,
                     thread_above: int = 8, max_pixel_bytes: int | None = None) -> Encoded:
        """``prompts`` hold one marker per image of ``images`` (per row, in the order of the markers)."""
        flat = [image for row in images for image in row]
        if flat:
            processed = await asyncio.to_thread(self.image_processor, images=flat, return_tensors="np")
            pixel_values = np.ascontiguousarray(processed["pixel_values"], dtype=np.float32)
            grids = np.asarray(processed["image_grid_thw"], dtype=np.int64)
            if max_pixel_bytes is not None and pixel_values.nbytes > max_pixel_bytes:
                raise BadRequestError(
                    f"The request's images make {pixel_values.nbytes} bytes of pixel values after preprocessing, more "
                    f"than the maximum of {max_pixel_bytes} (ADAPTER_MAX_PIXEL_BYTES_PER_REQUEST): send fewer or "
                    "smaller images", param="image_url")
        else:
            pixel_values, grids = np.zeros((0, 0), np.float32), np.zeros((0, 3), np.int64)
        per_row = np.array([len(row) for row in images], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(per_row)])
        texts = [self.expand(prompt, grids[starts[i]:starts[i + 1]]) if per_row[i] else prompt
                 for i, prompt in enumerate(prompts)]
        encoded = await self.encoder.encode_async(texts, None, thread_above, options)
        if self.family.score_token_id is not None:
            encoded = _appended(encoded, self.family.score_token_id)
        expected = np.array([sum(self.family.image_text(grid, self.image_processor).count(self.family.image_pad_token)
                                 for grid in grids[starts[i]:starts[i + 1]]) for i in range(len(prompts))],
                            dtype=np.int64)
        found = (encoded.input_ids == self.image_token_id).sum(axis=1)
        if not np.array_equal(found, expected):
            row = int(np.nonzero(found != expected)[0][0])
            raise BadRequestError(
                f"Prompt {row} holds {int(found[row])} image tokens where its images need {int(expected[row])}: "
                "the text may not contain image placeholders itself, and truncation may not cut into an image")
        return Encoded(encoded.input_ids, encoded.lengths, encoded.token_type_ids,
                       VisionArrays(pixel_values, grids, per_row) if flat else None)


def _appended(encoded: Encoded, token: int) -> Encoded:
    """Every row with ``token`` appended (jina-reranker-m0's score token, as vLLM's post_process_tokens)."""
    rows, width = encoded.input_ids.shape
    ids = np.zeros((rows, width + 1), dtype=np.int64)
    ids[:, :width] = encoded.input_ids
    ids[np.arange(rows), encoded.lengths] = token
    return Encoded(ids, encoded.lengths + 1, None)


async def load_images(loader: MediaLoader, urls: list[str]) -> dict[str, object]:
    """Every distinct URL once (a 1:N rerank's query image is read once), concurrently."""
    distinct = list(dict.fromkeys(urls))
    images = await asyncio.gather(*(loader.image(url) for url in distinct))
    return dict(zip(distinct, images))


def check_image_count(count: int, limit: int) -> None:
    if count > limit:
        raise BadRequestError(f"At most {limit} image(s) may be provided in one prompt.", param="image")
