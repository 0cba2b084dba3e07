from fastapi import APIRouter, Response

from adapter.dependencies import GatewayDep, RegistryDep
from adapter.models.protocol import ModelCard, ModelList

router = APIRouter(tags=["models"])


@router.get("/v1/models", response_model=ModelList, summary="Served models (vLLM / OpenAI)")
async def list_models(registry: RegistryDep) -> ModelList:
    return ModelList(
        data=[
            ModelCard(id=model.name, created=model.created, root=model.checkpoint, max_model_len=model.max_model_len)
            for model in registry
        ]
    )


@router.get("/health", summary="200 with an empty body while Triton is ready, else 503")
async def health(gateway: GatewayDep) -> Response:
    return Response(status_code=200 if await gateway.ready() else 503)
