"""SPLADE sparse embedders (vLLM's ``BertSpladeSparseEmbeddingModel`` over a ``BertForMaskedLM`` checkpoint) on CPU
fp32: the packed engine's ``sparse`` vectors against a direct torch computation from transformers'
``BertForMaskedLM(...).logits`` with vLLM's rule (CLS / SEP dropped when the config names them, ``log1p(relu)``,
max over tokens), several texts packed into chunks cut across requests, both bodies; a sequence left empty; the
card, the Triton output and the family picking (only with the architecture override)."""

from __future__ import annotations

import random

import pytest
import torch

from poolserve_contract import families as declarations
from poolserve_contract.card import ModelCard, model_card
from poolserve_contract.parameters import ModelParameters
from poolserve_contract.triton_config import complete_config
from poolserve_runtime import families
from poolserve_runtime.engine import PackedEngine
from poolserve_runtime.packing import PackedBatch, RequestSequences
from poolserve_runtime.settings import ModelSettings
from tests.support.tiny_models import random_text
from tests.support.token_models import splade_checkpoint, splade_reference

ARCHITECTURE = "BertSpladeSparseEmbeddingModel"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("splade")
    return {"special_ids": splade_checkpoint(root / "special_ids"),
            "no_special_ids": splade_checkpoint(root / "no_special_ids", seed=1, special_ids=False)}


def texts() -> list[str]:
    rng = random.Random(5)
    return [random_text(rng, words) for words in (6, 21, 1, 30, 9)]


def load(checkpoint, body: str, max_tokens_per_forward: int = 48) -> PackedEngine:
    settings = ModelSettings(model_name="splade", checkpoint=str(checkpoint), device=torch.device("cpu"),
                             dtype=torch.float32, max_tokens_per_forward=max_tokens_per_forward, max_model_len=0,
                             logit_mean=0.0, logit_sigma=1.0, attention=body, output_names=("sparse",),
                             compile="none", architecture=ARCHITECTURE)
    return PackedEngine.load(families.by_name("splade"), settings)


def packed(checkpoint, requests: list[list[str]], add_special_tokens: bool = True) -> PackedBatch:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    sequences = []
    for request in requests:
        encoded = [tokenizer(text, add_special_tokens=add_special_tokens) for text in request]
        ids = torch.cat([torch.tensor(e["input_ids"]) for e in encoded])
        types = torch.cat([torch.tensor(e["token_type_ids"]) for e in encoded])
        sequences.append(RequestSequences(ids, torch.tensor([len(e["input_ids"]) for e in encoded]), types))
    return PackedBatch.pack(sequences)


@pytest.mark.parametrize("kind", ["special_ids", "no_special_ids"])
@pytest.mark.parametrize("body", ["padded", "varlen"])
def test_sparse_vectors_match_vllms_rule_on_transformers_logits(checkpoints, kind, body):
    checkpoint, sentences = checkpoints[kind], texts()
    engine = load(checkpoint, body)
    batch = packed(checkpoint, [sentences[:2], sentences[2:]])  # chunks of 48 tokens cut across requests
    vectors = engine.run(batch)["sparse"]
    expected = torch.stack(splade_reference(checkpoint, sentences))
    assert vectors.shape == (len(sentences), engine.model.config.vocab_size) and vectors.dtype == torch.float32
    torch.testing.assert_close(vectors, expected, rtol=1e-5, atol=1e-5)
    assert bool((vectors >= 0).all()) and bool((vectors > 0).any())


def test_dropping_cls_and_sep_changes_the_vector_and_a_bare_pair_is_zero(checkpoints):
    checkpoint = checkpoints["special_ids"]
    engine = load(checkpoint, "varlen")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    words = tokenizer("a b c", add_special_tokens=False)["input_ids"]
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    rows = [[cls, *words, sep], words, [cls, sep], [cls]]
    batch = PackedBatch.pack([RequestSequences(torch.tensor([t for row in rows for t in row]),
                                               torch.tensor([len(row) for row in rows]), None)])
    vectors = engine.run(batch)["sparse"]
    # Dropped CLS and SEP leave the words, scored in their context of five tokens.
    torch.testing.assert_close(vectors[0], splade_reference(checkpoint, ["a b c"])[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(vectors[0], vectors[1])
    assert bool((vectors[2] == 0).all()) and bool((vectors[3] == 0).all())  # nothing left: vLLM's zero vector


def test_logits_are_computed_in_steps_of_bounded_rows(checkpoints, monkeypatch):
    checkpoint, sentences = checkpoints["special_ids"], texts()
    engine = load(checkpoint, "varlen", max_tokens_per_forward=512)
    batch = packed(checkpoint, [sentences])
    whole = engine.run(batch)["sparse"]
    monkeypatch.setattr(type(engine.family), "LOGIT_ELEMENTS_PER_STEP", 3 * engine.model.config.vocab_size)
    torch.testing.assert_close(engine.run(batch)["sparse"], whole, rtol=1e-5, atol=1e-5)  # matmuls of other shapes


def card_of(checkpoint, **parameters) -> ModelCard:
    declaration = declarations.by_name("splade")
    return model_card(ModelParameters.from_mapping({"architecture": ARCHITECTURE, **parameters}), declaration,
                      str(checkpoint), task=declaration.task, token_type_input=declaration.uses_token_types,
                      fallback_name="splade", local_files_only=True)


def test_the_card_and_the_triton_output(checkpoints):
    checkpoint = checkpoints["special_ids"]
    (checkpoint / "config_sentence_transformers.json").write_text('{"prompts": {"query": "query: "}}')
    card = card_of(checkpoint)
    assert (card.task, card.sparse, card.normalizes, card.is_matryoshka) == ("embed", True, False, False)
    assert card.embedding_size == card.vocab_size and card.prompts == {"query": "query: "}
    assert ModelCard.from_json(card.to_json()) == card
    family = declarations.by_name("splade")
    assert family.output_kind == "sparse_embed" and declarations.by_name("bert_embedding").output_kind == "embed"
    config = complete_config({"name": "splade_embedder"}, family.output_kind, uses_token_types=True)
    assert [(o["name"], o["dims"]) for o in config["output"]] == [("sparse", [-1])]


def test_a_masked_lm_is_served_as_splade_only_with_the_architecture_override(checkpoints):
    masked_lm = {"architectures": ["BertForMaskedLM"]}
    assert declarations.family_for_config(masked_lm, ARCHITECTURE).name == "splade"
    with pytest.raises(declarations.UnsupportedArchitecture, match="BertForMaskedLM"):
        declarations.family_for_config(masked_lm)
    settings = ModelSettings(model_name="splade", checkpoint=str(checkpoints["special_ids"]),
                             device=torch.device("cpu"), dtype=torch.float32, max_tokens_per_forward=48,
                             max_model_len=0, logit_mean=0.0, logit_sigma=1.0, attention="varlen",
                             output_names=("sparse",), compile="none")
    with pytest.raises(declarations.UnsupportedArchitecture, match="not served by the splade family"):
        PackedEngine.load(families.by_name("splade"), settings)
