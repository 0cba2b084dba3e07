"""Admission control: bounded work in flight and waiting, first come first served, fast refusal."""

from __future__ import annotations

import asyncio
import time

import pytest

from poolserve_adapter.admission import Admission
from poolserve_adapter.errors import TooManyRequestsError


def admission(**limits) -> Admission:
    return Admission("m", **{"max_inflight_tokens": 100, "max_queued_tokens": 100, "max_wait_s": 5.0, **limits})


async def hold(gate: Admission, tokens: int, release: asyncio.Event, order: list | None = None, name: str = ""):
    async with gate.admit(tokens):
        if order is not None:
            order.append(name)
        await release.wait()


def test_admits_within_the_bound_queues_in_order_and_refuses_beyond_at_once():
    async def scenario():
        gate, release = admission(), asyncio.Event()
        order: list[str] = []
        running = [asyncio.create_task(hold(gate, 60, release, order, "a"))]
        await asyncio.sleep(0)
        running += [asyncio.create_task(hold(gate, 60, release, order, name)) for name in ("b", "c")]  # 120 queued?
        await asyncio.sleep(0.01)
        assert gate.inflight_tokens == 60 and order == ["a"]
        # b (60) waits; c (60) would bring the queue to 120 > 100: refused
        assert gate.queued_tokens == 60
        with pytest.raises(TooManyRequestsError) as refused:
            await running[2]
        assert refused.value.retry_after_s >= 1
        started = time.perf_counter()
        with pytest.raises(TooManyRequestsError):
            async with gate.admit(50):
                pass
        assert time.perf_counter() - started < 0.05  # refused without waiting
        release.set()
        await asyncio.gather(*running[:2])
        assert order == ["a", "b"] and gate.inflight_tokens == 0 and gate.queued_tokens == 0

    asyncio.run(scenario())


def test_a_request_larger_than_the_bound_runs_alone_and_waits_time_out():
    async def scenario():
        gate, release = admission(max_wait_s=0.1), asyncio.Event()
        big = asyncio.create_task(hold(gate, 500, release))
        await asyncio.sleep(0.01)
        assert gate.inflight_tokens == 500
        started = time.perf_counter()
        with pytest.raises(TooManyRequestsError, match="within 0.1 s"):
            async with gate.admit(10):
                pass
        assert 0.09 < time.perf_counter() - started < 1.0
        assert gate.queued_tokens == 0
        release.set()
        await big

    asyncio.run(scenario())


def test_a_cancelled_waiter_gives_its_place_back():
    async def scenario():
        gate, release = admission(), asyncio.Event()
        first = asyncio.create_task(hold(gate, 100, release))
        await asyncio.sleep(0.01)
        waiting = asyncio.create_task(hold(gate, 80, release))
        await asyncio.sleep(0.01)
        assert gate.queued_tokens == 80
        waiting.cancel()  # the client left while it waited
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert gate.queued_tokens == 0
        release.set()
        await first
        assert gate.inflight_tokens == 0

    asyncio.run(scenario())


def test_refuse_if_full_refuses_before_tokenizing_only_when_a_small_request_would_not_fit():
    async def scenario():
        gate, release = admission(max_queued_tokens=100), asyncio.Event()
        gate.refuse_if_full()  # nothing seen, nothing queued: open
        running = [asyncio.create_task(hold(gate, 100, release))]
        await asyncio.sleep(0.01)
        running.append(asyncio.create_task(hold(gate, 20, release)))  # waits: the queue holds 20 of 100
        await asyncio.sleep(0.01)
        gate.refuse_if_full()  # a request as small as the smallest recent one (20) still fits
        running.append(asyncio.create_task(hold(gate, 70, release)))
        await asyncio.sleep(0.01)
        assert gate.queued_tokens == 90
        with pytest.raises(TooManyRequestsError, match="maximum of queued work"):
            gate.refuse_if_full()  # 90 + 20 > 100: refused with no size known
        release.set()
        await asyncio.gather(*running)
        gate.refuse_if_full()  # drained: open again

    asyncio.run(scenario())


def test_the_queue_holds_no_more_than_the_measured_rate_drains_within_the_wait_bound():
    async def scenario():
        gate = admission(max_inflight_tokens=100, max_queued_tokens=10**9, max_wait_s=0.3)

        async def work(tokens: int = 100):
            async with gate.admit(tokens):
                await asyncio.sleep(0.05)  # one request of 100 tokens at a time: ~2,000 tokens/s

        for _ in range(6):  # measure the rate
            await work()
        assert 1000 < gate.rate() < 2500
        queued = [asyncio.create_task(work()) for _ in range(4)]  # one runs, 300 tokens queue: ~0.15-0.2 s
        await asyncio.sleep(0.01)
        assert gate.queued_tokens == 300
        started = time.perf_counter()
        with pytest.raises(TooManyRequestsError, match="maximum of queued work"):
            await work(1000)  # would wait for ~0.65 s of work > 0.3 s: refused at once, not after the wait
        assert time.perf_counter() - started < 0.02
        await asyncio.gather(*queued)  # the admitted ones all finish

    asyncio.run(scenario())
