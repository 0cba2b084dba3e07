"""TEI's API through the real app: ``/predict``, TEI's body on ``/rerank``, ``/embed``, ``/embed_all``, ``/info`` and
``POST /``, with a real tokenizer and a fake Triton gateway whose outputs are functions of the token ids.

What these pin, against ``router/src/http/{server,types}.rs`` and ``core/src/infer.rs`` of TEI: TEI's input rules
(``["a", "b"]`` is one pair, a batch is a list of lists), its activation (softmax over the labels, sigmoid for
one, the logits with ``raw_scores``) computed from the model's raw ``logits``, its sort (score descending, equal
scores later index first), the bare rank list with ``text`` only on ``return_text``, ``/embed``'s cut-then-normalise,
``/embed_all``'s token vectors, every check with TEI's status, kind and words, ``/info``'s shape, ``POST /``'s
dispatch by the model's kind, and vLLM's ``/rerank`` body answering exactly as before beside TEI's.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from poolserve_adapter.errors import ServiceUnavailableError, TooManyRequestsError
from poolserve_adapter.registry import ServedModel
from poolserve_adapter.tei.info import model_type, tei_route
from poolserve_adapter.tokenization import Encoded, TextEncoder
from poolserve_contract.card import ModelCard
from tests.support.fake_triton import HealthyGateway, app_over

MAX_MODEL_LEN = 32
WIDTH = 6
TOKEN_DIM = 3
LIMIT = 8
QUERY = "paris france"
TEXTS = ["paris is the capital of france", "good movie", "cold winter snow"]
SENTIMENT_LABELS = {0: "negative", 1: "neutral", 2: "positive"}
LONG_TEXT = " ".join(f"word{i}" for i in range(40))


def logits_of(ids: np.ndarray, columns: int) -> np.ndarray:
    """The fake classifier's logits of one sequence: both signs, distinct per sequence."""
    total = float(ids.sum())
    return np.array([np.sin(total * 0.37 + column) * 4 for column in range(columns)], dtype=np.float32)


def pooled_of(ids: np.ndarray) -> np.ndarray:
    return np.array([np.cos(float(ids.sum()) * 0.1 + k) * (k + 1) for k in range(WIDTH)], dtype=np.float32)


def token_vectors(ids: np.ndarray) -> np.ndarray:
    return np.stack([ids, ids % 3, np.ones_like(ids)], axis=-1).astype(np.float32)


class TeiGateway(HealthyGateway):
    """Stands in for TritonGateway (and its client's model-config call, for /info)."""

    max_rows = 16

    def __init__(self, checkpoint_configs: dict[str, dict]):
        self.calls: list[tuple[str, tuple[str, ...], Encoded]] = []
        self.refusal: Exception | None = None
        self.logits: np.ndarray | None = None  # set: the logits every sequence gets
        self.client = self
        self.configs = checkpoint_configs

    async def get_model_config(self, name: str, as_json: bool = False) -> dict:
        return {"config": self.configs[name]}

    def refuse_if_busy(self, triton_model: str) -> None:
        if self.refusal is not None:
            raise self.refusal

    def leave_admission_board(self) -> None:
        pass

    async def infer(self, triton_model: str, encoded: Encoded, outputs: tuple[str, ...], lora_ids=None) -> dict[str, np.ndarray]:
        self.calls.append((triton_model, outputs, encoded))
        sequences = [ids[:length] for ids, length in zip(encoded.input_ids, encoded.lengths)]
        (output,) = outputs
        if output in ("logits", "scores"):
            columns = 3 if triton_model == "sentiment_triton" else 1
            rows = np.stack([logits_of(ids, columns) if self.logits is None else self.logits for ids in sequences])
            return {output: rows if output == "logits" else 1 / (1 + np.exp(-rows))}
        if output == "pooled":
            return {output: np.stack([pooled_of(ids) for ids in sequences])}
        if output == "sparse":
            vectors = np.zeros((len(sequences), 300), dtype=np.float32)
            for row, ids in enumerate(sequences):
                vectors[row, ids] = 1.5
            return {output: vectors}
        assert output == "token_projected", output
        longest = int(encoded.lengths.max())
        vectors = np.zeros((len(sequences), longest, TOKEN_DIM), dtype=np.float32)
        for row, ids in enumerate(sequences):
            vectors[row, :len(ids)] = token_vectors(ids)
        return {output: vectors}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tests.support.tiny_models import wordpiece_tokenizer

    return wordpiece_tokenizer(tmp_path_factory.mktemp("wordpiece"))


