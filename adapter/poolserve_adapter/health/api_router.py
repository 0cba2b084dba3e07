"""The server's own routes: readiness (``/health``, and SageMaker's ``/ping``) and ``/version``."""

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from poolserve_adapter import __version__
from poolserve_adapter.base.dependencies import GatewayDep
from poolserve_adapter.triton_gateway import TritonGateway

router = APIRouter(tags=["models"])


async def readiness(request: Request, gateway: TritonGateway) -> Response:
    """200 with an empty body (vLLM's) while Triton and every model are ready; otherwise 503 with why:
    draining for a shutdown, Triton unreachable, or the models that are not ready (a stub being
    reloaded after a crash shows here, while the other models keep serving)."""
    if request.app.state.lifecycle.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    if await gateway.ready():
        return Response(status_code=200)
    unavailable = await gateway.unavailable_models()
    if unavailable is None:
        return JSONResponse({"status": "unavailable", "message": "Triton does not answer"}, status_code=503)
    return JSONResponse({"status": "degraded", "unavailable_models": unavailable}, status_code=503)


@router.get("/health", summary="200 with an empty body while Triton and its models are ready, else 503 with why")
async def health(request: Request, gateway: GatewayDep) -> Response:
    return await readiness(request, gateway)


@router.get("/ping", summary="SageMaker health check: the same as /health")
async def ping(request: Request, gateway: GatewayDep) -> Response:
    return await readiness(request, gateway)


@router.post("/ping", summary="SageMaker health check (POST): the same as /health")
async def ping_post(request: Request, gateway: GatewayDep) -> Response:
    return await readiness(request, gateway)


@router.get("/version", summary="The adapter's version (vLLM's route)")
async def server_version() -> dict:
    return {"version": __version__}
