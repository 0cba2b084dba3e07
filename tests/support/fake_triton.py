"""The real adapter app without a tritonserver, for unit tests of the serving pipeline: discovery returns the
models a test gives, and the test's fake gateway answers in place of Triton."""

from __future__ import annotations

import contextlib

from fastapi.testclient import TestClient

from poolserve_adapter.app import create_app
from poolserve_adapter.registry import ModelRegistry, ServedModel
from poolserve_adapter.settings import Settings


class HealthyGateway:
    """What every fake gateway answers alike: Triton ready, every model available. A test's gateway
    subclasses it and writes only its ``infer``."""

    async def ready(self) -> bool:
        return True

    async def unavailable_models(self) -> dict[str, str]:
        return {}


@contextlib.contextmanager
def app_over(monkeypatch, models: list[ServedModel], gateway, **settings):
    """A TestClient of the app over ``models`` (``settings``: Settings fields), with ``gateway`` put in place of
    the one its lifespan made; yields (client, gateway)."""
    async def discover(_client, _settings):
        return ModelRegistry(models)

    monkeypatch.setattr("poolserve_adapter.app.discover_models", discover)
    app = create_app(Settings(triton_grpc_url="127.0.0.1:1", **settings))
    with TestClient(app) as client:
        real, app.state.gateway = app.state.gateway, gateway
        try:
            yield client, gateway
        finally:
            app.state.gateway = real  # the app's shutdown closes what it made
