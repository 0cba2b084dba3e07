"""``make serve``: the whole stack on this machine, with no Docker and no hub.

1. prepares the built-in checkpoints (cached after the first run);
2. starts ``tritonserver`` through the project's launcher, loading the default model folders
   (``bert_classifier`` → builtin:sentiment-minilm, ``bert_embedder`` → builtin:all-MiniLM-L6-v2)
   or the ones named with ``--model`` (see :mod:`model_runtime.serving_plan`);
3. runs the HTTP adapter on ``--host``/``--port`` and prints the URL and a sample request;
4. reloads a model whose stub dies and restarts a dead tritonserver (bounded: a crash loop stops the
   stack with a non-zero exit), and stops everything on Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import logging
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn

from adapter.app import create_app
from adapter.settings import Settings
from model_runtime.builtin import prepare_all
from model_runtime.checkpoints import PROJECT_ROOT, served_name
from model_runtime.launcher import SOURCE_FOLDER, LauncherError, ServerDied, StubDied, TritonServer
from model_runtime.serving_plan import PlanError, parse_sets, plan_models

DEFAULT_MODELS = ("bert_classifier", "bert_embedder")
logger = logging.getLogger("serve")


def sample_requests(base_url: str) -> str:
    return (
        f"curl -s {base_url}/classify -H 'Content-Type: application/json' \\\n"
        "  -d '{\"model\": \"sentiment-minilm\", \"input\": [\"I love this!\", \"This is terrible.\"]}'\n"
        f"curl -s {base_url}/rerank -H 'Content-Type: application/json' \\\n"
        "  -d '{\"model\": \"all-MiniLM-L6-v2\", \"query\": \"What is the capital of France?\", "
        "\"documents\": [\"Berlin is in Germany.\", \"Paris is the capital of France.\"]}'"
    )


@dataclass
class Recovery:
    """Bounded restarts: each target (a model's stub, or tritonserver) may fail ``limit`` times in
    ``window_s``; one more failure is a crash loop, reported, and the stack exits non-zero for its
    supervisor (compose, systemd, Kubernetes) to act on."""

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


async def _watch(triton: TritonServer, web: uvicorn.Server, failures: list[str], recovery: Recovery) -> None:
    """Announce the URL once up; reload a model whose stub died (the others keep serving), restart a
    dead tritonserver on the same ports; stop everything on a crash loop."""
    announced = False
    while not web.should_exit:
        if web.started and not announced:
            base_url = f"http://{web.config.host}:{web.config.port}"
            print(f"\nServing on {base_url}  (Triton gRPC {triton.grpc_url}, OpenAPI {base_url}/docs)", flush=True)
            print("Try:\n" + sample_requests(base_url) + "\n", flush=True)
            announced = True
        try:
            triton.check()
        except (StubDied, ServerDied) as died:
            target = died.model if isinstance(died, StubDied) else "tritonserver"
            if not recovery.allow(target):
                failures.append(f"{target} crash-looping ({recovery.limit} restarts within {recovery.window_s:g} s): "
                                f"{died}")
                web.should_exit = True
                break
            logger.warning("%s died; %s", target, "reloading it" if target != "tritonserver" else "restarting")
            await asyncio.sleep(recovery.backoff_s(target))
            try:
                if isinstance(died, StubDied):
                    await asyncio.to_thread(triton.reload, died.model)
                else:
                    await asyncio.to_thread(triton.restart)
                logger.warning("%s is back", target)
            except LauncherError as error:
                logger.error("recovering %s failed: %s", target, error)  # checked again, counted again
        await asyncio.sleep(0.5)


def uses_builtins(model_args: list[str], repository: Path) -> bool:
    """Whether the plan needs the built-in checkpoints: the defaults, a ``builtin:`` checkpoint, or a
    model folder named alone (its config.pbtxt's default checkpoint is a built-in one)."""
    return not model_args or any("builtin:" in arg or ("=" not in arg and (repository / arg).is_dir())
                                 for arg in model_args)


class _StopRequests:
    """SIGINT/SIGTERM handler for the whole run.

    uvicorn handles the signals while it serves and re-raises them once it has shut down; with
    the default handlers that would kill this process before Triton is stopped, so ours stay
    installed around it and only ask everything to stop.
    """

    def __init__(self) -> None:
        self.requested = False
        self.web: uvicorn.Server | None = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self)

    def __call__(self, signum: int, _frame: object) -> None:
        self.requested = True
        if self.web is not None:
            self.web.should_exit = True


async def serve(args: argparse.Namespace) -> int:
    stop = _StopRequests()
    if uses_builtins(args.model, args.model_repository):
        print("Preparing built-in models (cached after the first run)...", flush=True)
        await asyncio.to_thread(prepare_all)
    try:
        models = plan_models(args.model or list(DEFAULT_MODELS), args.model_repository, parse_sets(args.set))
    except PlanError as error:
        print(f"serve: {error}", file=sys.stderr, flush=True)
        return 2
    for name, parameters in models.items():
        print(f"  {served_name(parameters, name)}: Triton model {name} ({parameters[SOURCE_FOLDER]})", flush=True)
    triton = TritonServer(
        model_repository=args.model_repository,
        models=models,
        grpc_port=args.triton_grpc_port,
        log_path=args.triton_log,
    )
    print(f"Starting tritonserver with {', '.join(triton.models)}...", flush=True)
    try:
        await asyncio.to_thread(triton.start)
    except LauncherError as error:
        print(f"serve: {error}", file=sys.stderr, flush=True)
        return 1
    failures: list[str] = []
    try:
        if stop.requested:
            return 0
        # Triton's own metrics are appended to the adapter's /metrics unless the environment says otherwise.
        metrics_url = os.environ.get("ADAPTER_TRITON_METRICS_URL") or f"http://127.0.0.1:{triton.metrics_port}/metrics"
        settings = Settings(triton_grpc_url=triton.grpc_url, model_repository=args.model_repository,
                            host=args.host, port=args.port, triton_metrics_url=metrics_url)
        web = uvicorn.Server(uvicorn.Config(create_app(settings), host=args.host, port=args.port, log_level="info"))
        stop.web = web
        watcher = asyncio.create_task(_watch(triton, web, failures, Recovery()))
        await web.serve()
        watcher.cancel()
    finally:
        await asyncio.to_thread(triton.stop)
    if failures:
        print(f"serve: {failures[0]}", file=sys.stderr, flush=True)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adapter.stack", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument(
        "--model", action="append", default=[], metavar="CHECKPOINT|FOLDER[=CHECKPOINT]",
        help="a checkpoint (local folder, builtin:NAME or hub id; its config.json picks the architecture), a "
        "model folder, or FOLDER=CHECKPOINT; repeatable. "
        f"Default: {' '.join(DEFAULT_MODELS)} with the built-in checkpoints.",
    )
    parser.add_argument("--set", action="append", default=[], metavar="NAME.key=value",
                        help="set a model parameter (NAME: the --model value or its Triton name); repeatable")
    parser.add_argument("--model-repository", type=Path, default=PROJECT_ROOT / "model_repository")
    parser.add_argument("--triton-grpc-port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--triton-log", type=Path, default=None, help="tritonserver log file (default: stdout)")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return asyncio.run(serve(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
