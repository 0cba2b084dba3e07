"""The embedding routes (``/v1/embeddings``, Cohere's ``/v2/embed``, SGLang's ``/encode``, ``/pooling`` with
an embedding model) through the real app, with real tokenizers (tests/support/tiny_models.py) and a fake
Triton gateway that answers ``pooled`` and ``embeddings`` computed from the token ids it is sent.

What these pin: every request field and its default, vLLM's, Cohere's and SGLang's error messages and
their order, which Triton output a request reads (``pooled`` only when normalisation is turned off on a
normalising model), Matryoshka truncation then renormalisation, the base64 / bytes encodings (decoded
back here), Cohere's bit packing, and the OpenAI and Cohere SDKs reading our answers.
tests/integration/test_embeddings_clients.py checks the same against the real model.
"""

from __future__ import annotations

import base64
import json

import cohere
import numpy as np
import openai
import pytest
import torch

from poolserve_adapter.base.embedding import float8_bits
from poolserve_adapter.registry import ServedModel
from poolserve_adapter.tokenization import Encoded, TextEncoder
from tests.support.fake_triton import HealthyGateway, app_over

MAX_MODEL_LEN = 32
WIDTH = 16
TEXT = "paris is the capital of france"
TEXTS = ["paris france capital", "good movie", "cold winter snow"]


def pooled_rows(encoded: Encoded) -> np.ndarray:
    """The fake model's pooled vector of each row: a function of its ids, with both signs."""
    sums = encoded.input_ids.sum(axis=1).astype(np.float32)
    lengths = encoded.lengths.astype(np.float32)
    return (np.cos(sums[:, None] * 0.37 + np.arange(WIDTH, dtype=np.float32)) * (1 + lengths[:, None] / 10)).astype(
        np.float32)


def normalised(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


class EmbeddingGateway(HealthyGateway):
    """Stands in for TritonGateway: records each call; ``pooled`` is :func:`pooled_rows`, ``embeddings`` the
    same normalised when the model normalises; a classifier's ``scores`` / ``logits`` are three values."""

    def __init__(self, normalizing: dict[str, bool]):
        self.normalizing = normalizing  # triton model → its `embeddings` are normalised
        self.calls: list[tuple[str, Encoded, tuple[str, ...]]] = []

    def refuse_if_busy(self, triton_model: str) -> None:
        pass

    def leave_admission_board(self) -> None:
        pass

    async def infer(self, triton_model: str, encoded: Encoded, outputs: tuple[str, ...], lora_ids=None) -> dict[str, np.ndarray]:
        self.calls.append((triton_model, encoded, outputs))
        pooled = pooled_rows(encoded)
        logits = np.tile(encoded.lengths.astype(np.float32)[:, None] / 10, (1, 3))
        arrays = {"pooled": pooled, "embeddings": normalised(pooled) if self.normalizing[triton_model] else pooled,
                  "logits": logits, "scores": 1 / (1 + np.exp(-logits))}
        return {name: arrays[name] for name in outputs}


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from tests.support.tiny_models import CHATML_TEMPLATE, byte_level_tokenizer, wordpiece_tokenizer

    byte_level = byte_level_tokenizer(tmp_path_factory.mktemp("byte_level"))
    byte_level.chat_template = CHATML_TEMPLATE
    return wordpiece_tokenizer(tmp_path_factory.mktemp("wordpiece")), byte_level


def served(name: str, tokenizer, task: str = "embed", **fields) -> ServedModel:
    encoder = TextEncoder(tokenizer, max_model_len=MAX_MODEL_LEN, sends_token_types=False)
    return ServedModel(name=name, triton_model=f"{name}_triton", task=task, checkpoint=f"/checkpoints/{name}",
                       encoder=encoder, id2label={}, num_labels=3 if task == "classify" else 0, created=1,
                       embedding_size=WIDTH if task == "embed" else 0, **fields)


@pytest.fixture
def api(monkeypatch, tokenizers):
    wordpiece, byte_level = tokenizers
    models = [
        served("minilm", wordpiece, normalizes=True),
        served("sentiment", wordpiece, task="classify"),
        served("matryoshka", wordpiece, normalizes=True, is_matryoshka=True, matryoshka_dimensions=(8, 16)),
        served("any-size", wordpiece, normalizes=True, is_matryoshka=True),
        served("raw", wordpiece, prompts={"query": "query: ", "document": "passage: "}),
        served("chat-embedder", byte_level, normalizes=True),
    ]
    gateway = EmbeddingGateway({model.triton_model: model.normalizes for model in models})
    with app_over(monkeypatch, models, gateway, max_items_per_request=8, max_tokens_per_request=400) as running:
        yield running


def vllm_error(response, status: int, error_type: str, message: str = "", param: str | None = "any") -> dict:
    body = response.json()
    assert response.status_code == status, body
    assert list(body) == ["error"] and body["error"]["type"] == error_type and body["error"]["code"] == status
    assert message in body["error"]["message"], body
    if param != "any":
        assert body["error"]["param"] == param, body
    return body["error"]


def sent(gateway, call: int = -1) -> tuple[Encoded, tuple[str, ...]]:
    return gateway.calls[call][1], gateway.calls[call][2]


def embed(client, **body):
    return client.post("/v1/embeddings", json={"model": "minilm", **body})


# --- /v1/embeddings: the response ---------------------------------------------------------------------


def test_float_response_is_vllms_shape_with_the_normalised_vectors(api):
    client, gateway = api
    response = client.post("/v1/embeddings", json={"model": "minilm", "input": TEXTS},
                           headers={"x-request-id": "abc"})
    body = response.json()
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    assert list(body) == ["id", "object", "created", "model", "data", "usage"]
    assert (body["id"], body["object"], body["model"]) == ("embd-abc", "list", "minilm")
    encoded, outputs = sent(gateway)
    assert outputs == ("embeddings",)
    assert [list(item) for item in body["data"]] == [["index", "object", "embedding"]] * 3
    assert [item["index"] for item in body["data"]] == [0, 1, 2] and body["data"][0]["object"] == "embedding"
    np.testing.assert_allclose([item["embedding"] for item in body["data"]], normalised(pooled_rows(encoded)),
                               rtol=1e-6, atol=1e-7)
    tokens = encoded.num_tokens
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0,
                             "completion_tokens_details": None}
    # float32 digits, as vLLM's orjson writes a float32 array (not the float64 expansion of each value)
    assert all(repr(value) == str(np.float32(value)) for value in body["data"][0]["embedding"])


