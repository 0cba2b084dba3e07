"""``poolserve`` as a user types it: vLLM's options, the API key kept from Triton, a fast ``--help``, one log
format (text or JSON lines), progress while a start is slow, Ctrl-C forwarded once, and /docs served offline."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import logging.config
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from poolserve_adapter.app import create_app
from poolserve_adapter.lifecycle import Lifecycle, SignalDrain
from poolserve_adapter.log_config import uvicorn_log_config
from poolserve_adapter.settings import Settings
from poolserve_stack.cli import build_parser
from poolserve_stack.progress import CurrentStep, reporting
from poolserve_stack.running import model_entries
from poolserve_stack.serve import adapter_environment, adapter_settings
from poolserve_stack.triton_server import triton_environment

PROJECT_ROOT = Path(__file__).resolve().parents[2]


# --- The command line ------------------------------------------------------------------------------------------


def test_serve_takes_models_as_vllm_does_first_positional_then_model_flags(monkeypatch):
    monkeypatch.delenv("MODELS", raising=False)
    monkeypatch.delenv("SET", raising=False)
    args = build_parser().parse_args(["serve", "BAAI/bge-reranker-v2-m3", "/data/my model", "--model", "bert_embedder",
                                      "--port", "9000", "--api-key", "k", "--served-model-name", "rr", "mine", "emb"])
    assert model_entries(args) == (["BAAI/bge-reranker-v2-m3", "/data/my model", "bert_embedder"], [])
    assert (args.port, args.api_key, args.served_model_name) == (9000, "k", ["rr", "mine", "emb"])
    monkeypatch.setenv("MODELS", "from-env")
    assert model_entries(build_parser().parse_args(["serve"]))[0] == ["from-env"]  # $MODELS when none are given
    assert model_entries(build_parser().parse_args(["serve", "given"]))[0] == ["given"]


def test_make_serve_runs_the_console_script_with_models_and_sets():
    makefile = (PROJECT_ROOT / "Makefile").read_text()
    recipe = re.search(r"^serve: .*\n\t(.*)$", makefile, re.M).group(1)
    assert recipe == ("$(VENV)/bin/poolserve serve --stop-with-parent --host $(HOST) --port $(PORT) "
                      "$(foreach m,$(MODELS),'$(m)') $(foreach s,$(SET),--set '$(s)')")


def test_make_serve_installs_the_runtime_lock_and_make_test_the_full_one():
    makefile = (PROJECT_ROOT / "Makefile").read_text()
    assert re.search(r"^serve: \$\(RUNTIME_INSTALLED\)$", makefile, re.M)
    assert re.search(r"^test: \$\(INSTALLED\)", makefile, re.M)
    assert "RUNTIME_LOCK ?= requirements/image.txt" in makefile
    runtime = (PROJECT_ROOT / "requirements" / "image.txt").read_text()
    full = (PROJECT_ROOT / "requirements" / "lock.txt").read_text()
    pins = re.compile(r"^([A-Za-z0-9_.-]+==\S+)", re.M)
    assert set(pins.findall(runtime)) <= set(pins.findall(full))  # the runtime at the full lock's versions
    assert not {"pytest", "schemathesis", "cohere"} & {pin.split("==")[0] for pin in pins.findall(runtime)}


def stack_args(**given) -> argparse.Namespace:
    args = build_parser().parse_args(["serve"])
    args.log_format = "text"
    return argparse.Namespace(**{**vars(args), **given})


def test_api_key_option_reaches_the_adapter_and_never_tritonserver(monkeypatch):
    monkeypatch.delenv("ADAPTER_API_KEY", raising=False)
    triton = SimpleNamespace(grpc_url="127.0.0.1:5001", inference_key=None, metrics_port=5002)
    settings = adapter_settings(triton, stack_args(api_key="s3cret"))
    assert settings.api_key == "s3cret"
    workers_env = adapter_environment(settings.model_copy(update={"workers": 2}), {"PATH": "/usr/bin"})
    assert workers_env["ADAPTER_API_KEY"] == "s3cret" and workers_env["ADAPTER_LOG_FORMAT"] == "text"
    # Without the option, the adapter's own variable; tritonserver and its stubs get neither.
    monkeypatch.setenv("ADAPTER_API_KEY", "from-env")
    assert adapter_settings(triton, stack_args(api_key=None)).api_key == "from-env"
    assert not any("API_KEY" in key or "s3cret" in value
                   for key, value in triton_environment({"ADAPTER_API_KEY": "s3cret", "PATH": "/bin"}, "").items())


def test_help_imports_no_server_and_no_model_library():
    """`poolserve --help` stays fast: torch, transformers, tritonclient and the servers are imported only once
    a command runs (measured 0.27 s for `poolserve serve --help` on 2 cores)."""
    script = ("import sys\nfrom poolserve_stack.cli import main\n"
              "for argv in (['--help'], ['serve', '--help'], ['triton', '--help']):\n"
              "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
              "heavy = ('torch', 'transformers', 'tritonclient', 'grpc', 'uvicorn', 'fastapi', 'poolserve_runtime')\n"
              "print(sorted(name for name in heavy if name in sys.modules))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=PROJECT_ROOT,
                            timeout=60, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_a_bad_log_format_in_the_environment_is_a_usage_error(monkeypatch):
    monkeypatch.setenv("ADAPTER_LOG_FORMAT", "xml")
    from poolserve_stack.cli import main

    with pytest.raises(SystemExit) as stopped:
        main(["serve"])
    assert stopped.value.code == 2


# --- The console -----------------------------------------------------------------------------------------------


def record(name: str, message: str, *args, level: int = logging.INFO) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, message, args, None)


def formatted(config: dict, handler: str, log_record: logging.LogRecord) -> str:
    logging.config.dictConfig(config)
    return logging.getLogger(log_record.name).handlers[0].formatter.format(log_record) if handler == "own" else (
        logging.getLogger("uvicorn.access").handlers[0].formatter.format(log_record))


def test_our_lines_and_uvicorn_s_share_one_format_and_httpx_stays_quiet():
    config = uvicorn_log_config()
    for name in ("poolserve_adapter", "poolserve_stack"):
        assert config["loggers"][name]["handlers"] == config["loggers"]["uvicorn"]["handlers"] == ["default"]
    assert config["root"]["handlers"] == ["default"]  # other libraries' warnings too
    assert config["loggers"]["httpx"]["level"] == "WARNING"  # one "HTTP Request: GET .../metrics" per scrape
    logging.config.dictConfig(config)
    assert not logging.getLogger("httpx").isEnabledFor(logging.INFO)
    line = logging.getLogger("poolserve_stack").handlers[0].formatter.format(record("poolserve_stack", "Triton ready"))
    assert line == "INFO:     Triton ready"


def test_json_log_format_is_one_object_per_line_for_every_logger():
    logging.config.dictConfig(uvicorn_log_config("json"))
    access = record("uvicorn.access", '%s - "%s %s HTTP/%s" %d', "127.0.0.1:5", "GET", "/classify", "1.1", 200)
    lines = [logging.getLogger("uvicorn.access").handlers[0].formatter.format(access),
             logging.getLogger("poolserve_stack").handlers[0].formatter.format(
                 record("poolserve_stack", "Try:\ncurl ...")),
             logging.getLogger("uvicorn.error").parent.handlers[0].formatter.format(
                 record("uvicorn.error", "boom", level=logging.ERROR))]
    for line in lines:
        assert "\n" not in line
        entry = json.loads(line)
        assert set(entry) == {"time", "level", "logger", "message"}
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", entry["time"])
    assert json.loads(lines[0])["message"] == '127.0.0.1:5 - "GET /classify HTTP/1.1" 200'
    assert json.loads(lines[1]) | {"time": ""} == {"time": "", "level": "INFO", "logger": "poolserve_stack",
                                                  "message": "Try:\ncurl ..."}
    assert json.loads(lines[2])["level"] == "ERROR"
    logging.config.dictConfig(uvicorn_log_config())


def test_a_slow_step_says_what_it_is_doing_every_few_seconds():
    said: list[str] = []
    step = CurrentStep("importing torch")
    with reporting(said.append, step, every_s=0.05):
        time.sleep(0.12)
        step.set("training the head")
        time.sleep(0.12)
    count = len(said)
    time.sleep(0.1)
    assert len(said) == count  # quiet once the step is over
    assert any(line.startswith("  ... importing torch (") for line in said)
    assert any(line.startswith("  ... training the head (") for line in said)
    with reporting(said.append, step, every_s=5):
        pass
    assert len(said) == count  # a fast step says nothing


def test_triton_s_progress_names_the_models_still_loading():
    from poolserve_stack.triton_server import TritonServer

    server = TritonServer(PROJECT_ROOT / "model_repository", {
        "bert_classifier": {"checkpoint": "builtin:sentiment-minilm"},
        "BAAI--bge-m3": {"checkpoint": "BAAI/bge-m3", "model_folder": "bge_m3_embedder"}})
    assert server.progress() == "starting tritonserver"
    server._waiting_for = "models"
    assert server.progress() == "Triton is loading sentiment-minilm, BAAI/bge-m3"
    server.load_seconds["bert_classifier"] = 3.0
    assert server.progress() == "Triton is loading BAAI/bge-m3 (1 of 2 ready)"


def test_one_ctrl_c_reaches_uvicorn_once():
    """The drain forwards the signal once: a second SIGINT is uvicorn's forced exit, which skips the app's
    shutdown and printed its cancelled lifespan as a traceback on every Ctrl-C."""
    forwarded: list[int] = []

    async def run() -> None:
        previous = signal.signal(signal.SIGINT, lambda sig, _frame: forwarded.append(sig))
        try:
            async with SignalDrain(Lifecycle(), drain_timeout_s=5, poll_s=0.01) as drain:
                drain._on_signal(signal.SIGINT, None)
                await asyncio.sleep(0.2)
                assert forwarded == [signal.SIGINT]
                drain._on_signal(signal.SIGINT, None)  # a second Ctrl-C goes straight through
                assert forwarded == [signal.SIGINT, signal.SIGINT]
        finally:
            signal.signal(signal.SIGINT, previous)

    asyncio.run(run())


# --- /docs offline ---------------------------------------------------------------------------------------------


def test_docs_load_swagger_ui_from_the_adapter_itself():
    client = TestClient(create_app(Settings(triton_grpc_url="127.0.0.1:1")))  # no lifespan: no Triton needed
    for page in ("/docs", "/redoc"):
        html = client.get(page)
        assert html.status_code == 200
        urls = re.findall(r"""(?:src|href)=["']([^"']+)["']|url: ?'([^']+)'""", html.text)
        urls = [url for pair in urls for url in pair if url]
        assert urls and all(url.startswith("/") for url in urls), urls  # nothing from a CDN
        for url in urls:
            assert client.get(url).status_code == 200, url
    assert "swagger-ui-bundle.js" in client.get("/docs").text


def test_settings_document_the_log_format():
    assert Settings().log_format == "text"
    with pytest.raises(ValueError):
        Settings(log_format="xml")


def test_stack_console_lines_are_logged_not_printed(capsys):
    """The stack's lines go through the poolserve_stack logger, so --log-format applies to them too."""
    from poolserve_stack import running

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("poolserve_stack")
    logger.addHandler(handler)
    try:
        running.say("Serving on http://x")
    finally:
        logger.removeHandler(handler)
    assert stream.getvalue() == "Serving on http://x\n" and capsys.readouterr().out == ""


def test_a_stop_during_the_start_is_a_clean_exit(capsys):
    from poolserve_stack.errors import StartStopped
    from poolserve_stack.running import EXIT_STOPPED, start_or_exit_code

    def start():
        raise StartStopped("stopped while loading models")

    assert start_or_exit_code(start, "serve") == EXIT_STOPPED
