"""The serving pipeline (resolve → guards → encode → infer → respond) through the real app, without a
tritonserver: the models' tokenizers are real (trained here, tests/support/tiny_models.py), the Triton
gateway is a fake that records what it is sent and answers arrays computed from it.

What these tests pin is the adapter's own behaviour: which model a request gets, the guards and
their order (a refused request is never tokenized nor sent), the response bodies and their usage,
and the three error flavours. The real-stack tests (tests/integration/) keep the contract with Triton.
"""

from __future__ import annotations

import base64

import numpy as np
import pytest

from poolserve_adapter.errors import TooManyRequestsError
from poolserve_adapter.registry import ServedModel
from poolserve_adapter.timing import timed
from poolserve_adapter.tokenization import Encoded, TextEncoder
from tests.support.fake_triton import app_over

MAX_MODEL_LEN = 32
MAX_ITEMS = 4
MAX_TOKENS = 120
TEMPLATE = "{{ instruction | default('relevant?') }} Q: {{ messages[0]['content'] }} D: {{ messages[1]['content'] }}"
TEXT = "paris is the capital of france"


class FakeGateway:
    """Stands in for TritonGateway: records each call and answers from the token ids it is sent.

    ``logits`` [n, labels] of row i are ``(length_i + k) / 10`` for label k, ``scores`` their sigmoid,
    ``embeddings`` ``[length_i, 1, 0]``: every answer can be recomputed from the recorded inputs."""

    def __init__(self, labels: dict[str, int]):
        self.labels = labels  # triton model → output width
        self.calls: list[tuple[str, Encoded, tuple[str, ...]]] = []
        self.busy: set[str] = set()

    def refuse_if_busy(self, triton_model: str) -> None:
        if triton_model in self.busy:
            raise TooManyRequestsError(f"The server is busy: model {triton_model} is full.", retry_after_s=7)

    def leave_admission_board(self) -> None:
        pass  # no board: one worker

    async def infer(self, triton_model: str, encoded: Encoded, outputs: tuple[str, ...], lora_ids=None) -> dict[str, np.ndarray]:
        self.calls.append((triton_model, encoded, outputs))
        lengths = encoded.lengths.astype(np.float32)
        logits = (lengths[:, None] + np.arange(self.labels[triton_model], dtype=np.float32)) / 10
        arrays = {"logits": logits, "scores": 1 / (1 + np.exp(-logits)),
                  "embeddings": np.stack([lengths, np.ones_like(lengths), np.zeros_like(lengths)], axis=1)}
        return {name: arrays[name] for name in outputs}

    async def ready(self) -> bool:
        return not self.busy

    async def unavailable_models(self) -> dict[str, str]:
        return {name: "not ready" for name in sorted(self.busy)}


def sigmoid(value: float) -> float:
    return float(1 / (1 + np.exp(-np.float32(value))))


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from tests.support.tiny_models import CHATML_TEMPLATE, byte_level_tokenizer, wordpiece_tokenizer

    wordpiece = wordpiece_tokenizer(tmp_path_factory.mktemp("wordpiece"))
    byte_level = byte_level_tokenizer(tmp_path_factory.mktemp("byte_level"))
    byte_level.chat_template = CHATML_TEMPLATE
    return wordpiece, byte_level


def served(name: str, task: str, labels: int, tokenizer, *, token_types: bool = False, id2label=None,
           **fields) -> ServedModel:
    encoder = TextEncoder(tokenizer, max_model_len=MAX_MODEL_LEN, sends_token_types=token_types)
    return ServedModel(name=name, triton_model=f"{name}_triton", task=task, checkpoint=f"/checkpoints/{name}",
                       encoder=encoder, id2label=id2label or {}, num_labels=labels, created=1, **fields)


