"""``make serve``: the whole stack on this machine, with no Docker and no hub.

1. prepares the built-in checkpoints (cached after the first run);
2. starts ``tritonserver`` through the project's launcher, loading the default model folders
   (``bert_classifier`` → builtin:sentiment-minilm, ``bert_embedder`` → builtin:all-MiniLM-L6-v2)
   or the ones named with ``--model`` (see :mod:`poolserve_runtime.serving_plan`);
3. runs the HTTP adapter on ``--host``/``--port`` and prints the URL and a sample request;
4. reloads a model whose stub dies and restarts a dead tritonserver (bounded: a crash loop stops the
   stack with a non-zero exit), and stops everything on Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

import uvicorn

from poolserve_adapter.app import create_app
from poolserve_adapter.connections import server_options
from poolserve_adapter.log_config import uvicorn_log_config
from poolserve_adapter.settings import Settings
from poolserve_runtime.launcher import LauncherError, ServerDied, StubDied, TritonServer, signal_me_when_parent_dies
from poolserve_runtime.serve_triton import add_model_arguments, model_entries, start_triton
from poolserve_runtime.serving_plan import PlanError
from poolserve_runtime.supervision import CrashLoop, Recovery, recover

# After the adapter stops, tritonserver gets this long to exit before it and its stubs are killed.
STOP_GRACE_S = 2.0


def sample_requests(base_url: str) -> str:
    return (
        f"curl -s {base_url}/classify -H 'Content-Type: application/json' \\\n"
        "  -d '{\"model\": \"sentiment-minilm\", \"input\": [\"I love this!\", \"This is terrible.\"]}'\n"
        f"curl -s {base_url}/rerank -H 'Content-Type: application/json' \\\n"
        "  -d '{\"model\": \"all-MiniLM-L6-v2\", \"query\": \"What is the capital of France?\", "
        "\"documents\": [\"Berlin is in Germany.\", \"Paris is the capital of France.\"]}'"
    )


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
            try:
                await asyncio.to_thread(recover, triton, died, recovery)
            except CrashLoop as loop:
                failures.append(str(loop))
                web.should_exit = True
                break
        await asyncio.sleep(0.5)


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


async def serve(args: argparse.Namespace, stop: _StopRequests) -> int:
    entries, sets = model_entries(args)
    try:
        triton = await asyncio.to_thread(start_triton, entries, sets, args.model_repository,
                                         log_path=args.triton_log, grpc_port=args.triton_grpc_port)
    except PlanError as error:
        print(f"serve: {error}", file=sys.stderr, flush=True)
        return 2
    except LauncherError as error:
        print(f"serve: {error}", file=sys.stderr, flush=True)
        return 1
    failures: list[str] = []
    try:
        if stop.requested:
            return 0
        # The stack's own Triton and address; every other setting (ADAPTER_*) as the environment says.
        settings = Settings(triton_grpc_url=triton.grpc_url, model_repository=args.model_repository,
                            host=args.host, port=args.port, triton_inference_key=triton.inference_key)
        if settings.triton_metrics_url is None:  # Triton's own metrics are appended to the adapter's /metrics
            settings = settings.model_copy(
                update={"triton_metrics_url": f"http://127.0.0.1:{triton.metrics_port}/metrics"})
        web = uvicorn.Server(uvicorn.Config(create_app(settings), host=args.host, port=args.port, log_level="info",
                                            log_config=uvicorn_log_config(), **server_options(settings)))
        stop.web = web
        watcher = asyncio.create_task(_watch(triton, web, failures, Recovery()))
        await web.serve()
        watcher.cancel()
    finally:
        # The adapter has drained and cut what was left: Triton's work is nobody's any more.
        await asyncio.to_thread(triton.stop, STOP_GRACE_S)
    if failures:
        print(f"serve: {failures[0]}", file=sys.stderr, flush=True)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m poolserve_adapter.stack", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    add_model_arguments(parser)
    parser.add_argument("--triton-grpc-port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--stop-with-parent", action="store_true",
                        help="stop (as on SIGTERM) when the parent process dies; `make serve` passes it")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parser.parse_args(argv)
    stop = _StopRequests()  # before the parent-death signal can arrive
    if args.stop_with_parent:
        signal_me_when_parent_dies(signal.SIGTERM)
    return asyncio.run(serve(args, stop))


if __name__ == "__main__":
    sys.exit(main())
