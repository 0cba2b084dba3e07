"""The stack's one command line: ``poolserve`` once installed, or ``python -m poolserve_stack``.

* ``serve``: Triton and the HTTP adapter on this machine (``make serve``);
* ``triton``: Triton alone, supervised (the ``triton`` container of compose and Kubernetes);
* ``prepare``: build the built-in checkpoints into the models cache.

``serve`` and ``triton`` take the same model flags (``--model``, ``--set``, ``--model-repository``,
``--triton-log``) and ``--stop-with-parent``, run the same watch loop (a dead stub is reloaded, a
dead tritonserver restarted, a crash loop stops the run) and exit alike: 0 when asked to stop
(SIGINT/SIGTERM), 2 when the models named cannot be served (nothing started), 1 when Triton fails to
start or crash-loops.
"""

from __future__ import annotations

import argparse
import logging
import signal
from pathlib import Path

from poolserve_contract.checkpoints import PROJECT_ROOT
from poolserve_stack.plan import DEFAULT_MODELS
from poolserve_stack.processes import signal_me_when_parent_dies
from poolserve_stack.running import EXIT_STOPPED, StopRequests, run_triton


def log_path_arg(value: str) -> Path | None:
    """'-': Triton's log goes to stdout; empty: the default file (see ``startup.default_log_path``)."""
    from poolserve_stack.startup import default_log_path

    return None if value == "-" else Path(value) if value else default_log_path()


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
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
    parser.add_argument("--stop-with-parent", action="store_true",
                        help="stop (as on SIGTERM) when the parent process dies; `make serve` passes it")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="poolserve", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="{serve,triton,prepare}")

    serve = commands.add_parser("serve", help="Triton and the HTTP adapter on this machine (make serve)")
    add_model_arguments(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--triton-grpc-port", type=int, default=0, help="0 picks a free port")

    triton = commands.add_parser("triton", help="Triton alone, supervised (the triton container)")
    add_model_arguments(triton)
    triton.add_argument("--address", default="127.0.0.1", help="address Triton binds (0.0.0.0 in a container)")
    triton.add_argument("--http", action="store_true",
                        help="open Triton's HTTP endpoint too (off by default; its control APIs are restricted "
                        "like gRPC's)")
    triton.add_argument("--http-port", type=int, default=8000, help="0 picks a free port")
    triton.add_argument("--grpc-port", type=int, default=8001, help="0 picks a free port")
    triton.add_argument("--metrics-port", type=int, default=8002, help="0 picks a free port")
    triton.add_argument("--ready-timeout", type=float, default=600.0, help="seconds the models may take to load")
    triton.add_argument("--ready-json", action="store_true",
                        help="print one JSON line on stdout once ready (ports, models); progress goes to stderr")

    prepare = commands.add_parser("prepare", help="build the built-in checkpoints into the models cache")
    prepare.add_argument("--cache", type=Path, default=None, help="default: $MODEL_RUNTIME_CACHE or .cache/models")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "prepare":
        from poolserve_stack.builtin import prepare_all

        for name, path in prepare_all(args.cache).items():
            print(f"builtin:{name} -> {path}", flush=True)
        return EXIT_STOPPED
    stop = StopRequests()  # before the parent-death signal can arrive
    if args.stop_with_parent:
        signal_me_when_parent_dies(signal.SIGTERM)
    if args.command == "serve":
        import asyncio

        from poolserve_stack.serve import serve

        return asyncio.run(serve(args, stop))
    return run_triton(args, stop)