@pytest.fixture
def models(tokenizers) -> list[ServedModel]:
    wordpiece, byte_level = tokenizers
    return [
        served("sentiment", "classify", 3, wordpiece, token_types=True, id2label={0: "neg", 1: "neu", 2: "pos"}),
        served("reranker", "classify", 1, wordpiece, token_types=True),
        served("embedder", "embed", 0, wordpiece),
        served("chat", "classify", 2, byte_level),
        served("llm-reranker", "classify", 1, byte_level, score_template=TEMPLATE),
        served("st-reranker", "classify", 1, wordpiece, token_types=True, declares_st_activation=True),
    ]


def running(monkeypatch, models: list[ServedModel]):
    """The app over ``models`` and a :class:`FakeGateway` answering for Triton."""
    gateway = FakeGateway({model.triton_model: max(model.num_labels, 1) for model in models})
    return app_over(monkeypatch, models, gateway, max_items_per_request=MAX_ITEMS, max_tokens_per_request=MAX_TOKENS)


@pytest.fixture
def api(monkeypatch, models):
    with running(monkeypatch, models) as client_and_gateway:
        yield client_and_gateway


@pytest.fixture
def tokenized(models, monkeypatch) -> list[str]:
    """The models whose tokenizer was called, in order (tokenizing, truncating and chat rendering)."""
    seen: list[str] = []
    for model in models:
        encoder = model.encoder
        for method in ("encode", "truncate_texts", "render_chat"):
            original = getattr(encoder, method)

            def recording(*args, _original=original, _name=model.name, **kwargs):
                seen.append(_name)
                return _original(*args, **kwargs)

            monkeypatch.setattr(encoder, method, recording)
    return seen


def vllm_error(response, status: int, error_type: str, fragment: str = "") -> dict:
    body = response.json()
    assert response.status_code == status, body
    assert set(body) == {"error"} and body["error"]["type"] == error_type and body["error"]["code"] == status
    assert fragment in body["error"]["message"], body
    return body["error"]


def sglang_error(response, status: int, fragment: str = "") -> dict:
    body = response.json()
    assert response.status_code == status, body
    assert body["object"] == "error" and body["code"] == status and fragment in body["message"], body
    return body


# --- resolve: which model a request gets ----------------------------------------------------------


def test_an_unknown_model_is_vllms_404_and_a_route_the_model_lacks_is_a_400_saying_why(api):
    client, gateway = api
    vllm_error(client.post("/classify", json={"model": "nope", "input": TEXT}), 404, "NotFoundError",
               "The model `nope` does not exist.")
    scoring = ("Scoring API is only enabled for num_labels == 1. Model `sentiment` is a classifier with 3 labels; "
               "it serves /classify, /pooling.")
    for path, body, message in (
        ("/classify", {"model": "embedder", "input": TEXT},
         "Classification API is not supported by this model. Model `embedder` is an embedding model; it serves "
         "/v1/embeddings, /v2/embed, /score and /rerank, /pooling."),
        ("/v1/embeddings", {"model": "reranker", "input": TEXT},
         "Embedding API is not supported by this model. Model `reranker` is a classifier with 1 label; it serves "
         "/classify, /score and /rerank, /pooling."),
        ("/score", {"model": "sentiment", "queries": "q", "documents": ["d"]}, scoring),
        *((path, {"model": "sentiment", "query": "q", "documents": ["d"]}, scoring)
          for path in ("/rerank", "/v1/rerank", "/v2/rerank")),
        ("/invocations", {"model": "sentiment", "query": "q", "documents": ["d"]}, scoring),
    ):
        error = vllm_error(client.post(path, json=body), 400, "BadRequestError")
        assert (error["message"], error["param"]) == (message, None), path
    response = client.post("/v1/classify_nope", json={"model": "sentiment", "input": TEXT})
    assert (response.status_code, response.json()) == (404, {"detail": "Not Found"})  # a mistyped URL
    assert gateway.calls == []


