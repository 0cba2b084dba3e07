"""The rerank and score bodies Cohere's SDK, Jina's API and the frameworks over them send, through the real app
with a real tokenizer (tests/support/tiny_models.py) and a fake Triton gateway whose scores are a function of the
token ids it is sent.

What these pin: an explicit ``null`` is the field's default on /rerank (all its paths), /score and /v2/embed, and
OpenAPI shows those fields nullable (vLLM itself refuses them: knowingly beyond it); ``return_documents: false``
leaves ``document`` out; Cohere v1 / Jina object documents are scored by ``text`` or by ``rank_fields`` (as
``field: value`` lines, in the order given) and echoed as sent, while ``{"content": [...]}`` stays a multimodal
item. tests/integration/test_real_clients.py sends the same through the real SDKs and langchain-cohere.
"""

from __future__ import annotations

import numpy as np
import pytest

from poolserve_adapter.registry import ServedModel
from poolserve_adapter.tokenization import Encoded, TextEncoder
from tests.support.fake_triton import HealthyGateway, app_over

MAX_MODEL_LEN = 64
WIDTH = 4
QUERY = "paris france capital"
DOCUMENTS = ["bank loan rate", "paris is the capital of france", "cold winter snow"]
RERANK_PATHS = ("/rerank", "/v1/rerank", "/v2/rerank", "/vllm/v1/rerank")


class ScoringGateway(HealthyGateway):
    """Records what each call sends; a row's logit is a function of its token ids (so two documents differ and the
    same ids score the same), ``embeddings`` likewise."""

    def __init__(self):
        self.calls: list[tuple[str, Encoded, tuple[str, ...]]] = []

    def refuse_if_busy(self, triton_model: str) -> None:
        pass

    def leave_admission_board(self) -> None:
        pass

    async def infer(self, triton_model: str, encoded: Encoded, outputs: tuple[str, ...], lora_ids=None) -> dict[str, np.ndarray]:
        self.calls.append((triton_model, encoded, outputs))
        sums = (encoded.input_ids * np.arange(1, encoded.input_ids.shape[1] + 1)).sum(axis=1).astype(np.float32)
        logits = (sums % 97 / 10 - 5)[:, None]
        embeddings = np.cos(sums[:, None] * 0.37 + np.arange(WIDTH, dtype=np.float32)).astype(np.float32)
        arrays = {"logits": logits, "scores": 1 / (1 + np.exp(-logits)), "embeddings": embeddings}
        return {name: arrays[name] for name in outputs}


