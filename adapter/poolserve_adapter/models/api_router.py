"""``GET /v1/models`` and ``GET /v1/models/{model}``: the served models (vLLM / OpenAI, SGLang), then their LoRA
adapters as vLLM's ``show_available_models`` lists them (``root`` the adapter's folder, ``parent`` its base model,
no ``max_model_len``)."""

from fastapi import APIRouter

from poolserve_adapter.base.dependencies import RegistryDep
from poolserve_adapter.errors import NotFoundError
from poolserve_adapter.models.protocol import ModelCard, ModelList
from poolserve_adapter.registry import ModelRegistry, ServedModel

router = APIRouter(tags=["models"])


def card(model: ServedModel) -> ModelCard:
    if model.parent is not None:
        return ModelCard(id=model.name, created=model.created, root=model.checkpoint, parent=model.parent)
    return ModelCard(id=model.name, created=model.created, root=model.checkpoint, max_model_len=model.max_model_len)


def listed(registry: ModelRegistry) -> list[ServedModel]:
    return [*registry, *registry.adapters.values()]


@router.get("/v1/models", response_model=ModelList, summary="Served models (vLLM / OpenAI)")
async def list_models(registry: RegistryDep) -> ModelList:
    return ModelList(data=[card(model) for model in listed(registry)])


@router.get("/v1/models/{model:path}", response_model=ModelCard, summary="One served model (SGLang / OpenAI)",
            responses={404: {"description": "Not a served model"}})
async def retrieve_model(model: str, registry: RegistryDep) -> ModelCard:
    served = registry.named(model)
    if served is not None:
        return card(served)
    raise NotFoundError(f"The model `{model}` does not exist.", param="model")
