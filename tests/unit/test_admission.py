"""Admission control: bounded work in flight and waiting, first come first served, fast refusal.

The machine-speed cases run on a fake clock (:class:`FakeClock`): the test says how long the model takes, so a
machine that finishes one request per 6 s is tested in milliseconds and without timing noise.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from poolserve_adapter.admission import Admission
from poolserve_adapter.admission_board import RESCAN_INTERVAL_S, STALE_AFTER_S, AdmissionBoard, PeerLoad
from poolserve_adapter.errors import TooManyRequestsError


def admission(**limits) -> Admission:
    return Admission("m", **{"max_inflight_tokens": 100, "max_queued_tokens": 100, "max_wait_s": 5.0, **limits})


async def hold(gate: Admission, tokens: int, release: asyncio.Event, order: list | None = None, name: str = ""):
    async with gate.admit(tokens):
        if order is not None:
            order.append(name)
        await release.wait()


class FakeClock:
    """Seconds that pass only in :meth:`advance`; an Admission built with it measures the model on it."""

    def __init__(self):
        self.now = 1000.0
        self._alarms: list[tuple[float, asyncio.Future]] = []

    def __call__(self) -> float:
        return self.now

    def reached(self, when: float) -> asyncio.Future:
        """Resolves once the clock has reached ``when``."""
        alarm = asyncio.get_running_loop().create_future()
        self._alarms.append((when, alarm))
        return alarm

    async def advance(self, seconds: float) -> None:
        self.now += seconds
        for when, alarm in [entry for entry in self._alarms if entry[0] <= self.now]:
            self._alarms.remove((when, alarm))
            if not alarm.done():
                alarm.set_result(None)
        # Real time for what that woke, and for the admission's reviews (every millisecond: fast_reviews).
        await asyncio.sleep(0.01)


@pytest.fixture
def fast_reviews(monkeypatch):
    """Waiters are reviewed every millisecond of real time, so each FakeClock.advance is followed by reviews."""
    monkeypatch.setattr(Admission, "REVIEW_INTERVAL_S", 0.001)


async def arrive(gate: Admission, clock: FakeClock, tokens: int = 100, seconds: float = 6.0) -> asyncio.Task:
    """A request of ``tokens`` that the model computes in ``seconds`` of the fake clock once admitted; returned
    when it has been refused, started or queued (all of which happen at once, on arrival)."""

    async def request():
        async with gate.admit(tokens):
            await clock.reached(clock.now + seconds)

    task = asyncio.create_task(request())
    await asyncio.sleep(0)
    return task


def refusal(task: asyncio.Task) -> str:
    """The message a request was refused with (it must have been)."""
    assert task.done(), "not answered"
    assert isinstance(task.exception(), TooManyRequestsError), task.exception()
    return task.exception().message


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


def test_the_queue_holds_no_more_than_the_measured_rate_drains_within_the_wait_bound(fast_reviews):
    async def scenario():
        clock = FakeClock()
        gate = admission(max_inflight_tokens=100, max_queued_tokens=10**9, max_wait_s=0.3, clock=clock)
        assert gate.rate() is None  # nothing run yet
        for _ in range(20):  # one request of 100 tokens at a time, 1/16 s each: 1,600 tokens/s
            task = await arrive(gate, clock, 100, seconds=1 / 16)
            await clock.advance(1 / 16)
            await task
        assert gate.rate() == pytest.approx(1600)
        running = await arrive(gate, clock, 100, seconds=1 / 16)
        # 100 to 300 tokens ahead of them, 200 to 400 with their own: done within 0.25 s, they wait
        queued = [await arrive(gate, clock, 100, seconds=1 / 16) for _ in range(3)]
        assert gate.inflight_tokens == 100 and gate.queued_tokens == 300
        for tokens in (100, 1000):  # 500 tokens and more: 0.31 s > 0.3 s, refused at once rather than after the wait
            assert "maximum of queued work" in refusal(await arrive(gate, clock, tokens, seconds=1 / 16))
        with pytest.raises(TooManyRequestsError):
            gate.refuse_if_full()  # and before tokenizing
        for _ in range(4):
            await clock.advance(1 / 16)
        await asyncio.gather(running, *queued)  # the admitted ones all ran, the last done 0.25 s after it came
        assert gate.inflight_tokens == 0 and gate.queued_tokens == 0

    asyncio.run(scenario())


def test_a_machine_that_finishes_less_than_one_request_per_rate_window_refuses_the_excess_at_once(fast_reviews):
    async def scenario():
        clock = FakeClock()
        gate = admission(max_inflight_tokens=100, max_queued_tokens=10**9, max_wait_s=15.0, clock=clock)
        for _ in range(2):  # 6 s a request: never two finishes within Admission.RATE_WINDOW_S (5 s)
            task = await arrive(gate, clock, 100, seconds=6.0)
            await clock.advance(6.0)
            await task
        assert gate.rate() == pytest.approx(100 / 6)
        running = await arrive(gate, clock, 100, seconds=6.0)
        waiting = await arrive(gate, clock, 100, seconds=6.0)  # done 12 s from now: within 15 s
        assert gate.inflight_tokens == 100 and gate.queued_tokens == 100
        started = time.perf_counter()
        excess = [await arrive(gate, clock, 100, seconds=6.0) for _ in range(3)]  # 18 s and more: refused at once
        assert all("maximum of queued work" in refusal(task) for task in excess)
        assert time.perf_counter() - started < 0.5  # not after the 15 s wait (the fake clock has not moved)
        with pytest.raises(TooManyRequestsError):
            gate.refuse_if_full()  # and before tokenizing
        await clock.advance(6.0)  # the running one finishes: the waiting one starts, 6 s after it came
        assert running.done() and not waiting.done() and gate.inflight_tokens == 100 and gate.queued_tokens == 0
        await clock.advance(6.0)
        await asyncio.gather(running, waiting)

    asyncio.run(scenario())


def test_before_any_request_has_finished_the_time_the_work_in_flight_has_taken_bounds_the_rate(fast_reviews):
    async def scenario():
        clock = FakeClock()
        gate = admission(max_inflight_tokens=100, max_queued_tokens=10**9, max_wait_s=10.0, clock=clock)
        first = await arrive(gate, clock, 100, seconds=60.0)  # the worker's first request, on a very slow machine
        assert gate.rate() is None  # just started: nothing known
        await clock.advance(4.0)
        assert gate.rate() == pytest.approx(25.0)  # 100 tokens not done in 4 s: at most 25 tokens/s
        # Nothing is known to be ahead of the first waiter (the work in flight may be all but done); 100 tokens are
        # ahead of the second: with its own, 8 s at least, within 10 s. Both wait.
        waiting = [await arrive(gate, clock, 100) for _ in range(2)]
        assert gate.queued_tokens == 200
        started = time.perf_counter()
        assert "maximum of queued work" in refusal(await arrive(gate, clock, 100))  # 300 tokens: 12 s at least
        assert time.perf_counter() - started < 0.5
        # 4 s later the first still runs: at most 100/8 tokens/s. The second waiter (came at 4 s, 100 tokens ahead)
        # cannot start before 8 + 8 = 16 s > 14 s: refused now, 6 s before its wait would have ended.
        await clock.advance(4.0)
        assert "would not start this request within 10 s" in refusal(waiting[1])
        assert not waiting[0].done() and gate.queued_tokens == 100
        for task in (first, waiting[0]):  # the clients leave: everything is given back
            task.cancel()
        await asyncio.gather(first, waiting[0], return_exceptions=True)
        assert gate.inflight_tokens == 0 and gate.queued_tokens == 0

    asyncio.run(scenario())


def test_a_waiter_is_not_refused_while_requests_computed_together_finish_one_by_one():
    """Triton computes the requests in flight as one batch and they finish a moment apart. Right after the first,
    the estimate counts the others as not begun: that must not refuse a waiter which starts once they are done."""

    async def scenario():
        clock = FakeClock()
        gate = admission(max_inflight_tokens=300, max_queued_tokens=10**9, max_wait_s=5.0, clock=clock)
        for _ in range(2):  # 100 tokens/s, one request at a time
            task = await arrive(gate, clock, 100, seconds=1.0)
            await clock.advance(1.0)
            await task
        batch = [await arrive(gate, clock, 100, seconds=4.0) for _ in range(3)]  # slower together: done in 4 s
        await clock.advance(0.5)
        waiting = await arrive(gate, clock, 100, seconds=1.0)  # 250 tokens ahead, 100 its own: 3.5 s, it waits
        assert gate.inflight_tokens == 300 and gate.queued_tokens == 100
        # The batch finishes: after the first of the three, 200 tokens look undone at 50 tokens/s, 4 s > 1.5 s left
        await clock.advance(3.5)
        await asyncio.gather(*batch)
        assert not waiting.done() and gate.inflight_tokens == 100  # started, not refused, 4 s after it came
        await clock.advance(1.0)
        await waiting

    asyncio.run(scenario())


def test_until_a_request_has_finished_one_runs_at_a_time_then_the_token_bound_holds(fast_reviews):
    async def scenario():
        clock = FakeClock()
        gate = admission(max_inflight_tokens=1000, max_queued_tokens=1000, clock=clock)
        first, second = await arrive(gate, clock, 100, seconds=1.0), await arrive(gate, clock, 100, seconds=1.0)
        assert gate.inflight_tokens == 100 and gate.queued_tokens == 100  # the machine's speed is unknown yet
        await clock.advance(1.0)
        await first
        more = [await arrive(gate, clock, 100, seconds=1.0) for _ in range(3)]  # known now: they run together
        assert gate.inflight_tokens == 400 and gate.queued_tokens == 0
        await clock.advance(1.0)
        await asyncio.gather(second, *more)

    asyncio.run(scenario())


def test_at_ten_times_the_capacity_admitted_requests_take_at_most_the_wait_plus_their_own_time(fast_reviews):
    """A simulated model that computes one request in 2.5 s, first come first served as Triton's queue does, is
    offered a request every 0.25 s for 25 s. The token bound lets everything in: only the rate bounds the work."""
    duration, every, max_wait = 2.5, 0.25, 5.0

    async def scenario():
        clock = FakeClock()
        gate = admission(max_inflight_tokens=10**9, max_queued_tokens=10**9, max_wait_s=max_wait, clock=clock)
        model_free_at = clock.now
        answers: list[tuple[float, float, bool]] = []  # (arrived, answered, admitted)

        async def request():
            nonlocal model_free_at
            arrived = clock.now
            try:
                async with gate.admit(100):
                    model_free_at = max(clock.now, model_free_at) + duration
                    await clock.reached(model_free_at)
            except TooManyRequestsError:
                answers.append((arrived, clock.now, False))
            else:
                answers.append((arrived, clock.now, True))

        tasks = []
        for _ in range(100):
            tasks.append(asyncio.create_task(request()))
            await clock.advance(every)
        for _ in range(100):  # drain: at most 25 s more
            if all(task.done() for task in tasks):
                break
            await clock.advance(every)
        await asyncio.gather(*tasks)
        return answers

    answers = asyncio.run(scenario())
    admitted = [answered - arrived for arrived, answered, ok in answers if ok]
    refused = [(arrived, answered - arrived) for arrived, answered, ok in answers if not ok]
    first_answer = min(answered for _, answered, ok in answers if ok)
    print(f"simulated 10x: {len(admitted)} admitted (longest {max(admitted):.2f} s), {len(refused)} refused "
          f"(slowest {max(took for _, took in refused):.2f} s)")
    # Every admitted request started within max_wait and ran its own 2.5 s (the fake clock moves in 0.25 s steps).
    assert max(admitted) <= max_wait + duration + every
    # Once a request has finished, the excess is refused on arrival; before, as soon as the time the first one has
    # taken shows the queue cannot start in time.
    assert all(took == 0 for arrived, took in refused if arrived >= first_answer)
    assert max(took for _, took in refused) <= max_wait / 2
    assert len(admitted) >= 10  # and the model is kept busy: (25 s + the drain) / 2.5 s a request


def test_by_default_only_time_bounds_the_queue_64_clients_of_large_reranks_all_wait(fast_reviews):
    """The defaults' case that refused most requests: 64 clients of 64-document reranks (~15,000 tokens each) on a
    model that does ~500,000 tokens/s. All 64 are done in about 2 s, well within the wait: none is refused; the
    excess beyond what the model can start within the wait still is, at once."""

    async def scenario():
        clock = FakeClock()
        gate = Admission("m", max_inflight_tokens=131072, max_queued_tokens=None, max_wait_s=10.0, clock=clock)
        for _ in range(2):  # the model's speed: 15,000 tokens in 0.03 s
            task = await arrive(gate, clock, 15000, seconds=0.03)
            await clock.advance(0.03)
            await task
        clients = [await arrive(gate, clock, 15000, seconds=0.25) for _ in range(64)]
        assert not any(task.done() for task in clients)  # none refused: 960,000 tokens ~ 2 s of work
        assert gate.queued_tokens > 524288  # more than the old fixed bound queued
        excess = [await arrive(gate, clock, 15000) for _ in range(400)]
        refused = [task for task in excess if task.done()]
        # 10 s at 500,000 tokens/s hold ~333 such requests in all: the rest is refused on arrival.
        assert 200 < len(excess) - len(refused) < 300 and all("maximum of queued work" in refusal(t) for t in refused)
        for task in clients + excess:
            task.cancel()
        await asyncio.gather(*clients, *excess, return_exceptions=True)

    asyncio.run(scenario())


def board_workers(tmp_path, clock, count: int, **limits) -> list[Admission]:
    """``count`` adapter workers' admissions of one model on one board (one process plays them all)."""
    alive = set(range(1, count + 1))
    workers = []
    for pid in alive:
        board = AdmissionBoard(tmp_path, pid=pid, clock=clock, is_alive=lambda p: p in alive)
        workers.append(Admission("m", **{"max_inflight_tokens": 10**9, "max_queued_tokens": None, "max_wait_s": 5.0,
                                         **limits}, clock=clock, board=board.entry("m")))
    return workers


