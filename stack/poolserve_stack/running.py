"""What ``poolserve serve`` and ``poolserve triton`` share once their flags are read: the stop
request, the exit codes, the start that fails with one, and Triton's own watch loop."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import time

from poolserve_stack.errors import LauncherError
from poolserve_stack.plan import PlanError
from poolserve_stack.supervision import CrashLoop, Recovery, check_and_recover
from poolserve_stack.triton_server import TritonServer

EXIT_STOPPED, EXIT_FAILED, EXIT_BAD_PLAN = 0, 1, 2


class StopRequests:
    """SIGINT/SIGTERM handler for the whole run: it only asks everything to stop.

    uvicorn handles the signals while it serves and re-raises them once it has shut down; with the
    default handlers that would kill this process before Triton is stopped, so ours stay installed
    around it (``on_stop`` tells uvicorn).
    """

    def __init__(self) -> None:
        self.requested = False
        self.on_stop = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self)

    def __call__(self, signum: int, _frame: object) -> None:
        self.requested = True
        if self.on_stop is not None:
            self.on_stop()


def model_entries(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """--model/--set, else the MODELS/SET environment variables ``make serve`` and compose pass."""
    return (args.model or shlex.split(os.environ.get("MODELS", "")),
            args.set or shlex.split(os.environ.get("SET", "")))


def start_or_exit_code(start, prefix: str) -> TritonServer | int:
    """``start()``'s server, or the exit code its failure means (the reason printed)."""
    try:
        return start()
    except PlanError as error:
        print(f"{prefix}: {error}", file=sys.stderr, flush=True)
        return EXIT_BAD_PLAN
    except LauncherError as error:
        print(f"{prefix}: {error}", file=sys.stderr, flush=True)
        return EXIT_FAILED


def run_triton(args: argparse.Namespace, stop: StopRequests) -> int:
    from poolserve_stack.startup import start_triton

    def say(line: str) -> None:
        print(line, file=sys.stderr if args.ready_json else sys.stdout, flush=True)

    entries, sets = model_entries(args)
    triton = start_or_exit_code(lambda: start_triton(
        entries, sets, args.model_repository, log_path=args.triton_log, say=say, address=args.address,
        http=args.http, http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=args.metrics_port,
        ready_timeout_s=args.ready_timeout), "triton")
    if isinstance(triton, int):
        return triton
    if args.ready_json:
        print(json.dumps({"ready": True, "http": triton.http_url if triton.http else None, "grpc": triton.grpc_url,
                          "metrics_port": triton.metrics_port, "models": sorted(triton.models)}), flush=True)
    recovery = Recovery()
    try:
        while not stop.requested:
            check_and_recover(triton, recovery)
            time.sleep(0.5)
    except CrashLoop as loop:
        print(f"triton: {loop}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    finally:
        triton.stop()
    return EXIT_STOPPED
