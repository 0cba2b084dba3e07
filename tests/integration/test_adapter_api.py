"""The HTTP adapter against the real stack (uvicorn → gRPC → tritonserver), vLLM's shapes exactly.

Served models are the tiny checkpoints, named after their folders: `bert_classifier` (3 labels),
`xlm_roberta_classifier` (1 label: a cross-encoder), `bert_embedder` (a bi-encoder), ...
"""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

pytestmark = pytest.mark.integration

CLASSIFY_KEYS = ["id", "object", "created", "model", "data", "usage"]
USAGE_KEYS = ["prompt_tokens", "total_tokens", "completion_tokens", "prompt_tokens_details", "completion_tokens_details"]
TEXTS = ["good movie", "the weather was cold and the coffee bad", "rain", "paris is the capital city of france"]
DOCS = ["bank loan rate", "paris france capital", "pizza pasta bread", "cold winter snow", "stock market price"]


def post(url, path, body, **kwargs):
    return httpx.post(f"{url}{path}", json=body, timeout=60, **kwargs)


def hf_classifier(checkpoint, texts, pairs=None):
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint, dtype=torch.float32).eval()
    encoded = tokenizer(texts, pairs, padding=True, return_tensors="pt")
    with torch.inference_mode():
        logits = model(**encoded).logits
    return logits, int(encoded["attention_mask"].sum())


def hf_embeddings(checkpoint, texts):
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModel.from_pretrained(checkpoint, dtype=torch.float32).eval()
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**encoded).last_hidden_state
    mask = encoded["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1), int(mask.sum())


# --- /classify -------------------------------------------------------------------------------


def test_classify_list_shapes_order_labels_and_usage(adapter_url, tiny_checkpoints):
    response = post(adapter_url, "/classify", {"model": "bert_classifier", "input": TEXTS})
    assert response.status_code == 200, response.text
    body = response.json()
    assert list(body) == CLASSIFY_KEYS
    assert body["object"] == "list" and body["model"] == "bert_classifier"
    assert body["id"].startswith("classify-") and len(body["id"]) == len("classify-") + 16
    assert list(body["usage"]) == USAGE_KEYS

    logits, tokens = hf_classifier(tiny_checkpoints["bert_classifier"], TEXTS)
    expected = torch.softmax(logits, -1).numpy()
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0,
                             "prompt_tokens_details": None, "completion_tokens_details": None}
    labels = {0: "negative", 1: "neutral", 2: "positive"}
    for index, (row, item) in enumerate(zip(expected, body["data"])):
        assert list(item) == ["index", "label", "probs", "num_classes"]
        assert item["index"] == index and item["num_classes"] == 3
        np.testing.assert_allclose(item["probs"], row, rtol=1e-4, atol=1e-5)
        assert item["label"] == labels[int(np.argmax(row))]


def test_classify_single_string_and_token_ids(adapter_url, tiny_checkpoints):
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoints["bert_classifier"])
    ids = tokenizer("good movie")["input_ids"]
    by_text = post(adapter_url, "/classify", {"model": "bert_classifier", "input": "good movie"}).json()
    by_ids = post(adapter_url, "/classify", {"model": "bert_classifier", "input": ids}).json()
    by_id_lists = post(adapter_url, "/classify", {"model": "bert_classifier", "input": [ids, ids[:2]]}).json()
    assert len(by_text["data"]) == len(by_ids["data"]) == 1 and len(by_id_lists["data"]) == 2
    np.testing.assert_allclose(by_text["data"][0]["probs"], by_ids["data"][0]["probs"], rtol=1e-6)
    # A prompt sharing a forward with another prompt (or with another request Triton batched in) runs at another
    # padded width on the CPU body: fp32 sums reorder by a few 1e-7 (6e-6 relative seen once on CI).
    np.testing.assert_allclose(by_id_lists["data"][0]["probs"], by_ids["data"][0]["probs"], rtol=2e-5, atol=1e-6)
    assert by_ids["usage"]["prompt_tokens"] == len(ids)
    assert by_id_lists["usage"]["prompt_tokens"] == len(ids) + 2


