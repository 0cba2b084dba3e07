"""The stack's one command line: ``poolserve`` once installed, or ``python -m poolserve_stack``.

* ``serve``: Triton and the HTTP adapter on this machine (``make serve``), vLLM's way:
  ``poolserve serve MODEL [MODEL ...] --port 8080 --api-key KEY --served-model-name NAME [NAME ...]``;
* ``triton``: Triton alone, supervised (the ``triton`` container of compose and Kubernetes);
* ``prepare``: build the built-in checkpoints into the models cache.

``serve`` and ``triton`` take the same model flags (models, ``--model``, ``--set``,
``--served-model-name``, ``--model-repository``, ``--triton-log``), ``--log-format`` and
``--stop-with-parent``, run the same watch loop (a dead stub is reloaded, a dead tritonserver
restarted, a crash loop stops the run) and exit alike: 0 when asked to stop (SIGINT/SIGTERM, during
the start too), 2 when the models named cannot be served or a parameter is wrong (nothing started),
1 when Triton fails to start or crash-loops.

This module imports only what ``--help`` needs: the stack, the adapter, torch and tritonclient are
imported once the command is known.
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

from poolserve_adapter.log_config import LOG_FORMATS, configure_logging
from poolserve_contract.checkpoints import PROJECT_ROOT
from poolserve_stack.plan import DEFAULT_MODELS
from poolserve_stack.processes import signal_me_when_parent_dies


def log_path_arg(value: str) -> Path | None:
    """'-': Triton's log goes to stdout; empty: the default file (see ``startup.default_log_path``)."""
    from poolserve_stack.startup import default_log_path

    return None if value == "-" else Path(value) if value else default_log_path()


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "models", nargs="*", default=[], metavar="MODEL",
        help="a checkpoint (local folder, builtin:NAME or hub id; its config.json picks the architecture), a "
        "model folder, or FOLDER=CHECKPOINT. The first is the default model of requests that name none. "
        f"Default: $MODELS (space-separated), else {' '.join(DEFAULT_MODELS)} with the built-in checkpoints.",
    )
    parser.add_argument("--model", action="append", default=[], metavar="MODEL",
                        help="one more MODEL, after the positional ones; repeatable")
    parser.add_argument("--served-model-name", nargs="+", default=[], metavar="NAME",
                        help="the name clients send as `model`, one per MODEL in their order (default: the "
                        "checkpoint as given, a path too, as vLLM; builtin:NAME is served as NAME)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME.key=value",
                        help="set a model parameter (NAME: the MODEL as given or its Triton name); repeatable; "
                        "unknown keys and bad values are refused before anything starts. Default: $SET "
                        "(space-separated)")
    parser.add_argument("--model-repository", type=Path, default=PROJECT_ROOT / "model_repository")
    parser.add_argument("--triton-log", type=log_path_arg, default="",
                        help="tritonserver's own log file; '-' sends it to stdout (default: "
                        "$MODEL_RUNTIME_CACHE/../logs/tritonserver.log)")
    parser.add_argument("--log-format", choices=LOG_FORMATS, default=None,
                        help="the console's format: text, or json (one object per line: time, level, logger, "
                        "message). Default: $ADAPTER_LOG_FORMAT, else text")
    parser.add_argument("--stop-with-parent", action="store_true",
                        help="stop (as on SIGTERM) when the parent process dies; `make serve` passes it")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="poolserve", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="{serve,triton,prepare}")

    serve = commands.add_parser("serve", help="Triton and the HTTP adapter on this machine (make serve)")
    add_model_arguments(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--api-key", default=None,
                       help="require `Authorization: Bearer KEY` on every route but /health, /ping and /metrics "
                       "(as vLLM's --api-key). Default: $ADAPTER_API_KEY; it reaches the adapter only, never "
                       "Triton or its models. $ADAPTER_API_KEY is the safer form: any local user can read a command line")
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
    parser = build_parser()
    args = parser.parse_args(argv)
    from poolserve_stack.running import EXIT_STOPPED, StopRequests, run_triton

    if args.command == "prepare":
        import logging

        from poolserve_stack.builtin import prepare_all

        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        for name, path in prepare_all(args.cache).items():
            print(f"builtin:{name} -> {path}", flush=True)
        return EXIT_STOPPED
    args.log_format = args.log_format or os.environ.get("ADAPTER_LOG_FORMAT") or "text"
    if args.log_format not in LOG_FORMATS:
        parser.error(f"ADAPTER_LOG_FORMAT={args.log_format!r} is not one of {', '.join(LOG_FORMATS)}")
    configure_logging(args.log_format)
    stop = StopRequests()  # before the parent-death signal can arrive
    if args.stop_with_parent:
        signal_me_when_parent_dies(signal.SIGTERM)
    if args.command == "serve":
        import asyncio

        from poolserve_stack.serve import serve

        return asyncio.run(serve(args, stop))
    return run_triton(args, stop)
