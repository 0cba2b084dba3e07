"""The vLLM and SGLang contract (../shared/research/api-contract.md), against the real stack.

One behaviour per test, exact shapes, orders, status codes and messages. Models are the tiny
checkpoints served under their folder names (see tests/support/tiny_models.py): `bert_classifier` (3
labels, max length 128), `xlm_roberta_classifier` (1 label: a cross-encoder), `bert_embedder`,
`qwen2_classifier` (2 labels, ChatML chat template), `llama_classifier` (regression).
A second adapter with an API key, small limits and SGLang's /v1/rerank runs for the guard tests.
"""

from __future__ import annotations

import base64
import re

import httpx
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from tests.integration.test_adapter_api import assert_vllm_error, hf_classifier, hf_embeddings
from tests.support.stack import running_adapter

pytestmark = pytest.mark.integration

SGLANG_ERROR_KEYS = ["object", "message", "type", "param", "code"]
DOCS = ["bank loan rate", "paris france capital", "pizza pasta bread", "cold winter snow"]


def post(url, path, body, **kwargs):
    return httpx.post(f"{url}{path}", json=body, timeout=60, **kwargs)


def assert_sglang_error(response, status, error_type, message=None):
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == SGLANG_ERROR_KEYS, body
    assert body["object"] == "error" and body["type"] == error_type and body["code"] == status
    if message is not None:
        assert message in body["message"], body["message"]
    return body


def tokenizer_of(tiny_checkpoints, folder):
    return AutoTokenizer.from_pretrained(tiny_checkpoints[folder])


# --- vLLM /classify: chat form, special tokens, truncation, ids -------------------------------------


def test_classify_chat_messages_render_with_the_chat_template(adapter_url, tiny_checkpoints):
    tokenizer = tokenizer_of(tiny_checkpoints, "qwen2_classifier")
    messages = [{"role": "user", "content": "is the movie good"}, {"role": "assistant", "content": "great film"}]
    plain = post(adapter_url, "/classify", {"model": "qwen2_classifier", "messages": messages})
    assert plain.status_code == 200, plain.text
    expected_prompt = tokenizer.apply_chat_template(messages, tokenize=False)
    expected_ids = tokenizer(expected_prompt, add_special_tokens=False)["input_ids"]
    assert plain.json()["usage"]["prompt_tokens"] == len(expected_ids)
    by_ids = post(adapter_url, "/classify", {"model": "qwen2_classifier", "input": expected_ids}).json()
    np.testing.assert_allclose(plain.json()["data"][0]["probs"], by_ids["data"][0]["probs"], rtol=1e-5, atol=1e-6)

    generation = post(adapter_url, "/classify", {"model": "qwen2_classifier", "messages": messages,
                                                 "add_generation_prompt": True}).json()
    with_prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert generation["usage"]["prompt_tokens"] == len(tokenizer(with_prompt, add_special_tokens=False)["input_ids"])

    both = post(adapter_url, "/classify", {"model": "qwen2_classifier", "messages": messages,
                                           "add_generation_prompt": True, "continue_final_message": True})
    assert_vllm_error(both, 400, "BadRequestError",
                      "Cannot set both `continue_final_message` and `add_generation_prompt` to True.")
    untrusted = post(adapter_url, "/classify", {"model": "qwen2_classifier", "messages": messages,
                                                "chat_template": "{{ messages }}"})
    assert_vllm_error(untrusted, 400, "BadRequestError", "--trust-request-chat-template")
    no_template = post(adapter_url, "/classify", {"model": "bert_classifier", "messages": messages})
    assert_vllm_error(no_template, 400, "BadRequestError", "chat template")


def test_classify_add_special_tokens(adapter_url):
    with_specials = post(adapter_url, "/classify", {"model": "bert_classifier", "input": "good movie"}).json()
    without = post(adapter_url, "/classify", {"model": "bert_classifier", "input": "good movie",
                                              "add_special_tokens": False}).json()
    assert with_specials["usage"]["prompt_tokens"] == without["usage"]["prompt_tokens"] + 2  # [CLS] and [SEP]


