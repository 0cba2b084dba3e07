"""Adapter pieces without a server: the Triton client is faked here (never in integration tests)."""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace

import numpy as np
import pytest
from fastapi.testclient import TestClient
from tritonclient.utils import InferenceServerException

from poolserve_adapter import errors
from poolserve_adapter.app import create_app
from poolserve_adapter.registry import ModelRegistry, ServedModel
from poolserve_adapter.settings import Settings
from poolserve_adapter.tokenization import Encoded, TextEncoder
from poolserve_adapter.triton_gateway import TritonGateway
from poolserve_contract.parameters import served_name


class FakeTritonClient:
    """Records calls; answers scores = mean token id per row, or raises a given error."""

    def __init__(self, error: InferenceServerException | None = None):
        self.calls: list[dict] = []
        self.error = error

    async def infer(self, model_name, inputs, outputs=None, client_timeout=None, timeout=None, headers=None):
        tensors = {tensor.name(): tensor for tensor in inputs}
        self.calls.append({"model": model_name, "shapes": {n: t.shape() for n, t in tensors.items()}, "timeout": timeout})
        if self.error is not None:
            raise self.error
        ids = np.frombuffer(tensors["input_ids"]._raw_content, dtype=np.int64).reshape(tensors["input_ids"].shape())
        mask = np.frombuffer(tensors["attention_mask"]._raw_content, dtype=np.int64).reshape(ids.shape)
        scores = ((ids * mask).sum(1) / mask.sum(1)).astype(np.float32)[:, None]
        return SimpleNamespace(as_numpy=lambda name: scores)


def test_gateway_splits_rows_pads_each_chunk_and_keeps_order():
    client = FakeTritonClient()
    gateway = TritonGateway(client, timeout_s=1, max_rows=2)
    encoded = Encoded.from_lists([[1], [2, 2, 2], [3, 3], [4], [5, 5, 5, 5]])
    scores = asyncio.run(gateway.infer("m", encoded, ("scores",)))["scores"][:, 0]
    assert scores.tolist() == [1, 2, 3, 4, 5]
    assert [call["shapes"]["input_ids"] for call in client.calls] == [[2, 3], [2, 2], [1, 4]]
    assert all("token_type_ids" not in call["shapes"] for call in client.calls)


@pytest.mark.parametrize(
    "status, error_class, http",
    [
        ("StatusCode.INVALID_ARGUMENT", errors.BadRequestError, 400),
        ("StatusCode.UNAVAILABLE", errors.ServiceUnavailableError, 503),
        ("StatusCode.DEADLINE_EXCEEDED", errors.GatewayTimeoutError, 504),
        ("StatusCode.INTERNAL", errors.InternalServerError, 500),
        ("StatusCode.SOMETHING_NEW", errors.InternalServerError, 500),
    ],
)
def test_triton_status_mapping(status, error_class, http):
    client = FakeTritonClient(InferenceServerException("boom at /opt/secret/path.py 0xdeadbeef", status=status))
    gateway = TritonGateway(client, timeout_s=1, max_rows=8)
    with pytest.raises(error_class) as caught:
        asyncio.run(gateway.infer("m", Encoded.from_lists([[1, 2]]), ("scores",)))
    assert caught.value.status == http
    assert "/opt/secret" not in caught.value.message and "0xdeadbeef" not in caught.value.message


def test_validation_message_bounds_echoed_input():
    message = errors.validation_message([{"type": "x", "loc": ("body", "input"), "msg": "bad", "input": "y" * 500}] * 12)
    assert message.startswith("12 validation errors:\n")
    assert "...[truncated]" in message and "...and 2 more errors" in message


def test_served_name_rules():
    assert served_name({"served_model_name": "mine", "checkpoint": "x/y"}, "folder") == "mine"
    assert served_name({"checkpoint": "builtin:sentiment-minilm"}, "folder") == "sentiment-minilm"
    assert served_name({"checkpoint": "BAAI/bge-reranker-base"}, "folder") == "BAAI/bge-reranker-base"
    assert served_name({}, "folder") == "folder"


