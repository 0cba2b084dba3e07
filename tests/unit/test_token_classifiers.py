"""Token classifiers (``*ForTokenClassification``) on CPU fp32: every token's logits against transformers'
``AutoModelForTokenClassification(...).logits`` for each family, padded and varlen bodies; the per-request
padded ``token_logits``; the card (labels, activation, STEP parameters), the Triton outputs, the family
picking, and the STEP parameters' parsing and checks."""

from __future__ import annotations

import random

import pytest
import torch

from poolserve_contract import families as declarations
from poolserve_contract.card import ModelCard, model_card
from poolserve_contract.parameters import ModelParameters
from poolserve_contract.triton_config import complete_config
from poolserve_runtime import families
from poolserve_runtime.engine import PackedEngine
from poolserve_runtime.packing import PackedBatch, RequestSequences
from poolserve_runtime.settings import ModelSettings
from tests.support.tiny_models import random_text
from tests.support.token_models import (
    TOKEN_CLASSIFIER_FAMILIES,
    TOKEN_LABELS,
    token_classifier_checkpoint,
    token_classifier_reference,
)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("token_classifiers")
    return {kind: token_classifier_checkpoint(root / kind, kind) for kind in TOKEN_CLASSIFIER_FAMILIES}


def texts() -> list[str]:
    rng = random.Random(11)
    return [random_text(rng, words) for words in (5, 19, 1, 27, 9)]


def load(checkpoint, family: str, body: str, calibration: tuple[float, float] = (0.0, 1.0),
         **parameters) -> PackedEngine:
    settings = ModelSettings(model_name="tagger", checkpoint=str(checkpoint), device=torch.device("cpu"),
                             dtype=torch.float32, max_tokens_per_forward=48, max_model_len=0,
                             logit_mean=calibration[0], logit_sigma=calibration[1], attention=body,
                             output_names=("token_logits",), compile="none", **parameters)
    return PackedEngine.load(families.by_name(family), settings)


def packed(checkpoint, requests: list[list[str]]) -> PackedBatch:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    sequences = []
    for request in requests:
        encoded = [tokenizer(text) for text in request]
        ids = torch.cat([torch.tensor(e["input_ids"]) for e in encoded])
        types = torch.cat([torch.tensor(e["token_type_ids"]) for e in encoded]) if "token_type_ids" in encoded[0] \
            else None
        sequences.append(RequestSequences(ids, torch.tensor([len(e["input_ids"]) for e in encoded]), types))
    return PackedBatch.pack(sequences)


@pytest.mark.parametrize("kind", list(TOKEN_CLASSIFIER_FAMILIES))
@pytest.mark.parametrize("body", ["padded", "varlen"])
def test_every_tokens_logits_match_transformers(checkpoints, kind, body):
    checkpoint, family = checkpoints[kind], TOKEN_CLASSIFIER_FAMILIES[kind]
    if body not in families.by_name(family).bodies:
        pytest.skip(f"{family} runs {families.by_name(family).bodies} only")
    sentences = texts()
    engine = load(checkpoint, family, body)
    batch = packed(checkpoint, [sentences[:2], sentences[2:]])  # chunks of 48 tokens cut across requests
    logits = engine.run(batch)["token_logits"]
    expected = torch.cat(token_classifier_reference(checkpoint, sentences))
    assert logits.shape == (int(batch.cu_seqlens[-1]), len(TOKEN_LABELS))
    # fp32 on the CPU: the engine's padded chunks and the reference's padding are matmuls of other shapes, whose
    # reduction order (and the threads that run it) moves logits of ~7 by up to a few 1e-5; a wrong row is off by 0.1+.
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-4)


def test_each_request_gets_its_padded_logits_and_calibration_applies(checkpoints):
    checkpoint = checkpoints["bert"]
    engine = load(checkpoint, "bert_token_classifier", "padded")
    batch = packed(checkpoint, [["a b", "a b c d e f g"], ["x"]])
    first, second = batch.split(engine.run(batch), engine.token_outputs)
    lengths = batch.lengths.tolist()
    assert first["token_logits"].shape == (2, max(lengths[:2]), len(TOKEN_LABELS))
    assert second["token_logits"].shape == (1, lengths[2], len(TOKEN_LABELS))
    assert torch.all(first["token_logits"][0, lengths[0]:] == 0)
    reference = token_classifier_reference(checkpoint, ["a b"])[0]
    torch.testing.assert_close(first["token_logits"][0, :lengths[0]], reference, rtol=1e-5, atol=1e-5)
    # logit_mean / logit_sigma calibrate every token's logits (vLLM's TokenClassifierPoolerHead)
    shifted = load(checkpoint, "bert_token_classifier", "padded", calibration=(0.5, 2.0)).run(batch)["token_logits"]
    torch.testing.assert_close(shifted[:lengths[0]], (reference - 0.5) / 2.0, rtol=1e-5, atol=1e-5)


