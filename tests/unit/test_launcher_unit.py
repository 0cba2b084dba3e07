import json
import os
import subprocess
import sys
import time

import pytest

from poolserve_contract.triton_config import complete_config
from poolserve_contract.wire import SOURCE_FOLDER
from poolserve_stack import processes, run_repository, triton_server
from poolserve_stack.run_repository import config_with_parameters, write_run_repository
from tests.support.stack import MODEL_REPOSITORY


def parsed(text: str) -> dict:
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    return json.loads(json_format.MessageToJson(text_format.Parse(text, model_config_pb2.ModelConfig()),
                                                preserving_proto_field_name=True))


def test_generated_config_renames_and_sets_parameters():
    config = parsed(config_with_parameters(MODEL_REPOSITORY / "bert_classifier" / "config.pbtxt",
                                           {"checkpoint": "/ckpt", "dtype": "float16"}, name="two"))
    assert config["name"] == "two" and config["backend"] == "python"
    assert config["parameters"]["checkpoint"]["string_value"] == "/ckpt"
    assert config["parameters"]["dtype"]["string_value"] == "float16"


def test_every_repository_config_is_short_and_completes_to_the_shared_contract():
    from poolserve_runtime.families import by_name

    folders = [f for f in MODEL_REPOSITORY.iterdir() if (f / "config.pbtxt").exists()]
    assert len(folders) >= 17
    for folder in folders:
        text = (folder / "config.pbtxt").read_text()
        config = parsed(text)
        assert config["name"] == folder.name and config["backend"] == "python"
        assert len([line for line in text.splitlines() if not line.startswith("#")]) <= 4, folder.name
        family_name = (folder / "1" / "model.py").read_text().split('by_name("')[1].split('"')[0]
        family = by_name(family_name)
        assert family.folder == folder.name
        complete_config(config, family.output_kind, family.uses_token_types)
        names = [i["name"] for i in config["input"]]
        assert names[:2] == ["input_ids", "attention_mask"] and all(i["allow_ragged_batch"] for i in config["input"])
        assert ("token_type_ids" in names) == family.uses_token_types
        assert [o["name"] for o in config["output"]] == {
            "embed": ["embeddings", "pooled"], "token_embed": ["token_embeddings", "token_projected", "maxsim_scores"],
            "token_classify": ["token_logits"], "sparse_embed": ["sparse"],
            "bge_m3": ["embeddings", "pooled", "token_embeddings", "token_projected", "token_logits"],
        }.get(family.output_kind, ["logits", "scores"])
        assert config["dynamic_batching"]["default_queue_policy"]["max_queue_size"] > 0


def test_declared_fields_win_over_the_completed_ones():
    config = {"max_batch_size": 8, "input": [{"name": "input_ids", "data_type": "TYPE_INT64", "dims": [-1]}],
              "sequence_batching": {}}
    complete_config(config, "classify", False)
    assert config["max_batch_size"] == 8 and "dynamic_batching" not in config
    assert config["input"][0] == {"name": "input_ids", "data_type": "TYPE_INT64", "dims": [-1]}
    assert [i["name"] for i in config["input"]] == ["input_ids", "attention_mask", "sequence_lengths", "lora_names"]


def test_run_repository_links_the_source_folder(tmp_path):
    source = tmp_path / "repo"
    (source / "a" / "1").mkdir(parents=True)
    (source / "a" / "config.pbtxt").write_text('name: "a"\nbackend: "python"\n')
    (source / "a" / "1" / "model.py").write_text("# model")
    (source / "a" / "weights").mkdir()
    models = {"a": {"checkpoint": "weights"}, "b-2": {SOURCE_FOLDER: "a", "checkpoint": "hub/id"}}
    target = write_run_repository(source, models, tmp_path / "run")
    assert parsed((target / "b-2" / "config.pbtxt").read_text())["name"] == "b-2"
    assert (target / "b-2" / "1" / "model.py").read_text() == "# model"
    a = parsed((target / "a" / "config.pbtxt").read_text())
    assert a["parameters"]["checkpoint"]["string_value"] == str((source / "a" / "weights").resolve())
    assert parsed((target / "b-2" / "config.pbtxt").read_text())["parameters"][SOURCE_FOLDER]["string_value"] == "a"