def test_a_worker_judges_by_the_whole_models_backlog_and_speed(tmp_path, fast_reviews, monkeypatch):
    monkeypatch.setattr("poolserve_adapter.admission_board.RESCAN_INTERVAL_S", 0.0)

    async def scenario():
        clock = FakeClock()
        busy, idle = board_workers(tmp_path, clock, 2)
        for gate in (busy, idle):  # each has measured 100 tokens/s
            task = await arrive(gate, clock, 100, seconds=1.0)
            await clock.advance(1.0)
            await task
        # The busy worker holds 400 tokens of work (4 s at its 100 tokens/s: within its 5 s wait).
        held = [await arrive(busy, clock, 100, seconds=100.0) for _ in range(4)]
        assert not any(task.done() for task in held)
        # Alone, the idle worker would take any request at once (nothing ahead of it); but it queues for the same
        # model, whose backlog is 400 tokens at the busy worker's 100 tokens/s (an idle worker's rate is its past,
        # not the model's speed now). 200 more: 6 s, refused on arrival.
        assert "maximum of queued work" in refusal(await arrive(idle, clock, 200))
        taken = await arrive(idle, clock, 100, seconds=100.0)  # (400 + 100) / 100: 5 s, taken
        assert not taken.done()
        # The busy worker's clients leave: its backlog leaves the board with them.
        for task in held:
            task.cancel()
        await asyncio.gather(*held, return_exceptions=True)
        later = await arrive(idle, clock, 300, seconds=100.0)  # (100 + 300) / 100: 4 s, its own work only
        assert not later.done()
        for task in (taken, later):
            task.cancel()
        await asyncio.gather(taken, later, return_exceptions=True)

    asyncio.run(scenario())