def sent_rows(gateway: ScoringGateway, call: int = -1) -> list[list[int]]:
    encoded = gateway.calls[call][1]
    return [row[:length].tolist() for row, length in zip(encoded.input_ids, encoded.lengths)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tests.support.tiny_models import wordpiece_tokenizer

    return wordpiece_tokenizer(tmp_path_factory.mktemp("wordpiece"))


def served(name: str, tokenizer, task: str, num_labels: int) -> ServedModel:
    encoder = TextEncoder(tokenizer, max_model_len=MAX_MODEL_LEN, sends_token_types=True)
    return ServedModel(name=name, triton_model=f"{name}_triton", task=task, checkpoint=f"/checkpoints/{name}",
                       encoder=encoder, id2label={}, num_labels=num_labels, created=1,
                       embedding_size=WIDTH if task == "embed" else 0)


@pytest.fixture
def api(monkeypatch, tokenizer):
    models = [served("reranker", tokenizer, "classify", 1), served("embedder", tokenizer, "embed", 0)]
    with app_over(monkeypatch, models, ScoringGateway(), max_items_per_request=8, max_tokens_per_request=2000) as app:
        yield app


def ok(response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


def ranked(body: dict) -> list[tuple[int, float]]:
    return [(result["index"], result["relevance_score"]) for result in body["results"]]


def vllm_error(response, message: str, param: str | None = None) -> dict:
    body = response.json()
    assert response.status_code == 400, body
    assert message in body["error"]["message"] and body["error"]["param"] == param, body
    return body["error"]


# --- null: the field's default ----------------------------------------------------------------------------------


NULLABLE_SCORING_FIELDS = {"max_tokens_per_doc": None, "max_tokens_per_query": None, "priority": None,
                           "request_id": None, "truncate_prompt_tokens": None, "use_activation": None}


@pytest.mark.parametrize("path", RERANK_PATHS)
def test_null_rerank_fields_are_their_defaults(api, path):
    """langchain-cohere's CohereRerank always sends "max_tokens_per_doc": null, and "top_n": null when asked for
    every document; Cohere's v2 SDK sends "priority": null when given None."""
    client, _ = api
    body = {"model": "reranker", "query": QUERY, "documents": DOCUMENTS}
    plain = ok(client.post(path, json=body))
    nulls = ok(client.post(path, json={**body, **NULLABLE_SCORING_FIELDS, "top_n": None, "rank_fields": None,
                                       "return_documents": None}))
    assert ranked(nulls) == ranked(plain) and len(plain["results"]) == len(DOCUMENTS)
    assert nulls["results"] == plain["results"]
    assert nulls["id"].startswith("score-") and len(nulls["id"]) == len("score-") + 16  # a fresh request_id
    top = ok(client.post(path, json={**body, "top_n": 2, "max_tokens_per_doc": None}))
    assert ranked(top) == ranked(plain)[:2]


def test_null_score_fields_are_their_defaults(api):
    client, _ = api
    body = {"model": "reranker", "queries": QUERY, "documents": DOCUMENTS}
    plain = ok(client.post("/score", json=body))
    nulls = ok(client.post("/score", json={**body, **NULLABLE_SCORING_FIELDS}))
    assert nulls["data"] == plain["data"]


def test_null_cohere_embed_fields_are_their_defaults(api):
    client, _ = api
    body = {"model": "embedder", "texts": DOCUMENTS}
    plain = ok(client.post("/v2/embed", json=body))
    nulls = ok(client.post("/v2/embed", json={**body, "embedding_types": None, "truncate": None, "priority": None,
                                              "max_tokens": None, "input_type": None, "output_dimension": None}))
    assert list(plain["embeddings"]) == ["float"]  # embedding_types' default
    assert nulls["embeddings"] == plain["embeddings"]


def test_null_stays_refused_where_a_value_is_required_and_on_other_routes(api):
    client, gateway = api
    response = client.post("/rerank", json={"model": "reranker", "query": None, "documents": DOCUMENTS})
    assert response.status_code == 400 and response.json()["error"]["param"] == "body.query"
    response = client.post("/rerank", json={"model": "reranker", "query": QUERY, "documents": DOCUMENTS, "top_n": -1})
    assert response.status_code == 400 and response.json()["error"]["param"] == "body.top_n"
    response = client.post("/v1/embeddings", json={"model": "embedder", "input": "x", "priority": None})
    assert response.status_code == 400 and response.json()["error"]["param"] == "body.priority"  # as vLLM
    assert gateway.calls == []


def test_openapi_shows_the_defaulted_fields_nullable(api):
    client, _ = api
    schemas = client.get("/openapi.json").json()["components"]["schemas"]

    def admits_null(model: str, field: str) -> bool:
        # /rerank's body is a union with TEI's RerankRequest: FastAPI then names both by their modules
        name = next(key for key in schemas if key in (model, f"poolserve_adapter__rerank__protocol__{model}"))
        return {"type": "null"} in schemas[name]["properties"][field].get("anyOf", [])

    for field in ("top_n", "max_tokens_per_doc", "max_tokens_per_query", "priority", "request_id"):
        assert admits_null("RerankRequest", field), field
    for field in ("max_tokens_per_doc", "priority"):
        assert admits_null("ScoreRequest", field), field
    for field in ("embedding_types", "truncate", "priority"):
        assert admits_null("CohereEmbedRequest", field), field
    assert not admits_null("EmbeddingCompletionRequest", "priority")  # vLLM's other routes keep theirs


# --- return_documents --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [*RERANK_PATHS, "/invocations"])
def test_return_documents_false_leaves_the_documents_out(api, path):
    client, _ = api
    body = {"model": "reranker", "query": QUERY, "documents": DOCUMENTS}
    with_documents = ok(client.post(path, json=body))
    assert all(r["document"]["text"] == DOCUMENTS[r["index"]] for r in with_documents["results"])
    assert ok(client.post(path, json={**body, "return_documents": True}))["results"] == with_documents["results"]
    bare = ok(client.post(path, json={**body, "return_documents": False, "top_n": 2}))
    assert [list(result) for result in bare["results"]] == [["index", "relevance_score"]] * 2
    assert ranked(bare) == ranked(with_documents)[:2]
    assert list(bare) == list(with_documents) == ["id", "model", "usage", "results"]
    assert bare["usage"] == with_documents["usage"] and bare["model"] == "reranker"


# --- object documents and rank_fields ----------------------------------------------------------------------------


def test_object_documents_are_scored_by_their_text_and_echoed_as_sent(api):
    client, gateway = api
    body = {"model": "reranker", "query": QUERY}
    plain = ok(client.post("/v1/rerank", json={**body, "documents": DOCUMENTS}))
    strings_sent = sent_rows(gateway)
    objects = [{"text": text, "id": f"doc-{index}", "source": "wiki"} for index, text in enumerate(DOCUMENTS)]
    answer = ok(client.post("/v1/rerank", json={**body, "documents": objects}))
    assert sent_rows(gateway) == strings_sent and ranked(answer) == ranked(plain)
    for result in answer["results"]:
        document = result["document"]
        assert {key: document[key] for key in ("text", "id", "source")} == objects[result["index"]]
    mixed = ok(client.post("/rerank", json={**body, "documents": [objects[0], DOCUMENTS[1]]}))
    assert {r["index"]: r["document"]["text"] for r in mixed["results"]} == {0: DOCUMENTS[0], 1: DOCUMENTS[1]}
    one = ok(client.post("/rerank", json={**body, "documents": objects[1]}))  # one item is one document
    assert one["results"][0]["document"]["id"] == "doc-1"


def test_rank_fields_score_the_named_fields_as_lines_in_their_order(api):
    client, gateway = api
    body = {"model": "reranker", "query": QUERY}
    documents = [{"text": text, "title": f"title {index}", "year": 2000 + index}
                 for index, text in enumerate(DOCUMENTS)]
    answer = ok(client.post("/v1/rerank", json={**body, "documents": documents, "rank_fields": ["title", "text"],
                                                "return_documents": False}))
    ranked_sent = sent_rows(gateway)
    as_lines = [f"title: {document['title']}\ntext: {document['text']}" for document in documents]
    expected = ok(client.post("/v1/rerank", json={**body, "documents": as_lines}))
    assert ranked_sent == sent_rows(gateway) and ranked(answer) == ranked(expected)
    ok(client.post("/v1/rerank", json={**body, "documents": documents, "rank_fields": ["year", "title"]}))
    reordered = ["year: 2000\ntitle: title 0", "year: 2001\ntitle: title 1", "year: 2002\ntitle: title 2"]
    first = sent_rows(gateway)
    ok(client.post("/v1/rerank", json={**body, "documents": reordered}))
    assert first == sent_rows(gateway)  # a value that is not a string in JSON
    ok(client.post("/v1/rerank", json={**body, "documents": DOCUMENTS, "rank_fields": ["title"]}))  # texts ignore it


def test_a_rank_field_a_document_lacks_is_a_400(api):
    client, gateway = api
    documents = [{"text": "a", "title": "t"}, {"text": "b"}]
    vllm_error(client.post("/v1/rerank", json={"model": "reranker", "query": QUERY, "documents": documents,
                                               "rank_fields": ["title"]}),
               "Document 1 has no field 'title', which rank_fields names.", param="rank_fields")
    assert gateway.calls == []


@pytest.mark.parametrize("document, param", [
    ({"title": "no text"}, "body.documents"),
    ({"text": 5}, "body.documents"),
    (7, "body.documents"),
    ({"text": "x", "multi_modal": []}, "body.documents"),
])
def test_a_document_that_is_no_text_object_nor_multimodal_item_is_a_validation_400(api, document, param):
    client, gateway = api
    response = client.post("/rerank", json={"model": "reranker", "query": QUERY, "documents": [document]})
    body = response.json()
    assert response.status_code == 400 and body["error"]["type"] == "Bad Request", body
    assert body["error"]["param"] == param
    assert gateway.calls == []


def test_an_object_with_content_stays_a_multimodal_item(api):
    """``{"content": [...]}`` is vLLM's multimodal item (refused by a text model as vLLM does), even with a
    ``text`` beside it; an object with ``text`` alone is a Cohere document."""
    client, _ = api
    item = {"content": [{"type": "text", "text": "paris"}], "text": "paris"}
    vllm_error(client.post("/rerank", json={"model": "reranker", "query": QUERY, "documents": [item]}),
               "MultiModalParam is not supported for")
    ok(client.post("/rerank", json={"model": "reranker", "query": QUERY, "documents": [{"text": "paris"}]}))