class WhitespaceTokenizer:
    """Token id = word length, exposed like a fast tokenizer's Rust backend."""

    class Backend:
        max_length = None

        def no_padding(self):
            pass

        def enable_truncation(self, max_length):
            self.max_length = max_length

        def encode_batch(self, inputs, add_special_tokens=True):
            rows = []
            for item in inputs:
                text, pair = item if isinstance(item, tuple) else (item, None)
                ids = ([len(w) for w in text.split()] + ([len(w) for w in pair.split()] if pair else []))[: self.max_length]
                rows.append(SimpleNamespace(ids=ids, type_ids=[0] * len(ids)))
            return rows

    def __init__(self):
        self.backend_tokenizer = self.Backend()

    def __len__(self):
        return 100


def make_model(name, task, num_labels):
    encoder = TextEncoder(WhitespaceTokenizer(), max_model_len=6, sends_token_types=False)
    return ServedModel(name=name, triton_model=name + "_triton", task=task, checkpoint="/ckpt", encoder=encoder,
                       id2label={0: "only"}, num_labels=num_labels)


def test_two_triton_models_under_one_served_name_are_refused():
    """A registry keyed by name would keep only the last of them, the default model perhaps."""
    with pytest.raises(ValueError, match="several Triton models are served as m:"):
        ModelRegistry([make_model("m", "classify", 1), make_model("m", "embed", 1), make_model("x", "classify", 1)])


@pytest.fixture
def app_with_fake_triton(monkeypatch):
    registry = ModelRegistry([make_model("ce", "classify", 1), make_model("multi", "classify", 3)])
    client = FakeTritonClient()

    async def fake_discover(_client, _settings):
        return registry

    monkeypatch.setattr("poolserve_adapter.app.discover_models", fake_discover)
    app = create_app(Settings(triton_grpc_url="127.0.0.1:1"))
    with TestClient(app) as test_client:
        app.state.gateway = TritonGateway(client, timeout_s=1, max_rows=64)
        yield test_client, client


def test_default_model_is_the_first_able_to_serve_the_task(app_with_fake_triton):
    test_client, triton = app_with_fake_triton
    body = test_client.post("/classify", json={"input": ["aa bbb"]}).json()
    assert body["model"] == "ce" and body["data"][0]["probs"] == [2.5] and body["data"][0]["label"] == "only"
    assert triton.calls[-1]["model"] == "ce_triton"
    rerank = test_client.post("/rerank", json={"query": "a", "documents": ["bb", "cccc"]}).json()
    assert [r["index"] for r in rerank["results"]] == [1, 0]


def test_over_long_is_caught_before_triton(app_with_fake_triton):
    test_client, triton = app_with_fake_triton
    response = test_client.post("/classify", json={"model": "ce", "input": "a b c d e f g h"})
    assert response.status_code == 400 and "maximum context length is 6 tokens" in response.json()["error"]["message"]
    assert triton.calls == []


def test_vocabulary_check_covers_ids_past_int64_and_negative_ids():
    from poolserve_adapter.errors import BadRequestError

    encoder = TextEncoder(WhitespaceTokenizer(), max_model_len=6, sends_token_types=False)  # vocabulary of 100
    encoder.check_vocabulary([[0, 99], [5]])
    for prompts, bad in (([[1, 100]], "100"), ([[3], [-1]], "-1"), ([[1, 2**64 + 5]], str(2**64 + 5))):
        with pytest.raises(BadRequestError, match=f"Token id {bad} is out of vocabulary"):
            encoder.check_vocabulary(prompts)


# --- /tokenize, /detokenize and their SGLang twins: bounded, off the event loop when large -----------

TOKEN_LIMIT = 40  # ADAPTER_MAX_TOKENS_PER_REQUEST of the app below


@pytest.fixture(scope="module")
def wordpiece(tmp_path_factory):
    from tests.support.tiny_models import CHATML_TEMPLATE, wordpiece_tokenizer

    tokenizer = wordpiece_tokenizer(tmp_path_factory.mktemp("wordpiece"))
    tokenizer.chat_template = CHATML_TEMPLATE  # for /tokenize's chat form
    return tokenizer


@pytest.fixture
def tokenizing_app(monkeypatch, wordpiece):
    encoder = TextEncoder(wordpiece, max_model_len=128, sends_token_types=True)
    model = ServedModel(name="bert", triton_model="bert_triton", task="classify", checkpoint="/ckpt", encoder=encoder,
                        id2label={0: "a", 1: "b"}, num_labels=2)

    async def fake_discover(_client, _settings):
        return ModelRegistry([model])

    monkeypatch.setattr("poolserve_adapter.app.discover_models", fake_discover)
    app = create_app(Settings(triton_grpc_url="127.0.0.1:1", max_tokens_per_request=TOKEN_LIMIT))
    with TestClient(app) as test_client:
        yield test_client