def test_the_board_forgets_a_worker_that_died_and_one_that_left(tmp_path):
    clock = FakeClock()
    alive = {1, 2, 3}
    entries = {pid: AdmissionBoard(tmp_path, pid=pid, clock=clock, is_alive=lambda p: p in alive).entry("m")
               for pid in alive}
    entries[2].publish(500.0, 300, 100.0)
    entries[3].publish(0.0, 200, 50.0)
    clock.now += 2.0  # worker 2's work in flight has gone on at its rate: 300 left of 500
    assert entries[1].peers() == PeerLoad(ahead_tokens=300 + 300 + 200, rate=150.0)
    alive.discard(2)  # killed: its record is dropped at the next scan, and its file removed
    clock.now += RESCAN_INTERVAL_S
    assert entries[1].peers() == PeerLoad(ahead_tokens=200, rate=50.0)
    assert sorted(path.name.rsplit(".", 1)[1] for path in tmp_path.iterdir()) == ["1", "3"]
    # A torn record (read while half written) is skipped for that read only.
    record = tmp_path / next(path.name for path in tmp_path.iterdir() if path.name.endswith(".3"))
    intact = record.read_bytes()
    record.write_bytes(intact[:8] + b"\xff" * 8 + intact[16:])
    assert entries[1].peers() == PeerLoad(0.0, 0.0)
    record.write_bytes(intact)
    assert entries[1].peers() == PeerLoad(ahead_tokens=200, rate=50.0)
    # A record its worker stopped rewriting (stuck, or gone and its pid reused) counts for nothing.
    clock.now += STALE_AFTER_S
    assert entries[1].peers() == PeerLoad(0.0, 0.0)
    entries[3].publish(0.0, 200, 50.0)
    assert entries[1].peers() == PeerLoad(ahead_tokens=200, rate=50.0)
    entries[3].close()  # shut down: gone from the board at once
    clock.now += RESCAN_INTERVAL_S
    assert entries[1].peers() == PeerLoad(0.0, 0.0)
    assert [path.name.rsplit(".", 1)[1] for path in tmp_path.iterdir()] == ["1"]


def test_a_worker_holding_work_republishes_so_the_others_see_a_stall(tmp_path, monkeypatch):
    """Work in flight with nobody waiting is republished every review: without it the others would age the record
    at the old rate down to nothing while the model stalls."""
    monkeypatch.setattr(Admission, "REVIEW_INTERVAL_S", 0.01)
    writes = []

    async def scenario():
        entry = AdmissionBoard(tmp_path, pid=1).entry("m")
        original = entry.publish
        entry.publish = lambda *args: (writes.append(args), original(*args))
        gate = Admission("m", max_inflight_tokens=1000, max_queued_tokens=None, max_wait_s=5.0, board=entry)
        release = asyncio.Event()
        task = asyncio.create_task(hold(gate, 100, release))
        await asyncio.sleep(0.2)
        during = len(writes)
        release.set()
        await task
        await asyncio.sleep(0.05)
        after = len(writes)
        await asyncio.sleep(0.1)
        assert len(writes) == after  # nothing held: no more rewriting
        return during

    assert asyncio.run(scenario()) >= 5


def test_without_its_folder_a_board_gives_no_entry_and_the_worker_judges_alone(tmp_path):
    board = AdmissionBoard(tmp_path / "removed")
    assert board.entry("m") is None
