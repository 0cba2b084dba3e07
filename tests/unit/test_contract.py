"""The torch-free model contract: parameters parsed once, the model card, and the adapter's side without torch."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from poolserve_contract import families
from poolserve_contract.card import ModelCard, card_for_config, model_card
from poolserve_contract.parameters import GPU_STUB_CPU_THREADS, ModelParameters, served_name
from poolserve_contract.triton_config import complete_config
from poolserve_contract.wire import MODEL_CARD

PROJECT_ROOT = Path(__file__).resolve().parents[2]


# --- ModelParameters ----------------------------------------------------------------------------------------


def test_parameter_defaults():
    parameters = ModelParameters.from_mapping({"checkpoint": " builtin:x "})
    assert parameters.checkpoint == "builtin:x"
    assert (parameters.dtype, parameters.attention, parameters.compile, parameters.prefix_reuse) == (
        "auto", "auto", "auto", "auto")
    assert parameters.max_tokens_per_forward == 16384 and parameters.max_model_len == 0
    assert (parameters.logit_mean, parameters.logit_sigma) == (0.0, 1.0)
    assert not parameters.trust_remote_code and parameters.instance_count is None
    assert parameters.cpu_threads_on("cuda") == GPU_STUB_CPU_THREADS and parameters.cpu_threads_on("cpu") == 0
    # Empty values read as their defaults, as config.pbtxt files write them.
    empty = ModelParameters.from_mapping({"max_model_len": "", "logit_mean": "", "logit_sigma": ""})
    assert (empty.max_model_len, empty.logit_mean, empty.logit_sigma) == (0, 0.0, 1.0)


def test_parameters_from_a_triton_config_ignore_other_keys():
    config = {"parameters": {"dtype": {"string_value": "float16"}, "trust_remote_code": {"string_value": "yes"},
                             "instance_count": {"string_value": "2"}, MODEL_CARD: {"string_value": "{}"},
                             "someone_elses": {"string_value": "x"}}}
    parameters = ModelParameters.from_config(config)
    assert parameters.dtype == "float16" and parameters.trust_remote_code and parameters.instance_count == 2


@pytest.mark.parametrize("key, value, message", [
    ("dtype", "int8", "dtype parameter 'int8' is not one of auto, float32, bfloat16, float16"),
    ("attention", "flash", "attention parameter 'flash' is not one of auto, varlen, padded"),
    ("compile", "always", "compile parameter 'always' is not one of auto, layers, none"),
    ("prefix_reuse", "on", "prefix_reuse parameter 'on' is not one of auto, off"),
    ("cpu_threads", "many", "cpu_threads parameter 'many' is not auto or a whole number"),
    ("trust_remote_code", "maybe", "trust_remote_code parameter 'maybe' is not true or false"),
    ("instance_count", "0", "instance_count must be a positive integer, got '0'"),
    ("max_tokens_per_forward", "lots", "max_tokens_per_forward parameter 'lots' is not a whole number"),
    ("logit_sigma", "wide", "logit_sigma parameter 'wide' is not a number"),
])
def test_each_parameter_refuses_what_it_cannot_take(key, value, message):
    with pytest.raises(ValueError) as error:
        ModelParameters.from_mapping({key: value})
    assert message in str(error.value)


def test_served_name_rules():
    assert served_name({"served_model_name": "mine", "checkpoint": "x/y"}, "folder") == "mine"
    assert served_name({"checkpoint": "builtin:sentiment-minilm"}, "folder") == "sentiment-minilm"
    assert served_name({"checkpoint": "BAAI/bge-reranker-base"}, "folder") == "BAAI/bge-reranker-base"
    assert served_name({}, "folder") == "folder"


# --- Declarations ---------------------------------------------------------------------------------------------


def test_every_declaration_has_a_folder_and_one_implementation():
    from poolserve_runtime import families as runtime

    declared = (*families.FAMILIES, families.GENERIC)
    assert len({family.name for family in declared}) == len(declared)
    assert len({family.folder for family in declared}) == len(declared)
    for declaration in declared:
        implementation = runtime.by_name(declaration.name)
        assert implementation.declaration is declaration and runtime.by_folder(declaration.folder) is implementation
    assert set(runtime.IMPLEMENTATIONS) == {family.name for family in declared}


def test_config_rules_read_the_checkpoint_config():
    from transformers import PretrainedConfig

    assert families.by_name("xlm_roberta").position_offset(PretrainedConfig(pad_token_id=1)) == 2
    assert families.by_name("modernbert").pooling_for(PretrainedConfig(classifier_pooling="mean")) == "mean"
    with pytest.raises(families.UnsupportedArchitecture, match="classifier_pooling"):
        families.by_name("modernbert").pooling_for(PretrainedConfig(classifier_pooling="max"))
    assert families.by_name("llama_bidirectional").pooling_for(PretrainedConfig(pooling="last")) == "last"
    assert families.by_name("llama_normal_weights").output_labels(PretrainedConfig(num_labels=38)) == 1
    assert families.by_name("jina_vl").output_labels(PretrainedConfig(num_labels=2)) == 1


# --- The model card -------------------------------------------------------------------------------------------


def write_config(directory: Path, config) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    return str(directory)


def card(checkpoint: str, family: str | None, task: str = "classify", token_type_input: bool = False, **parameters):
    declaration = families.by_name(family) if family else None
    return model_card(ModelParameters.from_mapping({"checkpoint": checkpoint, **parameters}), declaration, checkpoint,
                      task=task, token_type_input=token_type_input, fallback_name="m")


def test_an_llm_reranker_serves_the_labels_of_its_conversion(tmp_path):
    from transformers import Qwen3Config

    config = Qwen3Config(vocab_size=300, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=512, architectures=["Qwen3ForCausalLM"])
    # Known by its name: Qwen3-Reranker's yes/no conversion, one label.
    reranker = card(write_config(tmp_path / "Qwen3-Reranker-tiny", config), "qwen3")
    assert (reranker.num_labels, reranker.id2label, reranker.max_model_len) == (1, {}, 512)
    # hf_overrides naming three label tokens: three labels, whatever config.json's num_labels says.
    overrides = json.dumps({"architectures": ["Qwen3ForSequenceClassification"],
                            "classifier_from_token": ["a", "b", "c"]})
    assert card(write_config(tmp_path / "lm", config), "qwen3", hf_overrides=overrides).num_labels == 3


def test_a_gated_reward_head_serves_one_score(tmp_path):
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_labels=4,
                         architectures=["LlamaForSequenceClassificationWithNormal_Weights"])
    reward = card(write_config(tmp_path / "urm", config), "llama_normal_weights")
    assert (reward.num_labels, reward.id2label) == (1, {})


def test_roberta_max_model_len_leaves_out_the_padding_positions(tmp_path):
    from transformers import XLMRobertaConfig

    config = XLMRobertaConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                              max_position_embeddings=130, pad_token_id=1, type_vocab_size=1,
                              architectures=["XLMRobertaForSequenceClassification"])
    checkpoint = write_config(tmp_path / "roberta", config)
    assert card(checkpoint, "xlm_roberta", token_type_input=True).max_model_len == 128
    assert not card(checkpoint, "xlm_roberta", token_type_input=True).sends_token_types  # type_vocab_size 1
    assert card(checkpoint, "xlm_roberta", max_model_len="64").max_model_len == 64


def test_a_vision_card_names_its_image_token(tmp_path):
    from transformers import Qwen2_5_VLConfig

    config = Qwen2_5_VLConfig(image_token_id=7, architectures=["Qwen2_5_VLForSequenceClassification"],
                              text_config={"max_position_embeddings": 256, "vocab_size": 50})
    vision = card(write_config(tmp_path / "vl", config), "qwen2_5_vl")
    assert (vision.image_token_id, vision.family, vision.max_model_len) == (7, "qwen2_5_vl", 256)


def test_the_card_travels_in_the_completed_config(tmp_path):
    from transformers import BertConfig

    checkpoint = write_config(tmp_path / "bert", BertConfig(
        vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=64, type_vocab_size=2, id2label={0: "no", 1: "yes"},
        architectures=["BertForSequenceClassification"]))
    bert = families.by_name("bert")
    config = {"name": "two", "parameters": {"checkpoint": {"string_value": checkpoint}}}
    complete_config(config, bert.task, bert.uses_token_types, bert.vision, card_for_config(config, bert))
    read = ModelCard.from_config(config)
    assert read == ModelCard(served_name=checkpoint, family="bert", task="classify",
                             architecture="BertForSequenceClassification", max_model_len=64, num_labels=2,
                             id2label={0: "no", 1: "yes"}, sends_token_types=True, vocab_size=100)
    # An embedding model has no labels; a checkpoint not on this machine gets no card (the adapter computes it).
    assert card(checkpoint, "bert_embedding", task="embed").num_labels == 0
    unreadable = {"name": "x", "parameters": {"checkpoint": {"string_value": str(tmp_path / "absent")}}}
    assert card_for_config(unreadable, bert) is None
    assert ModelCard.from_config({"parameters": {}}) is None


# --- The adapter's side imports no torch ----------------------------------------------------------------------


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_adapter_and_contract_import_neither_torch_nor_the_runtime():
    forbidden = {"torch", "torchvision", "poolserve_runtime", "poolserve_kernels"}
    offenders = {str(path.relative_to(PROJECT_ROOT)): sorted(imports_of(path) & forbidden)
                 for folder in ("adapter/poolserve_adapter", "model_contract/poolserve_contract")
                 for path in (PROJECT_ROOT / folder).rglob("*.py") if imports_of(path) & forbidden}
    assert offenders == {}


# Run with torch and torchvision missing as in the adapter's image: a finder refuses them, and None in
# sys.modules makes availability probes (importlib.util.find_spec) answer "not installed".
WITHOUT_TORCH = """
import importlib.abc, json, pkgutil, sys
from pathlib import Path