@pytest.mark.parametrize("value, prompts", [
    (TEXT, 1), (TEXTS, 3), ([5, 6, 7], 1), ([[5, 6], [7, 8, 9]], 2),
])
def test_input_forms(api, value, prompts):
    client, gateway = api
    body = embed(client, input=value).json()
    assert len(body["data"]) == prompts and sent(gateway)[0].num_sequences == prompts
    if isinstance(value, list) and isinstance(value[0], list):
        assert sent(gateway)[0].lengths.tolist() == [2, 3]


def test_empty_input_and_wrong_types(api):
    client, gateway = api
    vllm_error(embed(client, input=[]), 400, "BadRequestError", "You must pass at least one prompt")
    vllm_error(client.post("/v1/embeddings", json={"model": "minilm"}), 400, "Bad Request", "Field required")
    vllm_error(embed(client, input=3), 400, "Bad Request", param="body.input")
    assert gateway.calls == []


def test_truncation_special_tokens_user_and_unknown_fields(api, tokenizers):
    client, gateway = api
    full = tokenizers[0](TEXT)["input_ids"]
    embed(client, input=TEXT, truncate_prompt_tokens=3, truncation_side="right", user="u", anything={"x": 1})
    assert sent(gateway)[0].input_ids[0].tolist() == full[:3]
    embed(client, input=TEXT, add_special_tokens=False)
    assert sent(gateway)[0].input_ids[0].tolist() == full[1:-1]
    vllm_error(embed(client, input=TEXT, truncate_prompt_tokens=MAX_MODEL_LEN + 1), 400, "BadRequestError",
               "truncate_prompt_tokens value is greater than max_model_len")
    vllm_error(embed(client, input=[5] * (MAX_MODEL_LEN + 1)), 400, "BadRequestError",
               f"maximum context length is {MAX_MODEL_LEN} tokens")


def test_normalize_is_refused_as_vllm_removed_it(api):
    client, gateway = api
    vllm_error(embed(client, input=TEXT, normalize=True), 400, "Bad Request",
               "Parameter `normalize` was removed; use `use_activation` instead.")
    assert gateway.calls == []


def test_a_model_that_does_not_embed_is_a_400_saying_so_and_an_unknown_one_is_a_404(api):
    client, gateway = api
    vllm_error(embed(client, model="sentiment", input=TEXT), 400, "BadRequestError",
               "Embedding API is not supported by this model. Model `sentiment` is a classifier with 3 labels; it "
               "serves /classify, /pooling.", param=None)
    vllm_error(embed(client, model="nope", input=TEXT), 404, "NotFoundError", "The model `nope` does not exist.")
    assert client.post("/v1/embeddings", json={"input": TEXT}).json()["model"] == "minilm"  # the first embedder
    assert [call[0] for call in gateway.calls] == ["minilm_triton"]