def test_a_route_only_a_sole_served_model_lacks_names_it_and_none_able_among_several_is_a_plain_404(
        monkeypatch, models):
    sentiment, embedder, chat = models[0], models[2], models[3]
    with running(monkeypatch, [sentiment]) as (client, _):
        error = vllm_error(client.post("/rerank", json={"query": "q", "documents": ["d"]}), 400, "BadRequestError")
        assert error["message"].startswith("Scoring API is only enabled for num_labels == 1. Model `sentiment`")
        body = sglang_error(client.post("/sglang/v1/rerank", json={"query": "q", "documents": ["d"]}), 400,
                            "Scoring API is only enabled for num_labels == 1.")
        assert body["type"] == "BadRequestError"
    with running(monkeypatch, [embedder]) as (client, _):
        sglang_error(client.post("/v1/classify", json={"input": TEXT}), 400,
                     "Classification API is not supported by this model. Model `embedder` is an embedding model")
    with running(monkeypatch, [sentiment, chat]) as (client, gateway):
        for path, body in (("/rerank", {"query": "q", "documents": ["d"]}), ("/v1/embeddings", {"input": TEXT})):
            response = client.post(path, json=body)
            assert (response.status_code, response.json()) == (404, {"detail": "Not Found"}), path
        assert gateway.calls == []


def test_without_a_name_the_first_model_able_to_serve_the_route_answers(api):
    client, gateway = api
    assert client.post("/classify", json={"input": TEXT}).json()["model"] == "sentiment"
    assert client.post("/rerank", json={"query": "q", "documents": ["d"]}).json()["model"] == "reranker"
    assert client.post("/pooling", json={"input": TEXT}).json()["model"] == "sentiment"
    assert [call[0] for call in gateway.calls] == ["sentiment_triton", "reranker_triton", "sentiment_triton"]


def test_sglang_routes_do_not_check_the_model_name(api):
    client, gateway = api
    assert client.post("/v1/classify", json={"model": "whatever", "input": TEXT}).json()["model"] == "sentiment"
    # SGLang's rerank prefers a cross-encoder; a named embedding model may still score (the fallback).
    client.post("/sglang/v1/rerank", json={"model": "nope", "query": "q", "documents": ["d"]})
    client.post("/sglang/v1/rerank", json={"model": "embedder", "query": "q", "documents": ["d"]})
    assert [call[0] for call in gateway.calls] == ["sentiment_triton", "reranker_triton", "embedder_triton",
                                                   "embedder_triton"]


def test_sglang_native_classify_falls_back_to_an_embedding_model(monkeypatch, tokenizers):
    with running(monkeypatch, [served("embedder", "embed", 0, tokenizers[0])]) as (client, gateway):
        response = client.post("/classify", json={"text": TEXT})
    assert response.status_code == 200 and len(response.json()["embedding"]) == 3
    assert gateway.calls[0][0] == "embedder_triton" and gateway.calls[0][2] == ("embeddings",)


@pytest.mark.parametrize("body, kind", [
    ({"model": "sentiment", "input": TEXT}, "classify"),
    ({"model": "embedder", "input": TEXT}, "pooling"),  # an embedding model has no classify
    ({"model": "reranker", "query": "q", "documents": ["a", "b"]}, "rerank"),
    ({"model": "reranker", "queries": "q", "documents": ["a"]}, "score"),
    ({"model": "sentiment", "input": TEXT, "task": "classify"}, "pooling"),
])
def test_invocations_dispatch_by_body_shape(api, body, kind):
    client, _ = api
    answer = client.post("/invocations", json=body, headers={"x-request-id": "r1"}).json()
    expected_id = {"classify": "classify-r1", "pooling": "pooling-r1", "rerank": "score-r1", "score": "score-r1"}
    assert answer["id"] == expected_id[kind]
    assert ("results" in answer) == (kind == "rerank") and (answer.get("object") == "list") == (kind != "rerank")


# --- guards: item count, admission before tokenizing, token limits --------------------------------


