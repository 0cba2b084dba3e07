"""Multi-LoRA on the real stack (``poolserve serve``: Triton and the adapter): a tiny BERT classifier served with
two PEFT adapters (``--set MODEL.lora_modules=a=PATH,b=PATH``, one with its own classifier head). ``/v1/models``
lists each adapter with its base as ``parent``; requests naming the base and each adapter, sent at once so
Triton may batch them together, score as the PEFT-merged model of their adapter; SGLang's ``lora_path`` picks
an adapter on its native ``/classify``."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch

from tests.support.stack import start_serve, stop_serve
from tests.support.tiny_models import build_checkpoint
from tests.unit.test_lora_runtime import MODELS, load_base, save_adapter

pytestmark = pytest.mark.integration
peft = pytest.importorskip("peft")

BASE = "tiny-bert"
TEXTS = ["the cat sat on the mat", "dogs bark at night", "a quiet afternoon", "stocks fell sharply today"]
TIMEOUT_S = 60


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-stack")
    checkpoint = build_checkpoint("bert", root / "base")
    _, targets, head = MODELS["bert"]
    adapters = {"rank4": save_adapter(checkpoint, root / "rank4", targets, 4, seed=1),
                "rank8-head": save_adapter(checkpoint, root / "rank8", targets, 8, seed=2, head=head)}
    modules = ",".join(f"{name}={path}" for name, path in adapters.items())
    process, url = start_serve(root, ["--model", f"bert_classifier={checkpoint}",
                                      "--set", f"bert_classifier.served_model_name={BASE}",
                                      "--set", f"bert_classifier.lora_modules={modules}"])
    try:
        yield url, checkpoint, adapters
    finally:
        stop_serve(process)


def reference_logits(checkpoint, adapter) -> np.ndarray:
    """HF's forward of the base, or of the PEFT-merged model of ``adapter``, over TEXTS."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    model = load_base(checkpoint)
    if adapter is not None:
        model = peft.PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().eval()
    with torch.no_grad():
        return np.concatenate([model(**tokenizer(text, return_tensors="pt")).logits.numpy() for text in TEXTS])


def classify_logits(url: str, model: str) -> np.ndarray:
    response = httpx.post(f"{url}/classify", json={"model": model, "input": TEXTS, "use_activation": False},
                          timeout=TIMEOUT_S)
    assert response.status_code == 200, response.text
    return np.array([item["probs"] for item in response.json()["data"]])


def test_models_lists_each_adapter_with_its_base_as_parent(stack):
    url, _, adapters = stack
    models = {entry["id"]: entry for entry in httpx.get(f"{url}/v1/models", timeout=TIMEOUT_S).json()["data"]}
    assert models[BASE]["parent"] is None
    for name, path in adapters.items():
        assert models[name]["parent"] == BASE and models[name]["root"] == str(path)


def test_base_and_adapters_at_once_score_as_their_merged_models(stack):
    url, checkpoint, adapters = stack
    names = [BASE, *adapters] * 3
    with ThreadPoolExecutor(len(names)) as pool:
        answers = list(pool.map(lambda name: classify_logits(url, name), names))
    for name, logits in zip(names, answers):
        expected = reference_logits(checkpoint, adapters.get(name))
        np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4, err_msg=name)
    assert np.abs(answers[1] - answers[0]).max() > 1e-2  # an adapter changes the scores: the test can fail


def test_sglang_lora_path_picks_the_adapter(stack):
    url, checkpoint, adapters = stack
    response = httpx.post(f"{url}/classify", json={"model": BASE, "text": TEXTS[0], "lora_path": "rank8-head"},
                          timeout=TIMEOUT_S)
    assert response.status_code == 200, response.text
    expected = reference_logits(checkpoint, adapters["rank8-head"])[0]
    np.testing.assert_allclose(response.json()["embedding"], expected, rtol=1e-4, atol=1e-4)
    unknown = httpx.post(f"{url}/classify", json={"model": BASE, "text": TEXTS[0], "lora_path": "nope"},
                         timeout=TIMEOUT_S)
    assert unknown.status_code == 400 and "not loaded" in unknown.text
