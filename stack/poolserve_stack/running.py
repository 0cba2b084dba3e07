"""What ``poolserve serve`` and ``poolserve triton`` share once their flags are read: the stop
request, the exit codes, the start that fails with one, the console (``say``: the ``poolserve_stack``
logger, in the format ``--log-format`` chose) and Triton's own watch loop."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import time

from poolserve_stack.errors import LauncherError, StartStopped
from poolserve_stack.plan import PlanError
from poolserve_stack.supervision import CrashLoop, Recovery, check_and_recover
from poolserve_stack.triton_server import TritonServer

EXIT_STOPPED, EXIT_FAILED, EXIT_BAD_PLAN = 0, 1, 2

logger = logging.getLogger("poolserve_stack")


def say(line: str) -> None:
    """A line of the stack's console (start-up, progress, the URL served)."""
    logger.info("%s", line)


class StopRequests:
    """SIGINT/SIGTERM handler for the whole run: it only asks everything to stop (a start under way
    gives up at its next poll: ``requested`` is its ``stop_requested``).

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

    def stop_requested(self) -> bool:
        return self.requested


def model_entries(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The models (positional, then --model) and --set, else the MODELS/SET environment variables compose
    passes."""
    return (args.models + args.model or shlex.split(os.environ.get("MODELS", "")),
            args.set or shlex.split(os.environ.get("SET", "")))


def start_or_exit_code(start, prefix: str) -> TritonServer | int:
    """``start()``'s server, or the exit code its failure means (the reason logged)."""
    try:
        return start()
    except PlanError as error:
        logger.error("%s: %s", prefix, error)
        return EXIT_BAD_PLAN
    except StartStopped as stopped:
        say(f"{prefix}: {stopped}")
        return EXIT_STOPPED
    except LauncherError as error:
        logger.error("%s: %s", prefix, error)
        return EXIT_FAILED


def run_triton(args: argparse.Namespace, stop: StopRequests) -> int:
    from poolserve_stack.startup import start_triton

    entries, sets = model_entries(args)
    triton = start_or_exit_code(lambda: start_triton(
        entries, sets, args.model_repository, log_path=args.triton_log, served_names=args.served_model_name,
        say=say, stop_requested=stop.stop_requested, address=args.address,
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
        logger.error("triton: %s", loop)
        return EXIT_FAILED
    finally:
        triton.stop()
    return EXIT_STOPPED