def words(count: int) -> str:
    from tests.support.tiny_models import WORDS

    return " ".join(WORDS[i % len(WORDS)] for i in range(count))


@pytest.mark.parametrize("off_loop_above", [10**9, 0], ids=["on-loop", "in-thread"])
def test_tokenize_routes_give_the_tokenizers_own_results_both_ways(tokenizing_app, wordpiece, monkeypatch,
                                                                   off_loop_above):
    """Small work runs on the loop, large in a worker thread: the bytes must not differ (key order included)."""
    from poolserve_adapter.sglang.protocol import TokenizeResponse as SGLangTokenizeResponse
    from poolserve_adapter.tokenize.protocol import TokenizeResponse

    monkeypatch.setattr("poolserve_adapter.tokenization.OFF_LOOP_ABOVE", off_loop_above)
    text = words(12) + " café ünïcode"
    ids = wordpiece(text)["input_ids"]
    body = tokenizing_app.post("/tokenize", json={"prompt": text, "return_token_strs": True})
    assert body.status_code == 200 and body.headers["content-type"] == "application/json"
    assert list(body.json()) == list(TokenizeResponse.model_fields)
    assert body.json() == {"count": len(ids), "max_model_len": 128, "tokens": ids,
                           "token_strs": wordpiece.convert_ids_to_tokens(ids)}
    plain = tokenizing_app.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    assert plain["tokens"] == ids[1:-1] and plain["token_strs"] is None
    chat = tokenizing_app.post("/tokenize", json={"messages": [{"role": "user", "content": "rain"}]}).json()
    rendered = wordpiece.apply_chat_template([{"role": "user", "content": "rain"}], tokenize=False,
                                             add_generation_prompt=True)
    assert chat["tokens"] == wordpiece(rendered, add_special_tokens=False)["input_ids"]
    assert tokenizing_app.post("/detokenize", json={"tokens": ids}).json() == {"prompt": wordpiece.decode(ids)}

    one = tokenizing_app.post("/v1/tokenize", json={"prompt": text}).json()
    assert list(one) == list(SGLangTokenizeResponse.model_fields)
    assert one == {"tokens": ids, "count": len(ids), "max_model_len": 128}
    many = tokenizing_app.post("/v1/tokenize", json={"prompt": ["good", text, ""]}).json()
    rows = [wordpiece(t)["input_ids"] for t in ("good", text, "")]
    assert many == {"tokens": rows, "count": [len(r) for r in rows], "max_model_len": 128}
    assert tokenizing_app.post("/v1/detokenize", json={"tokens": ids}).json() == {
        "text": wordpiece.decode(ids, skip_special_tokens=True)}
    assert tokenizing_app.post("/v1/detokenize", json={"tokens": [ids, ids[:3]], "skip_special_tokens": False}
                               ).json() == {"text": [wordpiece.decode(ids), wordpiece.decode(ids[:3])]}
    assert tokenizing_app.post("/v1/detokenize", json={"tokens": []}).json() == {"text": ""}


