"""Admission control: a bound on the work each served model holds, and on how long a request waits.

Without it every request waits in Triton's queue, and under overload all of them time out late
(60 s) instead of a few being refused at once. Per Triton model and adapter worker:

* up to ``max_inflight_tokens`` tokens are being computed (sent to Triton); a request larger than
  the bound alone runs when nothing else does;
* up to ``max_queued_tokens`` more wait here, first come first served, each at most
  ``max_wait_s``; and no more than the model gets through in ``max_wait_s`` at the rate measured
  over the last seconds (tokens finished per second of busy time), so that on a slow machine the
  excess is refused at once instead of after a wait it would not survive;
* anything beyond is refused at once with 429 and ``Retry-After`` (what OpenAI's, Cohere's and
  TEI's clients retry on; TEI answers 429 when its permits are spent).

A request that leaves (client gone, cancelled) gives its place back whether it waited or ran.

Refusing is cheap only if it comes before the work: :meth:`Admission.refuse_if_full` runs before a
request is tokenized and refuses it when a request as small as the smallest of the recent ones would
not fit in the queue, so an overloaded worker spends no tokenizer time on requests it will refuse.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import time

from poolserve_adapter.errors import TooManyRequestsError
from poolserve_adapter.metrics import get_metrics


class Admission:
    def __init__(self, model: str, *, max_inflight_tokens: int, max_queued_tokens: int, max_wait_s: float):
        self.model = model
        self.max_inflight_tokens = max_inflight_tokens
        self.max_queued_tokens = max_queued_tokens
        self.max_wait_s = max_wait_s
        self.inflight_tokens = 0
        self.queued_tokens = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future]] = collections.deque()
        # Sizes of the last requests seen: the smallest is what an untokenized request costs at least.
        self._recent_sizes: collections.deque[int] = collections.deque(maxlen=64)
        # Finished requests of the last RATE_WINDOW_S: (time, tokens, busy seconds so far then).
        self._finished: collections.deque[tuple[float, int, float]] = collections.deque()
        self._finished_tokens = 0  # sum over _finished but its oldest entry
        self._busy_s = 0.0  # time with work in flight, up to _busy_since
        self._busy_since: float | None = None  # set while work is in flight

    RATE_WINDOW_S = 5.0

    def _busy_now(self, now: float) -> float:
        return self._busy_s + (now - self._busy_since if self._busy_since is not None else 0.0)

    def rate(self) -> float | None:
        """Tokens finished per second of busy time over the last RATE_WINDOW_S (None: too few yet)."""
        now = time.monotonic()
        while self._finished and now - self._finished[0][0] > self.RATE_WINDOW_S:
            self._finished.popleft()
            if self._finished:
                self._finished_tokens -= self._finished[0][1]  # the new oldest entry leaves the sum
        if len(self._finished) < 4:
            return None
        busy = self._busy_now(now) - self._finished[0][2]
        return self._finished_tokens / max(busy, 1e-3)

    def _queue_too_slow(self, extra_tokens: int) -> bool:
        """The queue ahead would take longer than max_wait_s to drain at the measured rate."""
        rate = self.rate()
        return rate is not None and (self.queued_tokens + extra_tokens) / rate > self.max_wait_s

    def _fits(self, tokens: int) -> bool:
        return self.inflight_tokens == 0 or self.inflight_tokens + tokens <= self.max_inflight_tokens

    def _refuse(self, reason: str, message: str) -> TooManyRequestsError:
        get_metrics().rejected.labels(self.model, reason).inc()
        retry_after = max(1, math.ceil(self.max_wait_s))
        return TooManyRequestsError(message, retry_after_s=retry_after)

    def refuse_if_full(self) -> None:
        """Before tokenizing: refuse at once when the queue has no room for a request as small as the
        smallest recent one (the full check comes in :meth:`admit` once the size is known)."""
        if self._waiters and self._recent_sizes:
            smallest = min(self._recent_sizes)
            if self.queued_tokens + smallest > self.max_queued_tokens or self._queue_too_slow(smallest):
                raise self._refuse("queue_full", self._queue_full_message())

    def _queue_full_message(self) -> str:
        return f"The server is busy: model {self.model} holds its maximum of queued work. Retry later."

    @contextlib.asynccontextmanager
    async def admit(self, tokens: int):
        metrics = get_metrics()
        started = time.perf_counter()
        self._recent_sizes.append(tokens)
        if self._waiters or not self._fits(tokens):
            if self.queued_tokens + tokens > self.max_queued_tokens or self._queue_too_slow(tokens):
                raise self._refuse("queue_full", self._queue_full_message())
            waiter = asyncio.get_running_loop().create_future()
            entry = (tokens, waiter)
            self._waiters.append(entry)
            self.queued_tokens += tokens
            try:
                await asyncio.wait_for(asyncio.shield(waiter), timeout=self.max_wait_s)
            except (asyncio.TimeoutError, asyncio.CancelledError) as error:
                if waiter.done() and not waiter.cancelled():  # admitted just as it gave up: hand it on
                    self._release(tokens)
                else:
                    waiter.cancel()
                    self._waiters.remove(entry)
                    self.queued_tokens -= tokens
                    self._wake()
                if isinstance(error, asyncio.CancelledError):
                    raise
                raise self._refuse("wait_timeout", f"The server is busy: model {self.model} did not start this "
                                                   f"request within {self.max_wait_s:g} s. Retry later.") from None
        else:
            self._start(tokens)
        metrics.admitted.labels(self.model).inc()
        metrics.queue_wait.labels(self.model).observe(time.perf_counter() - started)
        try:
            yield
        except BaseException:
            self._release(tokens)
            raise
        self._release(tokens, finished=True)

    def _start(self, tokens: int) -> None:
        if self._busy_since is None:
            self._busy_since = time.monotonic()
        self.inflight_tokens += tokens

    def _release(self, tokens: int, finished: bool = False) -> None:
        now = time.monotonic()
        self.inflight_tokens -= tokens
        if finished:
            if self._finished:
                self._finished_tokens += tokens
            self._finished.append((now, tokens, self._busy_now(now)))
        if self.inflight_tokens == 0 and self._busy_since is not None:
            self._busy_s += now - self._busy_since
            self._busy_since = None
        self._wake()

    def _wake(self) -> None:
        """Start waiters in order while they fit (the head of the line first: no overtaking)."""
        while self._waiters and self._fits(self._waiters[0][0]):
            tokens, waiter = self._waiters.popleft()
            self.queued_tokens -= tokens
            if waiter.cancelled():
                continue
            self._start(tokens)
            waiter.set_result(None)