def card_of(checkpoint, family: str, **parameters) -> ModelCard:
    declaration = declarations.by_name(family)
    return model_card(ModelParameters.from_mapping(parameters), declaration, str(checkpoint), task=declaration.task,
                      token_type_input=declaration.uses_token_types, fallback_name="tagger", local_files_only=True)


def test_the_card_and_the_triton_output(checkpoints):
    card = card_of(checkpoints["bert"], "bert_token_classifier")
    assert (card.task, card.num_labels, card.token_activation) == ("token_classify", len(TOKEN_LABELS), "classify")
    assert card.id2label == dict(enumerate(TOKEN_LABELS))
    assert (card.step_tag_id, card.returned_token_ids) == (None, [])
    assert ModelCard.from_json(card.to_json()) == card
    config = complete_config({"name": "bert_token_classifier"}, "token_classify", uses_token_types=True)
    assert [(o["name"], o["dims"]) for o in config["output"]] == [("token_logits", [-1, -1])]


@pytest.mark.parametrize("problem_type, activation", [
    ("regression", "identity"), ("multi_label_classification", "sigmoid"), ("single_label_classification", "classify"),
])
def test_the_activation_follows_the_problem_type(tmp_path, problem_type, activation):
    checkpoint = token_classifier_checkpoint(tmp_path / "typed", "distilbert", num_labels=3, problem_type=problem_type)
    assert card_of(checkpoint, "distilbert_token_classifier").token_activation == activation


def test_token_classification_checkpoints_pick_their_family():
    for architecture, family in [("BertForTokenClassification", "bert_token_classifier"),
                                 ("XLMRobertaForTokenClassification", "xlm_roberta_token_classifier"),
                                 ("RobertaForTokenClassification", "xlm_roberta_token_classifier"),
                                 ("DistilBertForTokenClassification", "distilbert_token_classifier"),
                                 ("ModernBertForTokenClassification", "modernbert_token_classifier"),
                                 ("DebertaV2ForTokenClassification", "deberta_v2_token_classifier")]:
        declaration = declarations.family_for_config({"architectures": [architecture]})
        assert (declaration.name, declaration.task) == (family, "token_classify")
    with pytest.raises(declarations.UnsupportedArchitecture):
        declarations.family_for_config({"architectures": ["ElectraForTokenClassification"]})


def test_step_parameters_are_parsed_carried_and_checked(checkpoints):
    parameters = ModelParameters.from_mapping({"step_tag_id": "7", "returned_token_ids": "3, 1"})
    assert (parameters.step_tag_id, parameters.returned_token_ids) == (7, (3, 1))
    assert ModelParameters.from_mapping({}).returned_token_ids == ()
    with pytest.raises(ValueError, match="returned_token_ids parameter"):
        ModelParameters.from_mapping({"returned_token_ids": "3,x"})
    with pytest.raises(ValueError, match="step_tag_id parameter"):
        ModelParameters.from_mapping({"step_tag_id": "-1"})
    card = card_of(checkpoints["bert"], "bert_token_classifier", step_tag_id="7", returned_token_ids="3,1")
    assert (card.step_tag_id, card.returned_token_ids) == (7, [3, 1])
    with pytest.raises(ValueError, match=r"returned_token_ids \[5\] are not columns of the model's 5 labels"):
        card_of(checkpoints["bert"], "bert_token_classifier", returned_token_ids="0,5")
    with pytest.raises(ValueError, match="returned_token_ids"):
        load(checkpoints["bert"], "bert_token_classifier", "padded", returned_token_ids=(9,))


def test_step_parameters_are_refused_on_other_tasks(tmp_path):
    from tests.support.token_models import colbert_checkpoint

    colbert = colbert_checkpoint(tmp_path / "colbert")
    with pytest.raises(ValueError, match="apply to token_classify models"):
        card_of(colbert, "colbert", step_tag_id="3")
