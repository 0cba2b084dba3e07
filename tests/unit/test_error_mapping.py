"""Which exceptions are the client's fault (4xx) and which are ours (500, traceback logged, no details)."""

from __future__ import annotations

import logging

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from poolserve_adapter.errors import BadRequestError, install_exception_handlers


@pytest.fixture
def client() -> TestClient:
    app = FastAPI()
    install_exception_handlers(app)

    @app.get("/bug/{kind}")
    async def bug(kind: str):
        raise {"value": ValueError, "type": TypeError, "overflow": OverflowError,
               "unicode": UnicodeError}[kind]("internal detail /srv/secret/path.py at 0xdeadbeef")

    @app.get("/client")
    async def client_fault():
        raise BadRequestError("Token id 99999 is out of vocabulary", param="input")

    return TestClient(app, raise_server_exceptions=False)


@pytest.mark.parametrize("kind", ["value", "type", "overflow", "unicode"])
def test_a_programming_error_is_a_500_with_the_traceback_logged(client, kind, caplog):
    with caplog.at_level(logging.ERROR, logger="poolserve_adapter.errors"):
        response = client.get(f"/bug/{kind}")
    assert response.status_code == 500
    assert response.json() == {"error": {"message": "Internal server error", "type": "InternalServerError",
                                         "param": None, "code": 500}}
    assert "secret" not in response.text and "deadbeef" not in response.text
    records = [record for record in caplog.records if record.exc_info]
    assert len(records) == 1 and "/bug/" in records[0].getMessage()


def test_a_request_error_raised_as_such_is_a_400(client):
    response = client.get("/client")
    assert response.status_code == 400
    assert response.json()["error"] == {"message": "Token id 99999 is out of vocabulary", "type": "BadRequestError",
                                        "param": "input", "code": 400}