# --- use_activation ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("model, use_activation, output, normalise", [
    ("minilm", None, "embeddings", True),
    ("minilm", True, "embeddings", True),
    ("minilm", False, "pooled", False),  # only here is `pooled` read
    ("raw", None, "embeddings", False),
    ("raw", False, "embeddings", False),
    ("raw", True, "embeddings", True),  # normalised by the adapter
])
def test_use_activation_turns_normalisation_on_or_off(api, model, use_activation, output, normalise):
    client, gateway = api
    body = embed(client, model=model, input=TEXTS, use_activation=use_activation).json()
    encoded, outputs = sent(gateway)
    assert outputs == (output,)
    expected = normalised(pooled_rows(encoded)) if normalise else pooled_rows(encoded)
    np.testing.assert_allclose([item["embedding"] for item in body["data"]], expected, rtol=1e-6, atol=1e-7)


# --- dimensions (Matryoshka) ----------------------------------------------------------------------------


def test_dimensions_truncate_then_normalise_again(api):
    client, gateway = api
    body = embed(client, model="matryoshka", input=TEXTS, dimensions=8).json()
    encoded, outputs = sent(gateway)
    vectors = np.array([item["embedding"] for item in body["data"]])
    assert outputs == ("embeddings",) and vectors.shape == (3, 8)
    np.testing.assert_allclose(vectors, normalised(pooled_rows(encoded)[:, :8]), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, rtol=1e-6)
    raw = embed(client, model="matryoshka", input=TEXTS, dimensions=8, use_activation=False).json()
    assert sent(gateway)[1] == ("pooled",)
    np.testing.assert_allclose([item["embedding"] for item in raw["data"]], pooled_rows(encoded)[:, :8], rtol=1e-6)
    assert len(embed(client, model="any-size", input=TEXT, dimensions=5).json()["data"][0]["embedding"]) == 5


@pytest.mark.parametrize("model, dimensions, message", [
    ("minilm", 8, "Model 'minilm' does not support Matryoshka embeddings; dimensions must be unset "
                  "(received dimensions=8)."),
    ("minilm", 0, "Model 'minilm' does not support Matryoshka embeddings; dimensions must be unset "
                  "(received dimensions=0)."),
    ("matryoshka", 0, f"Model 'matryoshka' only supports dimensions in range [1, {WIDTH}], got 0."),
    ("any-size", WIDTH + 1, f"Model 'any-size' only supports dimensions in range [1, {WIDTH}], got {WIDTH + 1}."),
    ("matryoshka", 12, "Model 'matryoshka' only supports Matryoshka dimensions [8, 16], got 12."),
])
def test_dimensions_errors_are_vllms(api, model, dimensions, message):
    client, gateway = api
    error = vllm_error(embed(client, model=model, input=TEXT, dimensions=dimensions), 400, "BadRequestError")
    assert (error["message"], error["param"]) == (message, None)
    assert gateway.calls == []


def test_a_length_error_comes_before_a_dimensions_error(api):
    client, _ = api
    vllm_error(embed(client, input=[5] * (MAX_MODEL_LEN + 1), dimensions=8), 400, "BadRequestError",
               "maximum context length")


# --- encodings ----------------------------------------------------------------------------------------


def float_vectors(client, **body) -> np.ndarray:
    return np.array([item["embedding"] for item in embed(client, **body).json()["data"]], dtype=np.float32)


@pytest.mark.parametrize("embed_dtype, endianness, numpy_dtype", [
    ("float32", None, "=f4"), ("float32", "little", "<f4"), ("float32", "big", ">f4"),
    ("float16", "big", ">f2"), ("float16", "native", "=f2"),
])
def test_base64_round_trips(api, embed_dtype, endianness, numpy_dtype):
    client, _ = api
    expected = float_vectors(client, input=TEXTS)
    options = {"embed_dtype": embed_dtype} | ({"endianness": endianness} if endianness else {})
    body = embed(client, input=TEXTS, encoding_format="base64", **options).json()
    decoded = np.array([np.frombuffer(base64.b64decode(item["embedding"]), numpy_dtype) for item in body["data"]])
    np.testing.assert_array_equal(decoded, expected.astype(numpy_dtype))


