"""Vision-language classifiers and rerankers through the real stack (tritonserver + adapter).

One server from the serving plan (checkpoints named only by their folders, as ``make serve MODELS=``)
serves a Qwen2.5-VL classifier, jina-reranker-m0's architecture, a Qwen3-VL seq-cls reranker and a
Qwen3-VL-Reranker in its original generative form (converted with yes/no at load), each a tiny
random checkpoint with its own image processor config. Images are made with Pillow and sent as
data: URLs or served by a loopback HTTP server. Scores equal HF's own forward (fp32, 1e-4).
"""

from __future__ import annotations

import http.server

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from poolserve_contract.score_templates import render, template_text
from poolserve_runtime.vision_families import QWEN_IMAGE
from poolserve_stack.plan import plan_models
from poolserve_stack.triton_server import TritonServer
from tests.support.loopback import http_server_on_loopback
from tests.support.stack import MODEL_REPOSITORY, running_adapter
from tests.support.tiny_vision import (
    build_nemotron_vl_checkpoint,
    build_vision_checkpoint,
    data_url,
    image_bytes,
    make_image,
    nemotron_reference_scores,
    reference_scores,
)

pytestmark = pytest.mark.integration

SERVED = {"qwen2_5_vl": "vl-classifier", "jina_vl": "jina-m0", "qwen3_vl": "qwen3-vl-seqcls",
          "qwen3_vl_reranker": "qwen3-vl-reranker", "llama_nemotron_vl": "nemotron-vl"}
IMAGES = [make_image(90, 70, seed=1), make_image(60, 120, seed=2), make_image(50, 50, seed=3)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("vision")
    folders = {"qwen3_vl_reranker": "Qwen3-VL-Reranker-2B"}
    made = {kind: build_vision_checkpoint(kind, root / folders.get(kind, kind), seed=i)
            for i, kind in enumerate(SERVED) if kind != "llama_nemotron_vl"}
    made["llama_nemotron_vl"] = build_nemotron_vl_checkpoint(root / "llama-nemotron-rerank-vl")
    return made


class _ImageHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/image.png")
            self.end_headers()
            return
        if self.path == "/loop":
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.end_headers()
            return
        body = image_bytes(IMAGES[0]) if self.path == "/image.png" else (
            b"x" * 70000 if self.path == "/big" else b"not an image")
        self.send_response(200 if self.path != "/missing" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_server():
    with http_server_on_loopback(_ImageHandler) as url:
        yield url


@pytest.fixture(scope="module")
def stack(checkpoints, tmp_path_factory):
    sets = {str(path): {"served_model_name": SERVED[kind]} for kind, path in checkpoints.items()}
    plan = plan_models([str(path) for path in checkpoints.values()], MODEL_REPOSITORY, sets)
    log_dir = tmp_path_factory.mktemp("vision-stack")
    with TritonServer(MODEL_REPOSITORY, plan, log_path=log_dir / "tritonserver.log", ready_timeout_s=480) as server:
        # fetching on for 127.0.0.1 only; "localhost" stays a forbidden domain
        with running_adapter(server, log_dir, allowed_media_domains='["127.0.0.1"]', media_fetch_timeout_s="3",
                             max_image_bytes="60000", max_images_per_prompt="3") as url:
            with running_adapter(server, tmp_path_factory.mktemp("vision-closed")) as closed_url:
                yield server, plan, url, closed_url
        server.check()


def image_part(image) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(image)}}


def expected_pair_scores(kind, checkpoint, query, documents):
    """The prompts as vLLM writes them (placeholders first, the model's template or format), scored by HF."""
    def side(item):
        if isinstance(item, str):
            return item, []
        images = [part["_image"] for part in item if "_image" in part]
        texts = [part["text"] for part in item if "text" in part]
        return QWEN_IMAGE * len(images) + "\n".join(texts), images

    if kind == "llama_nemotron_vl":  # nemotron-vl-rerank.jinja: the document's image first
        prompts, images = [], []
        for document in documents:
            document_text, document_images = side(document)
            prompts.append(("<image> " if document_images else "") + f"question:{query} \n \n passage:"
                           + document_text.replace(QWEN_IMAGE, ""))
            images.append(document_images)
        return nemotron_reference_scores(checkpoint, prompts, images).flatten().numpy()
    query_text, query_images = side(query)
    prompts, images = [], []
    for document in documents:
        document_text, document_images = side(document)
        if kind == "jina_vl":
            prompts.append(f"**Document**:\n{document_text}\n**Query**:\n{query_text}")
            images.append(document_images + query_images)
        elif kind == "qwen3_vl_reranker":
            prompts.append(render(template_text("qwen3_vl_reranker"), query_text, document_text))
            images.append(query_images + document_images)
        else:
            prompts.append(query_text + document_text)
            images.append(query_images + document_images)
    return reference_scores(kind, checkpoint, prompts, images).flatten().numpy()


def as_request_item(item):
    if isinstance(item, str):
        return item
    return {"content": [{"type": "text", "text": part["text"]} if "text" in part else image_part(part["_image"])
                        for part in item]}


