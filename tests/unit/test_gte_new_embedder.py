"""GTE-new embedders (``NewModel``, vLLM's ``GteNewModel``: Alibaba-NLP/gte-multilingual-base) on the native body.

The body is the one ``tests/unit/test_native_gte_new.py`` pins to logits recorded from Alibaba-NLP's new-impl code
(``tests/goldens/gte_new.json``). Its weights are saved here as gte-multilingual-base ships them: bare names
(``embeddings.*``, ``encoder.*``), config.json ``architectures: ["NewModel"]``, and the sentence-transformers files
(CLS pooling, Normalize). The embedder's ``pooled`` output, put through the golden classifier's pooler and
classifier, must give the recorded logits, and ``embeddings`` must be its CLS state normalised.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from poolserve_contract import families as declarations
from poolserve_contract.card import model_card
from poolserve_contract.parameters import ModelParameters
from poolserve_runtime import families
from poolserve_runtime.engine import PackedEngine
from poolserve_runtime.native import gte_new
from poolserve_runtime.native.gte_new import EMBEDDING_FAMILY
from poolserve_runtime.packing import PackedBatch, RequestSequences
from poolserve_runtime.settings import ModelSettings
from tests.goldens.build import (
    build_golden_checkpoint,
    golden_state_dict,
    load_golden,
    write_sentence_transformers_files,
)

TOLERANCE = dict(rtol=1e-5, atol=1e-5)
MODEL_REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"


@pytest.fixture(scope="module")
def golden():
    return load_golden("gte_new")


@pytest.fixture(scope="module")
def classifier(golden, tmp_path_factory) -> Path:
    """The golden checkpoint itself: a ``NewForSequenceClassification`` (``new.`` names, pooler, classifier)."""
    return build_golden_checkpoint(golden, tmp_path_factory.mktemp("gte_new_classifier"))


def save_embedder(golden, directory: Path, with_pooler: bool = False) -> Path:
    """The golden body as a ``NewModel`` checkpoint with gte-multilingual-base's sentence-transformers files: bare
    weight names, no classifier (and no pooler unless ``with_pooler``)."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {name.removeprefix("new."): tensor for name, tensor in golden_state_dict(golden).items()
             if name.startswith("new.") and (with_pooler or not name.startswith("new.pooler."))}
    save_file({name: tensor.contiguous() for name, tensor in state.items()}, str(directory / "model.safetensors"))
    config = {key: value for key, value in golden["config"].items() if key not in ("id2label", "label2id")}
    (directory / "config.json").write_text(json.dumps({**config, "architectures": ["NewModel"]}, indent=2))
    return write_sentence_transformers_files(directory, config["hidden_size"], "cls", normalize=True,
                                             max_seq_length=8192)


@pytest.fixture(scope="module")
def embedder(golden, tmp_path_factory) -> Path:
    return save_embedder(golden, tmp_path_factory.mktemp("gte_new_embedder") / "bare")


def load_engine(checkpoint: Path, budget: int = 16384, architecture: str = "") -> PackedEngine:
    settings = ModelSettings(model_name="gte", checkpoint=str(checkpoint), device=torch.device("cpu"),
                             dtype=torch.float32, max_tokens_per_forward=budget, max_model_len=0, logit_mean=0.0,
                             logit_sigma=1.0, attention="varlen", output_names=("embeddings", "pooled"),
                             compile="none", architecture=architecture)
    return PackedEngine.load(EMBEDDING_FAMILY, settings)


def packed_batch(golden) -> PackedBatch:
    """The golden rows (two of them text pairs with token types) as two requests."""
    rows = list(zip(golden["input_ids"], golden["token_type_ids"]))
    return PackedBatch.pack([RequestSequences(torch.tensor([t for ids, _ in group for t in ids]),
                                              torch.tensor([len(ids) for ids, _ in group]),
                                              torch.tensor([t for _, types in group for t in types]))
                             for group in (rows[:4], rows[4:])])


def golden_head(golden, pooled: torch.Tensor) -> torch.Tensor:
    """The golden classifier's NewPooler (dense + tanh) and classifier on CLS states: its logits."""
    state = golden_state_dict(golden)
    features = torch.tanh(pooled @ state["new.pooler.dense.weight"].T + state["new.pooler.dense.bias"])
    return features @ state["classifier.weight"].T + state["classifier.bias"]


def classifier_cls_states(golden, classifier: Path) -> torch.Tensor:
    """The CLS state of every golden row from the classifier family's body (the one pinned to the upstream logits)."""
    engine = PackedEngine.load(families.by_name("gte_new"), ModelSettings(
        model_name="reference", checkpoint=str(classifier), device=torch.device("cpu"), dtype=torch.float32,
        max_tokens_per_forward=16384, max_model_len=0, logit_mean=0.0, logit_sigma=1.0, attention="varlen",
        output_names=("logits", "scores"), compile="none"))
    states = []
    with torch.inference_mode():
        for ids, types in zip(golden["input_ids"], golden["token_type_ids"]):
            hidden = engine.family.body(engine.model)(torch.tensor([ids]), token_type_ids=torch.tensor([types]))
            states.append(hidden.last_hidden_state[0, 0])
    return torch.stack(states)


