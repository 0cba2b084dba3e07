from fastapi import APIRouter, Body, Depends

from adapter.common.protocol import ERROR_RESPONSES, require_json
from adapter.dependencies import RegistryDep
from adapter.errors import BadRequestError
from adapter.tokenize.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
)

router = APIRouter(tags=["tokenize"])


@router.post("/tokenize", response_model=TokenizeResponse, responses=ERROR_RESPONSES,
             dependencies=[Depends(require_json)], summary="Tokenize a prompt or a chat (vLLM)")
async def tokenize(registry: RegistryDep,
                   body: TokenizeCompletionRequest | TokenizeChatRequest = Body(...)) -> TokenizeResponse:
    model = registry.resolve(body.model, capability="can_tokenize")
    if isinstance(body, TokenizeChatRequest):
        prompt = model.encoder.render_chat(body.messages, add_generation_prompt=body.add_generation_prompt,
                                           continue_final_message=body.continue_final_message,
                                           chat_template_kwargs=body.chat_template_kwargs)
    else:
        prompt = body.prompt
    ids = model.encoder.count_tokens(prompt, body.add_special_tokens)
    return TokenizeResponse(count=len(ids), max_model_len=model.max_model_len, tokens=ids,
                            token_strs=model.encoder.token_strings(ids) if body.return_token_strs else None)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=ERROR_RESPONSES,
             dependencies=[Depends(require_json)], summary="Token ids back to text (vLLM)")
async def detokenize(body: DetokenizeRequest, registry: RegistryDep) -> DetokenizeResponse:
    model = registry.resolve(body.model, capability="can_tokenize")
    for token in body.tokens:
        if not 0 <= token < model.encoder.vocab_size:
            raise BadRequestError(f"Token id {token} is out of vocabulary", param="tokens")
    return DetokenizeResponse(prompt=model.encoder.decode(body.tokens))