ITEM_LIMITED = [
    ("/classify", {"model": "sentiment", "input": ["a"] * 5}, "vllm"),
    ("/classify", {"model": "sentiment", "input": [[1, 2]] * 5}, "vllm"),
    ("/pooling", {"model": "embedder", "input": ["a"] * 5}, "vllm"),
    ("/score", {"model": "reranker", "queries": "q", "documents": ["a"] * 5}, "vllm"),
    ("/rerank", {"model": "reranker", "query": "q", "documents": ["a"] * 5}, "vllm"),
    ("/v1/classify", {"input": ["a"] * 5}, "sglang"),
    ("/sglang/v1/rerank", {"query": "q", "documents": ["a"] * 5}, "sglang"),
    ("/classify", {"text": ["a"] * 5}, "native"),
    ("/classify", {"input_ids": [[1]] * 5}, "native"),
]


@pytest.mark.parametrize("path, body, flavour", ITEM_LIMITED)
def test_more_items_than_allowed_is_a_400_before_tokenizing(api, tokenized, path, body, flavour):
    client, gateway = api
    response = client.post(path, json=body)
    message = "Input list length 5 exceeds the maximum allowed count of 4 per request"
    if flavour == "vllm":
        vllm_error(response, 400, "BadRequestError", message)
    elif flavour == "sglang":
        sglang_error(response, 400, message)
    else:
        assert response.status_code == 400 and message in response.json()["error"]["message"]
        assert set(response.json()["error"]) == {"message"}  # SGLang's native flavour
    assert tokenized == [] and gateway.calls == []
    within = {key: value[:MAX_ITEMS] if isinstance(value, list) else value for key, value in body.items()}
    assert client.post(path, json=within).status_code == 200


ADMITTED = [
    ("/classify", {"model": "sentiment", "input": TEXT}, "sentiment"),
    ("/classify", {"model": "chat", "messages": [{"role": "user", "content": "rain"}]}, "chat"),
    ("/pooling", {"model": "embedder", "input": TEXT}, "embedder"),
    ("/score", {"model": "embedder", "queries": TEXT, "documents": ["a", "b"]}, "embedder"),
    ("/rerank", {"model": "reranker", "query": TEXT, "documents": ["a"], "max_tokens_per_doc": 3}, "reranker"),
    ("/v1/classify", {"input": TEXT}, "sentiment"),
    ("/sglang/v1/rerank", {"query": TEXT, "documents": ["a"]}, "reranker"),
    ("/classify", {"text": TEXT}, "sentiment"),
]


@pytest.mark.parametrize("path, body, model", ADMITTED)
def test_a_full_admission_queue_refuses_with_429_before_any_tokenizing(api, tokenized, path, body, model):
    client, gateway = api
    gateway.busy.add(f"{model}_triton")
    response = client.post(path, json=body)
    assert response.status_code == 429 and response.headers["retry-after"] == "7"
    assert "is full" in response.text
    assert tokenized == [] and gateway.calls == []
    gateway.busy.clear()
    assert client.post(path, json=body).status_code == 200 and tokenized


def test_a_request_invalid_on_its_face_is_a_400_even_while_its_model_is_full(api):
    client, gateway = api
    gateway.busy.add("embedder_triton")
    vllm_error(client.post("/pooling", json={"model": "embedder", "input": TEXT, "dimensions": 8}), 400,
               "BadRequestError", "dimensions is currently not supported")
    vllm_error(client.post("/classify", json={"model": "sentiment", "input": TEXT, "truncate_prompt_tokens": 99}),
               400, "BadRequestError", "truncate_prompt_tokens value is greater than max_model_len")