def test_timing_headers_say_where_the_time_went(adapter_url):
    response = post(adapter_url, "/rerank", {"model": "xlm_roberta_classifier", "query": "q", "documents": DOCS})
    tokenize, inference, total = (float(response.headers[f"x-{n}-time"]) for n in ("tokenize", "inference", "total"))
    assert 0 < tokenize < total and 0 < inference < total and tokenize + inference <= total


def test_classify_use_activation_false_returns_logits(adapter_url, tiny_checkpoints):
    body = post(adapter_url, "/classify", {"model": "bert_classifier", "input": TEXTS, "use_activation": False}).json()
    logits, _ = hf_classifier(tiny_checkpoints["bert_classifier"], TEXTS)
    np.testing.assert_allclose([d["probs"] for d in body["data"]], logits.numpy(), rtol=1e-4, atol=1e-4)


def test_classify_x_request_id_header_names_the_response(adapter_url):
    response = post(adapter_url, "/classify", {"model": "bert_classifier", "input": "x"}, headers={"X-Request-Id": "abc"})
    assert response.json()["id"] == "classify-abc"
    assert post(adapter_url, "/classify", {"model": "bert_classifier", "input": "x", "request_id": "r1"}).json()["id"] == "classify-r1"


def test_classify_many_inputs_split_across_triton_requests_keep_order(adapter_url, tiny_checkpoints):
    texts = [f"{w} movie" for w in ("good bad great terrible happy sad boring exciting love hate").split()]
    body = post(adapter_url, "/classify", {"model": "bert_classifier", "input": texts}).json()
    logits, _ = hf_classifier(tiny_checkpoints["bert_classifier"], texts)
    assert [d["index"] for d in body["data"]] == list(range(len(texts)))
    np.testing.assert_allclose([d["probs"] for d in body["data"]], torch.softmax(logits, -1).numpy(), rtol=1e-4, atol=1e-5)


# --- /rerank ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/rerank", "/v1/rerank", "/v2/rerank"])
def test_rerank_cross_encoder_sorted_with_original_index(adapter_url, tiny_checkpoints, path):
    query = "capital of france"
    response = post(adapter_url, path, {"model": "xlm_roberta_classifier", "query": query, "documents": DOCS})
    assert response.status_code == 200, response.text
    body = response.json()
    assert list(body) == ["id", "model", "usage", "results"] and body["id"].startswith("score-")
    logits, tokens = hf_classifier(tiny_checkpoints["xlm_roberta_classifier"], [query] * len(DOCS), DOCS)
    expected = torch.sigmoid(logits[:, 0]).numpy()
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    assert [r["index"] for r in body["results"]] == list(np.argsort(-expected, kind="stable"))
    for result in body["results"]:
        assert list(result) == ["index", "document", "relevance_score"]
        assert result["document"] == {"text": DOCS[result["index"]], "multi_modal": None}
        assert result["relevance_score"] == pytest.approx(float(expected[result["index"]]), rel=1e-4, abs=1e-5)


def test_rerank_top_n_and_bare_string_document(adapter_url):
    full = post(adapter_url, "/rerank", {"model": "xlm_roberta_classifier", "query": "q", "documents": DOCS}).json()
    top = post(adapter_url, "/rerank", {"model": "xlm_roberta_classifier", "query": "q", "documents": DOCS, "top_n": 2}).json()
    # the same ranking; scores equal up to float noise (another batch composition inside Triton)
    assert [r["index"] for r in top["results"]] == [r["index"] for r in full["results"][:2]]
    np.testing.assert_allclose([r["relevance_score"] for r in top["results"]],
                               [r["relevance_score"] for r in full["results"][:2]], rtol=1e-5)
    assert top["usage"] == full["usage"]  # every document is still scored
    many = post(adapter_url, "/rerank", {"model": "xlm_roberta_classifier", "query": "q", "documents": DOCS, "top_n": 99}).json()
    assert len(many["results"]) == len(DOCS)
    single = post(adapter_url, "/rerank", {"model": "xlm_roberta_classifier", "query": "q", "documents": "one doc"}).json()
    assert [r["index"] for r in single["results"]] == [0]


