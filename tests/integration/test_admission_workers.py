"""Admission on defaults, with several adapter workers: load the model has time for is never refused.

The case that refused most requests before (a fixed token bound per worker): 64 and 128 clients at once, each
reranking many documents, through two workers sharing an admission board. This guards the real stack's wiring
(the board folder, its records, two workers judging together) and that no bound but time refuses; how the board
makes one worker refuse for another's backlog is tested in tests/unit/test_admission.py, and the refusal of what
cannot start in time in test_overload.py.
"""

from __future__ import annotations

import asyncio
import re

import httpx
import pytest

from tests.support.stack import running_adapter
from tests.support.tiny_models import corpus

pytestmark = pytest.mark.integration

MODEL = "xlm_roberta_classifier"


@pytest.fixture(scope="module")
def two_workers(triton_server, tmp_path_factory):
    """Two workers, every admission setting at its default but the wait: on a 2-core CI machine the tiny model's
    CPU forward competes with tokenizing 128 requests, and 128 requests of 32 documents can take more than the
    default 10 s there; refusing them would then be right. 60 s leaves the work time to fit, so any refusal
    would come from a bound other than time (the fixed token bound before)."""
    with running_adapter(triton_server, tmp_path_factory.mktemp("admission_workers"), workers="2",
                         admission_wait_s="60") as url:
        yield url


def rejected_total(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return sum(float(value) for value in re.findall(r'^adapter_rejected_total\{[^}]*\} (\S+)$', text, re.M))


@pytest.mark.parametrize("clients", [64, 128])
def test_many_clients_of_large_reranks_are_all_answered(two_workers, clients):
    async def run():
        async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=clients)) as client:
            async def one(index: int):
                body = {"model": MODEL, "query": f"question {index}", "documents": corpus(32, seed=index)}
                return await client.post(f"{two_workers}/rerank", json=body)
            return await asyncio.gather(*(one(index) for index in range(clients)))

    before = rejected_total(two_workers)
    responses = asyncio.run(run())
    statuses = [response.status_code for response in responses]
    assert statuses == [200] * clients, [response.text for response in responses if response.status_code != 200][:3]
    assert all(len(response.json()["results"]) == 32 for response in responses)
    assert rejected_total(two_workers) == before == 0