def test_the_request_token_limit_counts_every_sequence_before_triton(api, tokenizers):
    client, gateway = api
    over = client.post("/classify", json={"model": "sentiment", "input": [[5] * 31] * 4})  # 124 tokens
    error = vllm_error(over, 400, "BadRequestError",
                       f"The request holds 124 tokens, more than the maximum of {MAX_TOKENS} per request")
    assert error["param"] is None
    assert client.post("/classify", json={"model": "sentiment", "input": [[5] * 30] * 4}).status_code == 200
    # A bi-encoder's two sides count together, though each side alone fits.
    text = TEXT
    while len(tokenizers[0](text)["input_ids"]) <= MAX_TOKENS // 6:
        text += " good"
    assert 3 * len(tokenizers[0](text)["input_ids"]) <= MAX_TOKENS
    score = client.post("/score", json={"model": "embedder", "queries": [text] * 3, "documents": [text] * 3})
    vllm_error(score, 400, "BadRequestError", f"more than the maximum of {MAX_TOKENS} per request")
    assert len(gateway.calls) == 1


def test_context_length_vllm_allows_max_model_len_sglang_does_not(api):
    client, gateway = api
    ids = [5] * MAX_MODEL_LEN
    assert client.post("/classify", json={"model": "sentiment", "input": ids}).status_code == 200
    vllm_error(client.post("/classify", json={"model": "sentiment", "input": ids + [5]}), 400, "BadRequestError",
               f"maximum context length is {MAX_MODEL_LEN} tokens")
    sglang_error(client.post("/v1/classify", json={"input": ids}), 400,
                 f"The input ({MAX_MODEL_LEN} tokens) is longer than the model's context length")
    native = client.post("/classify", json={"input_ids": ids})
    assert native.status_code == 400 and "context length" in native.json()["error"]["message"]
    assert len(gateway.calls) == 1


def test_an_empty_prompt_never_reaches_triton(api):
    client, gateway = api
    vllm_error(client.post("/classify", json={"model": "sentiment", "input": [[]]}), 400, "BadRequestError",
               "The decoder prompt cannot be empty")
    vllm_error(client.post("/classify", json={"model": "sentiment", "input": "", "add_special_tokens": False}), 400,
               "BadRequestError", "The decoder prompt cannot be empty")
    assert gateway.calls == []


# --- respond: bodies and usage ---------------------------------------------------------------------


def test_classify_labels_the_best_class_and_counts_the_prompt_tokens(api, tokenizers):
    client, gateway = api
    body = client.post("/classify", json={"model": "sentiment", "input": [TEXT, "good"]},
                       headers={"x-request-id": "abc"}).json()
    lengths = [len(tokenizers[0](text)["input_ids"]) for text in (TEXT, "good")]
    assert body["id"] == "classify-abc" and body["model"] == "sentiment"
    assert body["usage"] == {"prompt_tokens": sum(lengths), "total_tokens": sum(lengths), "completion_tokens": 0,
                             "prompt_tokens_details": None, "completion_tokens_details": None}
    for row, length in zip(body["data"], lengths):
        assert row["probs"] == pytest.approx([sigmoid((length + k) / 10) for k in range(3)])
        assert row["label"] == "pos" and row["num_classes"] == 3
    triton_model, encoded, outputs = gateway.calls[0]
    assert outputs == ("scores",) and encoded.token_type_ids is not None
    raw = client.post("/classify", json={"model": "sentiment", "input": TEXT, "use_activation": False,
                                         "request_id": "mine"}).json()
    assert gateway.calls[-1][2] == ("logits",) and raw["id"] == "classify-mine"
    assert raw["data"][0]["probs"] == pytest.approx([(lengths[0] + k) / 10 for k in range(3)])


def test_classify_chat_renders_the_template_without_extra_special_tokens(api, tokenizers):
    client, gateway = api
    messages = [{"role": "user", "content": "rain"}]
    body = client.post("/classify", json={"model": "chat", "messages": messages}).json()
    prompt = tokenizers[1].apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    ids = tokenizers[1](prompt, add_special_tokens=False)["input_ids"]
    assert gateway.calls[0][1].input_ids[0].tolist() == ids
    assert body["data"][0]["label"] is None and body["usage"]["prompt_tokens"] == len(ids)
    refused = client.post("/classify", json={"model": "chat", "messages": messages, "chat_template": "{{ x }}"})
    vllm_error(refused, 400, "BadRequestError", "--trust-request-chat-template")


