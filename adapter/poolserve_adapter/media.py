"""Images from request URLs: ``data:`` URLs always, http(s) only from allowed domains, with limits.

Remote fetching is off until ``ADAPTER_ALLOWED_MEDIA_DOMAINS`` names hosts: a server that fetches any
URL it is sent can be pointed at internal services (SSRF). When on, every hop of a redirect must be
an allowed host too, the download is bounded in bytes and in wall time, and the decoded image in
pixels. Every failure is a 400 with vLLM's wording where vLLM has one
(``vllm/multimodal/media/connector.py``); vLLM answers some of them 422/500/501, this server 400.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import time
from urllib.parse import urljoin, urlsplit

import httpx

from poolserve_adapter.errors import BadRequestError
from poolserve_adapter.settings import Settings


class MediaLoader:
    def __init__(self, settings: Settings, client: httpx.AsyncClient | None = None):
        self.allowed_domains = {domain.lower() for domain in settings.allowed_media_domains}
        self.timeout_s = settings.media_fetch_timeout_s
        self.max_redirects = settings.media_max_redirects
        self.max_bytes = settings.max_image_bytes
        self.max_pixels = settings.max_image_pixels
        self._client = client

    async def image(self, url: str, param: str = "image_url"):
        """The decoded RGB image behind ``url``."""
        if not isinstance(url, str) or not url:
            raise BadRequestError("image_url.url must be a non-empty string", param=param)
        scheme = urlsplit(url).scheme.lower()
        if scheme == "data":
            data = self._decode_data_url(url)
        elif scheme in ("http", "https"):
            data = await self._fetch(url)
        else:
            raise BadRequestError("The URL must be either a HTTP or data URL.", param=param)
        return await asyncio.to_thread(self._open, data)

    def _decode_data_url(self, url: str) -> bytes:
        header, comma, payload = url[5:].partition(",")
        if not comma:
            raise BadRequestError(f"Invalid data URL {url[:32]!r}: missing ',' separator.", param="image_url")
        if not header.endswith(";base64"):
            raise BadRequestError("Only base64 data URLs are supported for now.", param="image_url")
        if len(payload) > (self.max_bytes + 2) // 3 * 4 + 4:
            raise BadRequestError(f"The image is larger than the maximum of {self.max_bytes} bytes "
                                  "(ADAPTER_MAX_IMAGE_BYTES).", param="image_url")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as error:
            raise BadRequestError(f"Invalid base64 in the data URL: {error}", param="image_url") from None

    def _check_host(self, url: str) -> None:
        host = (urlsplit(url).hostname or "").lower()
        if not self.allowed_domains:
            raise BadRequestError(
                "Fetching images by URL is disabled on this server: send the image as a data: URL, or start the "
                "server with ADAPTER_ALLOWED_MEDIA_DOMAINS naming the hosts to fetch from.", param="image_url")
        if host not in self.allowed_domains:
            raise BadRequestError(
                f"The URL must be from one of the allowed domains: {sorted(self.allowed_domains)}. "
                f"Input URL domain: {host}", param="image_url")

    async def _fetch(self, url: str) -> bytes:
        self._check_host(url)
        deadline = time.monotonic() + self.timeout_s
        client = self._client or httpx.AsyncClient()
        try:
            for _ in range(self.max_redirects + 1):
                try:
                    return await asyncio.wait_for(self._download(client, url), max(deadline - time.monotonic(), 0))
                except _Redirect as redirect:
                    url = urljoin(url, redirect.location)
                    if urlsplit(url).scheme.lower() not in ("http", "https"):
                        raise BadRequestError("Failed to fetch media from URL: redirect to a non-HTTP URL",
                                              param="image_url") from None
                    self._check_host(url)
                except asyncio.TimeoutError:
                    raise BadRequestError(f"Failed to fetch media from URL: no complete answer within "
                                          f"{self.timeout_s:g} s (ADAPTER_MEDIA_FETCH_TIMEOUT_S)",
                                          param="image_url") from None
                except (httpx.HTTPError, httpx.InvalidURL) as error:  # InvalidURL is no HTTPError
                    raise BadRequestError(f"Failed to fetch media from URL: {type(error).__name__}",
                                          param="image_url") from None
            raise BadRequestError(f"Failed to fetch media from URL: more than {self.max_redirects} redirects "
                                  "(ADAPTER_MEDIA_MAX_REDIRECTS)", param="image_url")
        finally:
            if self._client is None:
                await client.aclose()

    async def _download(self, client: httpx.AsyncClient, url: str) -> bytes:
        async with client.stream("GET", url, follow_redirects=False) as response:
            if response.is_redirect:
                raise _Redirect(response.headers.get("location", ""))
            if response.status_code >= 400:
                raise BadRequestError(f"Failed to fetch media from URL: HTTP {response.status_code} error",
                                      param="image_url")
            declared = int(response.headers.get("content-length") or 0)
            if declared > self.max_bytes:
                raise self._too_big()
            chunks, size = [], 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > self.max_bytes:
                    raise self._too_big()
                chunks.append(chunk)
            return b"".join(chunks)

    def _too_big(self) -> BadRequestError:
        return BadRequestError(f"Failed to fetch media from URL: the image is larger than the maximum of "
                               f"{self.max_bytes} bytes (ADAPTER_MAX_IMAGE_BYTES)", param="image_url")

    def _open(self, data: bytes):
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > self.max_pixels:
                    raise BadRequestError(
                        f"Image dimensions {width}x{height} ({width * height} pixels) exceed the maximum of "
                        f"{self.max_pixels} pixels (ADAPTER_MAX_IMAGE_PIXELS).", param="image_url")
                image.load()
                return _to_rgb(image)
        except BadRequestError:
            raise
        except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as error:
            raise BadRequestError(f"Failed to load image: {type(error).__name__}: cannot identify or decode the "
                                  "image data", param="image_url") from None


def _to_rgb(image):
    """RGB as vLLM's ``convert_image_mode``: transparency composited on white, not dropped to black."""
    from PIL import Image

    if image.mode == "RGB":
        return image.copy()
    if image.mode in ("RGBA", "LA", "P") and ("transparency" in image.info or image.mode != "P"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


class _Redirect(Exception):
    def __init__(self, location: str):
        super().__init__(location)
        self.location = location
