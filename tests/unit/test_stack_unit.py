"""make serve's and the triton container's start-up helpers that need no running stack."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from poolserve_adapter.settings import Settings
from poolserve_stack.cli import add_model_arguments
from poolserve_stack.errors import LauncherError, ServerDied, StubDied
from poolserve_stack.plan import uses_builtins
from poolserve_stack.running import model_entries
from poolserve_stack.supervision import CrashLoop, Recovery, placement, recover

PROJECT_ROOT = Path(__file__).resolve().parents[2]
REPOSITORY = PROJECT_ROOT / "model_repository"


def test_builtins_are_prepared_only_when_the_plan_uses_them():
    assert uses_builtins([], REPOSITORY)  # the defaults
    assert uses_builtins(["bert_classifier"], REPOSITORY)  # a folder alone: its default checkpoint is built in
    assert uses_builtins(["bert_classifier=builtin:sentiment-minilm"], REPOSITORY)
    assert not uses_builtins(["bert_classifier=/data/x", "BAAI/bge-reranker-v2-m3", "/data/y"], REPOSITORY)


def test_recovery_allows_a_bounded_number_of_restarts_with_growing_backoff():
    recovery = Recovery(limit=2, window_s=60)
    assert recovery.allow("m") and recovery.backoff_s("m") == 0.5
    assert recovery.allow("m") and recovery.backoff_s("m") == 1.0
    assert not recovery.allow("m")  # the third failure within the window is a crash loop
    assert recovery.allow("other")


class FakeServer:
    def __init__(self, fail_with: LauncherError | None = None):
        self.calls: list[tuple[str, ...]] = []
        self.fail_with = fail_with

    def reload(self, name: str) -> None:
        self.calls.append(("reload", name))
        if self.fail_with:
            raise self.fail_with

    def restart(self) -> None:
        self.calls.append(("restart",))


def test_recover_reloads_a_dead_stub_restarts_a_dead_server_and_stops_a_crash_loop():
    server, recovery, slept = FakeServer(), Recovery(limit=1, window_s=60), []
    recover(server, StubDied("stub died", "bert_classifier"), recovery, sleep=slept.append)
    recover(server, ServerDied("server died"), recovery, sleep=slept.append)
    assert server.calls == [("reload", "bert_classifier"), ("restart",)] and slept == [0.5, 0.5]
    with pytest.raises(CrashLoop, match="bert_classifier crash-looping"):
        recover(server, StubDied("again", "bert_classifier"), recovery, sleep=slept.append)
    failing = FakeServer(fail_with=LauncherError("load failed"))
    recover(failing, StubDied("x", "m"), Recovery(), sleep=lambda _s: None)  # logged; the next check sees it again
    assert failing.calls == [("reload", "m")]


def test_placement_reads_triton_s_completed_instance_groups():
    assert placement({"instance_group": [{"kind": "KIND_CPU", "count": 1}]}) == "1 instance on CPU"
    assert placement({"instance_group": [{"kind": "KIND_GPU", "count": 1, "gpus": [0]},
                                         {"kind": "KIND_GPU", "count": 1, "gpus": [1]}]}) == "2 instances on GPU 0, 1"


def test_models_and_sets_come_from_the_environment_when_not_given(monkeypatch):
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    monkeypatch.setenv("MODELS", "BAAI/bge-reranker-v2-m3 'bert_classifier=/data/my model'")
    monkeypatch.setenv("SET", "bert_classifier.dtype=float16")
    assert model_entries(parser.parse_args([])) == (
        ["BAAI/bge-reranker-v2-m3", "bert_classifier=/data/my model"], ["bert_classifier.dtype=float16"])
    assert model_entries(parser.parse_args(["--model", "x"])) == (["x"], ["bert_classifier.dtype=float16"])
    assert parser.parse_args(["--triton-log", "-"]).triton_log is None  # '-': Triton's log on stdout


def test_compose_passes_every_adapter_setting_through():
    compose = yaml.safe_load((PROJECT_ROOT / "docker-compose.yml").read_text())
    environment = compose["services"]["adapter"]["environment"]
    expected = {f"ADAPTER_{name.upper()}" for name in Settings.model_fields}
    assert expected <= set(environment), f"not passed through: {sorted(expected - set(environment))}"
    assert compose["services"]["adapter"]["depends_on"]["triton"]["condition"] == "service_healthy"


def test_a_child_of_a_pid_1_parent_is_spawned(tmp_path):
    """In a container the launcher itself is pid 1: its children must not take that for orphanhood."""
    script = (
        "import os, sys\n"
        "from poolserve_stack.triton_server import spawn_tied_to_this_process\n"
        "child = spawn_tied_to_this_process([sys.executable, '-c', 'print(\"child ran\")'])\n"
        "sys.exit(child.wait())\n"
    )
    unshare = ["unshare", "--pid", "--fork", "--mount-proc"]
    if os.geteuid() != 0 or subprocess.run([*unshare, "true"], capture_output=True).returncode != 0:
        pytest.skip("needs a pid namespace (root with unshare)")
    result = subprocess.run([*unshare, sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=PROJECT_ROOT, timeout=60)
    assert result.returncode == 0 and "child ran" in result.stdout, result.stderr


def test_healthy_probes_stay_off_the_console_and_failing_ones_do_not():
    import logging
    import logging.config

    from poolserve_adapter.log_config import uvicorn_log_config

    logging.config.dictConfig(uvicorn_log_config())
    handler = logging.getLogger("uvicorn.access").handlers[0]

    def shown(path: str, status: int) -> bool:
        record = logging.LogRecord("uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d',
                                   ("127.0.0.1:5", "GET", path, "1.1", status), None)
        return bool(handler.filter(record))

    assert not shown("/health", 200) and not shown("/ping", 200)
    assert shown("/health", 503) and shown("/classify", 200)


def test_the_adapter_process_gets_the_stack_s_triton_and_address_but_not_triton_s_keys():
    from poolserve_adapter.settings import Settings
    from poolserve_stack.serve import adapter_environment

    settings = Settings(triton_grpc_url="127.0.0.1:5001", host="0.0.0.0", port=9000, workers=2,
                        triton_metrics_url="http://127.0.0.1:5002/metrics")
    environ = {"PATH": "/usr/bin", "ADAPTER_API_KEY": "client-key", "ADAPTER_TRITON_GRPC_URL": "elsewhere:1",
               "ADAPTER_TRITON_INFERENCE_KEY": "stale", "TRITON_CONTROL_KEY": "admin", "TRITON_INFERENCE_KEY": "k"}
    env = adapter_environment(settings, environ)
    assert env["ADAPTER_TRITON_GRPC_URL"] == "127.0.0.1:5001" and env["ADAPTER_PORT"] == "9000"
    assert env["ADAPTER_HOST"] == "0.0.0.0" and env["ADAPTER_WORKERS"] == "2"
    assert env["ADAPTER_API_KEY"] == "client-key" and env["PATH"] == "/usr/bin"  # the adapter's own settings
    # The control key never reaches the adapter; Triton started without an inference key: none is sent.
    assert not {"TRITON_CONTROL_KEY", "TRITON_INFERENCE_KEY", "ADAPTER_TRITON_INFERENCE_KEY"} & set(env)
    keyed = adapter_environment(settings.model_copy(update={"triton_inference_key": "k2"}), environ)
    assert keyed["ADAPTER_TRITON_INFERENCE_KEY"] == "k2"
