"""Keeping a :class:`~poolserve_stack.triton_server.TritonServer` serving: what ``make serve`` and the
compose/Kubernetes ``triton`` container share.

* :class:`Recovery` bounds restarts: each target (one model's stub, or tritonserver) may fail
  ``limit`` times in ``window_s``; one failure more is a crash loop, reported, and the process exits
  non-zero for its supervisor (compose, systemd, Kubernetes) to act on.
* :func:`recover` handles one failure :meth:`TritonServer.check` raised: a dead stub is reloaded
  (the other models keep serving), a dead tritonserver is restarted on the same ports. A model that
  a holder of the control key unloaded is left so, and never counts towards a crash loop.
* :func:`describe_models` is the start-up summary a newcomer reads instead of Triton's own log.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from poolserve_contract.parameters import served_name
from poolserve_contract.wire import SOURCE_FOLDER
from poolserve_stack.errors import LauncherError, ModelUnloaded, ServerDied, StubDied
from poolserve_stack.triton_server import TritonServer

logger = logging.getLogger("poolserve_stack")


@dataclass
class Recovery:
    limit: int = 3
    window_s: float = 300.0
    failures: dict[str, list[float]] = field(default_factory=dict)

    def allow(self, target: str) -> bool:
        now = time.monotonic()
        recent = [t for t in self.failures.get(target, []) if now - t < self.window_s] + [now]
        self.failures[target] = recent
        return len(recent) <= self.limit

    def backoff_s(self, target: str) -> float:
        return min(8.0, 0.5 * 2 ** (len(self.failures.get(target, [])) - 1))


class CrashLoop(LauncherError):
    """A target failed more often than :class:`Recovery` allows."""


def recover(triton: TritonServer, died: StubDied | ServerDied, recovery: Recovery, sleep=time.sleep) -> None:
    """Bring back what ``died`` names, or raise :class:`CrashLoop`. A failed attempt is only logged:
    the next :meth:`TritonServer.check` sees it again and it counts again."""
    if isinstance(died, ModelUnloaded):  # an operator's decision, not a failure
        logger.warning("%s", died)
        return
    target = died.model if isinstance(died, StubDied) else "tritonserver"
    if not recovery.allow(target):
        raise CrashLoop(f"{target} crash-looping ({recovery.limit} restarts within {recovery.window_s:g} s): {died}")
    logger.warning("%s died; %s", target, "reloading it" if target != "tritonserver" else "restarting")
    sleep(recovery.backoff_s(target))
    try:
        triton.reload(died.model) if isinstance(died, StubDied) else triton.restart()
        logger.warning("%s is back", target)
    except LauncherError as error:
        logger.error("recovering %s failed: %s", target, error)


def placement(config: dict) -> str:
    """Where Triton placed a model's instances: "1 instance on CPU", "2 instances on GPU 0, 1"."""
    groups = config.get("instance_group", [])
    count = sum(int(group.get("count", 1)) for group in groups)
    gpus = sorted({gpu for group in groups for gpu in group.get("gpus", [])})
    kinds = sorted({group.get("kind", "KIND_AUTO").removeprefix("KIND_") for group in groups})
    where = f"GPU {', '.join(map(str, gpus))}" if gpus else "/".join(kinds) or "AUTO"
    return f"{count} instance{'s' if count != 1 else ''} on {where}"


def describe_models(triton: TritonServer) -> str:
    """One line per loaded model, from the config Triton loaded: the name clients send, its Triton
    model and folder, its checkpoint, where its instances run and how long the load took."""
    lines = []
    for name, planned in triton.models.items():
        config = triton.model_config(name)
        parameters = {**{key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()},
                      **planned}
        seconds = triton.load_seconds.get(name)
        lines.append(f"  {served_name(parameters, name)}: Triton model {name} "
                     f"({parameters.get(SOURCE_FOLDER, name)}, {parameters.get('checkpoint', '?')}), "
                     f"{placement(config)}" + (f", loaded in {seconds:.1f} s" if seconds is not None else ""))
    return "\n".join(lines)


def check_and_recover(triton: TritonServer, recovery: Recovery) -> None:
    """One look at the server, as every watch loop takes it: bring back whatever died since the last
    look, or raise :class:`CrashLoop`."""
    try:
        triton.check()
    except (StubDied, ServerDied) as died:
        recover(triton, died, recovery)
