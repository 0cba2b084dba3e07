"""Long documents in /rerank, /score and SGLang's rerank (``long_documents``: truncate, max, mean) through
the real app with real tokenizers (tests/support/tiny_models.py) and a fake Triton gateway that
records each row it is sent and scores it from its ids.

What these pin: the layout of the chunks (the pair's own ids around each window of the document's
ids, the room the query and special tokens leave, the overlap), the aggregation per document, the
order and usage of the responses, the guards counting chunks, and that a document that fits is sent
exactly as truncate mode sends it. tests/integration/test_long_documents.py checks the same against
the real model.
"""

from __future__ import annotations

import numpy as np
import pytest

from poolserve_adapter.base.scoring import chunk_count, chunk_windows
from poolserve_adapter.registry import ServedModel
from poolserve_adapter.tokenization import Encoded, TextEncoder
from poolserve_contract.card import ModelCard
from poolserve_contract.parameters import ModelParameters
from tests.support.fake_triton import HealthyGateway, app_over

MAX_MODEL_LEN = 32
MAX_ITEMS = 12
MAX_TOKENS = 300
TEMPLATE = "Q: {{ messages[0]['content'] }} D: {{ messages[1]['content'] }}!"
# Words the tiny tokenizers hold as one token each: a document of N of them is N document tokens.
WORDS = ("paris france capital city river bank money loan rate market stock price movie film great good bad "
         "weather rain sun cloud snow cold warm summer winter").split()
LONG = " ".join(WORDS[i % len(WORDS)] for i in range(70))
SHORT = "paris france capital"


class RecordingGateway(HealthyGateway):
    """Records every call; a row's logit is ``(sum of its ids % 89) / 10``, so chunks score differently and
    every score can be recomputed from the recorded rows. Embeddings are ``[length, sum % 7, 1]``."""

    def __init__(self):
        self.calls: list[tuple[Encoded, tuple[str, ...]]] = []

    def refuse_if_busy(self, triton_model: str) -> None:
        pass

    async def infer(self, triton_model: str, encoded: Encoded, outputs: tuple[str, ...], lora_ids=None) -> dict[str, np.ndarray]:
        self.calls.append((encoded, outputs))
        sums = (encoded.input_ids.sum(axis=1) % 89).astype(np.float32)
        logits = (sums / 10)[:, None]
        lengths = encoded.lengths.astype(np.float32)
        arrays = {"logits": logits, "scores": 1 / (1 + np.exp(-logits)),
                  "embeddings": np.stack([lengths, sums % 7, np.ones_like(lengths)], axis=1)}
        return {name: arrays[name] for name in outputs}


def rows_of(encoded: Encoded) -> list[list[int]]:
    return [row[:length].tolist() for row, length in zip(encoded.input_ids, encoded.lengths)]


def activated(rows: list[list[int]]) -> list[float]:
    logits = np.array([sum(row) % 89 for row in rows], dtype=np.float32) / 10
    return (1 / (1 + np.exp(-logits))).tolist()


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from tests.support.tiny_models import byte_level_tokenizer, wordpiece_tokenizer

    return (wordpiece_tokenizer(tmp_path_factory.mktemp("wordpiece")),
            byte_level_tokenizer(tmp_path_factory.mktemp("byte_level")))


def served(name: str, task: str, tokenizer, *, token_types: bool = False, **fields) -> ServedModel:
    encoder = TextEncoder(tokenizer, max_model_len=MAX_MODEL_LEN, sends_token_types=token_types)
    return ServedModel(name=name, triton_model=name, task=task, checkpoint=f"/checkpoints/{name}", encoder=encoder,
                       id2label={}, num_labels=1 if task == "classify" else 0, created=1, **fields)


def running(monkeypatch, models: list[ServedModel]):
    return app_over(monkeypatch, models, RecordingGateway(), max_items_per_request=MAX_ITEMS,
                    max_tokens_per_request=MAX_TOKENS)


@pytest.fixture
def api(monkeypatch, tokenizers):
    wordpiece, byte_level = tokenizers
    models = [
        served("reranker", "classify", wordpiece, token_types=True),
        served("max-reranker", "classify", wordpiece, token_types=True, long_documents="max"),
        served("llm-reranker", "classify", byte_level, score_template=TEMPLATE),
        served("embedder", "embed", wordpiece),
    ]
    with running(monkeypatch, models) as client_and_gateway:
        yield client_and_gateway


def error_of(response, status: int, fragment: str) -> dict:
    body = response.json()
    assert response.status_code == status, body
    assert fragment in body["error"]["message"], body
    return body["error"]


