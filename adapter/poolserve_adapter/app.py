"""The FastAPI application: the lifespan-owned Triton client and registry, the middleware, and the
routers of every slice (``classify/``, ``scoring/``, ...: each ``protocol`` / ``serving`` /
``api_router`` over ``base/``). ``/docs`` (Swagger UI) and ``/redoc`` load their scripts and styles
from the adapter itself (fastapi-offline's copies), not from a CDN: they work on a host with no
internet access."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from contextlib import asynccontextmanager

import tritonclient.grpc.aio as grpcaio
from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from tritonclient.utils import InferenceServerException

from poolserve_adapter import __version__
from poolserve_adapter.admission_board import board_from_environment
from poolserve_adapter.cohere.api_router import router as cohere_router
from poolserve_adapter.disconnect import CancelOnDisconnectMiddleware
from poolserve_adapter.embeddings.api_router import router as embeddings_router
from poolserve_adapter.errors import install_exception_handlers
from poolserve_adapter.health.api_router import router as health_router
from poolserve_adapter.lifecycle import DrainMiddleware, Lifecycle, SignalDrain, stop_with_launcher
from poolserve_adapter.lora.api_router import router as lora_router
from poolserve_adapter.lora.serving import LoraUpdates
from poolserve_adapter.metrics import install_metrics
from poolserve_adapter.models.api_router import router as models_router
from poolserve_adapter.pooling.api_router import router as pooling_router
from poolserve_adapter.registry import ModelRegistry, build_served_model
from poolserve_adapter.rerank.api_router import router as rerank_router
from poolserve_adapter.rerank.api_router import v1_rerank_router as vllm_v1_rerank_router
from poolserve_adapter.score.api_router import router as score_router
from poolserve_adapter.security import ApiKeyMiddleware, BodySizeLimitMiddleware
from poolserve_adapter.settings import Settings, get_settings
from poolserve_adapter.sglang.api_router import SGLANG_PATHS
from poolserve_adapter.sglang.api_router import router as sglang_router
from poolserve_adapter.sglang.api_router import v1_rerank_router as sglang_v1_rerank_router
from poolserve_adapter.shared_paths.classify import router as classify_router
from poolserve_adapter.shared_paths.invocations import router as invocations_router
from poolserve_adapter.tei.api_router import router as tei_router
from poolserve_adapter.timing import install_timing_headers
from poolserve_adapter.tokenize.api_router import router as tokenize_router
from poolserve_adapter.triton_gateway import AdmissionLimits, TritonGateway, inference_headers
from poolserve_contract.wire import SERVE_ORDER

logger = logging.getLogger("poolserve_adapter")


async def loaded_models(client: grpcaio.InferenceServerClient) -> list[str]:
    """The models Triton has loaded and ready. Read from the statistics API, which lists every loaded
    model and stays open: the repository index is behind Triton's control key, which the adapter
    does not hold (whoever may call that API may load code into the server)."""
    statistics = await client.get_inference_statistics(as_json=True, client_timeout=5)
    names = sorted({entry["name"] for entry in statistics.get("model_stats", [])})
    ready = await asyncio.gather(*(client.is_model_ready(name, client_timeout=5) for name in names))
    return [name for name, is_ready in zip(names, ready, strict=True) if is_ready]


async def discover_models(client: grpcaio.InferenceServerClient, settings: Settings) -> ModelRegistry:
    """Wait for Triton, then build the registry from its ready models and their configs."""
    deadline = time.monotonic() + settings.startup_timeout_s
    while True:
        try:
            if await client.is_server_ready(client_timeout=5):
                ready = await loaded_models(client)
                if ready:
                    break
        except InferenceServerException:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"Triton at {settings.triton_grpc_url} has no ready model after {settings.startup_timeout_s}s")
        await asyncio.sleep(0.5)
    configs = {name: (await client.get_model_config(name, as_json=True))["config"] for name in ready}
    models = []
    for name in sorted(ready, key=lambda name: (serve_order(configs[name]), name)):
        models.append(await asyncio.to_thread(build_served_model, name, configs[name], settings.model_repository))
        logger.info("serving %s as %r (%s)", name, models[-1].name, models[-1].task)
    return ModelRegistry(models)


def serve_order(config: dict) -> float:
    """The model's place among those the user named (the plan's SERVE_ORDER; the first is the default
    model); a model the stack did not plan (a stock tritonserver) comes after them, by name."""
    order = (config.get("parameters") or {}).get(SERVE_ORDER, {}).get("string_value", "")
    return int(order) if order.isdigit() else float("inf")


def create_app(settings: Settings | None = None, lifecycle: Lifecycle | None = None) -> FastAPI:
    settings = settings or get_settings()
    lifecycle = lifecycle or Lifecycle()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        stop_with_launcher()
        client = grpcaio.InferenceServerClient(settings.triton_grpc_url)
        try:
            app.state.settings = settings
            app.state.registry = await discover_models(client, settings)
            app.state.gateway = TritonGateway(
                client, timeout_s=settings.triton_timeout_s, max_rows=settings.max_sequences_per_triton_request,
                admission=AdmissionLimits(settings.max_inflight_tokens_per_model, settings.max_queued_tokens_per_model,
                                          settings.admission_wait_s),
                admission_board=board_from_environment(),
                triton_models=tuple(model.triton_model for model in app.state.registry),
                inference_headers=inference_headers(settings),
            )
            async with SignalDrain(lifecycle, settings.drain_timeout_s):
                yield
        finally:
            if hasattr(app.state, "gateway"):
                app.state.gateway.leave_admission_board()
            with contextlib.suppress(asyncio.TimeoutError):  # a stop must not wait on a stuck channel
                await asyncio.wait_for(client.close(), timeout=2)

    app = FastAPIOffline(
        title="triton-pooling-serve",
        description="vLLM- and SGLang-compatible classify / score / rerank / embeddings APIs over Triton Inference "
        "Server.",
        version=__version__,
        lifespan=lifespan,
    )
    install_exception_handlers(app)
    install_timing_headers(app)
    # /v1/rerank speaks one flavour (a setting); each is also served under its own path.
    v1_rerank = sglang_v1_rerank_router if settings.rerank_v1_flavour == "sglang" else vllm_v1_rerank_router
    app.state.lifecycle = lifecycle
    app.state.sglang_paths = SGLANG_PATHS | ({"/v1/rerank"} if settings.rerank_v1_flavour == "sglang" else set())
    for router in (classify_router, score_router, rerank_router, v1_rerank, sglang_router, pooling_router,
                   embeddings_router, cohere_router, tei_router, tokenize_router, invocations_router, models_router,
                   health_router):
        app.include_router(router)
    # Runtime LoRA updates: routes only when allowed (vLLM registers none otherwise); each request then first adopts
    # another worker's update (poolserve_adapter.lora.serving).
    app.state.lora_updates = LoraUpdates(app.state, settings) if settings.allow_runtime_lora_updating else None
    if app.state.lora_updates is not None:
        app.include_router(lora_router)
    # Outermost first to run: the API key, then the body size.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(CancelOnDisconnectMiddleware)
    app.add_middleware(DrainMiddleware, lifecycle=lifecycle)  # counts what a graceful shutdown waits for
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)
    install_metrics(app, settings.triton_metrics_url)  # outermost: 401s and 413s are counted too
    app.openapi = lambda: openapi_without_422(app)
    return app


def openapi_without_422(app: FastAPI) -> dict:
    """FastAPI documents a 422 for every route; this API answers validation errors with 400."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema
