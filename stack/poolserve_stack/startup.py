"""From the models a user names to a ready, supervised tritonserver: what every subcommand shares.

1. checks the parameters set (``--set``/``$SET``, ``--served-model-name``) before anything else, so a
   typo is refused at once (:func:`poolserve_stack.plan.check_sets`);
2. prepares the built-in checkpoints when the plan uses them (cached in ``$MODEL_RUNTIME_CACHE``);
3. plans the models (``--model``/``$MODELS``);
4. starts tritonserver with its own log in a file (its path printed: the console shows what
   loaded, where and how fast; a failure prints the log's tail).

Preparing and loading say a line of progress every few seconds (:mod:`poolserve_stack.progress`), and
a stop asked meanwhile (``stop_requested``) ends the start with :class:`~poolserve_stack.errors.StartStopped`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from poolserve_contract.checkpoints import models_cache
from poolserve_stack.errors import StartStopped
from poolserve_stack.plan import (
    DEFAULT_MODELS,
    PlanError,
    check_sets,
    parse_sets,
    plan_models,
    uses_builtins,
    with_served_names,
)
from poolserve_stack.progress import CurrentStep, reporting
from poolserve_stack.supervision import describe_models
from poolserve_stack.triton_server import TritonServer


def default_log_path() -> Path:
    """``<cache>/../logs/tritonserver.log``: ``.cache/logs`` here, ``/cache/logs`` (the volume) in a container."""
    return models_cache().parent / "logs" / "tritonserver.log"


def start_triton(entries: list[str], sets: list[str], repository: Path, *, log_path: Path | None,
                 served_names: list[str] = (), say: Callable[[str], None] = print,
                 stop_requested: Callable[[], bool] = lambda: False, **server_options) -> TritonServer:
    """Check, prepare, plan and start; raises :class:`PlanError`, :class:`LauncherError` or
    :class:`StartStopped` with the reason. ``say`` prints the progress lines a newcomer reads instead
    of Triton's own log."""
    if served_names and not entries:
        # argparse's nargs="+" takes a model written after --served-model-name as one more name.
        raise PlanError(f"--served-model-name {' '.join(served_names)} was given with no model: name the models "
                        "first (poolserve serve MODEL ... --served-model-name NAME ...)")
    entries = list(entries or DEFAULT_MODELS)
    named_sets = with_served_names(entries, list(served_names), parse_sets(sets))
    check_sets(named_sets)
    if uses_builtins(entries, repository):
        began = time.monotonic()
        from poolserve_stack.builtin import prepare_all  # torch, only when needed

        step = CurrentStep("preparing the built-in models")
        with reporting(say, step):
            prepare_all(report=step.set)
        say(f"Prepared the built-in models in {time.monotonic() - began:.1f} s (cached after the first run)")
    if stop_requested():
        raise StartStopped("stopped before starting tritonserver")
    models = plan_models(entries, repository, named_sets)
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_bytes(b"")  # this run's log only; restarts within the run append
    triton = TritonServer(model_repository=repository, models=models, log_path=log_path,
                          stop_requested=stop_requested, **server_options)
    where = f"its log: {log_path}" if log_path is not None else "its log follows"
    say(f"Starting tritonserver with {len(models)} model{'s' if len(models) != 1 else ''} ({where})...")
    began = time.monotonic()
    with reporting(say, triton.progress):
        triton.start()
    for line in describe_models(triton).splitlines():  # one record each: every line in the log format
        say(line)
    http = f"HTTP :{triton.http_port}" if triton.http else "HTTP off"
    say(f"Triton ready in {time.monotonic() - began:.1f} s on {triton.address}: gRPC :{triton.grpc_port}, "
        f"{http}, metrics :{triton.metrics_port}; inference "
        f"{'needs $TRITON_INFERENCE_KEY' if triton.inference_key else 'open'}, model control only to this supervisor")
    return triton