def test_truncate_prompt_tokens_values(adapter_url, tiny_checkpoints):
    long_text = "paris is the capital city of france " * 40
    body = {"model": "bert_classifier", "input": [long_text, "good movie"]}
    five = post(adapter_url, "/classify", {**body, "truncate_prompt_tokens": 5}).json()
    assert five["usage"]["prompt_tokens"] == 5 + 4  # "good movie" is [CLS] good movie [SEP]
    to_max = post(adapter_url, "/classify", {**body, "truncate_prompt_tokens": -1}).json()
    assert to_max["usage"]["prompt_tokens"] == 128 + 4  # a prompt of exactly max_model_len is allowed
    # Tokenizer truncation keeps [CLS] ... [SEP]: the same as classifying those ids.
    tokenizer = tokenizer_of(tiny_checkpoints, "bert_classifier")
    kept = tokenizer(long_text, truncation=True, max_length=5)["input_ids"]
    by_ids = post(adapter_url, "/classify", {"model": "bert_classifier", "input": kept}).json()
    np.testing.assert_allclose(five["data"][0]["probs"], by_ids["data"][0]["probs"], rtol=1e-5)

    too_big = post(adapter_url, "/classify", {**body, "truncate_prompt_tokens": 129})
    assert_vllm_error(too_big, 400, "BadRequestError",
                      "truncate_prompt_tokens value is greater than max_model_len. Please request a smaller "
                      "truncation size.")
    assert_vllm_error(post(adapter_url, "/classify", {**body, "truncate_prompt_tokens": -2}), 400, "Bad Request",
                      param="body.truncate_prompt_tokens")
    assert_vllm_error(post(adapter_url, "/classify", {**body, "truncate_prompt_tokens": 0}), 400, "BadRequestError",
                      "The decoder prompt cannot be empty")


def test_truncation_side_slices_the_full_prompt(adapter_url, tiny_checkpoints):
    tokenizer = tokenizer_of(tiny_checkpoints, "bert_classifier")
    text = "the weather was cold and the coffee bad in paris"
    ids = tokenizer(text)["input_ids"]
    for side, kept in (("right", ids[:4]), ("left", ids[-4:])):
        got = post(adapter_url, "/classify", {"model": "bert_classifier", "input": text,
                                              "truncate_prompt_tokens": 4, "truncation_side": side}).json()
        expected = post(adapter_url, "/classify", {"model": "bert_classifier", "input": kept}).json()
        assert got["usage"]["prompt_tokens"] == 4
        np.testing.assert_allclose(got["data"][0]["probs"], expected["data"][0]["probs"], rtol=1e-5)


def test_removed_parameters_are_rejected(adapter_url):
    normalize = post(adapter_url, "/classify", {"model": "bert_classifier", "input": "x", "normalize": True})
    assert_vllm_error(normalize, 400, "Bad Request", "Parameter `normalize` was removed; use `use_activation` instead.")
    task = post(adapter_url, "/pooling", {"model": "bert_classifier", "input": "x", "task": "score"})
    assert task.status_code == 400


def test_unknown_fields_are_ignored_and_request_id_names_the_response(adapter_url):
    response = post(adapter_url, "/classify", {"model": "bert_classifier", "input": "x", "some_new_field": 1,
                                               "request_id": "abc123", "priority": 5, "user": "u"})
    assert response.status_code == 200 and response.json()["id"] == "classify-abc123"


def test_decoder_empty_prompt_and_vocabulary(adapter_url):
    assert_vllm_error(post(adapter_url, "/classify", {"model": "qwen2_classifier", "input": ""}), 400,
                      "BadRequestError", "The decoder prompt cannot be empty")
    assert_vllm_error(post(adapter_url, "/classify", {"model": "bert_classifier", "input": [2, 99999, 3]}), 400,
                      "BadRequestError", "Token id 99999 is out of vocabulary")
    assert post(adapter_url, "/classify", {"model": "bert_classifier", "input": ""}).status_code == 200  # [CLS][SEP]


def test_reward_model_classify_is_identity_with_one_label(adapter_url, tiny_checkpoints):
    """llama_classifier declares problem_type=regression: vLLM applies no activation."""
    body = post(adapter_url, "/classify", {"model": "llama_classifier", "input": ["good movie", "bad"]}).json()
    logits, _ = hf_classifier(tiny_checkpoints["llama_classifier"], ["good movie"])
    np.testing.assert_allclose(body["data"][0]["probs"], logits[0].numpy(), rtol=1e-4, atol=1e-5)
    assert body["data"][0]["num_classes"] == 1


# --- SGLang /v1/classify -------------------------------------------------------------------------


