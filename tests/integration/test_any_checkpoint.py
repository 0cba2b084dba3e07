"""Serve checkpoints by name alone, several of one architecture side by side, through the real stack.

One tritonserver (started by the launcher from the serving plan, as ``make serve MODELS=...`` does)
serves: two Qwen3 rerankers with different weights under their own served names, a ModernBERT
reranker, a Gemma2 reward model (padded body) and a natively loaded remote-code architecture
(Qwen2ForRewardModel), every one named only by its checkpoint folder. The real adapter sits in
front. Scores through HTTP and raw gRPC equal the reference implementation's.
"""

from __future__ import annotations

import json
import time

import httpx
import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient

from poolserve_stack.errors import LauncherError
from poolserve_stack.plan import PlanError, plan_models
from poolserve_stack.triton_server import TritonServer
from tests.goldens.build import build_golden_checkpoint, load_golden
from tests.support.stack import MODEL_REPOSITORY, running_adapter
from tests.support.tiny_models import build_checkpoint, wordpiece_tokenizer

pytestmark = pytest.mark.integration

TEXTS = ["the movie was great", "paris is the capital of france", "slow server", "rain"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("any")
    made = {
        "rerank-a": build_checkpoint("qwen3", root / "qwen3-a", seed=0),
        "rerank-b": build_checkpoint("qwen3", root / "qwen3-b", seed=1),
        "modernbert": build_checkpoint("modernbert", root / "modernbert"),
        "gemma2": build_checkpoint("gemma2", root / "gemma2"),
    }
    # An LLM reranker in its original form, named as published: recognised with no flag (issue #11).
    made["llm-reranker"] = build_checkpoint("qwen3_causal", root / "Qwen3-Reranker-0.6B")
    reward = build_golden_checkpoint(load_golden("qwen2_reward"), root / "qwen2-math-rm")
    wordpiece_tokenizer(reward)  # the golden has no tokenizer; 300 ids fit its vocabulary
    made["reward"] = reward
    return made


@pytest.fixture(scope="module")
def plan(checkpoints):
    entries = [str(path) for path in checkpoints.values()]
    sets = {str(checkpoints["rerank-a"]): {"served_model_name": "rerank-a"},
            str(checkpoints["rerank-b"]): {"served_model_name": "rerank-b"}}
    return plan_models(entries, MODEL_REPOSITORY, sets)


@pytest.fixture(scope="module")
def stack(plan, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("any-stack")
    with TritonServer(MODEL_REPOSITORY, plan, log_path=log_dir / "tritonserver.log", ready_timeout_s=480) as server:
        with running_adapter(server, log_dir) as url:
            yield server, url
        server.check()


def triton_name(plan, served):
    return next(name for name, params in plan.items() if params.get("served_model_name") == served)


def hf_logits(checkpoint, texts):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    model = AutoModelForSequenceClassification.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    with torch.inference_mode():
        return torch.stack([model(**tokenizer(text, return_tensors="pt")).logits[0] for text in texts])


def test_the_plan_picks_folders_from_config_json_and_names_are_stable(plan, checkpoints):
    folders = {name: params["model_folder"] for name, params in plan.items()}
    assert sorted(folders.values()) == sorted(["qwen3_classifier", "qwen3_classifier", "modernbert_classifier",
                                               "gemma2_classifier", "qwen2_reward", "qwen3_classifier"])
    assert len(set(plan)) == 6
    assert plan == plan_models([str(p) for p in checkpoints.values()], MODEL_REPOSITORY,
                               {str(checkpoints["rerank-a"]): {"served_model_name": "rerank-a"},
                                str(checkpoints["rerank-b"]): {"served_model_name": "rerank-b"}})
    assert all("/" not in name for name in plan)


def test_models_lists_each_checkpoint_under_its_served_name(stack, checkpoints):
    _, url = stack
    ids = {card["id"] for card in httpx.get(f"{url}/v1/models").json()["data"]}
    assert ids == {"rerank-a", "rerank-b", str(checkpoints["modernbert"]), str(checkpoints["gemma2"]),
                   str(checkpoints["reward"]), str(checkpoints["llm-reranker"])}


def test_two_rerankers_of_one_architecture_answer_with_their_own_weights(stack, checkpoints):
    _, url = stack
    scores = {}
    for served in ("rerank-a", "rerank-b"):
        body = httpx.post(f"{url}/classify", json={"model": served, "input": TEXTS}, timeout=60).json()
        scores[served] = torch.tensor([item["probs"] for item in body["data"]])
        expected = torch.sigmoid(hf_logits(checkpoints[served], TEXTS))
        torch.testing.assert_close(scores[served], expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(scores["rerank-a"], scores["rerank-b"], atol=1e-3)


def test_raw_grpc_reaches_a_model_by_its_triton_name(stack, plan, checkpoints):
    from transformers import AutoTokenizer

    server, _ = stack
    ids = AutoTokenizer.from_pretrained(str(checkpoints["rerank-b"]))(TEXTS[0], return_tensors="np")["input_ids"]
    tensor = grpcclient.InferInput("input_ids", list(ids.shape), "INT64")
    tensor.set_data_from_numpy(ids.astype(np.int64))
    result = grpcclient.InferenceServerClient(server.grpc_url).infer(triton_name(plan, "rerank-b"), [tensor])
    np.testing.assert_allclose(result.as_numpy("logits"), hf_logits(checkpoints["rerank-b"], TEXTS[:1]).numpy(),
                               rtol=1e-4, atol=1e-4)


def test_modernbert_reranker_and_gemma2_reward_match_hf(stack, checkpoints):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    _, url = stack
    query, documents = "capital of france", ["paris is the capital of france", "pizza and pasta", "rain"]
    body = httpx.post(f"{url}/rerank", json={"model": str(checkpoints["modernbert"]), "query": query,
                                             "documents": documents}, timeout=60).json()
    got = {item["index"]: item["relevance_score"] for item in body["results"]}
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoints["modernbert"]))
    model = AutoModelForSequenceClassification.from_pretrained(str(checkpoints["modernbert"])).eval()
    with torch.inference_mode():
        expected = [torch.sigmoid(model(**tokenizer(query, d, return_tensors="pt", return_token_type_ids=False))
                                  .logits[0, 0]).item() for d in documents]
    assert [got[i] for i in range(3)] == pytest.approx(expected, rel=1e-4, abs=1e-5)

    body = httpx.post(f"{url}/classify", json={"model": str(checkpoints["gemma2"]), "input": TEXTS}, timeout=60).json()
    probs = torch.tensor([item["probs"] for item in body["data"]])
    torch.testing.assert_close(probs, torch.sigmoid(hf_logits(checkpoints["gemma2"], TEXTS)), rtol=1e-4, atol=1e-4)


def test_native_reward_model_returns_raw_rewards_through_sglang_classify(stack, checkpoints):
    from transformers import AutoTokenizer

    from poolserve_runtime.engine import PackedEngine
    from poolserve_runtime.native import qwen2_reward
    from poolserve_runtime.packing import PackedBatch, RequestSequences
    from poolserve_runtime.settings import ModelSettings

    _, url = stack
    body = httpx.post(f"{url}/classify", json={"model": str(checkpoints["reward"]), "text": TEXTS}, timeout=60).json()
    got = torch.tensor([item["embedding"] for item in body])
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoints["reward"]))
    rows = [torch.tensor(tokenizer(text)["input_ids"]) for text in TEXTS]
    settings = ModelSettings(model_name="rm", checkpoint=str(checkpoints["reward"]), device=torch.device("cpu"),
                             dtype=torch.float32, max_tokens_per_forward=16384, max_model_len=0, logit_mean=0.0,
                             logit_sigma=1.0, attention="varlen", output_names=("logits", "scores"), compile="none")
    engine = PackedEngine.load(qwen2_reward.FAMILY, settings)
    expected = engine.run(PackedBatch.pack([RequestSequences(torch.cat(rows), torch.tensor([len(r) for r in rows]),
                                                             None)]))["logits"]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_an_unsupported_architecture_is_refused_before_anything_starts(tmp_path):
    (tmp_path / "t5").mkdir()
    (tmp_path / "t5" / "config.json").write_text(json.dumps({"architectures": ["T5ForConditionalGeneration"],
                                                             "model_type": "t5"}))
    with pytest.raises(PlanError) as error:
        plan_models([str(tmp_path / "t5")], MODEL_REPOSITORY)
    assert "T5ForConditionalGeneration" in str(error.value) and "GemmaForSequenceClassification" in str(error.value)
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "config.json").write_text(json.dumps({"architectures": ["FancyForSequenceClassification"],
                                                    "auto_map": {"AutoModelForSequenceClassification": "m.Fancy"}}))
    with pytest.raises(PlanError, match="trust_remote_code=true"):
        plan_models([str(remote)], MODEL_REPOSITORY)


