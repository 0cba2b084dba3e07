from fastapi import APIRouter, Body, Depends

from poolserve_adapter.common.protocol import ERROR_RESPONSES, require_json
from poolserve_adapter.dependencies import RegistryDep
from poolserve_adapter.errors import BadRequestError, NotFoundError
from poolserve_adapter.registry import ModelRegistry, ServedModel
from poolserve_adapter.tokenization import UNTRUSTED_CHAT_TEMPLATE
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


@router.post("/tokenize", response_model=TokenizeResponse, responses=ERROR_RESPONSES,
             dependencies=[Depends(require_json)], summary="Tokenize a prompt or a chat (vLLM)")
async def tokenize(registry: RegistryDep,
                   body: TokenizeCompletionRequest | TokenizeChatRequest = Body(...)) -> TokenizeResponse:
    model = resolve_for_tokenizer(registry, body.model)
    if isinstance(body, TokenizeChatRequest):
        if body.chat_template:
            raise BadRequestError(UNTRUSTED_CHAT_TEMPLATE)
        prompt = await model.encoder.render_chat_async(
            body.messages, add_generation_prompt=body.add_generation_prompt,
            continue_final_message=body.continue_final_message, chat_template_kwargs=body.chat_template_kwargs)
    else:
        prompt = body.prompt
    ids = model.encoder.count_tokens(prompt, body.add_special_tokens)
    return TokenizeResponse(count=len(ids), max_model_len=model.max_model_len, tokens=ids,
                            token_strs=model.encoder.token_strings(ids) if body.return_token_strs else None)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=ERROR_RESPONSES,
             dependencies=[Depends(require_json)], summary="Token ids back to text (vLLM)")
async def detokenize(body: DetokenizeRequest, registry: RegistryDep) -> DetokenizeResponse:
    model = resolve_for_tokenizer(registry, body.model)
    model.encoder.check_vocabulary([body.tokens], param="tokens")
    return DetokenizeResponse(prompt=model.encoder.decode(body.tokens))
