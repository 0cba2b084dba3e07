"""BGE-M3 (vLLM's ``BgeM3EmbeddingModel``: an ``XLMRobertaModel`` checkpoint with ``sparse_linear.pt`` and
``colbert_linear.pt`` beside it) on CPU fp32: one engine run gives the dense vectors, every token's ColBERT vector
and every token's lexical weight, each against a direct torch computation from
``XLMRobertaModel(x).last_hidden_state`` and the two heads saved as FlagEmbedding saves them; several texts packed
into chunks cut across requests, both bodies; the card, the Triton outputs and the family picking (only with the
architecture override)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from poolserve_adapter.registry import ServedModel
from poolserve_adapter.tokenization import TextEncoder
from poolserve_contract import families as declarations
from poolserve_contract.card import ModelCard, model_card
from poolserve_contract.parameters import ModelParameters
from poolserve_contract.triton_config import complete_config
from poolserve_runtime import families
from poolserve_runtime.engine import PackedEngine
from poolserve_runtime.packing import PackedBatch, RequestSequences
from poolserve_runtime.settings import ModelSettings
from tests.support.fake_triton import HealthyGateway, app_over
from tests.support.tiny_models import random_text
from tests.support.token_models import bge_m3_checkpoint, bge_m3_reference

ARCHITECTURE = "BgeM3EmbeddingModel"
OUTPUTS = ("embeddings", "pooled", "token_embeddings", "token_projected", "token_logits")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return bge_m3_checkpoint(tmp_path_factory.mktemp("bge_m3") / "bge_m3")


def texts() -> list[str]:
    rng = random.Random(7)
    return [random_text(rng, words) for words in (6, 21, 1, 30, 9)]


def settings_for(checkpoint, body: str, architecture: str = ARCHITECTURE) -> ModelSettings:
    return ModelSettings(model_name="bge_m3", checkpoint=str(checkpoint), device=torch.device("cpu"),
                         dtype=torch.float32, max_tokens_per_forward=48, max_model_len=0, logit_mean=0.0,
                         logit_sigma=1.0, attention=body, output_names=OUTPUTS, compile="none",
                         architecture=architecture)


def packed(checkpoint, requests: list[list[str]]) -> PackedBatch:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    sequences = []
    for request in requests:
        encoded = [tokenizer(text)["input_ids"] for text in request]
        sequences.append(RequestSequences(torch.tensor([t for ids in encoded for t in ids]),
                                          torch.tensor([len(ids) for ids in encoded]), None))
    return PackedBatch.pack(sequences)


@pytest.mark.parametrize("body", ["padded", "varlen"])
def test_one_run_gives_dense_colbert_and_lexical_outputs_as_the_direct_computation(checkpoint, body):
    sentences = texts()
    engine = PackedEngine.load(families.by_name("bge_m3"), settings_for(checkpoint, body))
    batch = packed(checkpoint, [sentences[:2], sentences[2:]])  # chunks of 48 tokens cut across requests
    outputs = engine.run(batch)
    reference = bge_m3_reference(checkpoint, sentences)
    assert tuple(outputs) == OUTPUTS and all(tensor.dtype == torch.float32 for tensor in outputs.values())
    torch.testing.assert_close(outputs["embeddings"], torch.stack([r["dense"] for r in reference]),
                               rtol=1e-5, atol=1e-5)
    assert not torch.allclose(outputs["pooled"], outputs["embeddings"])  # CLS before its normalisation
    torch.testing.assert_close(torch.nn.functional.normalize(outputs["pooled"], dim=-1), outputs["embeddings"])
    cu = batch.cu_seqlens.tolist()
    assert outputs["token_embeddings"].shape == (cu[-1], engine.model.config.hidden_size)
    assert outputs["token_logits"].shape == (cu[-1], 1)
    torch.testing.assert_close(torch.nn.functional.normalize(outputs["token_projected"], dim=-1),
                               outputs["token_embeddings"])
    for index, expected in enumerate(reference):
        begin, end = cu[index], cu[index + 1]
        # The adapter drops the rows vLLM's BOSEOSFilter drops: BOS for ColBERT, BOS and EOS for the weights.
        torch.testing.assert_close(outputs["token_embeddings"][begin + 1:end], expected["colbert"],
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.relu(outputs["token_logits"][begin + 1:end - 1, 0]), expected["weights"],
                                   rtol=1e-5, atol=1e-5)
    assert bool((outputs["token_logits"] < 0).any())  # the relu is the adapter's to apply


def test_per_request_token_outputs_are_padded_per_sequence(checkpoint):
    sentences = texts()
    engine = PackedEngine.load(families.by_name("bge_m3"), settings_for(checkpoint, "varlen"))
    batch = packed(checkpoint, [sentences[:2], sentences[2:]])
    whole = engine.run(batch)
    first, second = batch.split(whole, engine.token_outputs)
    lengths = batch.lengths.tolist()
    assert first["token_embeddings"].shape == (2, max(lengths[:2]), engine.model.config.hidden_size)
    assert second["token_logits"].shape == (3, max(lengths[2:]), 1) and second["embeddings"].shape[0] == 3
    assert bool((second["token_logits"][1, lengths[3]:] == 0).all())


def test_only_the_token_outputs_asked_for_are_computed(checkpoint):
    sentences = texts()
    engine = PackedEngine.load(families.by_name("bge_m3"), settings_for(checkpoint, "varlen"))
    batch = packed(checkpoint, [sentences[:2], sentences[2:]])
    whole = engine.run(batch)
    lexical = engine.run(batch, wanted=frozenset({"token_logits"}))
    assert tuple(lexical) == ("embeddings", "pooled", "token_logits")
    dense = engine.run(batch, wanted=frozenset({"embeddings"}))
    assert tuple(dense) == ("embeddings", "pooled")
    colbert = engine.run(batch, wanted=frozenset({"token_embeddings"}))
    assert tuple(colbert) == ("embeddings", "pooled", "token_embeddings")
    for name, tensor in {**lexical, **colbert}.items():
        torch.testing.assert_close(tensor, whole[name])
    first, _ = batch.split(lexical, engine.token_outputs)
    assert set(first) == {"embeddings", "pooled", "token_logits"}


def card_of(checkpoint, architecture: str = ARCHITECTURE) -> ModelCard:
    declaration = declarations.by_name("bge_m3")
    return model_card(ModelParameters.from_mapping({"architecture": architecture}), declaration, str(checkpoint),
                      task=declaration.task, token_type_input=declaration.uses_token_types, fallback_name="bge_m3",
                      local_files_only=True)


def test_the_card_and_the_triton_outputs(checkpoint):
    card = card_of(checkpoint)
    assert (card.task, card.normalizes, card.sparse, card.embedding_size) == ("embed", True, False, 48)
    assert card.extra_tasks == ["token_embed", "token_classify"] and card.token_activation == "relu"
    assert (card.bos_token_id, card.eos_token_id) == (0, 2)
    assert ModelCard.from_json(card.to_json()) == card
    family = declarations.by_name("bge_m3")
    assert family.output_kind == "bge_m3" and declarations.by_name("roberta_embedding").extra_tasks == ()
    config = complete_config({"name": "bge_m3_embedder"}, family.output_kind, uses_token_types=True)
    assert [(o["name"], o["dims"]) for o in config["output"]] == [
        ("embeddings", [-1]), ("pooled", [-1]), ("token_embeddings", [-1, -1]), ("token_projected", [-1, -1]),
        ("token_logits", [-1, -1])]


def test_an_xlm_roberta_is_served_as_bge_m3_only_with_the_architecture_override(checkpoint, tmp_path):
    xlm_roberta = {"architectures": ["XLMRobertaModel"]}
    assert declarations.family_for_config(xlm_roberta, ARCHITECTURE).name == "bge_m3"
    # The two head files beside the checkpoint do not pick it by themselves (vLLM needs the override too).
    assert declarations.family_for_config(xlm_roberta).name == "roberta_embedding"
    with pytest.raises(declarations.UnsupportedArchitecture, match="not served by the bge_m3 family"):
        PackedEngine.load(families.by_name("bge_m3"), settings_for(checkpoint, "varlen", architecture=""))
    headless = bge_m3_checkpoint(tmp_path / "headless")
    (headless / "colbert_linear.pt").unlink()
    with pytest.raises(declarations.UnsupportedArchitecture, match="colbert_linear.pt"):
        PackedEngine.load(families.by_name("bge_m3"), settings_for(headless, "varlen"))


# The adapter over a fake gateway: what /pooling and TEI's /embed_sparse make of BGE-M3's outputs.

class BgeM3Gateway(HealthyGateway):
    """Stands in for TritonGateway with BGE-M3's outputs as functions of the token ids: a token's lexical logit is
    ``id % 7 - 2`` (some negative), its ColBERT vector ``[id, position, 1]`` (projected: twice that), a sequence's
    dense vector ``[length, 1]``."""

    def __init__(self):
        self.calls: list[tuple[str, ...]] = []

    def refuse_if_busy(self, triton_model: str) -> None:
        pass

    def leave_admission_board(self) -> None:
        pass

    async def infer(self, triton_model: str, encoded, outputs: tuple[str, ...], lora_ids=None) -> dict[str, np.ndarray]:
        self.calls.append(outputs)
        ids, lengths = encoded.input_ids.astype(np.float32), encoded.lengths
        inside = np.arange(ids.shape[1])[None, :] < lengths[:, None]
        positions = np.broadcast_to(np.arange(ids.shape[1], dtype=np.float32), ids.shape)
        vectors = np.stack([ids, positions, np.ones_like(ids)], axis=-1) * inside[..., None]
        answers = {"token_logits": ((ids % 7 - 2) * inside)[..., None], "token_embeddings": vectors,
                   "token_projected": 2 * vectors,
                   "embeddings": np.stack([lengths, np.ones_like(lengths)], axis=1).astype(np.float32)}
        return {name: answers[name] for name in outputs}


@pytest.fixture(scope="module")
def xlmr_tokenizer(tmp_path_factory):
    from tests.support.tiny_models import roberta_tokenizer

    return roberta_tokenizer(tmp_path_factory.mktemp("xlmr"))


@pytest.fixture
def api(monkeypatch, xlmr_tokenizer):
    encoder = TextEncoder(xlmr_tokenizer, max_model_len=64, sends_token_types=False)
    model = ServedModel(name="bge-m3", triton_model="bge_m3_embedder", task="embed", checkpoint="/checkpoints/bge-m3",
                        encoder=encoder, id2label={}, num_labels=0, created=1, embedding_size=2, normalizes=True,
                        token_activation="relu", extra_tasks=("token_embed", "token_classify"), bos_token_id=0,
                        eos_token_id=2)
    with app_over(monkeypatch, [model], BgeM3Gateway(), max_items_per_request=16) as running:
        yield running


API_TEXTS = ["paris is the capital of france", "snow snow snow"]


def test_pooling_token_classify_gives_one_relud_weight_per_token_without_bos_and_eos(api, xlmr_tokenizer):
    client, gateway = api
    for use_activation in (None, False):
        body = {"model": "bge-m3", "task": "token_classify", "input": API_TEXTS}
        if use_activation is not None:
            body["use_activation"] = use_activation
        response = client.post("/pooling", json=body)
        assert response.status_code == 200, response.text
        assert gateway.calls[-1] == ("token_logits",)
        for item, text in zip(response.json()["data"], API_TEXTS):
            ids = np.array(xlmr_tokenizer(text)["input_ids"])
            assert ids[0] == 0 and ids[-1] == 2
            logits = (ids[1:-1] % 7 - 2).astype(np.float32)
            assert item["data"] == (logits if use_activation is False else np.maximum(logits, 0)).tolist()


def test_pooling_token_embed_drops_only_bos_and_follows_use_activation(api, xlmr_tokenizer):
    client, gateway = api
    for use_activation, scale, output in ((None, 1, "token_embeddings"), (False, 2, "token_projected")):
        body = {"model": "bge-m3", "task": "token_embed", "input": API_TEXTS[0], "use_activation": use_activation}
        response = client.post("/pooling", json={k: v for k, v in body.items() if v is not None})
        assert response.status_code == 200, response.text
        assert gateway.calls[-1] == (output,)
        ids = xlmr_tokenizer(API_TEXTS[0])["input_ids"]
        expected = [[scale * float(token), scale * float(position), scale * 1.0]
                    for position, token in enumerate(ids)][1:]  # </s> kept
        assert response.json()["data"][0]["data"] == expected
    # Without special tokens the first token is no BOS: nothing is dropped.
    response = client.post("/pooling", json={"model": "bge-m3", "task": "token_classify", "input": "snow",
                                             "add_special_tokens": False})
    ids = np.array(xlmr_tokenizer("snow", add_special_tokens=False)["input_ids"])
    assert response.json()["data"][0]["data"] == np.maximum(ids % 7 - 2, 0).astype(np.float32).tolist()


def test_pooling_embed_is_the_dense_vector_and_other_tasks_are_refused(api):
    client, gateway = api
    response = client.post("/pooling", json={"model": "bge-m3", "input": "snow"})
    assert response.status_code == 200 and gateway.calls[-1] == ("embeddings",)
    assert client.post("/v1/embeddings", json={"model": "bge-m3", "input": "snow"}).status_code == 200
    assert gateway.calls[-1] == ("embeddings",)
    refused = client.post("/pooling", json={"model": "bge-m3", "task": "classify", "input": "snow"})
    assert refused.status_code == 400
    assert refused.json()["error"]["message"] == (
        "Unsupported task: 'classify' Supported tasks: ('embed', 'token_embed', 'token_classify')")


def test_embed_sparse_gives_flagembeddings_lexical_weights(api, xlmr_tokenizer):
    client, gateway = api
    response = client.post("/embed_sparse", json={"inputs": API_TEXTS})
    assert response.status_code == 200, response.text
    assert gateway.calls[-1] == ("token_logits",)
    for entries, text in zip(response.json(), API_TEXTS):
        expected: dict[int, float] = {}
        for token in xlmr_tokenizer(text)["input_ids"]:
            weight = token % 7 - 2
            if token not in (0, 1, 2, 3) and weight > 0:  # cls, pad, eos, unk; weights <= 0
                expected[token] = max(weight, expected.get(token, 0))
        assert entries == [{"index": token, "value": float(expected[token])} for token in sorted(expected)]
    repeated = xlmr_tokenizer(API_TEXTS[1])["input_ids"]
    assert len(repeated) > len(set(repeated)) and response.json()[1]  # repeated ids: one entry each, the max
    assert any(token % 7 - 2 <= 0 for token in repeated[1:-1])  # some weights left out