def test_sglang_v1_classify_shape_softmax_and_labels(adapter_url, tiny_checkpoints):
    texts = ["good movie", "rain"]
    response = post(adapter_url, "/v1/classify", {"model": "anything", "input": texts})
    assert response.status_code == 200, response.text
    body = response.json()
    assert list(body) == ["id", "object", "created", "model", "data", "usage"]
    assert re.fullmatch(r"classify-[0-9a-f]{32}", body["id"]) and body["model"] == "bert_classifier"
    logits, tokens = hf_classifier(tiny_checkpoints["bert_classifier"], texts)
    probs = torch.softmax(logits.double(), -1).numpy()
    labels = {0: "negative", 1: "neutral", 2: "positive"}
    for row, item in zip(probs, body["data"]):
        np.testing.assert_allclose(item["probs"], row, rtol=1e-4)
        assert item["label"] == labels[int(np.argmax(row))] and item["num_classes"] == 3
    assert list(body["usage"]) == ["prompt_tokens", "total_tokens", "completion_tokens", "prompt_tokens_details",
                                   "reasoning_tokens", "completion_tokens_details"]
    assert body["usage"]["prompt_tokens"] == tokens and body["usage"]["reasoning_tokens"] == 0


def test_sglang_v1_classify_one_label_softmax_is_one(adapter_url):
    body = post(adapter_url, "/v1/classify", {"model": "xlm_roberta_classifier", "input": "good movie"}).json()
    assert body["data"][0]["probs"] == [1.0] and body["data"][0]["label"] == "LABEL_0"


@pytest.mark.parametrize("value, message", [
    ("", "Input cannot be empty"),
    ([], "Input cannot be empty"),
    ("   ", "Input cannot be empty or whitespace only"),
    (["good", " "], "Input at index 1 cannot be empty or whitespace only"),
    ([5, -2], "Token ID at index 1 must be non-negative"),
])
def test_sglang_v1_classify_validation_messages(adapter_url, value, message):
    response = post(adapter_url, "/v1/classify", {"model": "bert_classifier", "input": value})
    assert_sglang_error(response, 400, "BadRequestError", message)


def test_sglang_errors_are_flat_validation_too(adapter_url):
    body = assert_sglang_error(post(adapter_url, "/v1/classify", {"model": "bert_classifier"}), 400, "Bad Request")
    assert body["param"] is None
    too_long = post(adapter_url, "/v1/classify", {"model": "bert_classifier", "input": "paris " * 126})
    assert_sglang_error(too_long, 400, "BadRequestError",
                        "The input (128 tokens) is longer than the model's context length (128 tokens).")


# --- SGLang native /classify ---------------------------------------------------------------------


def test_native_classify_single_and_batch(adapter_url, tiny_checkpoints):
    single = post(adapter_url, "/classify", {"text": "good movie"})
    assert single.status_code == 200, single.text
    result = single.json()
    assert list(result) == ["embedding", "meta_info"]
    assert {"id", "finish_reason", "prompt_tokens", "weight_version", "num_retractions", "e2e_latency"} <= set(
        result["meta_info"])
    logits, tokens = hf_classifier(tiny_checkpoints["bert_classifier"], ["good movie"])
    np.testing.assert_allclose(result["embedding"], logits[0].numpy(), rtol=1e-4, atol=1e-5)  # raw head output
    assert result["meta_info"]["prompt_tokens"] == tokens

    batch = post(adapter_url, "/classify", {"text": ["good movie", "rain"], "rid": ["a", "b"]}).json()
    assert isinstance(batch, list) and [r["meta_info"]["id"] for r in batch] == ["a", "b"]
    np.testing.assert_allclose(batch[0]["embedding"], result["embedding"], rtol=1e-5, atol=1e-6)

    tokenizer = tokenizer_of(tiny_checkpoints, "bert_classifier")
    ids = tokenizer("good movie")["input_ids"]
    by_ids = post(adapter_url, "/classify", {"input_ids": ids}).json()
    np.testing.assert_allclose(by_ids["embedding"], result["embedding"], rtol=1e-5, atol=1e-6)
    assert len(post(adapter_url, "/classify", {"input_ids": [ids, ids]}).json()) == 2


