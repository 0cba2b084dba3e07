"""The Triton half of the stack: ``python -m poolserve_runtime.serve_triton`` runs it alone (the
``triton`` container of docker-compose.yml and of the Kubernetes pod); ``make serve`` runs the same
start-up before its adapter.

1. prepares the built-in checkpoints when the plan uses them (cached in ``$MODEL_RUNTIME_CACHE``);
2. plans the models (``--model``/``$MODELS``, ``--set``/``$SET``, as ``make serve`` takes them);
3. starts tritonserver with its own log in a file (its path printed: the console shows what
   loaded, where and how fast; a failure prints the log's tail);
4. supervises it: a dead stub is reloaded, a dead server restarted, a crash loop exits 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import sys
import time
from pathlib import Path

from poolserve_runtime.checkpoints import PROJECT_ROOT, models_cache
from poolserve_runtime.launcher import LauncherError, ServerDied, StubDied, TritonServer
from poolserve_runtime.serving_plan import DEFAULT_MODELS, PlanError, parse_sets, plan_models, uses_builtins
from poolserve_runtime.supervision import CrashLoop, Recovery, describe_models, recover


def default_log_path() -> Path:
    """``<cache>/../logs/tritonserver.log``: ``.cache/logs`` here, ``/cache/logs`` (the volume) in a container."""
    return models_cache().parent / "logs" / "tritonserver.log"


def start_triton(entries: list[str], sets: list[str], repository: Path, *, log_path: Path | None,
                 **server_options) -> TritonServer:
    """Prepare, plan and start; raises :class:`PlanError` or :class:`LauncherError` with the reason."""
    if uses_builtins(entries, repository):
        began = time.monotonic()
        print("Preparing built-in models (cached after the first run)...", end=" ", flush=True)
        from poolserve_runtime.builtin import prepare_all  # torch, only when needed

        prepare_all()
        print(f"done in {time.monotonic() - began:.1f} s", flush=True)
    models = plan_models(entries or list(DEFAULT_MODELS), repository, parse_sets(sets))
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_bytes(b"")  # this run's log only; restarts within the run append
    triton = TritonServer(model_repository=repository, models=models, log_path=log_path, **server_options)
    where = f"its log: {log_path}" if log_path is not None else "its log follows"
    print(f"Starting tritonserver with {len(models)} model{'s' if len(models) != 1 else ''} ({where})...", flush=True)
    began = time.monotonic()
    triton.start()
    print(describe_models(triton), flush=True)
    http = f"HTTP :{triton.http_port}" if triton.http else "HTTP off"
    print(f"Triton ready in {time.monotonic() - began:.1f} s on {triton.address}: gRPC :{triton.grpc_port}, "
          f"{http}, metrics :{triton.metrics_port}; inference {'needs $TRITON_INFERENCE_KEY' if triton.inference_key else 'open'}, "
          "model control only to this supervisor", flush=True)
    return triton


def log_path_arg(value: str) -> Path | None:
    """'-': Triton's log goes to stdout; empty: :func:`default_log_path`."""
    return None if value == "-" else Path(value) if value else default_log_path()


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model/--set/--model-repository/--triton-log, shared with ``python -m poolserve_adapter.stack``."""
    parser.add_argument(
        "--model", action="append", default=[], metavar="CHECKPOINT|FOLDER[=CHECKPOINT]",
        help="a checkpoint (local folder, builtin:NAME or hub id; its config.json picks the architecture), a "
        "model folder, or FOLDER=CHECKPOINT; repeatable. Default: $MODELS (space-separated), else "
        f"{' '.join(DEFAULT_MODELS)} with the built-in checkpoints.",
    )
    parser.add_argument("--set", action="append", default=[], metavar="NAME.key=value",
                        help="set a model parameter (NAME: the --model value or its Triton name); repeatable. "
                        "Default: $SET (space-separated)")
    parser.add_argument("--model-repository", type=Path, default=PROJECT_ROOT / "model_repository")
    parser.add_argument("--triton-log", type=log_path_arg, default="",
                        help="tritonserver's own log file; '-' sends it to stdout (default: "
                        "$MODEL_RUNTIME_CACHE/../logs/tritonserver.log)")


def model_entries(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """--model/--set, else the MODELS/SET environment variables ``make serve`` and compose pass."""
    return (args.model or shlex.split(os.environ.get("MODELS", "")),
            args.set or shlex.split(os.environ.get("SET", "")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m poolserve_runtime.serve_triton",
                                     description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--address", default="127.0.0.1", help="address Triton binds (0.0.0.0 in a container)")
    parser.add_argument("--http", action="store_true",
                        help="open Triton's HTTP endpoint too (off by default; its control APIs are restricted "
                        "like gRPC's)")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    stopping = False

    def request_stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    entries, sets = model_entries(args)
    try:
        triton = start_triton(entries, sets, args.model_repository,
                              log_path=args.triton_log,
                              address=args.address, http=args.http, http_port=args.http_port, grpc_port=args.grpc_port,
                              metrics_port=args.metrics_port)
    except PlanError as error:
        print(f"serve_triton: {error}", file=sys.stderr, flush=True)
        return 2
    except LauncherError as error:
        print(f"serve_triton: {error}", file=sys.stderr, flush=True)
        return 1
    recovery = Recovery()
    try:
        while not stopping:
            try:
                triton.check()
            except (StubDied, ServerDied) as died:
                recover(triton, died, recovery)
            time.sleep(0.5)
    except CrashLoop as loop:
        print(f"serve_triton: {loop}", file=sys.stderr, flush=True)
        return 1
    finally:
        triton.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