def test_removes_only_stale_regions_of_dead_launchers(tmp_path, monkeypatch):
    monkeypatch.setattr(processes, "SHM_DIR", tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f"{processes.SHM_PREFIX}{processes.OWNER_TAG}{dead_pid}-abc-uuid"
    live = tmp_path / f"{processes.SHM_PREFIX}{processes.OWNER_TAG}{os.getpid()}-abc-uuid"
    foreign = tmp_path / f"{processes.SHM_PREFIX}0123-uuid"  # another tool's region: never ours to remove
    for path in (stale, live, foreign):
        path.write_bytes(b"")
    assert processes.remove_stale_shm_regions() == [stale]
    assert not stale.exists() and live.exists() and foreign.exists()


def test_instance_count_becomes_the_instance_group_not_a_parameter(tmp_path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from poolserve_stack.errors import LauncherError
    from poolserve_stack.run_repository import config_with_parameters

    source = tmp_path / "config.pbtxt"
    source.write_text('name: "m"\nbackend: "python"\n')
    config = text_format.Parse(config_with_parameters(source, {"instance_count": "2", "dtype": "float16"}, "x"),
                               model_config_pb2.ModelConfig())
    assert [(group.count, group.kind) for group in config.instance_group] == [(2, model_config_pb2.ModelInstanceGroup.KIND_AUTO)]
    assert dict(config.parameters).keys() == {"dtype"}
    plain = text_format.Parse(config_with_parameters(source, {}, "x"), model_config_pb2.ModelConfig())
    assert not plain.instance_group  # Triton's own placement: one instance per GPU, or one on the CPU
    with pytest.raises(LauncherError, match="positive integer"):
        config_with_parameters(source, {"instance_count": "0"})


def test_the_adapter_s_settings_and_api_key_stay_out_of_tritonserver_s_environment():
    environ = {"ADAPTER_API_KEY": "secret", "ADAPTER_TRITON_GRPC_URL": "x:1", "HF_TOKEN": "hub", "PATH": "/usr/bin",
               "HOME": "/root"}
    env = triton_server.triton_environment(environ, "/libs")
    assert not any(key.startswith("ADAPTER_") for key in env)
    assert env["HF_TOKEN"] == "hub" and env["HOME"] == "/root"  # the stubs download checkpoints
    assert env["LD_LIBRARY_PATH"] == "/libs"
    assert env["PATH"] == f"{os.path.dirname(sys.executable)}:/usr/bin"


def test_run_configs_come_complete_so_triton_needs_no_auto_complete_stub():
    from poolserve_runtime.families import by_folder
    from tests.support.stack import FAULT_MODELS

    config = parsed(config_with_parameters(MODEL_REPOSITORY / "bert_classifier" / "config.pbtxt", {}, name="x"))
    family = by_folder("bert_classifier")
    expected = complete_config(parsed((MODEL_REPOSITORY / "bert_classifier" / "config.pbtxt").read_text()),
                               family.task, family.uses_token_types, family.vision)
    assert [i["name"] for i in config["input"]] == [i["name"] for i in expected["input"]]
    assert [o["name"] for o in config["output"]] == [o["name"] for o in expected["output"]]
    assert config["max_batch_size"] == expected["max_batch_size"] and "dynamic_batching" in config
    assert all(i["allow_ragged_batch"] for i in config["input"])
    # A folder the runtime does not know is left to Triton, and then auto-complete stays on.
    echo = config_with_parameters(FAULT_MODELS / "echo" / "config.pbtxt", {}, name="echo")
    assert parsed(echo) == parsed((FAULT_MODELS / "echo" / "config.pbtxt").read_text())
    assert run_repository.all_completed({"a": {SOURCE_FOLDER: "bert_classifier"}, "bert_embedder": {}})
    assert not run_repository.all_completed({"a": {SOURCE_FOLDER: "bert_classifier"}, "echo": {}})


def test_process_running_counts_zombies_as_gone():
    child = subprocess.Popen(["true"])
    deadline = time.monotonic() + 5
    while processes.process_running(child.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not processes.process_running(child.pid)  # exited, not yet reaped: a zombie
    assert processes.pid_alive(child.pid)  # which a plain kill(0) still sees
    child.wait()
    assert processes.process_running(os.getpid()) and not processes.process_running(child.pid)


def test_run_configs_carry_the_model_card_when_the_checkpoint_is_here(tmp_path):
    from poolserve_contract.card import ModelCard
    from tests.support.tiny_models import build_checkpoint

    checkpoint = build_checkpoint("bert", tmp_path / "bert")
    source = MODEL_REPOSITORY / "bert_classifier" / "config.pbtxt"
    card = ModelCard.from_config(parsed(config_with_parameters(source, {"checkpoint": str(checkpoint)}, name="x")))
    assert (card.served_name, card.family, card.num_labels, card.max_model_len) == (str(checkpoint), "bert", 3, 128)
    # A checkpoint this machine cannot read yet (not downloaded): no card, and the config is written all the same.
    absent = parsed(config_with_parameters(source, {"checkpoint": str(tmp_path / "absent")}, name="y"))
    assert ModelCard.from_config(absent) is None and absent["input"]


def test_on_a_gpu_machine_a_small_checkpoint_gets_two_instances_a_large_one_triton_s_one(tmp_path, monkeypatch):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    source = tmp_path / "config.pbtxt"
    source.write_text('name: "m"\nbackend: "python"\n')
    small, large = tmp_path / "small", tmp_path / "large"
    for folder, size in ((small, 1000), (large, run_repository.SMALL_WEIGHTS_BYTES + 1)):
        folder.mkdir()
        with (folder / "model.safetensors").open("wb") as weights:
            weights.truncate(size)  # sparse: no disk used

    def groups(parameters: dict) -> list[int]:
        config = text_format.Parse(config_with_parameters(source, parameters, "x"), model_config_pb2.ModelConfig())
        return [group.count for group in config.instance_group]

    monkeypatch.setattr(run_repository, "visible_gpu_count", lambda: 1)
    assert groups({"checkpoint": str(small)}) == [run_repository.INSTANCES_PER_GPU] == [2]
    assert groups({"checkpoint": str(large)}) == []  # Triton's one per GPU
    assert groups({"checkpoint": "org/hub-model"}) == []  # size unknown here
    assert groups({"checkpoint": str(small), "instance_count": "3"}) == [3]  # the user's choice wins
    monkeypatch.setattr(run_repository, "visible_gpu_count", lambda: 0)
    assert groups({"checkpoint": str(small)}) == []  # the CPU: one instance uses every core


def test_visible_gpus_follow_cuda_visible_devices(tmp_path, monkeypatch):
    for index in range(4):
        (tmp_path / f"0000:0{index}:00.0").mkdir()
    monkeypatch.setattr(processes, "NVIDIA_GPUS_DIR", tmp_path)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert processes.visible_gpu_count() == 4
    for visible, expected in (("0,2", 2), ("", 0), ("-1", 0), ("0,1,2,3,4,5", 4)):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        assert processes.visible_gpu_count() == expected
    monkeypatch.setattr(processes, "NVIDIA_GPUS_DIR", tmp_path / "none")  # no driver
    assert processes.visible_gpu_count() == 0