@pytest.fixture(scope="module")
def embedder_checkpoint(tmp_path_factory):
    """A sentence-transformers layout whose Pooling module says mean."""
    directory = tmp_path_factory.mktemp("embedder")
    (directory / "1_Pooling").mkdir()
    (directory / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (directory / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    return str(directory)


def served(name: str, tokenizer, task: str, checkpoint: str = "", **fields) -> ServedModel:
    encoder = TextEncoder(tokenizer, max_model_len=MAX_MODEL_LEN, sends_token_types=True)
    return ServedModel(name=name, triton_model=f"{name}_triton", task=task, checkpoint=checkpoint or f"/ckpt/{name}",
                       encoder=encoder, id2label=fields.pop("id2label", {}), num_labels=fields.pop("num_labels", 0),
                       created=1, **fields)


def triton_config(model: ServedModel, dtype: str) -> dict:
    card = ModelCard(served_name=model.name, family="", task=model.task, architecture="", max_model_len=MAX_MODEL_LEN,
                     num_labels=model.num_labels)
    return {"parameters": {"model_card": {"string_value": card.to_json()}, "dtype": {"string_value": dtype}}}


@pytest.fixture
def models(tokenizer, embedder_checkpoint):
    vocab = len(tokenizer)
    return [served("embedder", tokenizer, "embed", embedder_checkpoint, embedding_size=WIDTH, normalizes=True,
                   prompts={"query": "query: "}),
            served("reranker", tokenizer, "classify", num_labels=1, id2label={0: "LABEL_0"}),
            served("sentiment", tokenizer, "classify", num_labels=3, id2label=SENTIMENT_LABELS),
            served("splade", tokenizer, "embed", sparse=True, embedding_size=vocab),
            served("colbert", tokenizer, "token_embed", embedding_size=TOKEN_DIM, normalizes=True)]


@pytest.fixture
def api(monkeypatch, models):
    gateway = TeiGateway({model.triton_model: triton_config(model, "float16" if model.name == "embedder" else "auto")
                          for model in models})
    with app_over(monkeypatch, models, gateway, max_items_per_request=LIMIT, max_tokens_per_request=600) as running:
        yield running


def ids_of(tokenizer, first: str, second: str | None = None) -> np.ndarray:
    return np.array(tokenizer(first, second)["input_ids"])


def tei_error(response, status: int, kind: str, message: str | None = None) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "error_type"} and body["error_type"] == kind, body
    if message is not None:
        assert body["error"] == message


def sigmoid(values: np.ndarray) -> np.ndarray:
    return np.float32(1) / (np.float32(1) + np.exp(-values.astype(np.float32)))


def softmax(values: np.ndarray) -> np.ndarray:
    exponentials = np.exp(values - values.max())
    return exponentials / exponentials.sum()


def as_f32(values) -> np.ndarray:
    return np.array(values, dtype=np.float32)


# --- /predict -------------------------------------------------------------------------------------------------


def expected_predictions(tokenizer, columns: int, labels: dict[int, str], *inputs: str, raw: bool = False) -> list:
    logits = logits_of(ids_of(tokenizer, *inputs), columns)
    scores = logits if raw else softmax(logits) if columns > 1 else sigmoid(logits)
    order = sorted(range(columns), key=lambda i: scores[i])[::-1]
    return [(labels[i], scores[i]) for i in order]


def pairs_of(predictions: list[dict]) -> list:
    return [(item["label"], np.float32(item["score"])) for item in predictions]


def test_predict_a_text_a_pair_and_a_batch(api, tokenizer):
    client, gateway = api
    single = client.post("/predict", json={"inputs": TEXTS[0], "model": "sentiment"})
    assert single.status_code == 200, single.text
    expected = expected_predictions(tokenizer, 3, SENTIMENT_LABELS, TEXTS[0])
    assert [label for label, _ in pairs_of(single.json())] == [label for label, _ in expected]
    np.testing.assert_allclose([s for _, s in pairs_of(single.json())], [s for _, s in expected], rtol=1e-6)
    assert list(single.json()[0]) == ["score", "label"]
    assert gateway.calls[-1][:2] == ("sentiment_triton", ("logits",))  # raw logits, TEI's activation here

    pair = client.post("/predict", json={"inputs": [QUERY, TEXTS[0]], "model": "sentiment"})  # ONE pair
    assert pair.status_code == 200 and isinstance(pair.json()[0], dict) and len(pair.json()) == 3
    sent = gateway.calls[-1][2]
    assert sent.num_sequences == 1 and sent.input_ids[0, :sent.lengths[0]].tolist() == ids_of(tokenizer, QUERY, TEXTS[0]).tolist()
    assert 1 in sent.token_type_ids[0].tolist()  # sent as a text pair
    np.testing.assert_allclose([s for _, s in pairs_of(pair.json())],
                               [s for _, s in expected_predictions(tokenizer, 3, SENTIMENT_LABELS, QUERY, TEXTS[0])],
                               rtol=1e-6)

    batch = client.post("/predict", json={"inputs": [[TEXTS[1]], [QUERY, TEXTS[2]]], "model": "sentiment",
                                          "raw_scores": True})
    assert batch.status_code == 200, batch.text
    assert [len(item) for item in batch.json()] == [3, 3] and gateway.calls[-1][2].num_sequences == 2
    for predictions, inputs in zip(batch.json(), [(TEXTS[1],), (QUERY, TEXTS[2])]):
        expected = expected_predictions(tokenizer, 3, SENTIMENT_LABELS, *inputs, raw=True)
        assert pairs_of(predictions) == [(label, np.float32(score)) for label, score in expected]


def test_predict_on_a_reranker_is_the_sigmoid_of_its_label(api, tokenizer):
    client, _ = api
    response = client.post("/predict", json={"inputs": [QUERY, TEXTS[0]], "model": "reranker"})
    assert response.status_code == 200, response.text
    (prediction,) = response.json()
    assert prediction["label"] == "LABEL_0"
    assert np.float32(prediction["score"]) == sigmoid(logits_of(ids_of(tokenizer, QUERY, TEXTS[0]), 1))[0]


def test_equal_scores_come_out_later_first_as_teis_reversed_stable_sort(api):
    client, gateway = api
    gateway.logits = np.array([1.0, 2.0, 1.0], dtype=np.float32)
    predicted = client.post("/predict", json={"inputs": "snow", "model": "sentiment", "raw_scores": True}).json()
    assert [item["label"] for item in predicted] == ["neutral", "positive", "negative"]
    gateway.logits = np.array([0.5], dtype=np.float32)
    ranked = client.post("/rerank", json={"query": QUERY, "texts": TEXTS, "model": "reranker"}).json()
    assert [rank["index"] for rank in ranked] == [2, 1, 0]


def test_predict_errors(api, tokenizer):
    client, gateway = api
    calls = len(gateway.calls)

    def predict(inputs, **fields):
        return client.post("/predict", json={"inputs": inputs, "model": "sentiment", **fields})

    tei_error(client.post("/predict", json={"inputs": "snow", "model": "embedder"}), 424, "Backend",
              "Backend error: Model is not a classifier model")
    tei_error(predict([["snow"]] * (LIMIT + 1)), 422, "Validation",
              f"batch size {LIMIT + 1} > maximum allowed batch size {LIMIT}")
    tei_error(predict(""), 400, "Empty", "Input validation error: `inputs` cannot be empty")
    tei_error(predict([["snow"], ["", ""]]), 400, "Empty", "Input validation error: `inputs` cannot be empty")
    tei_error(predict(LONG_TEXT), 422, "Validation", f"Input validation error: `inputs` must have less than "
              f"{MAX_MODEL_LEN} tokens. Given: {len(ids_of(tokenizer, LONG_TEXT))}")
    assert len(gateway.calls) == calls
    for invalid in (["a", "b", "c"], [], [[]], [["a", "b", "c"]], [["a"], "b"], ["a", ["b"]], 3):
        tei_error(predict(invalid), 422, "Validation")
    tei_error(predict("snow", raw_scores=[1]), 422, "Validation")
    assert len(gateway.calls) == calls


def test_predict_truncates_the_longest_side_of_a_pair(api, tokenizer):
    client, gateway = api
    response = client.post("/predict", json={"inputs": [QUERY, LONG_TEXT], "model": "sentiment", "truncate": True})
    assert response.status_code == 200, response.text
    sent = gateway.calls[-1][2]
    query_ids = ids_of(tokenizer, QUERY).tolist()
    assert sent.lengths[0] == MAX_MODEL_LEN
    assert sent.input_ids[0, :len(query_ids)].tolist() == query_ids  # the short side is whole


# --- /rerank with TEI's body ------------------------------------------------------------------------------------


def test_rerank_teis_body_answers_teis_bare_sorted_list(api, tokenizer):
    client, gateway = api
    response = client.post("/rerank", json={"query": QUERY, "texts": TEXTS})  # no model: the first re-ranker
    assert response.status_code == 200, response.text
    scores = [sigmoid(logits_of(ids_of(tokenizer, QUERY, text), 1))[0] for text in TEXTS]
    expected_order = sorted(range(len(TEXTS)), key=lambda i: scores[i])[::-1]
    assert [rank["index"] for rank in response.json()] == expected_order
    assert [np.float32(rank["score"]) for rank in response.json()] == [scores[i] for i in expected_order]
    assert all(list(rank) == ["index", "score"] for rank in response.json())
    assert gateway.calls[-1][:2] == ("reranker_triton", ("logits",)) and gateway.calls[-1][2].num_sequences == 3
    with_text = client.post("/rerank", json={"query": QUERY, "texts": TEXTS, "return_text": True,
                                             "raw_scores": True, "top_n": 1})  # top_n: not TEI's, ignored
    assert [list(rank) for rank in with_text.json()] == [["index", "text", "score"]] * 3
    assert [rank["text"] for rank in with_text.json()] == [TEXTS[rank["index"]] for rank in with_text.json()]
    raw = {rank["index"]: np.float32(rank["score"]) for rank in with_text.json()}
    assert raw == {i: logits_of(ids_of(tokenizer, QUERY, text), 1)[0] for i, text in enumerate(TEXTS)}


def test_rerank_vllm_body_is_unchanged_beside_teis(api):
    client, gateway = api
    response = client.post("/rerank", json={"model": "reranker", "query": QUERY, "documents": TEXTS, "top_n": 2})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "reranker" and len(body["results"]) == 2 and "relevance_score" in body["results"][0]
    assert gateway.calls[-1][1] == ("scores",)
    # Both keys: vLLM's body (its own unknown `texts` ignored).
    both = client.post("/rerank", json={"model": "reranker", "query": QUERY, "documents": TEXTS, "texts": TEXTS})
    assert both.status_code == 200 and "results" in both.json()
    refused = client.post("/rerank", json={"model": "reranker", "query": QUERY})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "body.documents"


def test_rerank_teis_errors(api, tokenizer):
    client, gateway = api
    calls = len(gateway.calls)

    def rerank(texts, model="reranker", **fields):
        return client.post("/rerank", json={"query": QUERY, "texts": texts, "model": model, **fields})

    tei_error(rerank([]), 400, "Empty", "`texts` cannot be empty")
    for model in ("sentiment", "embedder", "colbert"):
        tei_error(rerank(TEXTS, model), 424, "Backend", "Backend error: model is not a re-ranker model")
    tei_error(rerank(["snow"] * (LIMIT + 1)), 422, "Validation",
              f"batch size {LIMIT + 1} > maximum allowed batch size {LIMIT}")
    tei_error(client.post("/rerank", json={"query": "", "texts": ["", "snow"]}), 400, "Empty",
              "Input validation error: `inputs` cannot be empty")
    tei_error(rerank([LONG_TEXT]), 422, "Validation", f"Input validation error: `inputs` must have less than "
              f"{MAX_MODEL_LEN} tokens. Given: {len(ids_of(tokenizer, QUERY, LONG_TEXT))}")
    tei_error(client.post("/rerank", json={"texts": TEXTS}), 422, "Validation")  # no query
    tei_error(rerank(TEXTS, truncation_direction="up"), 422, "Validation")
    assert len(gateway.calls) == calls
    assert rerank([LONG_TEXT], truncate=True, truncation_direction="left").status_code == 200
    gateway.logits = np.array([np.nan], dtype=np.float32)
    tei_error(rerank(TEXTS), 424, "Backend", "score is NaN")


@pytest.mark.parametrize("refusal, status, kind", [(TooManyRequestsError("Model is overloaded"), 429, "Overloaded"),
                                                   (ServiceUnavailableError("Triton is down"), 503, "Unhealthy")])
def test_refusals_of_the_shared_pipeline_take_teis_kinds(api, refusal, status, kind):
    client, gateway = api
    gateway.refusal = refusal
    for path, body in (("/rerank", {"query": QUERY, "texts": TEXTS}), ("/predict", {"inputs": "snow"}),
                       ("/embed", {"inputs": "snow"}), ("/embed_all", {"inputs": "snow"}), ("/", {"inputs": "snow"})):
        tei_error(client.post(path, json=body), status, kind, refusal.message)


# --- /embed and /embed_all --------------------------------------------------------------------------------------


def test_embed_cuts_then_normalises(api, tokenizer):
    client, gateway = api
    pooled = np.stack([pooled_of(ids_of(tokenizer, text)) for text in TEXTS])
    response = client.post("/embed", json={"inputs": TEXTS})
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(as_f32(response.json()), pooled / np.linalg.norm(pooled, axis=1, keepdims=True),
                               rtol=1e-6)
    assert gateway.calls[-1][:2] == ("embedder_triton", ("pooled",))
    raw = client.post("/embed", json={"inputs": TEXTS[0], "normalize": False})
    assert raw.status_code == 200 and as_f32(raw.json()).tolist() == pooled[:1].tolist()  # a list of one
    cut = client.post("/embed", json={"inputs": TEXTS, "dimensions": 2})
    np.testing.assert_allclose(as_f32(cut.json()), pooled[:, :2] / np.linalg.norm(pooled[:, :2], axis=1, keepdims=True),
                               rtol=1e-6)
    prompted = client.post("/embed", json={"inputs": [TEXTS[1]], "prompt_name": "query", "normalize": False})
    assert as_f32(prompted.json()).tolist() == [pooled_of(ids_of(tokenizer, "query: " + TEXTS[1])).tolist()]
    sparse = client.post("/embed", json={"inputs": "snow", "model": "splade", "normalize": False})
    assert sparse.status_code == 200 and gateway.calls[-1][1] == ("sparse",)
    assert np.flatnonzero(sparse.json()[0]).tolist() == sorted(set(ids_of(tokenizer, "snow").tolist()))


def test_embed_errors(api):
    client, gateway = api
    calls = len(gateway.calls)

    def embed(**fields):
        return client.post("/embed", json={"model": "embedder", "inputs": TEXTS, **fields})

    tei_error(embed(inputs=[]), 400, "Empty", "`inputs` cannot be empty")
    tei_error(embed(inputs=["snow"] * (LIMIT + 1)), 422, "Validation",
              f"batch size {LIMIT + 1} > maximum allowed batch size {LIMIT}")
    tei_error(embed(model="splade"), 424, "Backend", "Backend error: `normalize` is not available for SPLADE models")
    tei_error(embed(dimensions=0), 422, "Validation", "Input validation error: `dimensions` should be positive")
    tei_error(embed(model="sentiment"), 424, "Backend", "Backend error: Model is not an embedding model")
    tei_error(embed(inputs=["snow", ""]), 400, "Empty", "Input validation error: `inputs` cannot be empty")
    tei_error(embed(dimensions=WIDTH + 1), 422, "Validation",
              "Input validation error: `dimensions` should be smaller than the maximum embedding dimension.")
    tei_error(embed(prompt_name="passage"), 422, "Validation")
    tei_error(embed(inputs=[1, 2]), 422, "Validation")  # token ids are not taken
    assert len(gateway.calls) == calls
    assert embed(dimensions=WIDTH).status_code == 200


def test_embed_all_gives_every_tokens_vector(api, tokenizer):
    client, gateway = api
    response = client.post("/embed_all", json={"inputs": TEXTS[:2]})  # no model: the first with token vectors
    assert response.status_code == 200, response.text
    assert gateway.calls[-1][:2] == ("colbert_triton", ("token_projected",))
    for vectors, text in zip(response.json(), TEXTS):
        assert as_f32(vectors).tolist() == token_vectors(ids_of(tokenizer, text)).tolist()  # special tokens too
    calls = len(gateway.calls)
    tei_error(client.post("/embed_all", json={"inputs": "snow", "model": "splade"}), 424, "Backend",
              "Backend error: `embed_all` is not available for SPLADE models")
    tei_error(client.post("/embed_all", json={"inputs": "snow", "model": "sentiment"}), 424, "Backend",
              "Backend error: Model is not an embedding model")
    dense = client.post("/embed_all", json={"inputs": "snow", "model": "embedder"})
    tei_error(dense, 424, "Backend")
    assert "no per-token output" in dense.json()["error"]
    tei_error(client.post("/embed_all", json={"inputs": []}), 400, "Empty", "`inputs` cannot be empty")
    assert len(gateway.calls) == calls


# --- /info and POST / -------------------------------------------------------------------------------------------


def test_info_describes_the_default_model_in_teis_shape(api, models):
    client, _ = api
    response = client.get("/info")
    assert response.status_code == 200, response.text
    info = response.json()
    assert list(info) == ["model_id", "model_sha", "model_dtype", "served_model_name", "model_type",
                          "max_concurrent_requests", "max_input_length", "max_batch_tokens", "max_batch_requests",
                          "max_client_batch_size", "auto_truncate", "tokenization_workers", "version", "sha",
                          "docker_label"]
    assert info["model_id"] == models[0].checkpoint and info["served_model_name"] == "embedder"
    assert info["model_type"] == {"embedding": {"pooling": "mean"}} and info["model_dtype"] == "float16"
    assert (info["max_input_length"], info["max_client_batch_size"], info["max_batch_tokens"]) == (MAX_MODEL_LEN,
                                                                                                   LIMIT, 600)
    assert info["model_sha"] is None and info["auto_truncate"] is False and info["max_batch_requests"] is None


def test_model_types_and_root_routes_by_kind(models):
    by_name = {model.name: model for model in models}
    assert model_type(by_name["reranker"], "") == {"reranker": {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}}
    assert model_type(by_name["sentiment"], "") == {"classifier": {
        "id2label": {"0": "negative", "1": "neutral", "2": "positive"},
        "label2id": {"negative": 0, "neutral": 1, "positive": 2}}}
    assert {name: tei_route(model) for name, model in by_name.items()} == {
        "embedder": "embed", "reranker": "rerank", "sentiment": "predict", "splade": "embed_sparse",
        "colbert": "embed_all"}


def test_root_answers_as_the_route_of_the_default_models_kind(api, tokenizer):
    client, gateway = api
    embedded = client.post("/", json={"inputs": TEXTS, "truncate": False, "parameters": {}})  # default: the embedder
    assert embedded.status_code == 200 and embedded.json() == client.post("/embed", json={"inputs": TEXTS}).json()
    ranked = client.post("/", json={"model": "reranker", "query": QUERY, "texts": TEXTS})
    assert ranked.status_code == 200 and ranked.json() == client.post("/rerank", json={"query": QUERY,
                                                                                       "texts": TEXTS}).json()
    predicted = client.post("/", json={"model": "sentiment", "inputs": "snow"})
    assert predicted.status_code == 200 and predicted.json() == client.post(
        "/predict", json={"model": "sentiment", "inputs": "snow"}).json()
    tei_error(client.post("/", json={"input": "snow"}), 422, "Validation")
    tei_error(client.post("/", json={"model": "reranker", "inputs": "snow"}), 422, "Validation")