def test_rerank_bi_encoder_uses_cosine_similarity(adapter_url, tiny_checkpoints):
    query = "capital of france"
    body = post(adapter_url, "/rerank", {"model": "bert_embedder", "query": query, "documents": DOCS}).json()
    vectors, tokens = hf_embeddings(tiny_checkpoints["bert_embedder"], [query, *DOCS])
    expected = (vectors[1:] @ vectors[0]).numpy()
    assert body["usage"]["prompt_tokens"] == tokens  # the query counted once, plus each document
    assert [r["index"] for r in body["results"]] == list(np.argsort(-expected, kind="stable"))
    np.testing.assert_allclose([r["relevance_score"] for r in body["results"]], np.sort(expected)[::-1], rtol=1e-4, atol=1e-5)


# --- /score ----------------------------------------------------------------------------------


@pytest.mark.parametrize("sides", [("queries", "documents"), ("queries", "items"), ("data_1", "data_2"), ("text_1", "text_2")])
def test_score_all_field_spellings_one_to_n(adapter_url, tiny_checkpoints, sides):
    first, second = sides
    body = post(adapter_url, "/score", {"model": "xlm_roberta_classifier", first: "q text", second: DOCS}).json()
    assert list(body) == CLASSIFY_KEYS and body["id"].startswith("score-")
    logits, tokens = hf_classifier(tiny_checkpoints["xlm_roberta_classifier"], ["q text"] * len(DOCS), DOCS)
    assert [d["index"] for d in body["data"]] == list(range(len(DOCS)))  # pair order, not sorted
    assert all(list(d) == ["index", "object", "score"] and d["object"] == "score" for d in body["data"])
    np.testing.assert_allclose([d["score"] for d in body["data"]], torch.sigmoid(logits[:, 0]).numpy(), rtol=1e-4, atol=1e-5)
    assert body["usage"]["prompt_tokens"] == tokens


def test_score_n_to_n_and_one_to_one(adapter_url, tiny_checkpoints):
    queries = ["a query", "another one", "third"]
    body = post(adapter_url, "/score", {"model": "xlm_roberta_classifier", "queries": queries, "documents": DOCS[:3]}).json()
    logits, _ = hf_classifier(tiny_checkpoints["xlm_roberta_classifier"], queries, DOCS[:3])
    np.testing.assert_allclose([d["score"] for d in body["data"]], torch.sigmoid(logits[:, 0]).numpy(), rtol=1e-4, atol=1e-5)
    one = post(adapter_url, "/score", {"model": "xlm_roberta_classifier", "text_1": "a", "text_2": "b"}).json()
    assert len(one["data"]) == 1


def test_score_bi_encoder_n_to_n(adapter_url, tiny_checkpoints):
    queries, documents = ["rain snow", "pizza"], ["cold winter", "pasta bread"]
    body = post(adapter_url, "/score", {"model": "bert_embedder", "queries": queries, "documents": documents}).json()
    vectors, _ = hf_embeddings(tiny_checkpoints["bert_embedder"], queries + documents)
    expected = (vectors[:2] * vectors[2:]).sum(-1).numpy()
    np.testing.assert_allclose([d["score"] for d in body["data"]], expected, rtol=1e-4, atol=1e-5)


# --- /v1/models, /health ---------------------------------------------------------------------


