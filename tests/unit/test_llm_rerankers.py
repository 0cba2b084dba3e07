"""LLM rerankers in their original causal-LM form against HF ``AutoModelForCausalLM``, fp32 on CPU.

Qwen3-Reranker scores sigmoid(l_yes - l_no), bge-reranker-v2-gemma sigmoid(l_Yes), mxbai-rerank-v2
sigmoid(l_1 - l_0), where l are the HF next-token logits at the prompt's last position: the
engine's converted one-label head must give exactly that (1e-5), recognised from the checkpoint
name with no flag, on the prompts each model's score template renders.
"""

from __future__ import annotations

import json

import pytest
import torch

from poolserve_runtime import families, llm_rerankers
from poolserve_runtime.engine import PackedEngine
from poolserve_runtime.packing import PackedBatch, RequestSequences
from poolserve_runtime.settings import ModelSettings
from poolserve_stack.plan import PlanError, plan_models
from tests.support.stack import MODEL_REPOSITORY
from tests.support.tiny_models import build_checkpoint

QUERY = "what is the capital of france"
DOCUMENTS = ["paris is the capital of france", "pizza and pasta", "the river bank", "rain",
             "the capital city of france is paris and it is a great city with a river"]
# name the checkpoint as published (recognition) → (tiny kind, folder, true token, false token or None, template)
RERANKERS = {
    "Qwen3-Reranker-0.6B": ("qwen3_causal", "qwen3_classifier", "yes", "no", "qwen3_reranker"),
    "bge-reranker-v2-gemma": ("gemma_causal", "gemma_classifier", "Yes", None, "bge_reranker_v2_gemma"),
    "mxbai-rerank-base-v2": ("qwen2_causal", "qwen2_classifier", "1", "0", "mxbai_rerank_v2"),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("llm-rerankers")
    made = {name: build_checkpoint(kind, root / name) for name, (kind, *_rest) in RERANKERS.items()}
    made["llama"] = build_checkpoint("llama_causal", root / "some-llama")
    return made


def engine_for(parameters: dict, attention="padded", budget=16384) -> PackedEngine:
    family = families.by_folder(parameters["model_folder"])
    settings = ModelSettings(model_name="r", checkpoint=parameters["checkpoint"], device=torch.device("cpu"),
                             dtype=torch.float32, max_tokens_per_forward=budget, max_model_len=0, logit_mean=0.0,
                             logit_sigma=1.0, attention=attention, output_names=("logits", "scores"), compile="none",
                             hf_overrides=parameters.get("hf_overrides", ""))
    return PackedEngine.load(family, settings)


def prompts_for(parameters: dict) -> list[str]:
    from poolserve_contract.score_templates import render, template_text

    template = template_text(parameters["score_template"])
    return [render(template, QUERY, document) for document in DOCUMENTS]


def hf_scores(checkpoint, prompts, true_token, false_token) -> torch.Tensor:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    scores = []
    with torch.inference_mode():
        for prompt in prompts:
            logits = model(**tokenizer(prompt, return_tensors="pt")).logits[0, -1]
            margin = logits[tokenizer.convert_tokens_to_ids(true_token)]
            if false_token is not None:
                margin = margin - logits[tokenizer.convert_tokens_to_ids(false_token)]
            scores.append(torch.sigmoid(margin))
    return torch.stack(scores)


def run(engine: PackedEngine, checkpoint, prompts: list[str]) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    rows = [torch.tensor(tokenizer(prompt)["input_ids"]) for prompt in prompts]
    return engine.run(PackedBatch.pack([RequestSequences(torch.cat(rows), torch.tensor([len(r) for r in rows]), None)]))


@pytest.mark.parametrize("name", list(RERANKERS))
def test_known_rerankers_are_recognised_and_score_as_hf(checkpoints, name):
    _kind, folder, true_token, false_token, template = RERANKERS[name]
    (parameters,) = plan_models([str(checkpoints[name])], MODEL_REPOSITORY).values()
    assert parameters["model_folder"] == folder and parameters["score_template"] == template
    assert json.loads(parameters["hf_overrides"])["classifier_from_token"][-1] == true_token
    prompts = prompts_for(parameters)
    expected = hf_scores(checkpoints[name], prompts, true_token, false_token)
    for attention, budget in (("padded", 16384), ("varlen", 16384), ("varlen", 40)):
        got = run(engine_for(parameters, attention, budget), checkpoints[name], prompts)
        assert got["scores"].shape == (len(DOCUMENTS), 1)
        torch.testing.assert_close(got["scores"][:, 0], expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(got["scores"][:, 0].argsort(), expected.argsort())


def test_vllm_overrides_convert_any_causal_lm(checkpoints):
    """The generic conversion: vLLM's keys given by the user, k labels from k lm_head rows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    overrides = {"architectures": ["LlamaForSequenceClassification"], "classifier_from_token": ["yes", "no", "Yes"],
                 "method": "no_post_processing"}
    entry = str(checkpoints["llama"])
    (parameters,) = plan_models([entry], MODEL_REPOSITORY, {entry: {"hf_overrides": json.dumps(overrides)}}).values()
    assert parameters["model_folder"] == "llama_classifier" and "score_template" not in parameters
    got = run(engine_for(parameters, "varlen"), checkpoints["llama"], DOCUMENTS)
    tokenizer = AutoTokenizer.from_pretrained(entry)
    model = AutoModelForCausalLM.from_pretrained(entry, dtype=torch.float32).eval()
    ids = tokenizer.convert_tokens_to_ids(["yes", "no", "Yes"])
    with torch.inference_mode():
        expected = torch.stack([model(**tokenizer(d, return_tensors="pt")).logits[0, -1, ids] for d in DOCUMENTS])
    torch.testing.assert_close(got["logits"], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["scores"], torch.softmax(expected, dim=-1), rtol=1e-5, atol=1e-5)


def test_a_causal_lm_without_overrides_or_score_head_is_an_explicit_error(checkpoints):
    (parameters,) = plan_models([str(checkpoints["llama"])], MODEL_REPOSITORY).values()
    assert parameters["model_folder"] == "llama_classifier"  # vLLM's --convert classify
    with pytest.raises(llm_rerankers.UnsupportedArchitecture, match="without a score head.*hf_overrides"):
        engine_for(parameters)


@pytest.mark.parametrize("overrides, message", [
    ({"classifier_from_token": ["yes"], "method": "from_2_way_softmax"}, "false_token, true_token"),
    ({"method": "softmax_of_everything", "classifier_from_token": ["a"]}, "not one of"),
    ({"classifier_from_token": ["zebra"], "method": "no_post_processing"}, "not a token"),
    ({"pooling": "mean"}, "not served"),
])
def test_bad_overrides_fail_at_load_naming_the_problem(checkpoints, overrides, message):
    entry = str(checkpoints["llama"])
    with pytest.raises((llm_rerankers.UnsupportedArchitecture, PlanError), match=message):
        (parameters,) = plan_models([entry], MODEL_REPOSITORY, {entry: {"hf_overrides": json.dumps(overrides)}}).values()
        engine_for(parameters)
