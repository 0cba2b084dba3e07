"""Prompts of the completion form (``input``) and the chat form (``messages``) → token ids, by vLLM's
rules: shared by ``/classify``, ``/pooling`` and ``/invocations``."""

from __future__ import annotations

from poolserve_adapter.base.protocol import ChatRequest, CompletionRequest
from poolserve_adapter.errors import BadRequestError
from poolserve_adapter.media import MediaLoader
from poolserve_adapter.multimodal import check_image_count, load_images, parse_parts
from poolserve_adapter.registry import ServedModel
from poolserve_adapter.settings import Settings
from poolserve_adapter.tokenization import UNTRUSTED_CHAT_TEMPLATE, Encoded, PromptOptions


def chat_with_image_markers(messages: list[dict]) -> tuple[list[dict], list[str]]:
    """Messages whose content lists hold images → string contents in vLLM's form (one marker per image
    first, then the texts joined by newlines), and the image URLs in marker order. Messages without
    images are left as they are."""
    rendered, urls = [], []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str) and "\x00" in content:  # NUL delimits the image markers: no text poses as one
            message = {**message, "content": content.replace("\x00", "")}
        if not isinstance(content, list) or not any(
                isinstance(part, dict) and (part.get("type") not in (None, "text") or "image_url" in part)
                for part in content):
            rendered.append(message)
            continue
        side = parse_parts(content, param="messages")
        rendered.append({**message, "content": side.prompt(len(urls))})
        urls.extend(side.image_urls)
    return rendered, urls


async def encode_prompts(model: ServedModel, request: CompletionRequest | ChatRequest, options: PromptOptions,
                         settings: Settings) -> Encoded:
    """vLLM's prompt rules: a chat renders to one prompt; ``input`` is str | list[str] | list[int] |
    list[list[int]] (one non-empty list of ints is one prompt)."""
    thread_above = settings.tokenize_in_thread_above
    if isinstance(request, ChatRequest):
        if request.chat_template:
            raise BadRequestError(UNTRUSTED_CHAT_TEMPLATE)
        messages, urls = chat_with_image_markers(request.messages)
        if urls and model.vision is None:
            raise BadRequestError(f"{model.name} is not a multimodal model")
        prompt = await model.encoder.render_chat_async(
            messages,
            add_generation_prompt=request.add_generation_prompt,
            continue_final_message=request.continue_final_message,
            chat_template_kwargs=request.chat_template_kwargs,
        )
        if model.vision is not None and urls:
            check_image_count(len(urls), settings.max_images_per_prompt)
            ordered = [urls[i] for i in model.vision.image_order(prompt)]
            loaded = await load_images(MediaLoader(settings), ordered)
            return await model.vision.encode([prompt], [[loaded[url] for url in ordered]], options, thread_above,
                                             settings.max_pixel_bytes_per_request)
        return await model.encoder.encode_async([prompt], None, thread_above, options)
    value = request.input
    if isinstance(value, str):
        return await model.encoder.encode_async([value], None, thread_above, options)
    if not value:
        raise BadRequestError("You must pass at least one prompt")
    if isinstance(value[0], int):
        return model.encoder.check_token_ids([value], options)
    if isinstance(value[0], str):
        return await model.encoder.encode_async(list(value), None, thread_above, options)
    return model.encoder.check_token_ids(value, options)
