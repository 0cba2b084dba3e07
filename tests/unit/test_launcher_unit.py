import json
import os
import subprocess
import sys

from model_runtime import launcher
from model_runtime.launcher import config_with_parameters, parse_model_arguments
from tests.conftest import MODEL_REPOSITORY


def test_parse_model_arguments():
    models = parse_model_arguments(["a", "b"], ["a.checkpoint=/x=y", "c.dtype=float16"])
    assert models == {"a": {"checkpoint": "/x=y"}, "b": {}, "c": {"dtype": "float16"}}


def test_config_override_keeps_the_contract_and_sets_parameters():
    config = json.loads(config_with_parameters(MODEL_REPOSITORY / "bert_classifier" / "config.pbtxt", {"checkpoint": "/ckpt"}))
    assert config["name"] == "bert_classifier" and config["backend"] == "python"
    assert config["parameters"]["checkpoint"]["string_value"] == "/ckpt"
    assert config["parameters"]["dtype"]["string_value"] == "auto"  # untouched parameters stay
    assert [i["name"] for i in config["input"]] == ["input_ids", "attention_mask", "token_type_ids"]
    assert all(i["allow_ragged_batch"] for i in config["input"])


def test_every_repository_config_parses():
    for folder in MODEL_REPOSITORY.iterdir():
        if (folder / "config.pbtxt").exists():
            config = json.loads(config_with_parameters(folder / "config.pbtxt", {}))
            assert config["name"] == folder.name
            assert config["dynamic_batching"]["default_queue_policy"]["max_queue_size"] > 0


def test_removes_only_stale_regions_of_dead_launchers(tmp_path, monkeypatch):
    monkeypatch.setattr(launcher, "SHM_DIR", tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f"{launcher.SHM_PREFIX}{launcher.OWNER_TAG}{dead_pid}-abc-uuid"
    live = tmp_path / f"{launcher.SHM_PREFIX}{launcher.OWNER_TAG}{os.getpid()}-abc-uuid"
    foreign = tmp_path / f"{launcher.SHM_PREFIX}0123-uuid"  # another tool's region: never ours to remove
    for path in (stale, live, foreign):
        path.write_bytes(b"")
    assert launcher.remove_stale_shm_regions() == [stale]
    assert not stale.exists() and live.exists() and foreign.exists()