@pytest.mark.parametrize("kind", list(SERVED))
def test_rerank_mixes_text_and_image_documents_and_matches_hf(stack, checkpoints, kind):
    _, _, url, _ = stack
    query = "a photo of snow"
    documents = ["cold winter snow", [{"_image": IMAGES[0]}], [{"text": "two images"}, {"_image": IMAGES[1]}],
                 "coffee and bread", [{"_image": IMAGES[2]}]]
    expected = expected_pair_scores(kind, checkpoints[kind], query, documents)
    body = {"model": SERVED[kind], "query": query, "documents": [as_request_item(d) for d in documents]}
    response = httpx.post(f"{url}/rerank", json=body, timeout=120)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    got = {r["index"]: r["relevance_score"] for r in results}
    np.testing.assert_allclose([got[i] for i in range(len(documents))], expected, atol=1e-4, rtol=0)
    assert [r["relevance_score"] for r in results] == sorted(got.values(), reverse=True)
    echoed = {r["index"]: r["document"] for r in results}
    assert echoed[0] == {"text": "cold winter snow", "multi_modal": None}
    assert echoed[1]["text"] is None and echoed[1]["multi_modal"][0]["type"] == "image_url"
    assert response.json()["usage"]["prompt_tokens"] > 40  # image tokens counted


def test_score_with_an_image_query_and_the_query_image_read_once(stack, checkpoints):
    _, _, url, _ = stack
    query = [{"_image": IMAGES[1]}, {"text": "which text fits"}]
    documents = ["snow", "rain", "pizza"]
    expected = expected_pair_scores("qwen3_vl_reranker", checkpoints["qwen3_vl_reranker"], query, documents)
    body = {"model": SERVED["qwen3_vl_reranker"], "queries": as_request_item(query), "documents": documents}
    response = httpx.post(f"{url}/score", json=body, timeout=120)
    assert response.status_code == 200, response.text
    np.testing.assert_allclose([d["score"] for d in response.json()["data"]], expected, atol=1e-4, rtol=0)


def test_classify_chat_with_an_image_matches_hf(stack, checkpoints):
    _, _, url, _ = stack
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoints["qwen2_5_vl"])
    messages = [{"role": "user", "content": [image_part(IMAGES[0]), {"type": "text", "text": "is it snow"}]}]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": QWEN_IMAGE + "is it snow"}], tokenize=False)
    expected = reference_scores("qwen2_5_vl", checkpoints["qwen2_5_vl"], [prompt], [[IMAGES[0]]]).flatten().numpy()
    response = httpx.post(f"{url}/classify", json={"model": SERVED["qwen2_5_vl"], "messages": messages}, timeout=120)
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(response.json()["data"][0]["probs"], expected, atol=1e-4, rtol=0)
    # text-only requests to a vision model still work
    plain = httpx.post(f"{url}/classify", json={"model": SERVED["qwen2_5_vl"], "input": ["snow", "rain"]}, timeout=60)
    assert plain.status_code == 200 and len(plain.json()["data"]) == 2


def test_images_fetched_from_an_allowed_host_follow_redirects(stack, checkpoints, image_server):
    _, _, url, _ = stack
    direct = [{"type": "image_url", "image_url": {"url": f"{image_server}/image.png"}}]
    redirected = [{"type": "image_url", "image_url": {"url": f"{image_server}/redirect"}}]
    body = {"model": SERVED["jina_vl"], "query": "snow", "documents": [{"content": direct}, {"content": redirected},
                                                                       {"content": [image_part(IMAGES[0])]}]}
    response = httpx.post(f"{url}/rerank", json=body, timeout=120)
    assert response.status_code == 200, response.text
    scores = {r["index"]: r["relevance_score"] for r in response.json()["results"]}
    assert scores[0] == pytest.approx(scores[2], abs=1e-6) and scores[1] == pytest.approx(scores[2], abs=1e-6)


def error_of(response, status=400):
    assert response.status_code == status, response.text
    return response.json()["error"]["message"]


