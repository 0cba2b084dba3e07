"""Admission control: a bound on the work each served model holds, and on how long a request waits.

Without it every request waits in Triton's queue, and under overload all of them time out late
(60 s) instead of a few being refused at once. Per Triton model and adapter worker:

* up to ``max_inflight_tokens`` tokens are being computed (sent to Triton); a request larger than
  the bound alone runs when nothing else does. Until one request has finished, the model's speed is
  unknown and one request runs at a time: the others wait here, where they can still be refused,
  instead of in Triton's queue, where they cannot;
* more wait here, first come first served, each at most ``max_wait_s`` (and at most ``max_queued_tokens``
  of them when that bound is set; by default only time bounds the queue: a fixed token bound refused work
  the GPU had time for, e.g. 64 clients of 64-document reranks);
* both bounds follow the model's speed (see :meth:`Admission.rate`): a request is taken, to run or to
  wait, only when the work ahead of it (in flight and queued) and its own are expected to be done
  within ``max_wait_s``; a request with nothing ahead of it always is. While it waits it is refused
  as soon as its expected start (the work ahead of it done) passes ``max_wait_s`` from its arrival,
  not when the wait runs out; its own time is the room between the two checks, so that an estimate
  that errs by less refuses nothing late. It is sent to Triton only while that start is expected
  in time, and within ``max_wait_s`` or never. An admitted request is thus answered within about
  ``max_wait_s``, and within ``max_wait_s`` plus its own time while the estimate holds, whatever
  ``max_inflight_tokens`` lets into Triton;
* anything beyond is refused with 429 and ``Retry-After`` (what OpenAI's, Cohere's and TEI's clients
  retry on; TEI answers 429 when its permits are spent).

The rate is tokens finished per second of busy time (time with work in flight), measured up to the
last finish over a window that holds at least the last ``RATE_MIN_FINISHED`` finished requests and at
least ``RATE_WINDOW_S`` of busy time, however long the requests take: a slow machine finishes fewer
than one per window. Work in flight that has run for ``t`` seconds without finishing bounds it from
above (finished plus in-flight tokens over ``t``): that bound lowers the estimate as soon as the
model slows down, and it is the only estimate before any request has finished.

With several adapter workers, the arrival check reads the others' backlog and rates from the admission board
(:mod:`poolserve_adapter.admission_board`): a request is refused when the model as a whole, not this worker's
share of it, cannot start it in time. Waiters are still started by their own worker, in its order.

A request that leaves (client gone, cancelled) gives its place back whether it waited or ran.

Refusing is cheap only if it comes before the work: :meth:`Admission.refuse_if_full` runs before a
request is tokenized and refuses it when a request as small as the smallest of the recent ones would
be refused, so an overloaded worker spends no tokenizer time on requests it will refuse.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from poolserve_adapter.errors import TooManyRequestsError
from poolserve_adapter.metrics import get_metrics

if TYPE_CHECKING:
    from poolserve_adapter.admission_board import BoardEntry


class _Waiter:
    """A request waiting for admission. ``decision`` resolves to None when it is started, or to the error it is
    refused with."""

    __slots__ = ("tokens", "deadline", "decision")

    def __init__(self, tokens: int, deadline: float, decision: asyncio.Future):
        self.tokens = tokens
        self.deadline = deadline  # on the admission's clock: arrival + max_wait_s
        self.decision = decision


class Admission:
    # The rate window: at least this much busy time and at least this many finished requests, however long
    # they took; at most RATE_MAX_FINISHED entries (a fast machine finishes thousands per window).
    RATE_WINDOW_S = 5.0
    RATE_MIN_FINISHED = 8
    RATE_MAX_FINISHED = 1024
    # Waiters are checked against the estimate this often: it moves as time passes without a finish.
    REVIEW_INTERVAL_S = 0.1

    def __init__(self, model: str, *, max_inflight_tokens: int, max_queued_tokens: int | None, max_wait_s: float,
                 clock: Callable[[], float] = time.monotonic, board: BoardEntry | None = None):
        self.model = model
        self.max_inflight_tokens = max_inflight_tokens
        self.max_queued_tokens = max_queued_tokens  # None: no token bound, only the time bound
        self._board = board  # the other adapter workers' share of this model (None: this worker is alone)
        self.max_wait_s = max_wait_s
        self._clock = clock  # seconds; tests pass a fake one
        self.inflight_tokens = 0
        self.queued_tokens = 0
        self._waiters: collections.deque[_Waiter] = collections.deque()
        # Sizes of the last requests seen: the smallest is what an untokenized request costs at least.
        self._recent_sizes: collections.deque[int] = collections.deque(maxlen=64)
        # The rate window: finished requests, oldest first, as (busy clock when it finished, tokens). It starts
        # at _window_start, the busy clock of the finish before its first entry (0: every finish is in it).
        self._finished: collections.deque[tuple[float, int]] = collections.deque()
        self._window_start = 0.0
        self._window_tokens = 0  # the tokens of _finished's entries
        self._busy_s = 0.0  # the busy clock: time with work in flight, up to _busy_since
        self._busy_since: float | None = None  # set while work is in flight
        self._review_timer: asyncio.TimerHandle | None = None  # set while requests wait

    def _busy_now(self) -> float:
        return self._busy_s + (self._clock() - self._busy_since if self._busy_since is not None else 0.0)

    def _rate_and_inflight_left(self) -> tuple[float | None, float]:
        """(tokens finished per second of busy time, tokens of the work in flight still to do). The rate is None
        while nothing is known of it: nothing is refused for the rate then."""
        busy = self._busy_now()
        elapsed = busy - self._window_start
        if elapsed <= 0:
            return None, float(self.inflight_tokens)
        # The work in flight has not finished in `elapsed`, so at most all of it has been done: a bound from above,
        # which falls as a stalled or slowed model keeps its work, and the only estimate before any finish.
        rate = (self._window_tokens + self.inflight_tokens) / elapsed
        last_finish = self._finished[-1][0] if self._finished else 0.0
        if last_finish > self._window_start:
            # Measured up to the last finish, not to now: the work in flight since then is partly done.
            rate = min(rate, self._window_tokens / (last_finish - self._window_start))
        if rate <= 0:  # busy so far only with requests that failed or were cancelled
            return None, float(self.inflight_tokens)
        # Done of the work in flight: what the model does at that rate since the last finish (all of it before the
        # first finish, by the bound). Nothing is carried over a finish: Triton computes in batches, one after the
        # other, so the requests still in flight after one has finished have mostly not begun.
        return rate, max(0.0, self.inflight_tokens - rate * (busy - last_finish))

    def rate(self) -> float | None:
        """The estimated tokens finished per second of busy time (None: nothing known yet)."""
        return self._rate_and_inflight_left()[0]

    @staticmethod
    def _seconds(rate: float | None, ahead: float, own_tokens: int = 0) -> float | None:
        """Seconds for ``ahead`` tokens and then ``own_tokens`` at ``rate``; None when the rate is unknown or nothing
        is ahead: a request with nothing ahead of it is not refused for the rate."""
        if rate is None or ahead < 1:  # less than a token: nothing, but for rounding
            return None
        return (ahead + own_tokens) / rate

    def _fits(self, tokens: int) -> bool:
        if self.inflight_tokens == 0:
            return True
        # One request at a time until one has finished: how much the model gets through is unknown till then.
        return bool(self._finished) and self.inflight_tokens + tokens <= self.max_inflight_tokens

    def _refuse(self, reason: str, message: str) -> TooManyRequestsError:
        get_metrics().rejected.labels(self.model, reason).inc()
        retry_after = max(1, math.ceil(self.max_wait_s))
        return TooManyRequestsError(message, retry_after_s=retry_after)

    def _arrival_refusal(self, tokens: int) -> TooManyRequestsError | None:
        """The refusal of a request of ``tokens`` arriving now, if it must be refused: it would not fit in the queue,
        or the work ahead of it and its own would not be done within max_wait_s at the estimated rate."""
        must_wait = bool(self._waiters) or not self._fits(tokens)
        rate, inflight_left = self._rate_and_inflight_left()
        ahead = inflight_left + self.queued_tokens
        if self._board is not None:
            # The model's backlog and speed are all workers' together: they queue for the same Triton model. A
            # rate counts only for a worker holding work (this one's too): an idle worker's window is the past.
            peers = self._board.peers()
            if peers.rate > 0:
                rate = (rate if ahead >= 1 and rate is not None else 0.0) + peers.rate
            ahead += peers.ahead_tokens
        seconds = self._seconds(rate, ahead, tokens)
        over_token_bound = self.max_queued_tokens is not None and self.queued_tokens + tokens > self.max_queued_tokens
        if (must_wait and over_token_bound) or (seconds is not None and seconds > self.max_wait_s):
            return self._refuse("queue_full", f"The server is busy: model {self.model} holds its maximum of "
                                              f"queued work. Retry later.")
        return None

    def refuse_if_full(self) -> None:
        """Before tokenizing: refuse at once when a request as small as the smallest recent one would be refused
        (the full check comes in :meth:`admit` once the size is known)."""
        if self._recent_sizes:
            refusal = self._arrival_refusal(min(self._recent_sizes))
            if refusal is not None:
                raise refusal

    @contextlib.asynccontextmanager
    async def admit(self, tokens: int):
        metrics = get_metrics()
        started = time.perf_counter()
        self._recent_sizes.append(tokens)
        refusal = self._arrival_refusal(tokens)
        if refusal is not None:
            raise refusal
        if self._waiters or not self._fits(tokens):
            await self._wait_for_turn(tokens)
        else:
            self._start(tokens)
            self._schedule_review()
        metrics.admitted.labels(self.model).inc()
        metrics.queue_wait.labels(self.model).observe(time.perf_counter() - started)
        try:
            yield
        except BaseException:
            self._release(tokens)
            raise
        self._release(tokens, finished=True)

    async def _wait_for_turn(self, tokens: int) -> None:
        waiter = _Waiter(tokens, self._clock() + self.max_wait_s, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        self.queued_tokens += tokens
        self._schedule_review()
        try:
            # Shielded: a client that leaves cancels its wait, not the decision, which may be made already.
            refusal = await asyncio.shield(waiter.decision)
        except asyncio.CancelledError:
            if not waiter.decision.done():
                waiter.decision.cancel()
                self._waiters.remove(waiter)
                self.queued_tokens -= tokens
                self._wake()
            elif waiter.decision.result() is None:  # started just as it left: hand its place on
                self._release(tokens)
            raise
        if refusal is not None:
            raise refusal

    def _starts_too_late(self, waiter: _Waiter, now: float, rate: float | None, ahead: float) -> bool:
        """Whether a waiter is expected to start after its deadline, with ``ahead`` tokens to be done before it (the
        rest of the work in flight and the queue before it)."""
        seconds = self._seconds(rate, ahead)
        return seconds is not None and now + seconds > waiter.deadline

    def _wait_refusal(self, verb: str) -> TooManyRequestsError:
        return self._refuse("wait_timeout", f"The server is busy: model {self.model} {verb} not start this request "
                                            f"within {self.max_wait_s:g} s. Retry later.")

    def _review(self) -> None:
        """Refuse every waiter whose wait is over or that is expected to start too late, then start those that
        fit."""
        self._review_timer = None
        now = self._clock()
        rate, ahead = self._rate_and_inflight_left()
        still_waiting: collections.deque[_Waiter] = collections.deque()
        for waiter in self._waiters:
            if now >= waiter.deadline:
                refusal = self._wait_refusal("did")
            elif self._starts_too_late(waiter, now, rate, ahead):
                refusal = self._wait_refusal("would")
            else:
                still_waiting.append(waiter)
                ahead += waiter.tokens
                continue
            self.queued_tokens -= waiter.tokens
            waiter.decision.set_result(refusal)
        self._waiters = still_waiting
        self._wake()

    def _schedule_review(self) -> None:
        """One timer while requests wait (with a board, also while work is in flight), none otherwise. The head's
        deadline is the earliest (first come first served, one max_wait_s for all), so the timer never fires later
        than it. Every change of the queue or of the work in flight ends here: it is published then."""
        self._publish()
        # With a board, work in flight is republished too: the others age this worker's record by its rate, and
        # only a fresh one shows them a model that has slowed down or stalled.
        if not self._waiters and not (self._board is not None and self.inflight_tokens):
            if self._review_timer is not None:
                self._review_timer.cancel()
                self._review_timer = None
        elif self._review_timer is None:
            delay = self.REVIEW_INTERVAL_S
            if self._waiters:
                delay = min(delay, max(0.0, self._waiters[0].deadline - self._clock()))
            self._review_timer = asyncio.get_running_loop().call_later(delay, self._review)

    def _start(self, tokens: int) -> None:
        if self._busy_since is None:
            self._busy_since = self._clock()
        self.inflight_tokens += tokens

    def leave_board(self) -> None:
        """This worker's record leaves the board (at shutdown)."""
        if self._board is not None:
            self._board.close()
            self._board = None

    def _publish(self) -> None:
        """This worker's share of the model on the board, after every change of it."""
        if self._board is not None:
            rate, inflight_left = self._rate_and_inflight_left()
            self._board.publish(inflight_left, self.queued_tokens, rate)

    def _release(self, tokens: int, finished: bool = False) -> None:
        busy = self._busy_now()
        self.inflight_tokens -= tokens
        if finished:
            self._finished.append((busy, tokens))
            self._window_tokens += tokens
            # Drop the oldest finish while the window still holds enough finishes and busy time without it.
            while len(self._finished) > self.RATE_MIN_FINISHED and (
                    busy - self._finished[0][0] >= self.RATE_WINDOW_S
                    or len(self._finished) > self.RATE_MAX_FINISHED):
                self._window_start, dropped_tokens = self._finished.popleft()
                self._window_tokens -= dropped_tokens
        if self.inflight_tokens == 0 and self._busy_since is not None:
            self._busy_s = busy
            self._busy_since = None
        self._wake()

    def _wake(self) -> None:
        """Start waiters in order while they fit (the head of the line first: no overtaking). A head whose wait is
        over is refused; one whose expected start passes its deadline is not sent to Triton but left to the review,
        which refuses it if it still is: requests that Triton computed together finish milliseconds apart, and
        right after the first the estimate counts the others as not begun."""
        while self._waiters and self._fits(self._waiters[0].tokens):
            waiter = self._waiters[0]
            now = self._clock()
            wait_over = now >= waiter.deadline
            if not wait_over and self._starts_too_late(waiter, now, *self._rate_and_inflight_left()):
                break
            self._waiters.popleft()
            self.queued_tokens -= waiter.tokens
            if wait_over:
                waiter.decision.set_result(self._wait_refusal("did"))
            else:
                self._start(waiter.tokens)
                waiter.decision.set_result(None)
        self._schedule_review()