def test_models_lists_every_served_model_from_triton(adapter_url, tiny_checkpoints):
    body = httpx.get(f"{adapter_url}/v1/models").json()
    assert body["object"] == "list"
    cards = {card["id"]: card for card in body["data"]}
    assert set(cards) == set(tiny_checkpoints)
    card = cards["bert_classifier"]
    assert list(card)[:8] == ["id", "object", "created", "owned_by", "root", "parent", "max_model_len", "permission"]
    assert card["object"] == "model" and card["owned_by"] == "vllm" and card["parent"] is None
    assert card["max_model_len"] == 128 and cards["xlm_roberta_classifier"]["max_model_len"] == 128
    assert card["root"] == str(tiny_checkpoints["bert_classifier"])
    assert card["permission"][0]["object"] == "model_permission"


def test_health_is_empty_200(adapter_url):
    response = httpx.get(f"{adapter_url}/health")
    assert response.status_code == 200 and response.content == b""


# --- errors ----------------------------------------------------------------------------------


def assert_vllm_error(response, status, error_type, message=None, param=...):
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"] and list(body["error"]) == ["message", "type", "param", "code"]
    assert body["error"]["type"] == error_type and body["error"]["code"] == status
    if message is not None:
        assert message in body["error"]["message"], body["error"]["message"]
    if param is not ...:
        assert body["error"]["param"] == param
    assert "Traceback" not in body["error"]["message"] and "/work/" not in body["error"]["message"]
    return body


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/classify", {"model": "bert_classifier"}, "body.input"),
        ("/classify", {"input": {"text": "x"}}, "body.input"),
        ("/rerank", {"query": "q"}, "body.documents"),
        ("/rerank", {"query": ["q"], "documents": ["d"]}, "body.query"),
        ("/rerank", {"query": "q", "documents": ["d"], "top_n": -1}, "body.top_n"),
        ("/score", {"queries": "q"}, "body"),
    ],
)
def test_validation_errors_are_400_bad_request(adapter_url, path, body, param):
    assert_vllm_error(post(adapter_url, path, body), 400, "Bad Request", "validation error", param=param)


def test_malformed_json_and_wrong_content_type(adapter_url):
    malformed = httpx.post(f"{adapter_url}/classify", content=b'{"input": "x"', headers={"Content-Type": "application/json"})
    assert_vllm_error(malformed, 400, "Bad Request", "JSON decode error")
    wrong_type = httpx.post(f"{adapter_url}/classify", content=b'{"input": "x"}', headers={"Content-Type": "text/plain"})
    assert_vllm_error(wrong_type, 400, "Bad Request", "Unsupported Media Type: Only 'application/json' is allowed", param=None)


def test_empty_inputs(adapter_url):
    assert_vllm_error(post(adapter_url, "/classify", {"model": "bert_classifier", "input": []}), 400,
                      "BadRequestError", "You must pass at least one prompt")
    assert_vllm_error(post(adapter_url, "/rerank", {"model": "xlm_roberta_classifier", "query": "q", "documents": []}),
                      400, "BadRequestError", "At least one text_pair element must be given")
    assert_vllm_error(post(adapter_url, "/score", {"model": "xlm_roberta_classifier", "queries": [], "documents": ["d"]}),
                      400, "BadRequestError", "At least one text element must be given")


def test_n_to_one_score_is_an_error(adapter_url):
    response = post(adapter_url, "/score", {"model": "xlm_roberta_classifier", "queries": ["a", "b"], "documents": ["d"]})
    assert_vllm_error(response, 400, "BadRequestError", "Input lengths must be either 1:1, 1:N or N:N")


def test_unknown_model_is_404(adapter_url):
    for path, body in (("/classify", {"input": "x"}), ("/rerank", {"query": "q", "documents": ["d"]}),
                       ("/score", {"queries": "q", "documents": ["d"]})):
        response = post(adapter_url, path, {**body, "model": "no-such-model"})
        assert_vllm_error(response, 404, "NotFoundError", "The model `no-such-model` does not exist.", param=None)