def test_truncate_prompt_tokens_keeps_the_side_asked_for(api, tokenizers):
    client, gateway = api
    long_text = " ".join([TEXT] * 10)
    full = tokenizers[0](long_text)["input_ids"]
    assert client.post("/classify", json={"model": "sentiment", "input": long_text}).status_code == 400
    client.post("/classify", json={"model": "sentiment", "input": long_text, "truncate_prompt_tokens": -1})
    assert gateway.calls[-1][1].num_tokens == MAX_MODEL_LEN
    client.post("/classify", json={"model": "sentiment", "input": long_text, "truncate_prompt_tokens": 5,
                                   "truncation_side": "left"})
    assert gateway.calls[-1][1].input_ids[0].tolist() == full[-5:]


def test_score_cross_encoder_reads_each_pair_as_one_text_pair(api, tokenizers):
    client, gateway = api
    body = client.post("/score", json={"model": "reranker", "queries": TEXT, "documents": ["a", "good movie"]}).json()
    pairs = [tokenizers[0](TEXT, document)["input_ids"] for document in ("a", "good movie")]
    encoded = gateway.calls[0][1]
    assert [row[:length].tolist() for row, length in zip(encoded.input_ids, encoded.lengths)] == pairs
    assert [item["score"] for item in body["data"]] == pytest.approx([sigmoid(len(p) / 10) for p in pairs])
    assert body["usage"]["prompt_tokens"] == sum(map(len, pairs)) and body["id"].startswith("score-")
    vllm_error(client.post("/score", json={"model": "reranker", "queries": ["a", "b"], "documents": ["c", "d", "e"]}),
               400, "BadRequestError", "Input lengths must be either 1:1, 1:N or N:N")


def test_score_bi_encoder_embeds_the_query_once_and_returns_cosines(api, tokenizers):
    client, gateway = api
    documents = ["a", TEXT]
    body = client.post("/score", json={"model": "embedder", "queries": TEXT, "documents": documents}).json()
    (_, queries, _), (_, docs, _) = gateway.calls
    assert queries.num_sequences == 1 and docs.num_sequences == 2
    q = np.array([queries.lengths[0], 1.0, 0.0])
    expected = [float(q @ np.array([length, 1.0, 0.0]) / (np.linalg.norm(q) * np.hypot(length, 1.0)))
                for length in docs.lengths]
    assert [item["score"] for item in body["data"]] == pytest.approx(expected, rel=1e-5)
    assert body["data"][1]["score"] == pytest.approx(1.0)
    assert body["usage"]["prompt_tokens"] == queries.num_tokens + docs.num_tokens
    raw = client.post("/score", json={"model": "embedder", "queries": TEXT, "documents": documents,
                                      "use_activation": False}).json()
    assert raw["data"][0]["score"] == pytest.approx(float(q @ np.array([docs.lengths[0], 1.0, 0.0])))


def test_llm_reranker_prompts_come_from_the_score_template(api, tokenizers):
    client, gateway = api
    client.post("/score", json={"model": "llm-reranker", "queries": "q1", "documents": ["d1"], "instruction": "judge"})
    client.post("/sglang/v1/rerank", json={"model": "llm-reranker", "query": "q1", "documents": ["d1"]})
    judged, default = (call[1] for call in gateway.calls)
    assert tokenizers[1].decode(judged.input_ids[0][:judged.lengths[0]].tolist()) == "judge Q: q1 D: d1"
    assert tokenizers[1].decode(default.input_ids[0][:default.lengths[0]].tolist()) == "relevant? Q: q1 D: d1"