BLOCKED = ("torch", "torchvision")

class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is not installed in the adapter's image")
        return None

sys.meta_path.insert(0, NoTorch())
for name in BLOCKED:
    sys.modules[name] = None

import poolserve_adapter.app
import poolserve_contract
for module in pkgutil.walk_packages(poolserve_contract.__path__, "poolserve_contract."):
    __import__(module.name)
from PIL import Image
from poolserve_contract.card import card_for_config
from poolserve_contract.families import by_folder
from poolserve_contract.triton_config import complete_config
from poolserve_adapter.registry import build_served_model

repository, text_checkpoint, vision_checkpoint = (Path(p) for p in sys.argv[1:4])
served = {}
for folder, checkpoint in (("bert_classifier", text_checkpoint), ("qwen2_5_vl_classifier", vision_checkpoint)):
    family = by_folder(folder)
    config = {"name": folder, "parameters": {"checkpoint": {"string_value": str(checkpoint)}}}
    complete_config(config, family.task, family.uses_token_types, family.vision, card_for_config(config, family))
    model = build_served_model(folder, config, repository)
    served[folder] = {"num_labels": model.num_labels, "id2label": model.id2label, "max_model_len": model.max_model_len,
                      "sends_token_types": model.encoder.sends_token_types, "task": model.task}
