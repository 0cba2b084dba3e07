"""What routes and the serving pipeline receive: the registry, the Triton gateway and the settings,
owned by the lifespan (``app.state``).

The accessors are ``async def`` on purpose: FastAPI runs plain ``def`` dependencies in its thread
pool, and three thread hops per request cost ~1 ms (profiled on the rerank path).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from poolserve_adapter.registry import ModelRegistry
from poolserve_adapter.settings import Settings
from poolserve_adapter.triton_gateway import TritonGateway


async def get_registry(request: Request) -> ModelRegistry:
    updates = getattr(request.app.state, "lora_updates", None)
    if updates is not None:  # runtime LoRA updates on: another worker's update first (one stat when none)
        await updates.catch_up()
    return request.app.state.registry


async def get_gateway(request: Request) -> TritonGateway:
    return request.app.state.gateway


async def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
GatewayDep = Annotated[TritonGateway, Depends(get_gateway)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]
