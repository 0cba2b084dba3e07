"""vLLM's ``/tokenize`` and ``/detokenize`` work: the model by name (an unknown one named with the valid
aliases), and the JSON of the answer, rendered where the work ran (in a worker thread when large)."""

from __future__ import annotations

import orjson

from poolserve_adapter.errors import NotFoundError
from poolserve_adapter.registry import ModelRegistry, ServedModel


def resolve_for_tokenizer(registry: ModelRegistry, name: str | None) -> ServedModel:
    """vLLM's tokenize routes name the valid aliases when the model is unknown."""
    try:
        return registry.resolve(name, capability="can_tokenize")
    except NotFoundError:
        aliases = ", ".join(model.name for model in registry)
        raise NotFoundError(f"The model `{name}` does not exist. Valid aliases: {aliases}", param="model") from None


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