def test_bad_images_are_400s_in_the_flavour_shape(stack, image_server):
    _, _, url, closed_url = stack
    model = SERVED["jina_vl"]

    def rerank(parts, base=url):
        return httpx.post(f"{base}/rerank", json={"model": model, "query": "q", "documents": [{"content": parts}]},
                          timeout=60)

    def image(address):
        return [{"type": "image_url", "image_url": {"url": address}}]

    cases = {
        "data:image/png;base64,@@@not-base64": "Invalid base64",
        "data:image/png;base64,aGVsbG8=": "Failed to load image",
        "data:image/png,plain": "Only base64 data URLs",
        "data:image/png;base64": "missing ','",
        "ftp://127.0.0.1/x.png": "must be either a HTTP or data URL",
        f"{image_server.replace('127.0.0.1', 'localhost')}/image.png": "allowed domains",
        f"{image_server}/missing": "HTTP 404",
        f"{image_server}/big": "larger than the maximum of 60000 bytes",
        f"{image_server}/loop": "redirects",
        f"{image_server}/text": "Failed to load image",
    }
    for address, message in cases.items():
        body = rerank(image(address)).json()
        assert body["error"]["code"] == 400 and body["error"]["type"] == "BadRequestError", (address, body)
        assert message in body["error"]["message"], (address, body)
    big = make_image(200, 200, seed=9)
    assert "larger than the maximum" in error_of(rerank([image_part(big)]))  # a data URL over 60000 bytes
    assert "At most 3 image(s)" in error_of(rerank([image_part(IMAGES[2])] * 4))
    assert "not served" in error_of(rerank([{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AA=="}}]))
    # fetching is off by default: the server with no allowed domains reads data: URLs only
    assert "disabled" in error_of(rerank(image(f"{image_server}/image.png"), base=closed_url))
    assert httpx.post(f"{closed_url}/rerank", json={"model": model, "query": "q", "documents": [
        {"content": [image_part(IMAGES[2])]}]}, timeout=60).status_code == 200
    # one bad document fails the request without harming the next request
    assert httpx.post(f"{url}/rerank", json={"model": model, "query": "q", "documents": ["fine"]},
                      timeout=60).status_code == 200


def test_placeholders_typed_into_text_are_refused(stack):
    _, _, url, _ = stack
    response = httpx.post(f"{url}/rerank", json={"model": SERVED["jina_vl"], "query": "q",
                                                 "documents": ["<|image_pad|> sneaky"]}, timeout=60)
    assert "image tokens" in error_of(response)
    typed = httpx.post(f"{url}/classify", json={"model": SERVED["qwen2_5_vl"], "input": ["<|image_pad|> x"]}, timeout=60)
    assert "placeholder tokens but no image" in error_of(typed)
    # a NUL-delimited image marker typed into a text is no image (dropped, not a 500 or a duplicated image)
    injected = httpx.post(f"{url}/rerank", json={"model": SERVED["llama_nemotron_vl"], "query": "a\u0000image5\u0000",
                                                 "documents": [{"content": [image_part(IMAGES[0])]}]}, timeout=60)
    assert injected.status_code == 200, injected.text


def test_raw_grpc_contract_pixel_values_and_grids(stack, checkpoints):
    """A raw tritonclient user sends expanded ids, pixel_values [rows, P, D] and image_grid_thw [rows, K, 3]."""
    from transformers import AutoImageProcessor, AutoTokenizer

    server, plan, _, _ = stack
    name = next(n for n, p in plan.items() if p.get("served_model_name") == SERVED["qwen2_5_vl"])
    checkpoint = checkpoints["qwen2_5_vl"]
    processed = AutoImageProcessor.from_pretrained(checkpoint)(images=[IMAGES[0]], return_tensors="np")
    grid = processed["image_grid_thw"]
    text = QWEN_IMAGE.replace("<|image_pad|>", "<|image_pad|>" * (int(grid.prod()) // 4)) + "snow"
    ids = np.array([AutoTokenizer.from_pretrained(checkpoint)(text)["input_ids"]], dtype=np.int64)
    client = grpcclient.InferenceServerClient(server.grpc_url)
    inputs = []
    for key, array, dtype in (("input_ids", ids, "INT64"), ("pixel_values", processed["pixel_values"][None].astype(
            np.float32), "FP32"), ("image_grid_thw", grid[None].astype(np.int64), "INT64")):
        tensor = grpcclient.InferInput(key, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    result = client.infer(name, inputs).as_numpy("scores")
    expected = reference_scores("qwen2_5_vl", checkpoint, [QWEN_IMAGE + "snow"], [[IMAGES[0]]]).flatten().numpy()
    np.testing.assert_allclose(result[0], expected, atol=1e-4, rtol=0)
    # a grid naming more patches than were sent is this request's error alone
    bad = inputs[:2] + [grpcclient.InferInput("image_grid_thw", [1, 1, 3], "INT64")]
    bad[2].set_data_from_numpy(np.array([[[1, 40, 40]]], dtype=np.int64))
    with pytest.raises(Exception, match="patches"):
        client.infer(name, bad)
    # image pad tokens without their image are this request's error too (not the batch's forward)
    with pytest.raises(Exception, match="image pad tokens"):
        client.infer(name, inputs[:1])


def test_a_text_model_refuses_images_as_vllm_does(adapter_url):
    body = {"model": "qwen3_classifier", "query": "q", "documents": [{"content": [image_part(IMAGES[0])]}]}
    assert error_of(httpx.post(f"{adapter_url}/rerank", json=body, timeout=60)) == (
        "MultiModalParam is not supported for Qwen3ForSequenceClassification")
    chat = {"model": "qwen3_classifier", "messages": [{"role": "user", "content": [image_part(IMAGES[0])]}]}
    assert error_of(httpx.post(f"{adapter_url}/classify", json=chat, timeout=60)) == (
        "qwen3_classifier is not a multimodal model")