def test_over_long_input_is_vllm_400(adapter_url):
    long_text = "paris " * 300
    response = post(adapter_url, "/classify", {"model": "bert_classifier", "input": ["ok", long_text]})
    assert_vllm_error(
        response, 400, "BadRequestError",
        "This model's maximum context length is 128 tokens. However, your prompt contains at least 129 input tokens, "
        "which exceeds this limit even without any output tokens. Please reduce the length of the input prompt.",
        param="input_tokens",
    )
    pair = post(adapter_url, "/rerank", {"model": "xlm_roberta_classifier", "query": "q", "documents": ["d", long_text]})
    assert_vllm_error(pair, 400, "BadRequestError", "Please reduce the length of the input prompt.")
    ids = post(adapter_url, "/classify", {"model": "bert_classifier", "input": [5] * 200})
    assert_vllm_error(ids, 400, "BadRequestError", "your prompt contains 200 input tokens")


def test_out_of_vocabulary_token_id_is_400(adapter_url):
    response = post(adapter_url, "/classify", {"model": "bert_classifier", "input": [2, 99999, 3]})
    assert_vllm_error(response, 400, "BadRequestError", "out of vocabulary")


def test_task_the_model_lacks_is_a_400_in_vllms_words(adapter_url):
    """A 3-label classifier has no score/rerank routes in vLLM, an embedder no /classify (vLLM does not register
    them: a bare 404); here a 400 says why, with vLLM's offline words."""
    scoring = ("Scoring API is only enabled for num_labels == 1. Model `bert_classifier` is a classifier with 3 "
               "labels; it serves /classify, /pooling.")
    for path, body in (("/rerank", {"query": "q", "documents": ["d"]}), ("/v1/rerank", {"query": "q", "documents": ["d"]}),
                       ("/v2/rerank", {"query": "q", "documents": ["d"]}), ("/score", {"queries": "q", "documents": ["d"]})):
        response = post(adapter_url, path, {**body, "model": "bert_classifier"})
        assert assert_vllm_error(response, 400, "BadRequestError", param=None)["error"]["message"] == scoring, path
    response = post(adapter_url, "/classify", {"model": "bert_embedder", "input": "x"})
    assert_vllm_error(response, 400, "BadRequestError", "Classification API is not supported by this model. Model "
                      "`bert_embedder` is an embedding model; it serves /v1/embeddings, /v2/embed, /score and /rerank, "
                      "/pooling.")
    response = post(adapter_url, "/v1/embeddings", {"model": "bert_classifier", "input": "x"})
    assert_vllm_error(response, 400, "BadRequestError", "Embedding API is not supported by this model. Model "
                      "`bert_classifier` is a classifier with 3 labels")


def test_unknown_route_is_fastapi_404(adapter_url):
    response = post(adapter_url, "/v1/classify_nope", {"input": "x"})
    assert response.status_code == 404 and response.json() == {"detail": "Not Found"}


def test_bad_requests_do_not_fail_concurrent_good_ones(adapter_url, tiny_checkpoints):
    logits, _ = hf_classifier(tiny_checkpoints["bert_classifier"], TEXTS)
    expected = torch.softmax(logits, -1).numpy()
    bad_bodies = [
        {"model": "bert_classifier", "input": "paris " * 300},
        {"model": "bert_classifier", "input": [2, 99999]},
        {"model": "bert_classifier", "input": []},
        {"model": "bert_classifier", "input": [[]]},
    ]

    async def run():
        async with httpx.AsyncClient(base_url=adapter_url, timeout=60) as client:
            calls = []
            for round_ in range(3):
                calls += [client.post("/classify", json={"model": "bert_classifier", "input": TEXTS}) for _ in range(2)]
                calls += [client.post("/classify", json=body) for body in bad_bodies]
            return await asyncio.gather(*calls)

    responses = asyncio.run(run())
    good = [r for r in responses if r.request.content and b"good movie" in r.request.content]
    bad = [r for r in responses if r not in good]
    assert len(good) == 6 and len(bad) == 12
    for response in good:
        assert response.status_code == 200
        np.testing.assert_allclose([d["probs"] for d in response.json()["data"]], expected, rtol=1e-4, atol=1e-5)
    for response in bad:
        assert response.status_code == 400 and response.json()["error"]["type"] == "BadRequestError"