def test_a_checkpoint_in_the_wrong_folder_fails_the_start_naming_both(tmp_path, checkpoints):
    started = time.monotonic()
    plan = plan_models([f"qwen2_classifier={checkpoints['rerank-a']}"], MODEL_REPOSITORY)
    with pytest.raises(LauncherError, match="Qwen3ForSequenceClassification.*qwen2") as error:
        TritonServer(MODEL_REPOSITORY, plan, log_path=tmp_path / "log", ready_timeout_s=240).start()
    assert "served architectures" in str(error.value)
    assert time.monotonic() - started < 180


# --- LLM rerankers in their original form (issue #11) ------------------------------------------------

QUERY = "capital of france"
DOCUMENTS = ["paris is the capital of france", "pizza and pasta", "the capital city is paris on the river", "rain"]


def llm_reranker_expected(checkpoint, query, documents, instruction=None):
    """HF's next-token recipe on the rendered prompts: sigmoid(l_yes - l_no) at the last position."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from poolserve_contract.score_templates import render, template_text

    template = template_text("qwen3_reranker")
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    yes, no = tokenizer.convert_tokens_to_ids(["yes", "no"])
    scores, tokens = [], 0
    with torch.inference_mode():
        for document in documents:
            variables = {} if instruction is None else {"instruction": instruction}
            ids = tokenizer(render(template, query, document, **variables), return_tensors="pt")
            tokens += ids["input_ids"].shape[1]
            logits = model(**ids).logits[0, -1]
            scores.append(torch.sigmoid(logits[yes] - logits[no]).item())
    return scores, tokens


@pytest.mark.parametrize("path", ["/rerank", "/v1/rerank", "/v2/rerank"])
def test_llm_reranker_scores_through_the_rerank_routes(stack, checkpoints, path):
    _, url = stack
    expected, tokens = llm_reranker_expected(checkpoints["llm-reranker"], QUERY, DOCUMENTS)
    body = httpx.post(f"{url}{path}", json={"model": str(checkpoints["llm-reranker"]), "query": QUERY,
                                             "documents": DOCUMENTS}, timeout=60).json()
    got = {item["index"]: item["relevance_score"] for item in body["results"]}
    assert [got[i] for i in range(len(DOCUMENTS))] == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert [item["index"] for item in body["results"]] == sorted(range(4), key=lambda i: -expected[i])
    assert body["usage"]["prompt_tokens"] == tokens  # the rendered prompts, not the raw texts


def test_llm_reranker_instruction_and_score_route(stack, checkpoints):
    _, url = stack
    instruction = "Given a cooking question, find the recipe"
    expected, _ = llm_reranker_expected(checkpoints["llm-reranker"], QUERY, DOCUMENTS, instruction)
    default, _ = llm_reranker_expected(checkpoints["llm-reranker"], QUERY, DOCUMENTS)
    assert expected != pytest.approx(default)
    body = httpx.post(f"{url}/score", json={"model": str(checkpoints["llm-reranker"]), "queries": QUERY,
                                            "documents": DOCUMENTS, "instruction": instruction}, timeout=60).json()
    assert [item["score"] for item in body["data"]] == pytest.approx(expected, rel=1e-4, abs=1e-5)
    # chat_template_kwargs carries it too (vLLM's other spelling)
    body = httpx.post(f"{url}/rerank", json={"model": str(checkpoints["llm-reranker"]), "query": QUERY,
                                             "documents": DOCUMENTS,
                                             "chat_template_kwargs": {"instruction": instruction}}, timeout=60).json()
    got = {item["index"]: item["relevance_score"] for item in body["results"]}
    assert [got[i] for i in range(4)] == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_llm_reranker_through_sglang_rerank_with_instruct(stack, checkpoints):
    _, url = stack
    instruction = "Given a cooking question, find the recipe"
    expected, _ = llm_reranker_expected(checkpoints["llm-reranker"], QUERY, DOCUMENTS, instruction)
    body = httpx.post(f"{url}/sglang/v1/rerank", json={"model": str(checkpoints["llm-reranker"]), "query": QUERY,
                                                       "documents": DOCUMENTS, "instruct": instruction},
                      timeout=60).json()
    got = {item["index"]: item["score"] for item in body}
    assert [got[i] for i in range(4)] == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_llm_reranker_truncates_the_document_before_rendering(stack, checkpoints):
    from transformers import AutoTokenizer

    _, url = stack
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoints["llm-reranker"]))
    document = DOCUMENTS[2]
    ids = tokenizer(document, add_special_tokens=False)
    cut = document[: ids.token_to_chars(2).end]  # the text of the first three tokens
    expected, _ = llm_reranker_expected(checkpoints["llm-reranker"], QUERY, [cut])
    body = httpx.post(f"{url}/rerank", json={"model": str(checkpoints["llm-reranker"]), "query": QUERY,
                                             "documents": [document], "max_tokens_per_doc": 3}, timeout=60).json()
    assert body["results"][0]["relevance_score"] == pytest.approx(expected[0], rel=1e-4, abs=1e-5)
