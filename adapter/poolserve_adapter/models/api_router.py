"""``GET /v1/models`` and ``GET /v1/models/{model}``: the served models (vLLM / OpenAI, SGLang)."""

from fastapi import APIRouter

from poolserve_adapter.base.dependencies import RegistryDep
from poolserve_adapter.errors import NotFoundError
from poolserve_adapter.models.protocol import ModelCard, ModelList
from poolserve_adapter.registry import ServedModel

router = APIRouter(tags=["models"])


def card(model: ServedModel) -> ModelCard:
    return ModelCard(id=model.name, created=model.created, root=model.checkpoint, max_model_len=model.max_model_len)


@router.get("/v1/models", response_model=ModelList, summary="Served models (vLLM / OpenAI)")
async def list_models(registry: RegistryDep) -> ModelList:
    return ModelList(data=[card(model) for model in registry])


@router.get("/v1/models/{model:path}", response_model=ModelCard, summary="One served model (SGLang / OpenAI)",
            responses={404: {"description": "Not a served model"}})
async def retrieve_model(model: str, registry: RegistryDep) -> ModelCard:
    for served in registry:
        if served.name == model:
            return card(served)
    raise NotFoundError(f"The model `{model}` does not exist.", param="model")
