"""vLLM's ``/tokenize`` and ``/detokenize``.

Neither may stall the event loop, whatever its size: a prompt of ~16 MiB (the body limit) takes
seconds to tokenize and its millions of ids take a while to check, decode and write as JSON. Above
:data:`~poolserve_adapter.tokenization.OFF_LOOP_ABOVE` characters or ids, all of that runs in a
worker thread, through the backend's GIL-releasing batch calls, and the JSON is rendered there too:
the route returns the bytes. ``ADAPTER_MAX_TOKENS_PER_REQUEST`` bounds the ids of both (a 400).
"""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Body, Depends
from fastapi.responses import Response

from poolserve_adapter.common.protocol import ERROR_RESPONSES, require_json
from poolserve_adapter.dependencies import RegistryDep, SettingsDep
from poolserve_adapter.errors import BadRequestError, NotFoundError
from poolserve_adapter.registry import ModelRegistry, ServedModel
from poolserve_adapter.tokenization import UNTRUSTED_CHAT_TEMPLATE, check_request_tokens, run_sized
from poolserve_adapter.tokenize.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
)

router = APIRouter(tags=["tokenize"])


def resolve_for_tokenizer(registry: ModelRegistry, name: str | None) -> ServedModel:
    """vLLM's tokenize routes name the valid aliases when the model is unknown."""
    try:
        return registry.resolve(name, capability="can_tokenize")
    except NotFoundError:
        aliases = ", ".join(model.name for model in registry)
        raise NotFoundError(f"The model `{name}` does not exist. Valid aliases: {aliases}", param="model") from None


def json_response(body: bytes) -> Response:
    return Response(body, media_type="application/json")


def tokenize_json(model: ServedModel, prompt: str, add_special_tokens: bool, return_token_strs: bool,
                  max_tokens: int, param: str) -> bytes:
    """The ``TokenizeResponse`` of one prompt as JSON bytes (in a worker thread for a large prompt)."""
    ids = model.encoder.tokenize([prompt], add_special_tokens, max_tokens, param)[0]
    # The fields in TokenizeResponse's order, as FastAPI would have written the model.
    return orjson.dumps({"count": len(ids), "max_model_len": model.max_model_len, "tokens": ids,
                         "token_strs": model.encoder.token_strings(ids) if return_token_strs else None})


def detokenize_json(model: ServedModel, tokens: list[int]) -> bytes:
    model.encoder.check_vocabulary([tokens], param="tokens")
    return orjson.dumps({"prompt": model.encoder.decode(tokens)})


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
    return json_response(await run_sized(model.encoder.work_size(len(prompt)), tokenize_json, model, prompt,
                                         body.add_special_tokens, body.return_token_strs,
                                         settings.max_tokens_per_request, param))


@router.post("/detokenize", response_model=DetokenizeResponse, responses=ERROR_RESPONSES,
             dependencies=[Depends(require_json)], summary="Token ids back to text (vLLM)")
async def detokenize(body: DetokenizeRequest, registry: RegistryDep, settings: SettingsDep) -> Response:
    model = resolve_for_tokenizer(registry, body.model)
    check_request_tokens(len(body.tokens), settings.max_tokens_per_request, param="tokens")
    return json_response(await run_sized(len(body.tokens), detokenize_json, model, body.tokens))
