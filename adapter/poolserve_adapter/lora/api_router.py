"""vLLM's ``POST /v1/load_lora_adapter`` and ``POST /v1/unload_lora_adapter``, included only when runtime LoRA
updating is on (``ADAPTER_ALLOW_RUNTIME_LORA_UPDATING``, or vLLM's ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``): off, they
are unknown routes (404), as vLLM does not register them. Success is vLLM's 200 with a plain text body."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from poolserve_adapter.base.protocol import ERROR_RESPONSES, require_json
from poolserve_adapter.lora.protocol import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest
from poolserve_adapter.lora.serving import LoraUpdates

router = APIRouter(tags=["lora"])


def lora_updates(request: Request) -> LoraUpdates:
    return request.app.state.lora_updates


@router.post("/v1/load_lora_adapter", responses=ERROR_RESPONSES, dependencies=[Depends(require_json)],
             summary="Load a LoRA adapter at run time (vLLM); its base model reloads")
async def load_lora_adapter(body: LoadLoRAAdapterRequest, raw: Request) -> Response:
    return Response(content=await lora_updates(raw).load(body), status_code=200)


@router.post("/v1/unload_lora_adapter", responses=ERROR_RESPONSES, dependencies=[Depends(require_json)],
             summary="Unload a LoRA adapter at run time (vLLM); its base model reloads")
async def unload_lora_adapter(body: UnloadLoRAAdapterRequest, raw: Request) -> Response:
    return Response(content=await lora_updates(raw).unload(body), status_code=200)