def test_rerank_sorts_stably_keeps_top_n_and_echoes_documents(api):
    client, _ = api
    documents = ["good movie", "a", "b", TEXT]  # "a" and "b": the same length, so the same score
    body = client.post("/rerank", json={"model": "reranker", "query": "q", "documents": documents, "top_n": 3}).json()
    assert [result["index"] for result in body["results"]] == [3, 0, 1]
    assert body["results"][0]["document"] == {"text": TEXT, "multi_modal": None}
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0
    one = client.post("/rerank", json={"model": "reranker", "query": "q", "documents": "a"}).json()
    assert [result["index"] for result in one["results"]] == [0]


def test_rerank_max_tokens_per_doc_cuts_documents_and_is_bounded(api, tokenizers):
    client, gateway = api
    client.post("/rerank", json={"model": "reranker", "query": "q", "documents": [TEXT], "max_tokens_per_doc": 2})
    cut = tokenizers[0]("q", "paris is")["input_ids"]
    assert gateway.calls[0][1].input_ids[0].tolist() == cut
    error = vllm_error(client.post("/rerank", json={"model": "reranker", "query": "q", "documents": ["a"],
                                                    "max_tokens_per_doc": MAX_MODEL_LEN}),
                       400, "BadRequestError", f"must be less than max_model_len ({MAX_MODEL_LEN})")
    assert error["param"] == "max_tokens_per_doc"
    vllm_error(client.post("/rerank", json={"model": "reranker", "query": "q", "documents": ["a"],
                                            "chat_template_kwargs": {"tokenize": True}}),
               400, "BadRequestError", "reserved key")


def test_pooling_returns_floats_or_base64_and_refuses_another_task(api):
    client, gateway = api
    floats = client.post("/pooling", json={"model": "embedder", "input": TEXT}).json()
    length = int(gateway.calls[0][1].lengths[0])
    assert floats["data"][0]["data"] == [length, 1.0, 0.0] and floats["id"].startswith("pooling-")
    packed = client.post("/pooling", json={"model": "embedder", "input": TEXT, "encoding_format": "base64"}).json()
    assert np.frombuffer(base64.b64decode(packed["data"][0]["data"]), "<f4").tolist() == [length, 1.0, 0.0]
    big = client.post("/pooling", json={"model": "embedder", "input": TEXT, "encoding_format": "base64",
                                        "embed_dtype": "float16", "endianness": "big"}).json()
    assert np.frombuffer(base64.b64decode(big["data"][0]["data"]), ">f2").tolist() == [length, 1.0, 0.0]
    vllm_error(client.post("/pooling", json={"model": "embedder", "input": TEXT, "task": "classify"}), 400,
               "BadRequestError", "Unsupported task: 'classify'")
    assert client.post("/pooling", json={"model": "sentiment", "input": TEXT}).json()["data"][0]["data"] == \
        pytest.approx([sigmoid((length + k) / 10) for k in range(3)])


# --- SGLang flavours --------------------------------------------------------------------------------


def test_sglang_v1_classify_softmaxes_logits_and_names_unlabelled_classes(api):
    client, gateway = api
    body = client.post("/v1/classify", json={"model": "chat", "input": ["good", "rain"]}).json()
    assert gateway.calls[0][2] == ("logits",)
    for row, length in zip(body["data"], gateway.calls[0][1].lengths):
        logits = np.array([(length + k) / 10 for k in range(2)])
        assert row["probs"] == pytest.approx((np.exp(logits) / np.exp(logits).sum()).tolist())
        assert row["label"] == "LABEL_1"
    assert body["usage"]["prompt_tokens"] == int(gateway.calls[0][1].num_tokens)
    assert sglang_error(client.post("/v1/classify", json={"input": " "}), 400,
                        "Input cannot be empty or whitespace only")["type"] == "BadRequestError"
    assert sglang_error(client.post("/v1/classify", json={"input": 3}), 400, "validation error")["type"] == \
        "Bad Request"