def test_native_classify_errors(adapter_url):
    neither = post(adapter_url, "/classify", {"text": None, "rid": "x"})
    assert neither.status_code == 400
    assert neither.json() == {"error": {"message": "At least one of text, input_ids, image, video, or audio should "
                                                   "be provided"}}
    both = post(adapter_url, "/classify", {"text": "a", "input_ids": [1, 2]})
    assert both.status_code == 400 and list(both.json()) == ["error"] and list(both.json()["error"]) == ["message"]
    wrong_type = post(adapter_url, "/classify", {"text": 5})
    assert_sglang_error(wrong_type, 400, "Bad Request")


# --- rerank: vLLM fields, SGLang flavour ---------------------------------------------------------


def test_vllm_rerank_max_tokens_per_doc_and_query(adapter_url):
    body = {"model": "xlm_roberta_classifier", "query": "paris france capital city", "documents": DOCS}
    full = post(adapter_url, "/rerank", body).json()
    short = post(adapter_url, "/rerank", {**body, "max_tokens_per_doc": 1}).json()
    short_query = post(adapter_url, "/rerank", {**body, "max_tokens_per_query": 1}).json()
    assert short["usage"]["prompt_tokens"] < full["usage"]["prompt_tokens"]
    assert short_query["usage"]["prompt_tokens"] < full["usage"]["prompt_tokens"]
    assert [r["document"]["text"] for r in sorted(short["results"], key=lambda r: r["index"])] == DOCS
    assert_vllm_error(post(adapter_url, "/rerank", {**body, "max_tokens_per_doc": -1}), 400, "BadRequestError",
                      "max_tokens_per_doc must be a non-negative integer")
    assert_vllm_error(post(adapter_url, "/rerank", {**body, "max_tokens_per_query": 128}), 400, "BadRequestError",
                      "max_tokens_per_query must be less than max_model_len (128).")
    reserved = post(adapter_url, "/rerank", {**body, "chat_template_kwargs": {"tokenize": True}})
    assert_vllm_error(reserved, 400, "BadRequestError", "reserved")
    assert post(adapter_url, "/rerank", {**body, "instruction": "find the capital"}).status_code == 200


def test_vllm_rerank_paths_agree_and_take_cohere_objects(adapter_url):
    body = {"model": "xlm_roberta_classifier", "query": "capital", "documents": DOCS}
    results = [post(adapter_url, path, body).json()["results"] for path in ("/rerank", "/v1/rerank", "/v2/rerank",
                                                                              "/vllm/v1/rerank")]
    assert all(r == results[0] for r in results)
    objects = [{"text": text, "id": str(index)} for index, text in enumerate(DOCS)]
    as_objects = post(adapter_url, "/v1/rerank", {**body, "documents": objects}).json()["results"]
    assert [(r["index"], r["relevance_score"]) for r in as_objects] == [(r["index"], r["relevance_score"])
                                                                         for r in results[0]]
    assert all(r["document"]["text"] == DOCS[r["index"]] and r["document"]["id"] == str(r["index"])
               for r in as_objects)
    untexted = post(adapter_url, "/rerank", {**body, "documents": [{"title": "a"}]})
    assert_vllm_error(untexted, 400, "Bad Request", param="body.documents")


def test_a_rerank_route_the_model_lacks_is_a_400_on_every_vllm_path(adapter_url):
    """vLLM's words and body on each of its rerank paths and on /invocations (SGLang's routes pick another
    served model instead); a mistyped URL is still FastAPI's bare 404."""
    body = {"model": "bert_classifier", "query": "q", "documents": ["d"]}
    for path in ("/rerank", "/v1/rerank", "/v2/rerank", "/vllm/v1/rerank", "/invocations"):
        assert_vllm_error(post(adapter_url, path, body), 400, "BadRequestError",
                          "Scoring API is only enabled for num_labels == 1. Model `bert_classifier`", param=None)
    response = post(adapter_url, "/rerankk", body)
    assert response.status_code == 404 and response.json() == {"detail": "Not Found"}


