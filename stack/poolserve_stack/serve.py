"""``poolserve serve`` (``make serve``): the whole stack on this machine, with no Docker and no hub.

1. starts ``tritonserver`` as every subcommand does (:mod:`poolserve_stack.startup`), loading the
   default model folders (``bert_classifier`` → builtin:sentiment-minilm, ``bert_embedder`` →
   builtin:all-MiniLM-L6-v2) or the models named (see :mod:`poolserve_stack.plan`);
2. runs the HTTP adapter on ``--host``/``--port`` (with ``--api-key``, given to the adapter alone; and Triton's
   control key only when runtime LoRA updates are allowed, which reload models) and prints the URL and a sample
   request;
3. watches Triton as ``poolserve triton`` does, and stops everything on Ctrl-C / SIGTERM (during the
   start too: a load under way is given up).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import urllib.request

import uvicorn

from poolserve_adapter.app import create_app
from poolserve_adapter.connections import server_options
from poolserve_adapter.log_config import uvicorn_log_config
from poolserve_adapter.settings import Settings
from poolserve_contract.wire import CONTROL_KEY_ENV, INFERENCE_KEY_ENV
from poolserve_stack.processes import spawn_tied_to_this_process
from poolserve_stack.running import (
    EXIT_FAILED,
    EXIT_STOPPED,
    StopRequests,
    logger,
    model_entries,
    say,
    start_or_exit_code,
)
from poolserve_stack.startup import start_triton
from poolserve_stack.supervision import CrashLoop, Recovery, check_and_recover
from poolserve_stack.triton_server import TritonServer

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


async def watch(triton: TritonServer, web: uvicorn.Server, failures: list[str]) -> None:
    """Announce the URL once up; then the watch loop every subcommand runs (off the event loop: a
    reload waits for Triton), until the adapter stops or Triton crash-loops."""
    announced, recovery = False, Recovery()
    while not web.should_exit:
        if web.started and not announced:
            base_url = f"http://{web.config.host}:{web.config.port}"
            say(f"Serving on {base_url}  (Triton gRPC {triton.grpc_url}, OpenAPI {base_url}/docs)")
            say("Try:\n" + sample_requests(base_url))
            announced = True
        try:
            await asyncio.to_thread(check_and_recover, triton, recovery)
        except CrashLoop as loop:
            failures.append(str(loop))
            web.should_exit = True
            break
        await asyncio.sleep(0.5)


def adapter_settings(triton: TritonServer, args: argparse.Namespace) -> Settings:
    """The stack's own Triton and address, and the options given (--api-key, --log-format); every other
    setting (ADAPTER_*, ADAPTER_API_KEY without --api-key) as the environment says. Triton's control key goes
    to the adapter only when it may update LoRA adapters at run time (the one thing it needs the key for)."""
    given = {"api_key": args.api_key} if args.api_key else {}
    settings = Settings(triton_grpc_url=triton.grpc_url, model_repository=args.model_repository,
                        host=args.host, port=args.port, triton_inference_key=triton.inference_key,
                        log_format=args.log_format, **given)
    control_key = triton.control_key if settings.allow_runtime_lora_updating else None
    settings = settings.model_copy(update={"triton_control_key": control_key})
    if settings.triton_metrics_url is None:  # Triton's own metrics are appended to the adapter's /metrics
        settings = settings.model_copy(update={"triton_metrics_url": f"http://127.0.0.1:{triton.metrics_port}/metrics"})
    return settings


async def serve(args: argparse.Namespace, stop: StopRequests) -> int:
    entries, sets = model_entries(args)
    triton = await asyncio.to_thread(start_or_exit_code, lambda: start_triton(
        entries, sets, args.model_repository, log_path=args.triton_log, served_names=args.served_model_name,
        say=say, stop_requested=stop.stop_requested, grpc_port=args.triton_grpc_port), "serve")
    if isinstance(triton, int):
        return triton
    failures: list[str] = []
    try:
        if stop.requested:
            return EXIT_STOPPED
        settings = adapter_settings(triton, args)
        if settings.worker_count() > 1:
            return await serve_adapter_workers(triton, settings, stop)
        web = uvicorn.Server(uvicorn.Config(create_app(settings), host=args.host, port=args.port, log_level="info",
                                            log_config=uvicorn_log_config(settings.log_format),
                                            **server_options(settings)))

        def stop_web() -> None:
            web.should_exit = True

        stop.on_stop = stop_web
        watcher = asyncio.create_task(watch(triton, web, failures))
        await web.serve()
        watcher.cancel()
    finally:
        # The adapter has drained and cut what was left: Triton's work is nobody's any more.
        await asyncio.to_thread(triton.stop, STOP_GRACE_S)
    if failures:
        logger.error("serve: %s", failures[0])
        return EXIT_FAILED
    return EXIT_STOPPED


def adapter_environment(settings: Settings, environ: dict[str, str]) -> dict[str, str]:
    """The environment of ``python -m poolserve_adapter`` serving ``settings``: ``environ``'s ADAPTER_* values
    with the stack's own Triton, address, API key and log format over them. Triton's control key reaches the
    adapter only as the setting (when runtime LoRA updates are allowed), never as TRITON_CONTROL_KEY, and a
    value the stack has not set (no inference or control key) is removed, not inherited."""
    own = {"triton_grpc_url": settings.triton_grpc_url, "model_repository": str(settings.model_repository),
           "host": settings.host, "port": str(settings.port), "triton_metrics_url": settings.triton_metrics_url,
           "triton_inference_key": settings.triton_inference_key, "workers": str(settings.worker_count()),
           "log_format": settings.log_format, "triton_control_key": settings.triton_control_key,
           "allow_runtime_lora_updating": str(settings.allow_runtime_lora_updating).lower()}
    if settings.api_key:  # --api-key; without it $ADAPTER_API_KEY passes through as it is
        own["api_key"] = settings.api_key
    env = {key: value for key, value in environ.items() if key not in (CONTROL_KEY_ENV, INFERENCE_KEY_ENV)}
    for key, value in own.items():
        if value is None:
            env.pop(f"ADAPTER_{key.upper()}", None)
        else:
            env[f"ADAPTER_{key.upper()}"] = value
    return env


async def serve_adapter_workers(triton: TritonServer, settings: Settings, stop: StopRequests) -> int:
    """Several adapter workers (``ADAPTER_WORKERS``, by default one per 4 cores): uvicorn runs them from its own
    process, the adapter's ``python -m poolserve_adapter``, a child of this one (in a session of its own, with
    its workers) that drains on SIGTERM. Returns the exit code; Triton is stopped by the caller."""
    adapter = spawn_tied_to_this_process([sys.executable, "-m", "poolserve_adapter"],
                                         env=adapter_environment(settings, dict(os.environ)))
    stop.on_stop = lambda: adapter.send_signal(signal.SIGTERM)  # nothing once it has exited
    if stop.requested:  # a signal that came before the handler knew the child
        adapter.send_signal(signal.SIGTERM)
    base_url = f"http://{settings.host}:{settings.port}"
    announced, recovery, failure = False, Recovery(), None
    try:
        while adapter.poll() is None and failure is None:
            if not announced and await asyncio.to_thread(answers_health, f"{base_url}/health"):
                say(f"Serving on {base_url} with {settings.worker_count()} adapter workers  (Triton gRPC "
                    f"{triton.grpc_url}, OpenAPI {base_url}/docs)")
                say("Try:\n" + sample_requests(base_url))
                announced = True
            if not stop.requested:  # stopping: no Triton restart to wait for
                try:
                    await asyncio.to_thread(check_and_recover, triton, recovery)
                except CrashLoop as loop:
                    failure = str(loop)
            await asyncio.sleep(0.5)
    finally:
        await asyncio.to_thread(stop_adapter, adapter, settings.drain_timeout_s)
    if failure is None and not stop.requested:
        failure = f"the adapter stopped (exit code {adapter.returncode}); its log is above"
    if failure is not None:
        logger.error("serve: %s", failure)
        return EXIT_FAILED
    return EXIT_STOPPED


# After its drain, an adapter worker takes up to this long more to stop (cutting what is left, closing its
# Triton channel: lifecycle.CUT_AFTER_DRAIN_S and the 2 s channel close).
ADAPTER_STOP_AFTER_DRAIN_S = 5.0


def stop_adapter(adapter: subprocess.Popen, drain_timeout_s: float) -> None:
    """SIGTERM (a drain), a wait bounded by the drain, then SIGKILL to the adapter's whole session: its workers
    too, which a killed launcher would leave serving."""
    adapter.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        adapter.wait(drain_timeout_s + ADAPTER_STOP_AFTER_DRAIN_S)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(adapter.pid, signal.SIGKILL)
    adapter.wait()


def answers_health(url: str) -> bool:
    """Whether ``url`` answers 200 now (no proxy: the adapter is on this machine)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False