def test_the_classifier_reference_is_the_upstream_one(golden, classifier):
    """The CLS states compared against below give the recorded logits through the golden head."""
    torch.testing.assert_close(golden_head(golden, classifier_cls_states(golden, classifier)),
                               torch.tensor(golden["logits"]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("budget", [16384, 20])  # one forward; several forwards of at most 20 tokens
def test_engine_embeds_as_gte_multilingual_base(golden, classifier, embedder, budget):
    engine = load_engine(embedder, budget)
    assert (engine.pooling, engine.normalizes) == ("cls", True)  # 1_Pooling CLS + Normalize
    assert "family=gte_new_embedding" in engine.describe()
    outputs = engine.run(packed_batch(golden))
    expected = classifier_cls_states(golden, classifier)
    torch.testing.assert_close(outputs["pooled"], expected, **TOLERANCE)
    torch.testing.assert_close(outputs["embeddings"], torch.nn.functional.normalize(expected, dim=-1), **TOLERANCE)
    torch.testing.assert_close(golden_head(golden, outputs["pooled"]), torch.tensor(golden["logits"]),
                               rtol=1e-4, atol=1e-4)
    cosines = torch.nn.functional.cosine_similarity(outputs["embeddings"].double(), expected.double(), dim=1)
    assert bool((cosines >= 0.99999).all()), cosines.tolist()


def test_a_pooler_or_a_classifier_in_the_checkpoint_is_left_out(golden, classifier, embedder, tmp_path):
    """A bare checkpoint saved with upstream's pooler, and the reranker's ``new.``-prefixed checkpoint served as an
    embedder (vLLM: ``--hf-overrides '{"architectures": ["GteNewModel"]}'``), load the same body."""
    expected = load_engine(embedder).run(packed_batch(golden))["pooled"]
    with_pooler = save_embedder(golden, tmp_path / "with_pooler", with_pooler=True)
    for checkpoint, architecture in ((with_pooler, ""), (classifier, "GteNewModel")):
        engine = load_engine(checkpoint, architecture=architecture)
        assert not any(name.startswith(("pooler", "classifier")) for name in engine.model.state_dict())
        torch.testing.assert_close(engine.run(packed_batch(golden))["pooled"], expected, rtol=0, atol=0)
    # Without the override the reranker's architecture is not the embedder's.
    with pytest.raises(declarations.UnsupportedArchitecture, match="NewForSequenceClassification"):
        load_engine(classifier)


def test_embedder_state_dict_names(golden):
    config = gte_new.new_config(golden["config"])
    prefixed = {"new.embeddings.word_embeddings.weight": torch.zeros(1), "new.pooler.dense.weight": torch.zeros(1),
                "classifier.weight": torch.zeros(1), "new.encoder.layer.0.attention.qkv_proj.weight": torch.zeros(1)}
    bare = {name.removeprefix("new."): tensor for name, tensor in prefixed.items() if name.startswith("new.")}
    expected = {"embeddings.word_embeddings.weight", "encoder.layer.0.attention.qkv_proj.weight"}
    assert set(gte_new.embedder_state_dict(prefixed, config)) == expected
    assert set(gte_new.embedder_state_dict(bare, config)) == expected
    # pack_qkv=false checkpoints: q, k and v stacked into qkv_proj, bare names too.
    split = {f"encoder.layer.0.attention.{p}_proj.weight": torch.full((2, 3), float(i)) for i, p in enumerate("qkv")}
    stacked = gte_new.embedder_state_dict(split, config)["encoder.layer.0.attention.qkv_proj.weight"]
    assert stacked[:, 0].tolist() == [0, 0, 1, 1, 2, 2]


def test_the_family_the_card_and_the_folder(embedder):
    family = declarations.family_for_config(declarations.read_config_dict(str(embedder)))
    assert family.name == "gte_new_embedding" and family.task == "embed" and family.bodies == ("varlen",)
    assert declarations.family_for_config({"architectures": ["GteNewModel"]}) is family  # vLLM's name for it
    assert families.by_folder("gte_new_embedder") is EMBEDDING_FAMILY
    card = model_card(ModelParameters.from_mapping({}), family, str(embedder), task="embed",
                      token_type_input=family.uses_token_types, fallback_name="gte", local_files_only=True)
    assert (card.task, card.family, card.architecture) == ("embed", "gte_new_embedding", "NewModel")
    assert (card.embedding_size, card.normalizes, card.prompts, card.num_labels) == (32, True, {}, 0)
    assert card.max_model_len == 512 and card.sends_token_types

    from poolserve_contract.wire import SOURCE_FOLDER
    from poolserve_stack.plan import plan_models

    (planned,) = plan_models([str(embedder)], MODEL_REPOSITORY).values()
    assert planned[SOURCE_FOLDER] == "gte_new_embedder"


def test_unserved_options_are_refused_at_load(golden, tmp_path):
    directory = save_embedder(golden, tmp_path / "absolute")
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "position_embedding_type": "absolute"}))
    with pytest.raises(gte_new.UnsupportedArchitecture, match="position_embedding_type 'absolute'"):
        load_engine(directory)
