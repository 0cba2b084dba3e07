"""Token-level families on CPU fp32: ColBERT's token vectors against the direct torch computation vLLM's own
test checks (``F.normalize(F.linear(BertModel(x).last_hidden_state, W), dim=-1)``; pylate is not needed),
MaxSim against the float64 reference, the per-request padded outputs, the card and the family picking."""

from __future__ import annotations

import json
import random

import pytest
import torch

from poolserve_contract import families as declarations
from poolserve_contract.card import model_card
from poolserve_contract.families import UnsupportedArchitecture
from poolserve_contract.late_interaction import find_projection
from poolserve_contract.parameters import ModelParameters
from poolserve_contract.triton_config import complete_config
from poolserve_kernels.maxsim import maxsim_reference
from poolserve_runtime import families
from poolserve_runtime.engine import PackedEngine
from poolserve_runtime.packing import PackedBatch, RequestSequences
from poolserve_runtime.settings import ModelSettings
from tests.support.tiny_models import random_text
from tests.support.token_models import COLBERT_DIM, colbert_checkpoint, colbert_reference

OUTPUTS = ("token_embeddings", "token_projected", "maxsim_scores")


@pytest.fixture(scope="module")
def colbert(tmp_path_factory):
    return colbert_checkpoint(tmp_path_factory.mktemp("colbert") / "colbert")


def texts() -> list[str]:
    rng = random.Random(5)
    return [random_text(rng, words) for words in (4, 17, 1, 30, 8, 2)]


def load(checkpoint, body: str) -> PackedEngine:
    settings = ModelSettings(model_name="colbert", checkpoint=str(checkpoint), device=torch.device("cpu"),
                             dtype=torch.float32, max_tokens_per_forward=64, max_model_len=0, logit_mean=0.0,
                             logit_sigma=1.0, attention=body, output_names=OUTPUTS, compile="none")
    return PackedEngine.load(families.by_name("colbert"), settings)


def packed_requests(checkpoint, requests: list[list[str]]) -> PackedBatch:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    sequences = []
    for request in requests:
        ids = [torch.tensor(tokenizer(text)["input_ids"]) for text in request]
        sequences.append(RequestSequences(torch.cat(ids), torch.tensor([len(i) for i in ids]), None))
    return PackedBatch.pack(sequences)


@pytest.mark.parametrize("body", ["padded", "varlen"])
def test_token_vectors_and_maxsim_match_the_direct_computation(colbert, body):
    sentences = texts()
    requests = [sentences[:2], sentences[2:]]  # two requests: each scores its own first sequence
    engine = load(colbert, body)
    batch = packed_requests(colbert, requests)
    outputs = engine.run(batch)
    reference = colbert_reference(colbert, sentences)
    expected = torch.cat(reference)
    assert outputs["token_embeddings"].shape == (int(batch.cu_seqlens[-1]), COLBERT_DIM)
    torch.testing.assert_close(outputs["token_embeddings"], expected, rtol=1e-5, atol=1e-5)
    norms = outputs["token_projected"].norm(dim=-1, keepdim=True)
    torch.testing.assert_close(outputs["token_projected"] / norms, expected, rtol=1e-5, atol=1e-5)
    query_index = torch.tensor([0, 0, 2, 2, 2, 2])
    maxsim = maxsim_reference(expected.double(), batch.cu_seqlens, query_index)
    torch.testing.assert_close(outputs["maxsim_scores"][:, 0].double(), maxsim, rtol=1e-5, atol=1e-5)
    # vLLM's compute_maxsim_score straight from its definition, for one (query, document) pair.
    q, d = reference[2].double(), reference[5].double()
    assert outputs["maxsim_scores"][5, 0].item() == pytest.approx((q @ d.T).amax(-1).sum().item(), abs=1e-5)


def test_each_request_gets_its_padded_token_matrix(colbert):
    engine = load(colbert, "padded")
    batch = packed_requests(colbert, [["a b", "a b c d e f g"], ["x"]])
    per_request = batch.split(engine.run(batch), engine.token_outputs)
    first, second = per_request
    lengths = batch.lengths.tolist()
    assert first["token_embeddings"].shape == (2, max(lengths[:2]), COLBERT_DIM)
    assert second["token_embeddings"].shape == (1, lengths[2], COLBERT_DIM)
    assert first["maxsim_scores"].shape == (2, 1) and second["maxsim_scores"].shape == (1, 1)
    short = first["token_embeddings"][0]
    assert torch.all(short[lengths[0]:] == 0) and torch.all(short[:lengths[0]].norm(dim=-1) > 0.99)
    # the query against itself: one per query token (unit vectors)
    assert first["maxsim_scores"][0, 0].item() == pytest.approx(lengths[0], abs=1e-4)


def test_the_card_and_the_triton_outputs(colbert, tmp_path):
    family = declarations.by_name("colbert")
    card = model_card(ModelParameters.from_mapping({}), family, str(colbert), task=family.task,
                      token_type_input=True, fallback_name="colbert", local_files_only=True)
    assert (card.task, card.embedding_size, card.normalizes, card.num_labels) == ("token_embed", COLBERT_DIM, True, 0)
    config = complete_config({"name": "colbert_embedder"}, "token_embed", uses_token_types=True)
    assert [(o["name"], o["dims"]) for o in config["output"]] == [
        ("token_embeddings", [-1, -1]), ("token_projected", [-1, -1]), ("maxsim_scores", [1])]


def test_colbert_checkpoints_pick_the_family(colbert, tmp_path):
    assert declarations.family_for_config({"architectures": ["HF_ColBERT"]}).name == "colbert"
    assert declarations.family_for_config({"architectures": ["ColBERTModel"]}).name == "colbert"
    # A BertModel checkpoint with a projection: an embedder unless the architecture parameter says ColBERT.
    assert declarations.family_for_config({"architectures": ["BertModel"]}).name == "bert_embedding"
    assert declarations.family_for_config({"architectures": ["BertModel"]}, "HF_ColBERT").name == "colbert"
    plain = colbert_checkpoint(tmp_path / "plain", architecture=None)
    projection = find_projection(str(plain))
    assert (projection.tensor, projection.dim, projection.hidden_size) == ("linear.weight", COLBERT_DIM, 48)


def test_a_checkpoint_without_a_projection_is_refused(colbert, tmp_path):
    from safetensors.torch import load_file, save_file

    bare = tmp_path / "bare"
    bare.mkdir()
    for file in colbert.iterdir():
        if file.name != "model.safetensors":
            (bare / file.name).write_bytes(file.read_bytes())
    tensors = load_file(str(colbert / "model.safetensors"))
    del tensors["linear.weight"]
    save_file(tensors, str(bare / "model.safetensors"))
    with pytest.raises(UnsupportedArchitecture, match="no ColBERT projection"):
        find_projection(str(bare))
    config = json.loads((bare / "config.json").read_text())
    assert config["architectures"] == ["HF_ColBERT"]
    with pytest.raises(UnsupportedArchitecture, match="no ColBERT projection"):
        load(bare, "padded")