def test_chunk_windows_cover_the_document_with_the_overlap_asked_for():
    assert chunk_windows(10, 4, 1) == [(0, 4), (3, 7), (6, 10)]
    assert chunk_windows(11, 4, 1) == [(0, 4), (3, 7), (6, 10), (7, 11)]  # the last ends the document, full size
    assert chunk_windows(4, 4, 3) == [(0, 4)]
    assert chunk_windows(3, 4, 1) == [(0, 3)]
    assert chunk_windows(6, 4, 0) == [(0, 4), (2, 6)]
    for length in range(1, 60):
        for room in range(2, 9):
            for overlap in range(room):
                windows = chunk_windows(length, room, overlap)
                assert len(windows) == chunk_count(length, room, overlap)
                assert windows[0][0] == 0 and windows[-1][1] == length
                assert all(b - a == min(room, length) for a, b in windows)
                assert all(next_start - start <= room - overlap for (start, _), (next_start, _) in zip(windows, windows[1:]))


def test_a_cross_encoder_chunk_is_the_pairs_own_ids_around_a_window_of_the_document(api, tokenizers):
    client, gateway = api
    wordpiece = tokenizers[0]
    body = client.post("/rerank", json={"model": "reranker", "query": "rain", "documents": [LONG],
                                        "long_documents": "max", "chunk_overlap_tokens": 5}).json()
    encoded, outputs = gateway.calls[0]
    assert outputs == ("scores",)
    whole = wordpiece("rain", LONG)
    doc = wordpiece(LONG, add_special_tokens=False)["input_ids"]
    query = wordpiece("rain", add_special_tokens=False)["input_ids"]
    cls, sep = wordpiece.cls_token_id, wordpiece.sep_token_id
    room = MAX_MODEL_LEN - len(query) - 3  # [CLS] q [SEP] d [SEP]
    assert len(whole["input_ids"]) == len(query) + len(doc) + 3 > MAX_MODEL_LEN
    windows = chunk_windows(len(doc), room, 5)
    assert len(windows) > 2 and all(b - a == room for a, b in windows)
    assert rows_of(encoded) == [[cls, *query, sep, *doc[a:b], sep] for a, b in windows]
    assert max(encoded.lengths) == MAX_MODEL_LEN
    assert [row[:length].tolist() for row, length in zip(encoded.token_type_ids, encoded.lengths)] == \
        [[0] * (len(query) + 2) + [1] * (b - a + 1) for a, b in windows]
    assert body["results"][0]["relevance_score"] == pytest.approx(max(activated(rows_of(encoded))), abs=1e-7)
    assert body["usage"] == {"prompt_tokens": encoded.num_tokens, "total_tokens": encoded.num_tokens}
    default = client.post("/rerank", json={"model": "reranker", "query": "rain", "documents": [LONG],
                                           "long_documents": "mean"}).json()
    mean_rows = rows_of(gateway.calls[1][0])
    assert mean_rows == [[cls, *query, sep, *doc[a:b], sep] for a, b in chunk_windows(len(doc), room, room // 4)]
    assert default["results"][0]["relevance_score"] == pytest.approx(np.mean(activated(mean_rows)), abs=1e-7)


def test_a_document_that_fits_is_sent_and_scored_exactly_as_truncate_mode_does(api):
    client, gateway = api
    for mode in ("truncate", "max", "mean"):
        for model in ("reranker", "llm-reranker"):
            client.post("/rerank", json={"model": model, "query": "rain", "documents": [SHORT, "cold"],
                                         "long_documents": mode})
    bodies = {}
    for mode in ("truncate", "max", "mean"):
        response = client.post("/score", json={"model": "embedder", "queries": "rain", "documents": [SHORT, "cold"],
                                               "long_documents": mode})
        bodies[mode] = response.json()["data"]
    sent = [call[0] for call in gateway.calls]
    truncate_cross, truncate_llm = sent[0], sent[1]
    for encoded in (sent[2], sent[4]):
        assert np.array_equal(encoded.input_ids, truncate_cross.input_ids)
        assert np.array_equal(encoded.token_type_ids, truncate_cross.token_type_ids)
    for encoded in (sent[3], sent[5]):
        assert np.array_equal(encoded.input_ids, truncate_llm.input_ids) and encoded.token_type_ids is None
    assert bodies["max"] == bodies["mean"] == bodies["truncate"]


def test_results_keep_document_order_top_n_and_usage_with_chunks(api):
    client, gateway = api
    documents = ["cold", LONG, SHORT, LONG + " rain"]
    body = client.post("/rerank", json={"model": "max-reranker", "query": "rain", "documents": documents,
                                        "top_n": 3}).json()
    encoded = gateway.calls[0][0]
    rows = rows_of(encoded)
    room = MAX_MODEL_LEN - 4
    chunks = [1, len(chunk_windows(70, room, room // 4)), 1, len(chunk_windows(71, room, room // 4))]
    assert chunks == [1, 3, 1, 4]  # the model's own default: max
    assert len(rows) == sum(chunks)
    starts = np.cumsum([0, *chunks[:-1]])
    per_document = [max(activated(rows[s:s + n])) for s, n in zip(starts, chunks)]
    expected = sorted(range(4), key=lambda i: per_document[i], reverse=True)[:3]
    assert [r["index"] for r in body["results"]] == expected
    assert [r["document"]["text"] for r in body["results"]] == [documents[i] for i in expected]
    assert [r["relevance_score"] for r in body["results"]] == pytest.approx([per_document[i] for i in expected],
                                                                            abs=1e-7)
    assert body["usage"]["prompt_tokens"] == encoded.num_tokens
    score = client.post("/score", json={"model": "max-reranker", "queries": ["rain", "cold"],
                                        "documents": [LONG, SHORT]}).json()
    assert [item["index"] for item in score["data"]] == [0, 1]
    assert score["usage"]["prompt_tokens"] == gateway.calls[1][0].num_tokens
    error_of(client.post("/rerank", json={"model": "max-reranker", "query": "rain", "documents": [LONG],
                                          "long_documents": "truncate"}), 400, "maximum context length is 32")


def test_an_llm_reranker_chunk_keeps_the_prompts_own_tokens_around_the_document(api, tokenizers):
    client, gateway = api
    byte_level = tokenizers[1]
    client.post("/rerank", json={"model": "llm-reranker", "query": "rain", "documents": [LONG],
                                 "long_documents": "mean", "chunk_overlap_tokens": 2})
    rows = rows_of(gateway.calls[0][0])
    prompt = f"Q: rain D: {LONG}!"
    whole = byte_level(prompt, return_offsets_mapping=True)
    start = len("Q: rain D: ")
    in_document = [i for i, (a, b) in enumerate(whole["offset_mapping"]) if a < start + len(LONG) and b > start]
    first, last = in_document[0], in_document[-1] + 1
    prefix, document, suffix = whole["input_ids"][:first], whole["input_ids"][first:last], whole["input_ids"][last:]
    room = MAX_MODEL_LEN - len(prefix) - len(suffix)
    windows = chunk_windows(len(document), room, 2)
    assert rows == [prefix + document[a:b] + suffix for a, b in windows] and len(rows) > 2
    assert byte_level.decode(rows[0]).startswith("Q: rain D: paris france")
    assert all(byte_level.decode(row).endswith("!") for row in rows)
    assert rows[-1] == prefix + document[windows[-1][0]:] + suffix


def test_a_bi_encoder_embeds_each_chunk_alone_and_aggregates_the_cosines(api, tokenizers):
    client, gateway = api
    wordpiece = tokenizers[0]
    body = client.post("/score", json={"model": "embedder", "queries": "rain", "documents": [LONG, "cold"],
                                       "long_documents": "max"}).json()
    (queries, _), (documents, _) = gateway.calls
    doc = wordpiece(LONG, add_special_tokens=False)["input_ids"]
    room = MAX_MODEL_LEN - 2  # [CLS] d [SEP]: the query is embedded apart
    windows = chunk_windows(len(doc), room, room // 4)
    cls, sep = wordpiece.cls_token_id, wordpiece.sep_token_id
    assert rows_of(documents) == [[cls, *doc[a:b], sep] for a, b in windows] + [wordpiece("cold")["input_ids"]]
    q = np.array([queries.lengths[0], queries.input_ids[0].sum() % 89 % 7, 1.0])
    vectors = [np.array([len(row), sum(row) % 89 % 7, 1.0]) for row in rows_of(documents)]
    cosines = [float(q @ v / (np.linalg.norm(q) * np.linalg.norm(v))) for v in vectors]
    assert [item["score"] for item in body["data"]] == pytest.approx([max(cosines[:-1]), cosines[-1]], rel=1e-5)
    assert body["usage"]["prompt_tokens"] == queries.num_tokens + documents.num_tokens


def test_bad_values_and_the_guards_are_400s_counting_the_chunks(api):
    client, gateway = api
    base = {"model": "reranker", "query": "rain", "documents": [LONG]}
    assert error_of(client.post("/rerank", json={**base, "long_documents": "first"}), 400, "long_documents")[
        "type"] == "Bad Request"
    error_of(client.post("/rerank", json={**base, "chunk_overlap_tokens": -1}), 400, "chunk_overlap_tokens")
    room = MAX_MODEL_LEN - 4
    overlap = error_of(client.post("/rerank", json={**base, "long_documents": "max", "chunk_overlap_tokens": room}),
                       400, f"chunk_overlap_tokens ({room}) must be less than the {room} tokens")
    assert overlap["param"] == "chunk_overlap_tokens" and overlap["type"] == "BadRequestError"
    # A 10-token window leaves 6 for the document: one document of 70 tokens is 14 rows, more than MAX_ITEMS
    # (refused before its rows are built: they are counted first)
    error_of(client.post("/rerank", json={**base, "long_documents": "max", "truncate_prompt_tokens": 10}), 400,
             f"The documents make 14 chunks or more (long_documents=max), more than the maximum of {MAX_ITEMS}")
    # 4 documents of 70 tokens are 280 (within MAX_TOKENS), their 12 chunks 384 with the query and specials
    error_of(client.post("/rerank", json={**base, "documents": [LONG] * 4, "long_documents": "max"}), 400,
             f"The request holds 384 tokens, more than the maximum of {MAX_TOKENS}")
    error_of(client.post("/rerank", json={**base, "query": LONG, "documents": ["cold"], "long_documents": "max"}),
             400, "no room is left for a chunk of document 0")
    error_of(client.post("/rerank", json={**base, "documents": ["rain " * 30_000], "long_documents": "max"}), 400,
             "ADAPTER_MAX_TOKENS_PER_REQUEST")
    assert gateway.calls == []


def test_truncate_prompt_tokens_sets_the_window_each_chunk_fits(api):
    client, gateway = api
    client.post("/rerank", json={"model": "reranker", "query": "rain", "documents": [LONG], "long_documents": "max",
                                 "truncate_prompt_tokens": 20})
    assert max(gateway.calls[0][0].lengths) == 20


def test_sglang_rerank_chunks_below_its_context_length_and_counts_each_documents_tokens(api):
    client, gateway = api
    body = client.post("/sglang/v1/rerank", json={"model": "reranker", "query": "rain", "documents": [LONG, "cold"],
                                                  "long_documents": "mean"}).json()
    encoded, outputs = gateway.calls[0]
    assert outputs == ("logits",) and max(encoded.lengths) == MAX_MODEL_LEN - 1  # SGLang refuses N >= length
    by_index = {item["index"]: item for item in body}
    assert by_index[0]["meta_info"]["prompt_tokens"] == int(encoded.lengths[:-1].sum())
    assert by_index[1]["meta_info"]["prompt_tokens"] == int(encoded.lengths[-1])
    logits = (encoded.input_ids.sum(axis=1) % 89).astype(np.float32) / 10
    assert by_index[0]["score"] == pytest.approx(float(logits[:-1].astype(np.float64).mean()), abs=1e-7)


def test_the_model_parameter_is_checked_and_carried_by_the_card():
    assert ModelParameters.from_mapping({}).long_documents == "truncate"
    assert ModelParameters.from_mapping({"long_documents": "mean"}).long_documents == "mean"
    with pytest.raises(ValueError, match="long_documents parameter 'first' is not one of truncate, max, mean"):
        ModelParameters.from_mapping({"long_documents": "first"})
    card = ModelCard(served_name="m", family="", task="classify", architecture="A", max_model_len=8, num_labels=1,
                     long_documents="max")
    assert ModelCard.from_json(card.to_json()).long_documents == "max"
    old = {key: value for key, value in card.__dict__.items() if key != "long_documents"}
    assert ModelCard(**old).long_documents == "truncate"  # a card written before the parameter existed


def test_chunks_are_counted_without_being_cut():
    from poolserve_adapter.base.scoring import chunk_count, chunk_windows

    for length in range(1, 60):
        for room in range(1, 12):
            for overlap in range(room):
                assert chunk_count(length, room, overlap) == len(chunk_windows(length, room, overlap))


def test_a_vision_model_s_default_does_not_chunk_but_a_request_that_asks_is_refused():
    from types import SimpleNamespace

    from poolserve_adapter.base.scoring import long_documents

    vision = SimpleNamespace(vision=object(), long_documents="max")
    text = SimpleNamespace(vision=None, long_documents="max")
    silent = SimpleNamespace(long_documents=None, chunk_overlap_tokens=None)
    asking = SimpleNamespace(long_documents="mean", chunk_overlap_tokens=3)
    assert long_documents(silent, vision).mode == "truncate" and long_documents(silent, text).mode == "max"
    assert long_documents(asking, vision).mode == "mean"  # refused when its pairs are encoded