def test_sglang_rerank_bare_list_raw_scores(adapter_url):
    # `model` is not SGLang's (it serves one model); here it picks one of the served cross-encoders.
    body = {"model": "xlm_roberta_classifier", "query": "paris france capital", "documents": DOCS}
    response = post(adapter_url, "/sglang/v1/rerank", body)
    assert response.status_code == 200, response.text
    results = response.json()
    assert isinstance(results, list) and len(results) == len(DOCS)
    assert all(list(r) == ["score", "document", "index", "meta_info"] for r in results)
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    vllm_raw = post(adapter_url, "/rerank", {**body, "use_activation": False}).json()
    raw_by_index = {r["index"]: r["relevance_score"] for r in vllm_raw["results"]}
    for r in results:
        assert r["document"] == DOCS[r["index"]]
        assert r["score"] == pytest.approx(raw_by_index[r["index"]], rel=1e-5)  # SGLang: raw logits

    top = post(adapter_url, "/sglang/v1/rerank", {**body, "top_n": 2, "return_documents": False}).json()
    assert [r["index"] for r in top] == [r["index"] for r in results[:2]]
    assert all("document" not in r for r in top)


@pytest.mark.parametrize("body, error_type, message", [
    ({"query": "q", "documents": DOCS, "top_n": 0}, "Bad Request", "parameter top_n should be larger than 0."),
    ({"query": "q", "documents": "one doc"}, "Bad Request", None),
    ({"query": "", "documents": DOCS}, "BadRequestError", "Query cannot be empty"),
    ({"query": "  ", "documents": DOCS}, "BadRequestError", "Query cannot be empty or whitespace only"),
    ({"query": "q", "documents": []}, "BadRequestError", "Documents cannot be empty"),
    ({"query": "q", "documents": ["a", " "]}, "BadRequestError", "Each document cannot be empty or whitespace only"),
])
def test_sglang_rerank_validation(adapter_url, body, error_type, message):
    assert_sglang_error(post(adapter_url, "/sglang/v1/rerank", body), 400, error_type, message)


# --- /tokenize, /detokenize (both flavours) -------------------------------------------------------


def test_vllm_tokenize_and_detokenize(adapter_url, tiny_checkpoints):
    tokenizer = tokenizer_of(tiny_checkpoints, "bert_classifier")
    body = post(adapter_url, "/tokenize", {"model": "bert_classifier", "prompt": "good movie",
                                           "return_token_strs": True}).json()
    ids = tokenizer("good movie")["input_ids"]
    assert body == {"count": len(ids), "max_model_len": 128, "tokens": ids,
                    "token_strs": tokenizer.convert_ids_to_tokens(ids)}
    plain = post(adapter_url, "/tokenize", {"model": "bert_classifier", "prompt": "good movie",
                                            "add_special_tokens": False}).json()
    assert plain["tokens"] == ids[1:-1] and plain["token_strs"] is None
    back = post(adapter_url, "/detokenize", {"model": "bert_classifier", "tokens": ids[1:-1]}).json()
    assert back == {"prompt": tokenizer.decode(ids[1:-1])}
    assert_vllm_error(post(adapter_url, "/detokenize", {"model": "bert_classifier", "tokens": [-1]}), 400,
                      "BadRequestError", "out of vocabulary")
    assert_vllm_error(post(adapter_url, "/tokenize", {"model": "nope", "prompt": "x"}), 404, "NotFoundError")


def test_vllm_tokenize_chat_adds_generation_prompt_by_default(adapter_url, tiny_checkpoints):
    tokenizer = tokenizer_of(tiny_checkpoints, "qwen2_classifier")
    messages = [{"role": "user", "content": "hello rain"}]
    body = post(adapter_url, "/tokenize", {"model": "qwen2_classifier", "messages": messages}).json()
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert body["tokens"] == tokenizer(prompt, add_special_tokens=False)["input_ids"]


def test_sglang_tokenize_and_detokenize(adapter_url, tiny_checkpoints):
    tokenizer = tokenizer_of(tiny_checkpoints, "bert_classifier")
    one = post(adapter_url, "/v1/tokenize", {"model": "bert_classifier", "prompt": "good movie"}).json()
    ids = tokenizer("good movie")["input_ids"]
    assert one == {"tokens": ids, "count": len(ids), "max_model_len": 128}
    many = post(adapter_url, "/v1/tokenize", {"model": "bert_classifier", "prompt": ["good", "rain"]}).json()
    assert many["count"] == [3, 3] and len(many["tokens"]) == 2
    text = post(adapter_url, "/v1/detokenize", {"model": "bert_classifier", "tokens": ids}).json()
    assert text == {"text": tokenizer.decode(ids, skip_special_tokens=True)}


# --- /pooling, /invocations -----------------------------------------------------------------------


