"""Long documents by chunks (``long_documents``) against the real stack: the tiny XLM-R cross-encoder
(``xlm_roberta_classifier``, max_model_len 128) behind tritonserver and the adapter.

Parity: the score of a document cut into chunks is the max / mean of the scores of its chunks' pairs,
each built here from the checkpoint's own tokenizer by the documented layout (``<s> q </s></s>``
around a window of the document's ids, then ``</s>``) and scored one by one through ``/classify``
as token ids; a document that fits scores as in truncate mode.
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from transformers import AutoTokenizer

from tests.support.tiny_models import WORDS

pytestmark = pytest.mark.integration

MODEL = "xlm_roberta_classifier"
QUERY = "capital of france"
LONG = " ".join(WORDS[(7 * i) % len(WORDS)] for i in range(160))  # several windows of the model
SHORT = ["paris france capital", "cold winter snow"]


def post(url: str, path: str, body: dict) -> dict:
    response = httpx.post(f"{url}{path}", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def chunk_pairs(checkpoint, max_model_len: int, overlap: int | None) -> list[list[int]]:
    """The pairs of LONG's chunks, by the documented layout, from the tokenizer's whole pair encoding."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    whole = tokenizer(QUERY, LONG)
    ids, owners = whole["input_ids"], whole.sequence_ids()
    start = owners.index(1)
    end = len(owners) - owners[::-1].index(1)
    room = max_model_len - (len(ids) - (end - start))
    overlap = room // 4 if overlap is None else overlap
    length, pairs, first = end - start, [], 0
    while first + room < length:  # full windows, each ``room - overlap`` after the one before
        pairs.append(ids[:start] + ids[start + first:start + first + room] + ids[end:])
        first += room - overlap
    last_first = max(0, length - room)  # the last ends at the document's end, at full size
    pairs.append(ids[:start] + ids[start + last_first:end] + ids[end:])
    return pairs


@pytest.mark.parametrize(("mode", "overlap"), [("max", None), ("mean", 9)])
def test_a_chunked_score_is_the_aggregate_of_its_chunks_scored_one_by_one(adapter_url, tiny_checkpoints, mode,
                                                                          overlap):
    max_model_len = httpx.get(f"{adapter_url}/v1/models/{MODEL}", timeout=30).json()["max_model_len"]
    pairs = chunk_pairs(tiny_checkpoints[MODEL], max_model_len, overlap)
    assert len(pairs) >= 3 and max(map(len, pairs)) == max_model_len
    body = {"model": MODEL, "query": QUERY, "documents": [SHORT[0], LONG, SHORT[1]], "long_documents": mode}
    if overlap is not None:
        body["chunk_overlap_tokens"] = overlap
    reranked = post(adapter_url, "/rerank", body)
    one_by_one = post(adapter_url, "/classify", {"model": MODEL, "input": pairs})
    chunk_scores = [row["probs"][0] for row in one_by_one["data"]]
    expected = max(chunk_scores) if mode == "max" else float(np.mean(chunk_scores))
    by_index = {result["index"]: result["relevance_score"] for result in reranked["results"]}
    assert by_index[1] == pytest.approx(expected, abs=1e-6)

    truncated = post(adapter_url, "/rerank", {"model": MODEL, "query": QUERY, "documents": SHORT})
    short_scores = {result["index"]: result["relevance_score"] for result in truncated["results"]}
    assert [by_index[0], by_index[2]] == pytest.approx([short_scores[0], short_scores[1]], abs=1e-6)
    assert [result["index"] for result in reranked["results"]] == sorted(by_index, key=by_index.get, reverse=True)
    assert reranked["usage"]["prompt_tokens"] == sum(map(len, pairs)) + truncated["usage"]["prompt_tokens"]


def test_score_chunks_too_and_truncate_mode_still_refuses_the_long_pair(adapter_url):
    chunked = post(adapter_url, "/score", {"model": MODEL, "queries": QUERY, "documents": [LONG, SHORT[0]],
                                           "long_documents": "max"})
    reranked = post(adapter_url, "/rerank", {"model": MODEL, "query": QUERY, "documents": [LONG, SHORT[0]],
                                             "long_documents": "max"})
    by_index = {result["index"]: result["relevance_score"] for result in reranked["results"]}
    assert [item["score"] for item in chunked["data"]] == pytest.approx([by_index[0], by_index[1]], abs=1e-6)
    refused = httpx.post(f"{adapter_url}/score", json={"model": MODEL, "queries": QUERY, "documents": [LONG]},
                         timeout=60)
    assert refused.status_code == 400 and "maximum context length" in refused.json()["error"]["message"]