vision = model.vision
served["image_token_id"] = vision.image_token_id
processed = vision.image_processor(images=[Image.new("RGB", (90, 70), (10, 200, 30))], return_tensors="np")
served["pixel_values"] = processed["pixel_values"].tolist()
served["loaded"] = sorted(name for name in sys.modules if name.split(".")[0] in ("torch", "poolserve_runtime")
                          and sys.modules[name] is not None)
print(json.dumps(served))
"""


def test_the_adapter_builds_its_models_without_torch(tmp_path):
    import numpy as np
    from PIL import Image
    from transformers import AutoImageProcessor

    from tests.support.tiny_models import build_checkpoint
    from tests.support.tiny_vision import build_vision_checkpoint

    text = build_checkpoint("bert", tmp_path / "bert")
    vision = build_vision_checkpoint("qwen2_5_vl", tmp_path / "vl")
    result = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, str(PROJECT_ROOT / "model_repository"), str(text),
                             str(vision)], capture_output=True, text=True, timeout=600, cwd=PROJECT_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    served = json.loads(result.stdout.splitlines()[-1])
    assert served["loaded"] == []
    assert served["bert_classifier"] == {"num_labels": 3, "id2label": {"0": "negative", "1": "neutral", "2": "positive"},
                                         "max_model_len": 128, "sends_token_types": True, "task": "classify"}
    assert served["qwen2_5_vl_classifier"]["num_labels"] == 1
    assert served["image_token_id"] == json.loads((vision / "config.json").read_text())["image_token_id"]
    # The image processor the adapter runs without torch gives the pixels the one loaded with torch gives.
    with_torch = AutoImageProcessor.from_pretrained(vision)(images=[Image.new("RGB", (90, 70), (10, 200, 30))],
                                                            return_tensors="np")
    assert np.array_equal(np.asarray(served["pixel_values"], dtype=np.float32), with_torch["pixel_values"])
