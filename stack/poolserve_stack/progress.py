"""A line of progress every few seconds while a long step runs (preparing the built-in models, Triton
loading models), so the console never goes quiet for long: which step, how long it has taken."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

# Quiet for at most this long during a step.
PROGRESS_EVERY_S = 5.0


class CurrentStep:
    """The step a long task is on: the task sets it, :func:`reporting` reads it."""

    def __init__(self, step: str) -> None:
        self.step = step

    def set(self, step: str) -> None:
        self.step = step

    def __call__(self) -> str:
        return self.step


@contextlib.contextmanager
def reporting(say: Callable[[str], None], describe: Callable[[], str],
              every_s: float = PROGRESS_EVERY_S) -> Iterator[None]:
    """While the ``with`` block runs, ``say`` ``describe()`` and the time taken every ``every_s``, from a
    thread of its own (the step itself may block in a long call: a torch import, a gRPC load)."""
    began, done = time.monotonic(), threading.Event()

    def tick() -> None:
        while not done.wait(every_s):
            say(f"  ... {describe()} ({time.monotonic() - began:.0f} s)")

    ticker = threading.Thread(target=tick, name="progress", daemon=True)
    ticker.start()
    try:
        yield
    finally:
        done.set()
        ticker.join()
