from importlib.metadata import PackageNotFoundError, version

from fastapi import APIRouter, Response

from adapter.dependencies import GatewayDep, RegistryDep
from adapter.errors import NotFoundError
from adapter.models.protocol import ModelCard, ModelList

router = APIRouter(tags=["models"])


def card(model) -> ModelCard:
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


@router.get("/health", summary="200 with an empty body while Triton is ready, else 503")
async def health(gateway: GatewayDep) -> Response:
    return Response(status_code=200 if await gateway.ready() else 503)


@router.get("/ping", summary="SageMaker health check: the same as /health")
async def ping(gateway: GatewayDep) -> Response:
    return Response(status_code=200 if await gateway.ready() else 503)


@router.post("/ping", summary="SageMaker health check (POST): the same as /health")
async def ping_post(gateway: GatewayDep) -> Response:
    return Response(status_code=200 if await gateway.ready() else 503)


@router.get("/version", summary="The adapter's version (vLLM's route)")
async def server_version() -> dict:
    try:
        return {"version": version("triton-pooling-serve")}
    except PackageNotFoundError:
        return {"version": "0.0.0"}