def test_sglang_rerank_is_a_bare_list_of_raw_logits_with_per_document_tokens(api):
    client, gateway = api
    body = client.post("/sglang/v1/rerank", json={"query": "q", "documents": ["a", TEXT]}).json()
    encoded = gateway.calls[0][1]
    assert gateway.calls[0][2] == ("logits",)  # no activation declared: raw logits
    assert [item["index"] for item in body] == [1, 0]
    assert [item["meta_info"]["prompt_tokens"] for item in body] == encoded.lengths[::-1].tolist()
    assert body[0]["score"] == pytest.approx(encoded.lengths[1] / 10) and body[0]["document"] == TEXT
    bare = client.post("/sglang/v1/rerank", json={"query": "q", "documents": ["a", TEXT], "return_documents": False,
                                                  "top_n": 1}).json()
    assert len(bare) == 1 and "document" not in bare[0]
    client.post("/sglang/v1/rerank", json={"model": "st-reranker", "query": "q", "documents": ["a"]})
    assert gateway.calls[-1][2] == ("scores",)  # the checkpoint declares an activation
    sglang_error(client.post("/sglang/v1/rerank", json={"query": "q", "documents": ["a", " "]}), 400,
                 "Each document cannot be empty or whitespace only")


def test_sglang_native_classify_answers_an_object_for_one_input_and_a_list_for_several(api, tokenizers):
    client, gateway = api
    one = client.post("/classify", json={"text": TEXT, "rid": "r-1"}).json()
    length = len(tokenizers[0](TEXT)["input_ids"])
    assert one["embedding"] == pytest.approx([(length + k) / 10 for k in range(3)])
    assert one["meta_info"]["id"] == "r-1" and one["meta_info"]["prompt_tokens"] == length
    many = client.put("/classify", json={"text": [[TEXT, "doc"], ["q", "d"]]}).json()
    assert isinstance(many, list) and len(many) == 2
    assert gateway.calls[-1][1].input_ids[1][:gateway.calls[-1][1].lengths[1]].tolist() == \
        tokenizers[0]("q", "d")["input_ids"]
    ids = client.post("/classify", json={"input_ids": [[1, 2], [3]]}).json()
    assert [item["meta_info"]["prompt_tokens"] for item in ids] == [2, 1]


def test_sglang_native_errors_are_its_own_shape_and_validation_errors_are_flat(api):
    client, _ = api
    both = client.post("/classify", json={"text": TEXT, "input_ids": [1]})
    assert (both.status_code, both.json()) == (
        400, {"error": {"message": "Either text or input_ids should be provided, not both"}})
    unknown = client.post("/classify", json={"model": "nope", "text": TEXT})  # lenient: the first classifier
    assert unknown.status_code == 200
    sglang_error(client.post("/classify", json={"text": 5}), 400, "validation error")


def test_health_reports_the_models_triton_has_not_ready(api):
    client, gateway = api
    assert client.get("/health").status_code == 200
    gateway.busy.add("chat_triton")
    response = client.get("/ping")
    assert response.status_code == 503 and response.json() == {
        "status": "degraded", "unavailable_models": {"chat_triton": "not ready"}}


def test_timing_headers_say_where_a_request_s_time_went(api, monkeypatch):
    client, gateway = api
    fake_infer = gateway.infer

    async def timed_infer(*args):  # the real gateway times its Triton calls so
        with timed("inference"):
            return await fake_infer(*args)

    monkeypatch.setattr(gateway, "infer", timed_infer)
    response = client.post("/classify", json={"model": "sentiment", "input": [TEXT]})
    assert response.status_code == 200
    tokenize, inference, total = (float(response.headers[f"x-{name}-time"]) for name in ("tokenize", "inference", "total"))
    assert 0 < tokenize < total and 0 < inference < total
    refused = client.post("/classify", json={"model": "nope", "input": [TEXT]})  # errors are timed too
    assert refused.status_code == 404 and "x-inference-time" not in refused.headers
    assert float(refused.headers["x-total-time"]) > 0