def test_bfloat16_is_torchs_rounding(api):
    client, _ = api
    expected = torch.from_numpy(float_vectors(client, input=TEXTS)).to(torch.bfloat16)
    for endianness, order in (("little", "<u2"), ("big", ">u2")):
        body = embed(client, input=TEXTS, encoding_format="base64", embed_dtype="bfloat16",
                     endianness=endianness).json()
        bits = np.array([np.frombuffer(base64.b64decode(item["embedding"]), order) for item in body["data"]])
        decoded = torch.from_numpy(bits.astype(np.int32).astype(np.int16)).view(torch.bfloat16)
        assert torch.equal(decoded, expected)


FLOAT8 = [("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)]


def torch_float8_bits(values: np.ndarray, torch_dtype: torch.dtype) -> np.ndarray:
    """vLLM's cast (``tensor2binary``): torch's ``.to`` the float8 type, viewed as its bytes."""
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(torch_dtype).view(torch.uint8).numpy()


def float8_edge_values(torch_dtype: torch.dtype) -> np.ndarray:
    """Every finite float8 value (subnormals and ±max among them), every midpoint between neighbours (the ties
    that round to even, the half of the smallest subnormal too), values beyond the largest up to float32's
    largest, infinities and NaNs; each with the float32 just either side of it, and negated."""
    finite = torch.arange(256, dtype=torch.uint8).view(torch_dtype).float().numpy()
    finite = np.unique(finite[np.isfinite(finite)])
    midpoints = (finite[:-1] + finite[1:]) / 2
    beyond = finite[-1] * np.array([1.01, 1.0625, 1.125, 1.5, 2, 1e3, 1e30], dtype=np.float32)
    special = np.array([np.inf, np.nan, np.finfo(np.float32).max, np.finfo(np.float32).smallest_subnormal],
                       dtype=np.float32)
    values = np.concatenate([finite, midpoints, beyond, special]).astype(np.float32)
    with np.errstate(over="ignore"):  # float32's largest, stepped up, is infinity: meant
        values = np.concatenate([values, np.nextafter(values, np.float32(np.inf)),
                                 np.nextafter(values, np.float32(-np.inf))])
    return np.concatenate([values, -values])


@pytest.mark.parametrize("embed_dtype, torch_dtype", FLOAT8)
def test_float8_cast_is_torchs_bit_for_bit(embed_dtype, torch_dtype):
    """Round to nearest even, subnormals, e4m3fn saturating to ±448 (infinities too), e5m2 overflowing to ±inf,
    NaN as 0x7F with its sign: on every edge, random values at many scales and random float32 bit patterns."""
    rng = np.random.default_rng(25)
    scales = np.float32(10.0) ** rng.integers(-8, 7, 200_000).astype(np.float32)
    values = np.concatenate([float8_edge_values(torch_dtype), rng.standard_normal(200_000).astype(np.float32) * scales,
                             rng.integers(0, 2 ** 32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)])
    np.testing.assert_array_equal(float8_bits(values, embed_dtype), torch_float8_bits(values, torch_dtype))


@pytest.mark.parametrize("embed_dtype, torch_dtype", FLOAT8)
def test_float8_base64_and_bytes_are_one_byte_a_value_in_any_byte_order(api, embed_dtype, torch_dtype):
    """vLLM views the cast as uint8, so its byte swap for a non-native order changes nothing."""
    client, _ = api
    expected = torch_float8_bits(float_vectors(client, input=TEXTS), torch_dtype)
    assert np.count_nonzero(expected) > WIDTH  # the vectors are not all zeros in float8
    for endianness in ("native", "little", "big"):
        body = embed(client, input=TEXTS, encoding_format="base64", embed_dtype=embed_dtype,
                     endianness=endianness).json()
        np.testing.assert_array_equal([np.frombuffer(base64.b64decode(item["embedding"]), np.uint8)
                                       for item in body["data"]], expected)
    response = embed(client, input=TEXTS, encoding_format="bytes", embed_dtype=embed_dtype, endianness="big")
    metadata = json.loads(response.headers["metadata"])
    assert metadata["data"] == [{"index": i, "embed_dtype": embed_dtype, "endianness": "big", "start": i * WIDTH,
                                 "end": (i + 1) * WIDTH, "shape": [WIDTH]} for i in range(3)]
    assert response.content == expected.tobytes()
    only = embed(client, input=TEXTS, encoding_format="bytes_only", embed_dtype=embed_dtype, endianness="little")
    assert "metadata" not in only.headers and only.content == expected.tobytes()
    pooling = client.post("/pooling", json={"model": "minilm", "input": TEXTS, "encoding_format": "base64",
                                            "embed_dtype": embed_dtype}).json()
    assert [base64.b64decode(item["data"]) for item in pooling["data"]] == [row.tobytes() for row in expected]


def test_bytes_body_with_metadata_and_bytes_only(api):
    client, gateway = api
    expected = float_vectors(client, input=TEXTS)
    response = client.post("/v1/embeddings", json={"model": "minilm", "input": TEXTS, "encoding_format": "bytes",
                                                   "embed_dtype": "float16", "endianness": "big"},
                           headers={"x-request-id": "r7"})
    assert response.status_code == 200 and response.headers["content-type"] == "application/octet-stream"
    metadata = json.loads(response.headers["metadata"])
    tokens = sent(gateway)[0].num_tokens
    assert (metadata["id"], metadata["model"], metadata["usage"]) == (
        "embd-r7", "minilm", {"prompt_tokens": tokens, "total_tokens": tokens})
    assert isinstance(metadata["created"], int)
    assert metadata["data"] == [{"index": i, "embed_dtype": "float16", "endianness": "big", "start": i * 2 * WIDTH,
                                 "end": (i + 1) * 2 * WIDTH, "shape": [WIDTH]} for i in range(3)]
    decoded = [np.frombuffer(response.content[item["start"]:item["end"]], ">f2") for item in metadata["data"]]
    np.testing.assert_array_equal(decoded, expected.astype(">f2"))
    only = embed(client, input=TEXTS, encoding_format="bytes_only")
    assert "metadata" not in only.headers
    np.testing.assert_array_equal(np.frombuffer(only.content, "=f4").reshape(3, WIDTH), expected)


def test_bytes_metadata_header_carries_any_request_id(api):
    """The id echoes the body's request_id, which may hold any Unicode; a header is latin-1, so the JSON in it
    escapes what it cannot carry (the schema fuzz once got a 500 here)."""
    client, _ = api
    request_id = "\u00baA\U00075ccc\u0014\u00eb"
    response = embed(client, input=TEXTS[0], encoding_format="bytes", request_id=request_id)
    assert response.status_code == 200, response.text
    assert response.headers["metadata"].isascii()
    assert json.loads(response.headers["metadata"])["id"] == f"embd-{request_id}"


@pytest.mark.parametrize("field, value", [
    ("encoding_format", "hex"), ("embed_dtype", "fp8_e4m3fn"), ("embed_dtype", "int8"), ("endianness", "middle"),
])
def test_out_of_range_formats_are_validation_errors(api, field, value):
    client, gateway = api
    vllm_error(embed(client, input=TEXT, **{field: value}), 400, "Bad Request", "literal_error", param=f"body.{field}")
    assert gateway.calls == []


# --- the chat form --------------------------------------------------------------------------------------


def test_one_conversation_is_one_vector(api, tokenizers):
    client, gateway = api
    messages = [{"role": "user", "content": "paris"}, {"role": "assistant", "content": "france"}]
    body = embed(client, model="chat-embedder", messages=messages).json()
    prompt = tokenizers[1].apply_chat_template(messages, tokenize=False)
    assert len(body["data"]) == 1
    assert sent(gateway)[0].input_ids[0].tolist() == tokenizers[1](prompt, add_special_tokens=False)["input_ids"]
    vllm_error(embed(client, messages=messages), 400, "BadRequestError", "default chat template is no longer allowed")


@pytest.mark.parametrize("body", [
    {"messages": [[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]]},
    {"input": [{"role": "user", "content": "a"}]},
    {"input": [[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]]},
])
def test_several_conversations_are_refused_clearly(api, body):
    client, gateway = api
    vllm_error(embed(client, model="chat-embedder", **body), 400, "Bad Request",
               "Chat-form embedding requests with several conversations")
    assert gateway.calls == []


# --- the OpenAI SDK -----------------------------------------------------------------------------------


def test_openai_sdk_default_base64_equals_the_float_path(api):
    client, _ = api
    sdk = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client)
    result = sdk.embeddings.create(model="minilm", input=TEXTS)  # the SDK asks for base64 and decodes it
    np.testing.assert_array_equal([item.embedding for item in result.data], float_vectors(client, input=TEXTS))
    assert result.model == "minilm" and result.usage.prompt_tokens == result.usage.total_tokens > 0
    floats = sdk.embeddings.create(model="matryoshka", input="paris", dimensions=8, encoding_format="float")
    assert len(floats.data[0].embedding) == 8
    with pytest.raises(openai.BadRequestError, match="Embedding API is not supported by this model"):
        sdk.embeddings.create(model="sentiment", input="paris")


# --- Cohere /v2/embed -------------------------------------------------------------------------------------


def cohere_embed(client, **body):
    return client.post("/v2/embed", json={"model": "raw", **body})


def test_cohere_response_shape_and_every_embedding_type(api):
    client, gateway = api
    response = client.post("/v2/embed", json={"model": "minilm", "texts": TEXTS,
                                              "embedding_types": ["base64", "ubinary", "float", "binary"]},
                           headers={"x-request-id": "c1"})
    body = response.json()
    assert response.status_code == 200
    assert list(body) == ["id", "embeddings", "texts", "meta", "response_type"]
    assert (body["id"], body["texts"], body["response_type"]) == ("embd-c1", TEXTS, "embeddings_by_type")
    encoded, outputs = sent(gateway)
    assert outputs == ("embeddings",)
    assert body["meta"] == {"api_version": {"version": "2"},
                            "billed_units": {"input_tokens": encoded.num_tokens, "image_tokens": 0}}
    assert list(body["embeddings"]) == ["float", "binary", "ubinary", "base64"]
    floats = np.array(body["embeddings"]["float"], dtype=np.float32)
    np.testing.assert_allclose(floats, normalised(pooled_rows(encoded)), rtol=1e-6, atol=1e-7)
    bits = [[int("".join("1" if value >= 0 else "0" for value in row[k:k + 8]), 2) for k in range(0, WIDTH, 8)]
            for row in floats]
    assert body["embeddings"]["ubinary"] == bits
    assert body["embeddings"]["binary"] == [[byte - 128 for byte in row] for row in bits]
    decoded = [np.frombuffer(base64.b64decode(text), "<f4") for text in body["embeddings"]["base64"]]
    np.testing.assert_array_equal(decoded, floats)
    assert list(cohere_embed(client, texts=TEXTS).json()["embeddings"]) == ["float"]  # the default


def test_cohere_input_type_puts_the_models_prompt_first(api, tokenizers):
    client, gateway = api
    cohere_embed(client, texts=["paris"], input_type="query")
    assert sent(gateway)[0].input_ids[0].tolist() == tokenizers[0]("query: paris")["input_ids"]
    cohere_embed(client, texts=["paris"])
    assert sent(gateway)[0].input_ids[0].tolist() == tokenizers[0]("paris")["input_ids"]
    error = vllm_error(cohere_embed(client, texts=["paris"], input_type="search_query"), 400, "BadRequestError")
    assert error["message"] == "Unsupported input_type 'search_query'. Supported values: document, query"
    error = vllm_error(client.post("/v2/embed", json={"model": "minilm", "texts": ["x"], "input_type": "query"}),
                       400, "BadRequestError")
    assert error["message"] == ("Unsupported input_type 'query'. This model does not define any input_type task "
                                "instructions.")
    assert len(gateway.calls) == 2


def test_cohere_truncate_and_max_tokens(api, tokenizers):
    client, gateway = api
    full = tokenizers[0](TEXT)["input_ids"]
    cohere_embed(client, texts=[TEXT], max_tokens=4)  # END: the first tokens, the tokenizer's own way
    assert sent(gateway)[0].input_ids[0].tolist() == full[:3] + full[-1:]
    cohere_embed(client, texts=[TEXT], truncate="START", max_tokens=4)
    assert sent(gateway)[0].input_ids[0].tolist() == full[-4:]
    cohere_embed(client, texts=[TEXT], truncate="NONE", max_tokens=len(full))
    assert sent(gateway)[0].input_ids[0].tolist() == full
    error = vllm_error(cohere_embed(client, texts=["a", TEXT], truncate="NONE", max_tokens=4), 400, "BadRequestError")
    assert error["message"] == (f"Input of {len(full)} tokens exceeds max_tokens=4 with truncate=NONE. Set "
                                "truncate to END or START to allow truncation.")
    long_text = " ".join(["paris"] * MAX_MODEL_LEN)
    vllm_error(cohere_embed(client, texts=[long_text], truncate="NONE"), 400, "BadRequestError",
               f"maximum context length is {MAX_MODEL_LEN} tokens")
    assert sent(gateway)[0].num_tokens <= MAX_MODEL_LEN  # the last call: END truncated it
    cohere_embed(client, texts=[long_text])
    assert sent(gateway)[0].num_tokens == MAX_MODEL_LEN


@pytest.mark.parametrize("body, message", [
    ({}, "Exactly one of texts, images, or inputs must be provided, and it must be non-empty"),
    ({"texts": []}, "Exactly one of texts, images, or inputs must be provided"),
    ({"texts": ["a"], "images": ["data:image/png;base64,AA=="]}, "Exactly one of texts, images, or inputs"),
    ({"texts": ["a"], "embedding_types": ["int8"]}, "literal_error"),
    ({"texts": ["a"], "truncate": "MIDDLE"}, "literal_error"),
    ({"inputs": [{"content": [{"type": "text"}]}]}, "CohereEmbedContent with type='text' requires text"),
    ({"inputs": [{"content": [{"type": "image_url", "image_url": {}}]}]},
     "CohereEmbedContent with type='image_url' requires image_url.url"),
])
def test_cohere_validation_errors(api, body, message):
    client, gateway = api
    vllm_error(cohere_embed(client, **body), 400, "Bad Request", message)
    assert gateway.calls == []


def test_cohere_images_are_refused_and_text_inputs_are_embedded(api, tokenizers):
    client, gateway = api
    for body in ({"images": ["data:image/png;base64,AA=="]},
                 {"inputs": [{"content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]}]}):
        vllm_error(cohere_embed(client, **body), 400, "BadRequestError", "Image inputs are not supported on /v2/embed")
    answer = cohere_embed(client, inputs=[{"content": [{"type": "text", "text": "paris"},
                                                       {"type": "text", "text": "france"}]}]).json()
    assert "texts" not in answer and len(answer["embeddings"]["float"]) == 1
    assert sent(gateway)[0].input_ids[0].tolist() == tokenizers[0]("paris\nfrance")["input_ids"]


def test_cohere_output_dimension_and_binary_width(api):
    client, gateway = api
    body = client.post("/v2/embed", json={"model": "matryoshka", "texts": TEXTS, "output_dimension": 8,
                                          "embedding_types": ["float", "ubinary"]}).json()
    floats = np.array(body["embeddings"]["float"])
    assert floats.shape == (3, 8) and len(body["embeddings"]["ubinary"][0]) == 1
    np.testing.assert_allclose(floats, normalised(pooled_rows(sent(gateway)[0])[:, :8]), rtol=1e-6, atol=1e-7)
    error = vllm_error(client.post("/v2/embed", json={"model": "any-size", "texts": TEXTS, "output_dimension": 5,
                                                      "embedding_types": ["binary"]}), 400, "BadRequestError")
    assert error["message"] == "Embedding dimension must be a multiple of 8 for binary embedding types, but got 5."
    vllm_error(cohere_embed(client, texts=TEXTS, output_dimension=8), 400, "BadRequestError",
               "Model 'raw' does not support Matryoshka embeddings")
    vllm_error(client.post("/v2/embed", json={"model": "sentiment", "texts": TEXTS}), 400, "BadRequestError",
               "Embedding API is not supported by this model. Model `sentiment` is a classifier")


@pytest.mark.filterwarnings("ignore:You should not use the 'timeout' argument with the TestClient")
def test_cohere_sdk_reads_the_answer_and_surfaces_the_400(api):
    client, _ = api
    sdk = cohere.ClientV2(base_url="http://testserver", api_key="unused", httpx_client=client)
    result = sdk.embed(model="raw", texts=TEXTS, input_type="document", embedding_types=["float", "binary"])
    assert len(result.embeddings.float_) == 3 and len(result.embeddings.binary[0]) == WIDTH // 8
    assert result.meta.billed_units.input_tokens > 0 and result.texts == TEXTS
    with pytest.raises(cohere.BadRequestError) as refused:
        sdk.embed(model="minilm", texts=TEXTS, input_type="search_query", embedding_types=["float"])
    assert "Unsupported input_type 'search_query'" in refused.value.body["error"]["message"]


# --- /pooling with an embedding model ------------------------------------------------------------------


def test_pooling_embed_bytes_activation_and_dimensions(api):
    client, gateway = api
    floats = client.post("/pooling", json={"model": "minilm", "input": TEXTS}).json()
    encoded, outputs = sent(gateway)
    assert outputs == ("embeddings",)
    np.testing.assert_allclose([item["data"] for item in floats["data"]], normalised(pooled_rows(encoded)),
                               rtol=1e-6, atol=1e-7)
    raw = client.post("/pooling", json={"model": "minilm", "input": TEXTS, "use_activation": False}).json()
    assert sent(gateway)[1] == ("pooled",)
    np.testing.assert_allclose([item["data"] for item in raw["data"]], pooled_rows(encoded), rtol=1e-6)
    response = client.post("/pooling", json={"model": "minilm", "input": TEXTS, "encoding_format": "bytes"},
                           headers={"x-request-id": "p1"})
    metadata = json.loads(response.headers["metadata"])
    assert metadata["id"] == "pooling-p1" and metadata["data"][2]["end"] == len(response.content) == 3 * 4 * WIDTH
    np.testing.assert_array_equal(np.frombuffer(response.content, "=f4").reshape(3, WIDTH),
                                  np.array([item["data"] for item in floats["data"]], dtype=np.float32))
    only = client.post("/pooling", json={"model": "sentiment", "input": TEXTS, "encoding_format": "bytes_only"})
    assert "metadata" not in only.headers and len(only.content) == 3 * 3 * 4
    error = vllm_error(client.post("/pooling", json={"model": "matryoshka", "input": TEXT, "dimensions": 8}), 400,
                       "BadRequestError")
    assert (error["message"], error["param"]) == ("dimensions is currently not supported", "dimensions")


def test_invocations_pass_pooling_bytes_through(api):
    client, _ = api
    response = client.post("/invocations", json={"model": "minilm", "input": TEXT, "encoding_format": "bytes_only"})
    assert response.status_code == 200 and len(response.content) == 4 * WIDTH


# --- SGLang /encode -------------------------------------------------------------------------------------


def test_sglang_encode_single_batch_ids_and_put(api):
    client, gateway = api
    single = client.post("/encode", json={"model": "minilm", "text": TEXT, "rid": "r1"}).json()
    assert list(single) == ["embedding", "meta_info"] and single["meta_info"]["id"] == "r1"
    encoded, outputs = sent(gateway)
    assert outputs == ("embeddings",) and single["meta_info"]["prompt_tokens"] == encoded.num_tokens
    np.testing.assert_allclose(single["embedding"], normalised(pooled_rows(encoded))[0], rtol=1e-6, atol=1e-7)
    batch = client.put("/encode", json={"text": TEXTS}).json()
    assert isinstance(batch, list) and len(batch) == 3 and gateway.calls[-1][0] == "minilm_triton"
    assert len(client.post("/encode", json={"input_ids": [[5, 6], [7]]}).json()) == 2
    # SGLang does not check the model: a name it does not serve gets the first embedding model.
    assert client.post("/encode", json={"model": "nope", "text": "x"}).status_code == 200
    assert gateway.calls[-1][0] == "minilm_triton"


def test_sglang_encode_dimensions(api):
    client, gateway = api
    body = client.post("/encode", json={"model": "matryoshka", "text": TEXTS, "dimensions": 8}).json()
    np.testing.assert_allclose([item["embedding"] for item in body], normalised(pooled_rows(sent(gateway)[0])[:, :8]),
                               rtol=1e-6, atol=1e-7)
    raw = client.post("/encode", json={"model": "raw", "text": "x"}).json()
    np.testing.assert_allclose(raw["embedding"], pooled_rows(sent(gateway)[0])[0], rtol=1e-6)


@pytest.mark.parametrize("model, dimensions, message", [
    ("minilm", 8, "Model 'minilm' does not support matryoshka representation, changing output dimensions will "
                  "lead to poor results."),
    ("any-size", 0, "Requested dimensions must be greater than 0"),
    ("matryoshka", 12, "Model 'matryoshka' only supports [8, 16] matryoshka dimensions, using other output "
                       "dimensions will lead to poor results."),
    ("any-size", WIDTH + 1, f"Provided dimensions are greater than max embedding dimension: {WIDTH}"),
])
def test_sglang_encode_errors_are_native(api, model, dimensions, message):
    client, gateway = api
    response = client.post("/encode", json={"model": model, "text": TEXT, "dimensions": dimensions})
    assert (response.status_code, response.json()) == (400, {"error": {"message": message}})
    response = client.post("/encode", json={"model": model})
    assert (response.status_code, response.json()) == (
        400, {"error": {"message": "At least one of text, input_ids, image, video, or audio should be provided"}})
    flat = client.post("/encode", json={"text": 3}).json()  # validation errors are SGLang's flat ones
    assert flat["object"] == "error" and flat["type"] == "Bad Request" and flat["code"] == 400
    assert gateway.calls == []


def test_sglang_encode_on_a_named_classifier_returns_its_head_output(api):
    client, gateway = api
    body = client.post("/encode", json={"model": "sentiment", "text": TEXT}).json()
    assert gateway.calls[-1][0] == "sentiment_triton" and gateway.calls[-1][2] == ("logits",)
    assert len(body["embedding"]) == 3