def test_pooling_classify_embed_and_base64(adapter_url, tiny_checkpoints):
    classify = post(adapter_url, "/classify", {"model": "bert_classifier", "input": ["good movie"]}).json()
    pooled = post(adapter_url, "/pooling", {"model": "bert_classifier", "input": ["good movie"]})
    assert pooled.status_code == 200, pooled.text
    body = pooled.json()
    assert list(body) == ["id", "object", "created", "model", "data", "usage"] and body["id"].startswith("pooling-")
    assert body["data"][0]["object"] == "pooling"
    np.testing.assert_allclose(body["data"][0]["data"], classify["data"][0]["probs"], rtol=1e-5, atol=1e-6)

    embedded = post(adapter_url, "/pooling", {"model": "bert_embedder", "input": "paris france"}).json()
    expected, _ = hf_embeddings(tiny_checkpoints["bert_embedder"], ["paris france"])
    np.testing.assert_allclose(embedded["data"][0]["data"], expected[0].numpy(), rtol=1e-4, atol=1e-5)
    encoded = post(adapter_url, "/pooling", {"model": "bert_embedder", "input": "paris france",
                                             "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(encoded["data"][0]["data"]), dtype="<f4")
    np.testing.assert_allclose(decoded, embedded["data"][0]["data"], rtol=1e-5, atol=1e-6)


def test_pooling_errors(adapter_url):
    assert_vllm_error(post(adapter_url, "/pooling", {"model": "bert_classifier", "input": "x", "task": "embed"}),
                      400, "BadRequestError", "Unsupported task: 'embed' Supported tasks: ('classify',)")
    assert_vllm_error(post(adapter_url, "/pooling", {"model": "bert_embedder", "input": "x", "dimensions": 8}),
                      400, "BadRequestError", "dimensions")
    assert_vllm_error(post(adapter_url, "/pooling", {"model": "bert_embedder", "input": "x",
                                                     "encoding_format": "hex"}), 400, "Bad Request")


def test_invocations_route_by_body_shape(adapter_url):
    cases = [
        ("/classify", {"model": "bert_classifier", "input": ["good movie", "rain"]}, "data"),
        ("/score", {"model": "xlm_roberta_classifier", "queries": "capital", "documents": DOCS}, "data"),
        ("/rerank", {"model": "xlm_roberta_classifier", "query": "capital", "documents": DOCS}, "results"),
        ("/pooling", {"model": "bert_embedder", "input": "paris", "encoding_format": "float"}, "data"),
    ]
    for path, body, key in cases:
        direct = post(adapter_url, path, body).json()
        invoked = post(adapter_url, "/invocations", body)
        assert invoked.status_code == 200, (path, invoked.text)
        assert list(invoked.json()) == list(direct), path
        assert invoked.json()[key] == direct[key], path
    assert_vllm_error(post(adapter_url, "/invocations", {"nothing": 1}), 400, "BadRequestError",
                      "Cannot find a suitable request type")


# --- small routes --------------------------------------------------------------------------------


def test_ping_version_and_model_card(adapter_url):
    for method in ("GET", "POST"):
        ping = httpx.request(method, f"{adapter_url}/ping")
        assert ping.status_code == 200 and ping.content == b""
    version = httpx.get(f"{adapter_url}/version").json()
    assert list(version) == ["version"] and re.fullmatch(r"\d+\.\d+\.\d+.*", version["version"])
    card = httpx.get(f"{adapter_url}/v1/models/bert_classifier").json()
    assert card["id"] == "bert_classifier" and card["object"] == "model" and card["max_model_len"] == 128
    assert_vllm_error(httpx.get(f"{adapter_url}/v1/models/nope"), 404, "NotFoundError")


def test_openapi_documents_every_route_with_models_and_errors(adapter_url):
    spec = httpx.get(f"{adapter_url}/openapi.json").json()
    expected = {"/classify", "/v1/classify", "/rerank", "/v1/rerank", "/v2/rerank", "/vllm/v1/rerank",
                "/sglang/v1/rerank", "/score", "/pooling", "/tokenize", "/detokenize", "/v1/tokenize",
                "/v1/detokenize", "/invocations", "/v1/models", "/health", "/ping", "/version", "/metrics"}
    assert expected <= set(spec["paths"])
    for path in expected - {"/health", "/ping", "/version", "/metrics", "/v1/models", "/invocations"}:
        operation = spec["paths"][path]["post"]
        assert "requestBody" in operation, path
        assert "200" in operation["responses"] and "400" in operation["responses"], path


# --- guards: API key, limits, metrics, the /v1/rerank flavour switch -------------------------------


@pytest.fixture(scope="module")
def guarded_url(triton_server, tmp_path_factory):
    with running_adapter(triton_server, tmp_path_factory.mktemp("guarded"), api_key="s3cret",
                         rerank_v1_flavour="sglang", max_items_per_request="5", max_body_bytes="4096",
                         max_tokens_per_request="300",
                         triton_metrics_url=f"http://127.0.0.1:{triton_server.metrics_port}/metrics") as url:
        yield url


KEY = {"Authorization": "Bearer s3cret"}


def test_api_key_is_required_except_on_health_and_metrics(guarded_url):
    for path, body in (("/classify", {"input": "x"}), ("/v1/classify", {"input": "x"}),
                       ("/rerank", {"query": "q", "documents": ["d"]})):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            response = post(guarded_url, path, body, headers=headers)
            assert response.status_code == 401 and response.json() == {"error": "Unauthorized"}, (path, headers)
        assert post(guarded_url, path, body, headers=KEY).status_code == 200, path
    assert httpx.get(f"{guarded_url}/v1/models").status_code == 401
    for path in ("/health", "/ping", "/metrics"):
        assert httpx.get(f"{guarded_url}{path}").status_code == 200, path


def test_v1_rerank_flavour_switch_and_own_paths(guarded_url):
    body = {"query": "capital", "documents": DOCS[:3]}
    sglang = post(guarded_url, "/v1/rerank", body, headers=KEY).json()
    assert isinstance(sglang, list) and "score" in sglang[0]
    vllm = post(guarded_url, "/vllm/v1/rerank", {**body, "model": "xlm_roberta_classifier"}, headers=KEY).json()
    assert "results" in vllm
    assert_sglang_error(post(guarded_url, "/v1/rerank", {**body, "top_n": 0}, headers=KEY), 400, "Bad Request")


def test_limits_items_tokens_and_body_size(guarded_url):
    six = ["good movie"] * 6
    assert_vllm_error(post(guarded_url, "/classify", {"model": "bert_classifier", "input": six}, headers=KEY), 400,
                      "BadRequestError", "exceeds the maximum allowed count of 5")
    assert_sglang_error(post(guarded_url, "/v1/classify", {"input": six}, headers=KEY), 400, "BadRequestError",
                        "exceeds the maximum allowed count of 5")
    many_tokens = ["paris is the capital city of france " * 10] * 5
    assert_vllm_error(post(guarded_url, "/classify", {"model": "bert_classifier", "input": many_tokens}, headers=KEY),
                      400, "BadRequestError", "more than the maximum of 300 per request")
    huge = {"model": "bert_classifier", "input": "x" * 5000}
    assert_vllm_error(post(guarded_url, "/classify", huge, headers=KEY), 413, "PayloadTooLargeError", "4096 bytes")
    assert_sglang_error(post(guarded_url, "/v1/classify", huge, headers=KEY), 413, "PayloadTooLargeError")
    chunked = httpx.post(f"{guarded_url}/classify", content=iter([b'{"input": "', b"x" * 5000, b'"}']),
                         headers={**KEY, "Content-Type": "application/json"})
    assert chunked.status_code == 413
    assert post(guarded_url, "/classify", {"model": "bert_classifier", "input": ["good"] * 5}, headers=KEY).status_code == 200


def test_metrics_count_requests_errors_and_include_triton(guarded_url):
    post(guarded_url, "/classify", {"model": "bert_classifier", "input": "good"}, headers=KEY)
    post(guarded_url, "/classify", {"model": "bert_classifier", "input": []}, headers=KEY)
    text = httpx.get(f"{guarded_url}/metrics").text
    assert re.search(r'adapter_requests_total\{[^}]*route="/classify"[^}]*status="200"[^}]*\} [1-9]', text) or \
        re.search(r'adapter_requests_total\{[^}]*status="200"[^}]*route="/classify"[^}]*\} [1-9]', text), text[:2000]
    assert "adapter_request_duration_seconds_bucket" in text and "adapter_requests_in_flight" in text
    assert re.search(r'adapter_errors_total\{[^}]*error_type="BadRequestError"', text), text[:3000]
    assert "nv_inference_request_success" in text  # Triton's own metrics, appended


# --- found in review: each was a gap between the adapter and the contract --------------------------


def test_untrusted_chat_template_is_refused_however_it_is_sent(adapter_url):
    messages = [{"role": "user", "content": "x"}]
    for path in ("/classify", "/tokenize"):
        sneaky = post(adapter_url, path, {"model": "qwen2_classifier", "messages": messages,
                                          "chat_template_kwargs": {"chat_template": "PWNED {{ messages }}"}})
        assert_vllm_error(sneaky, 400, "BadRequestError", "--trust-request-chat-template")
    direct = post(adapter_url, "/tokenize", {"model": "qwen2_classifier", "messages": messages, "chat_template": "X"})
    assert_vllm_error(direct, 400, "BadRequestError", "--trust-request-chat-template")


def test_request_field_bounds(adapter_url):
    base = {"model": "bert_classifier", "input": "x"}
    assert_vllm_error(post(adapter_url, "/classify", {**base, "cache_salt": "a/b"}), 400, "Bad Request")
    assert_vllm_error(post(adapter_url, "/classify", {**base, "priority": 2**70}), 400, "Bad Request",
                      param="body.priority")
    assert post(adapter_url, "/classify", {**base, "cache_salt": "tenant-1", "priority": -3}).status_code == 200
    assert_vllm_error(post(adapter_url, "/pooling", {**base, "normalize": True}), 400, "Bad Request", "normalize")
    native = post(adapter_url, "/classify", {"text": "x", "normalize": True})  # SGLang ignores unknown keys
    assert native.status_code == 200 and "embedding" in native.json()


def test_model_names_with_slashes_and_tokenize_aliases(adapter_url):
    assert_vllm_error(httpx.get(f"{adapter_url}/v1/models/org/name"), 404, "NotFoundError",
                      "The model `org/name` does not exist.", param="model")
    unknown = post(adapter_url, "/tokenize", {"model": "nope", "prompt": "x"})
    body = assert_vllm_error(unknown, 404, "NotFoundError", "The model `nope` does not exist. Valid aliases: ",
                             param="model")
    assert "bert_classifier" in body["error"]["message"]


def test_sglang_put_routes(adapter_url):
    put = httpx.put(f"{adapter_url}/classify", json={"text": "good movie"})
    assert put.status_code == 200 and "embedding" in put.json()
    rerank = httpx.put(f"{adapter_url}/sglang/v1/rerank",
                       json={"model": "xlm_roberta_classifier", "query": "q", "documents": DOCS[:2]})
    assert rerank.status_code == 200 and isinstance(rerank.json(), list)


def test_invocations_embedding_body_errors_are_validation_errors(adapter_url):
    response = post(adapter_url, "/invocations", {"model": "bert_embedder", "input": "a", "embed_dtype": "bad"})
    assert_vllm_error(response, 400, "Bad Request", param="body.embed_dtype")


def test_guarded_limits_cover_tokenize_and_bi_encoder_score(guarded_url):
    assert_sglang_error(post(guarded_url, "/v1/tokenize", {"prompt": ["a"] * 6}, headers=KEY), 400,
                        "BadRequestError", "maximum allowed count of 5")
    assert_sglang_error(post(guarded_url, "/v1/detokenize", {"tokens": [[5]] * 6}, headers=KEY), 400,
                        "BadRequestError", "maximum allowed count of 5")
    text = "paris is the capital city of france " * 12  # ~86 tokens: 4 texts fit alone, not together
    score = post(guarded_url, "/score", {"model": "bert_embedder", "queries": [text] * 2, "documents": [text] * 2},
                 headers=KEY)
    assert_vllm_error(score, 400, "BadRequestError", "more than the maximum of 300 per request")


def test_unauthorized_requests_are_counted_under_their_route(guarded_url):
    post(guarded_url, "/classify", {"input": "x"})
    text = httpx.get(f"{guarded_url}/metrics").text
    assert re.search(r'adapter_errors_total\{[^}]*route="/classify"[^}]*\}', text) and \
        re.search(r'adapter_errors_total\{[^}]*error_type="Unauthorized"[^}]*\}', text), text[:3000]
    assert not re.search(r'adapter_errors_total\{[^}]*error_type="Unauthorized"[^}]*route="unmatched"', text)
    assert not re.search(r'adapter_errors_total\{[^}]*route="unmatched"[^}]*error_type="Unauthorized"', text)
