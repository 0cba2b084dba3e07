"""From the models a user names to a ready, supervised tritonserver: what every subcommand shares.

1. prepares the built-in checkpoints when the plan uses them (cached in ``$MODEL_RUNTIME_CACHE``);
2. plans the models (``--model``/``$MODELS``, ``--set``/``$SET``);
3. starts tritonserver with its own log in a file (its path printed: the console shows what
   loaded, where and how fast; a failure prints the log's tail).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from poolserve_contract.checkpoints import models_cache
from poolserve_stack.plan import DEFAULT_MODELS, parse_sets, plan_models, uses_builtins
from poolserve_stack.supervision import describe_models
from poolserve_stack.triton_server import TritonServer


def default_log_path() -> Path:
    """``<cache>/../logs/tritonserver.log``: ``.cache/logs`` here, ``/cache/logs`` (the volume) in a container."""
    return models_cache().parent / "logs" / "tritonserver.log"


def start_triton(entries: list[str], sets: list[str], repository: Path, *, log_path: Path | None,
                 say: Callable[[str], None] = print, **server_options) -> TritonServer:
    """Prepare, plan and start; raises :class:`PlanError` or :class:`LauncherError` with the reason.
    ``say`` prints the progress lines a newcomer reads instead of Triton's own log."""
    if uses_builtins(entries, repository):
        began = time.monotonic()
        from poolserve_stack.builtin import prepare_all  # torch, only when needed

        prepare_all()
        say(f"Prepared the built-in models in {time.monotonic() - began:.1f} s (cached after the first run)")
    models = plan_models(entries or list(DEFAULT_MODELS), repository, parse_sets(sets))
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_bytes(b"")  # this run's log only; restarts within the run append
    triton = TritonServer(model_repository=repository, models=models, log_path=log_path, **server_options)
    where = f"its log: {log_path}" if log_path is not None else "its log follows"
    say(f"Starting tritonserver with {len(models)} model{'s' if len(models) != 1 else ''} ({where})...")
    began = time.monotonic()
    triton.start()
    say(describe_models(triton))
    http = f"HTTP :{triton.http_port}" if triton.http else "HTTP off"
    say(f"Triton ready in {time.monotonic() - began:.1f} s on {triton.address}: gRPC :{triton.grpc_port}, "
        f"{http}, metrics :{triton.metrics_port}; inference "
        f"{'needs $TRITON_INFERENCE_KEY' if triton.inference_key else 'open'}, model control only to this supervisor")
    return triton
