"""vLLM's ``/tokenize`` and ``/detokenize``.

Neither may stall the event loop, whatever its size: a prompt of ~16 MiB (the body limit) takes
seconds to tokenize and its millions of ids take a while to check, decode and write as JSON. Above
:data:`~poolserve_adapter.tokenization.OFF_LOOP_ABOVE` characters or ids, all of that runs in a
worker thread, through the backend's GIL-releasing batch calls, and the JSON is rendered there too:
the route returns the bytes. ``ADAPTER_MAX_TOKENS_PER_REQUEST`` bounds the ids of both (a 400).
"""

from __future__ import annotations

from fastapi import APIRouter, Body, Depends
from fastapi.responses import Response

from poolserve_adapter.base.dependencies import RegistryDep, SettingsDep
from poolserve_adapter.base.protocol import ERROR_RESPONSES, require_json
from poolserve_adapter.errors import BadRequestError
from poolserve_adapter.tokenization import UNTRUSTED_CHAT_TEMPLATE, check_request_tokens, run_sized
from poolserve_adapter.tokenize.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
)
from poolserve_adapter.tokenize.serving import detokenize_json, resolve_for_tokenizer, tokenize_json

router = APIRouter(tags=["tokenize"])


@router.post("/tokenize", response_model=TokenizeResponse, responses=ERROR_RESPONSES,
             dependencies=[Depends(require_json)], summary="Tokenize a prompt or a chat (vLLM)")
async def tokenize(registry: RegistryDep, settings: SettingsDep,
                   body: TokenizeCompletionRequest | TokenizeChatRequest = Body(...)) -> Response:
    model = resolve_for_tokenizer(registry, body.model)
    if isinstance(body, TokenizeChatRequest):
        if body.chat_template:
            raise BadRequestError(UNTRUSTED_CHAT_TEMPLATE)
        prompt = await model.encoder.render_chat_async(
            body.messages, add_generation_prompt=body.add_generation_prompt,
            continue_final_message=body.continue_final_message, chat_template_kwargs=body.chat_template_kwargs)
        param = "messages"
    else:
        prompt, param = body.prompt, "prompt"
    ids_json = await run_sized(model.encoder.work_size(len(prompt)), tokenize_json, model, prompt,
                               body.add_special_tokens, body.return_token_strs, settings.max_tokens_per_request, param)
    return Response(ids_json, media_type="application/json")


@router.post("/detokenize", response_model=DetokenizeResponse, responses=ERROR_RESPONSES,
             dependencies=[Depends(require_json)], summary="Token ids back to text (vLLM)")
async def detokenize(body: DetokenizeRequest, registry: RegistryDep, settings: SettingsDep) -> Response:
    model = resolve_for_tokenizer(registry, body.model)
    check_request_tokens(len(body.tokens), settings.max_tokens_per_request, param="tokens")
    text_json = await run_sized(len(body.tokens), detokenize_json, model, body.tokens)
    return Response(text_json, media_type="application/json")