def test_tokenize_routes_bound_their_tokens(tokenizing_app, wordpiece):
    limit = f"more than the maximum of {TOKEN_LIMIT} per request (ADAPTER_MAX_TOKENS_PER_REQUEST)"
    long_text = words(TOKEN_LIMIT)  # 40 words: 42 ids with [CLS] and [SEP], 40 without
    count = len(wordpiece(long_text)["input_ids"])
    assert count > TOKEN_LIMIT

    response = tokenizing_app.post("/tokenize", json={"prompt": long_text})
    assert response.status_code == 400
    assert response.json() == {"error": {"message": f"The request holds {count} tokens, {limit}.",
                                         "type": "BadRequestError", "param": "prompt", "code": 400}}
    fits = tokenizing_app.post("/tokenize", json={"prompt": long_text, "add_special_tokens": False})
    assert fits.status_code == 200 and fits.json()["count"] == TOKEN_LIMIT  # exactly the limit is allowed
    chat = tokenizing_app.post("/tokenize", json={"messages": [{"role": "user", "content": long_text}]})
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "messages"

    too_many_ids = {"tokens": [5] * (TOKEN_LIMIT + 1)}
    response = tokenizing_app.post("/detokenize", json=too_many_ids)
    assert response.status_code == 400
    assert response.json() == {"error": {"message": f"The request holds {TOKEN_LIMIT + 1} tokens, {limit}.",
                                         "type": "BadRequestError", "param": "tokens", "code": 400}}
    assert tokenizing_app.post("/detokenize", json={"tokens": [5] * TOKEN_LIMIT}).status_code == 200
    # Bounded before the vocabulary check: an over-long list of bad ids is refused for its length.
    assert "more than the maximum" in tokenizing_app.post(
        "/detokenize", json={"tokens": [10**9] * (TOKEN_LIMIT + 1)}).json()["error"]["message"]

    # SGLang: every prompt / row of the request together, in its flat error shape.
    half = words(TOKEN_LIMIT // 2)
    response = tokenizing_app.post("/v1/tokenize", json={"prompt": [half, half]})
    total = 2 * len(wordpiece(half)["input_ids"])
    assert response.status_code == 400
    assert response.json() == {"object": "error", "message": f"The request holds {total} tokens, {limit}.",
                               "type": "BadRequestError", "param": None, "code": 400}
    assert tokenizing_app.post("/v1/tokenize", json={"prompt": long_text}).status_code == 400
    assert tokenizing_app.post("/v1/tokenize", json={"prompt": [half]}).status_code == 200
    rows = {"tokens": [[5] * (TOKEN_LIMIT // 2), [6] * (TOKEN_LIMIT // 2 + 1)]}
    response = tokenizing_app.post("/v1/detokenize", json=rows)
    assert response.status_code == 400 and response.json()["message"] == (
        f"The request holds {TOKEN_LIMIT + 1} tokens, {limit}.")
    assert tokenizing_app.post("/v1/detokenize", json={"tokens": [5] * (TOKEN_LIMIT + 1)}).status_code == 400


def loop_gaps_while(coroutine) -> tuple[object, float, float]:
    """Runs ``coroutine`` while a ticker sleeps 5 ms at a time: its result, its seconds, the loop's worst gap."""
    async def run():
        gaps, done = [0.0], False

        async def ticker():
            last = time.perf_counter()
            while not done:
                await asyncio.sleep(0.005)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0.02)
        started = time.perf_counter()
        result = await coroutine
        elapsed = time.perf_counter() - started
        done = True
        await task
        return result, elapsed, max(gaps)

    return asyncio.run(run())


def test_large_tokenizing_and_decoding_leave_the_event_loop_free(wordpiece):
    """~1 MB of text: ~0.7 s of tokenizing here. The backend's encode / decode hold the GIL for the whole
    call, which starves the loop even from a thread; encode_batch / decode_batch in a thread do not."""
    from tokenizers import Tokenizer

    from poolserve_adapter.tokenization import run_sized

    encoder = TextEncoder(wordpiece, max_model_len=128, sends_token_types=False)
    plain = Tokenizer.from_str(wordpiece.backend_tokenizer.to_str())
    plain.no_truncation()
    text = words(180_000)
    expected = plain.encode(text).ids  # the ids of the plain (GIL-holding) encode
    ids, seconds, gap = loop_gaps_while(run_sized(encoder.work_size(len(text)), encoder.tokenize, [text], True))
    assert ids == [expected] and len(expected) > 150_000
    assert gap < min(0.25, seconds / 2), f"the loop stalled {gap:.3f} s of a {seconds:.3f} s tokenize"
    many = expected * 3  # decoding is faster than tokenizing
    decoded, seconds, gap = loop_gaps_while(run_sized(len(many), encoder.decode, many))
    assert decoded == plain.decode(many, skip_special_tokens=False)
    assert gap < min(0.25, seconds / 2), f"the loop stalled {gap:.3f} s of a {seconds:.3f} s decode"


def test_few_but_huge_texts_are_tokenized_off_the_loop(wordpiece):
    """tokenize_in_thread_above counts texts; one huge text (here cut by truncation) must leave the loop too."""
    import threading

    from poolserve_adapter.tokenization import OFF_LOOP_ABOVE, PromptOptions

    encoder = TextEncoder(wordpiece, max_model_len=128, sends_token_types=False)
    threads = []
    encode = encoder.encode

    def recording_encode(*args, **kwargs):
        threads.append(threading.current_thread() is threading.main_thread())
        return encode(*args, **kwargs)

    encoder.encode = recording_encode
    huge = words(OFF_LOOP_ABOVE // 4)  # > OFF_LOOP_ABOVE characters
    for texts, pairs, options in (([huge], None, PromptOptions(truncate_to=8)),
                                  (["query"], [huge], PromptOptions(truncate_to=8)),
                                  (["short text"], None, PromptOptions())):
        encoded = asyncio.run(encoder.encode_async(texts, pairs, 8, options))
        assert encoded.num_sequences == 1
    assert threads == [False, False, True]  # the two huge ones in a worker thread, the short one on the loop
    same = asyncio.run(encoder.encode_async([huge], None, 8, PromptOptions(truncate_to=8)))
    assert same.input_ids.tolist() == [wordpiece(huge, truncation=True, max_length=8)["input_ids"]]


def test_truncate_texts_keeps_truncate_texts_results_in_one_batch(wordpiece):
    """max_tokens_per_doc / _per_query: one encode_batch over every string (off the loop when large),
    each cut exactly where the plain per-text encode would cut it; other items are kept whole."""
    from tokenizers import Tokenizer

    encoder = TextEncoder(wordpiece, max_model_len=128, sends_token_types=False)
    plain = Tokenizer.from_str(wordpiece.backend_tokenizer.to_str())
    plain.no_truncation()

    def reference(text: str, max_tokens: int) -> str:  # the former truncate_text, through encode
        text = text[: (max_tokens + 1) * 64]
        encoding = plain.encode(text, add_special_tokens=False)
        if len(encoding.ids) <= max_tokens:
            return text
        return text[: encoding.offsets[max_tokens - 1][1]] if max_tokens else ""

    image = {"type": "image_url", "image_url": {"url": "data:,"}}
    items = [words(3), words(50), "   ", "", "unbelievably parisian", image, words(5000)]
    for max_tokens in (0, 1, 4, 20):
        expected = [reference(item, max_tokens) if isinstance(item, str) else item for item in items]
        assert encoder.truncate_texts(items, max_tokens) == expected
        assert asyncio.run(encoder.truncate_texts_async(items, max_tokens)) == expected
        assert [encoder.truncate_text(item, max_tokens) for item in items if isinstance(item, str)] == [
            e for e in expected if isinstance(e, str)]
    assert encoder.truncate_texts([image], 3) == [image]


def test_health_is_ready_only_when_every_served_model_is():
    """A restarted Triton answers server-ready before its models are loaded again: /health must not."""
    from poolserve_adapter.health.api_router import readiness

    class Probe:
        def __init__(self, loaded: set[str]):
            self.loaded = loaded

        async def is_server_ready(self, client_timeout=None):
            return True

        async def is_model_ready(self, name, client_timeout=None):
            return name in self.loaded

    request = SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(lifecycle=SimpleNamespace(draining=False))))
    for loaded, status in ((set(), 503), ({"a"}, 503), ({"a", "b"}, 200)):
        gateway = TritonGateway(Probe(loaded), timeout_s=1, max_rows=2, triton_models=("a", "b"))
        response = asyncio.run(readiness(request, gateway))
        assert response.status_code == status, loaded
        if status == 503:
            assert json.loads(response.body)["unavailable_models"] == {m: "not ready" for m in "ab" if m not in loaded}


def test_workers_default_to_one_per_four_cores_at_most_four(monkeypatch):
    from poolserve_adapter.settings import Settings

    for cores, expected in ((2, 1), (4, 1), (8, 2), (16, 4), (128, 4)):
        monkeypatch.setattr("os.sched_getaffinity", lambda _pid, cores=cores: set(range(cores)))
        assert Settings().worker_count() == expected
        assert Settings(workers=3).worker_count() == 3


def test_usable_cores_follow_the_cgroup_cpu_quota(monkeypatch, tmp_path):
    from poolserve_adapter.settings import usable_cores

    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(16)))
    assert usable_cores(tmp_path) == 16  # no cgroup files: the affinity
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cores(tmp_path) == 16  # v2, unlimited
    (tmp_path / "cpu.max").write_text("250000 100000\n")
    assert usable_cores(tmp_path) == 3  # 2.5 cores' time: rounded up
    (tmp_path / "cpu.max").write_text("3200000 100000\n")
    assert usable_cores(tmp_path) == 16  # a quota above the affinity: the affinity
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert usable_cores(tmp_path) == 2  # v1
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert usable_cores(tmp_path) == 16  # v1, unlimited
