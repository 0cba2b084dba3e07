"""The native NomicBERT encoder (``NomicBertModel``: nomic-embed-text-v1 / v1.5) against the upstream code.

``tests/goldens/nomic_bert.json`` holds nomic-embed-text-v1.5's config scaled down (SwiGLU, no biases, rotary on
every channel, the vocabulary padded to a multiple of 64) and a variant with the options the released checkpoints
leave off (biased projections, the GELU MLP, rotary on half of each head, token types), the parameter names and
shapes and the seed that draws the weights (``tests/goldens/build.py``), token ids of mixed lengths, and the CLS
and mean-pooled hidden states that nomic-ai/nomic-bert-2048's ``modeling_hf_nomic_bert.py`` gave for them one
sequence at a time. Here they run packed, through the module by hand and through the engine, with and without the
sentence-transformers files nomic-embed-text-v1.5 ships (mean pooling, Normalize, search prompts).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from poolserve_contract import families as declarations
from poolserve_contract.card import model_card
from poolserve_contract.families import UnsupportedArchitecture, nomic_bert_config
from poolserve_contract.parameters import ModelParameters
from poolserve_runtime import families
from poolserve_runtime.engine import PackedEngine
from poolserve_runtime.native import nomic_bert
from poolserve_runtime.native.nomic_bert import FAMILY
from poolserve_runtime.packing import PackedBatch, RequestSequences
from poolserve_runtime.settings import ModelSettings
from tests.goldens.build import build_golden_checkpoint, load_golden, write_sentence_transformers_files

# Observed worst difference to the upstream recording: 6e-6 (fp32 reductions in another order, values of order 1).
TOLERANCE = dict(rtol=1e-5, atol=5e-5)
# nomic-embed-text-v1.5's config_sentence_transformers.json prompts
PROMPTS = {"query": "search_query: ", "document": "search_document: "}
MODEL_REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"


@pytest.fixture(scope="module")
def golden():
    return load_golden("nomic_bert")


def goldens(golden) -> dict[str, dict]:
    return {"v1.5": golden, "variant": golden["variants"][0]}


@pytest.fixture(scope="module")
def checkpoints(golden, tmp_path_factory) -> dict[str, Path]:
    """Each golden's checkpoint without sentence-transformers files (the family's defaults: CLS, normalised)."""
    root = tmp_path_factory.mktemp("nomic_bert")
    return {name: build_golden_checkpoint(case, root / name) for name, case in goldens(golden).items()}


@pytest.fixture(scope="module")
def embedder(golden, tmp_path_factory) -> Path:
    """The v1.5 golden with the sentence-transformers files nomic-embed-text-v1.5 ships."""
    directory = build_golden_checkpoint(golden, tmp_path_factory.mktemp("nomic_embed") / "v1.5")
    return write_sentence_transformers_files(directory, golden["config"]["n_embd"], "mean", normalize=True,
                                             prompts=PROMPTS, max_seq_length=8192)


def load_engine(checkpoint: Path, budget: int = 16384, architecture: str = "") -> PackedEngine:
    settings = ModelSettings(model_name="nomic", checkpoint=str(checkpoint), device=torch.device("cpu"),
                             dtype=torch.float32, max_tokens_per_forward=budget, max_model_len=0, logit_mean=0.0,
                             logit_sigma=1.0, attention="varlen", output_names=("embeddings", "pooled"),
                             compile="none", architecture=architecture)
    return PackedEngine.load(FAMILY, settings)


def packed_batch(case) -> PackedBatch:
    """The golden rows as two requests (the first three rows, the rest)."""
    rows = list(zip(case["input_ids"], case["token_type_ids"]))
    requests = [rows[:3], rows[3:]]
    return PackedBatch.pack([RequestSequences(torch.tensor([t for ids, _ in group for t in ids]),
                                              torch.tensor([len(ids) for ids, _ in group]),
                                              torch.tensor([t for _, types in group for t in types]))
                             for group in requests])


def body_states(model, rows) -> list[torch.Tensor]:
    """Last hidden states of ``rows`` ((ids, types) pairs) run as one packed stream, one tensor per row."""
    ids = torch.tensor([t for row, _ in rows for t in row])
    types = torch.tensor([t for _, row in rows for t in row])
    lengths = [len(row) for row, _ in rows]
    cu = torch.zeros(len(rows) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    with torch.inference_mode():
        hidden = FAMILY.body(model)(input_ids=ids[None], cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                                    max_length_q=max(lengths), max_length_k=max(lengths),
                                    token_type_ids=types[None], use_cache=False).last_hidden_state[0]
    return list(hidden.split(lengths))


def test_the_goldens_cover_what_they_should(golden):
    lengths = [len(row) for row in golden["input_ids"]]
    assert min(lengths) == 1 and max(lengths) == 40 and len(lengths) >= 5
    variant = golden["variants"][0]
    assert any(1 in row for row in variant["token_type_ids"])
    assert (golden["config"]["activation_function"], variant["config"]["activation_function"]) == ("swiglu", "gelu")
    assert variant["config"]["rotary_emb_fraction"] == 0.5 and variant["config"]["qkv_proj_bias"]


# --- The module against the upstream recording ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["v1.5", "variant"])
def test_module_by_hand_matches_upstream(golden, checkpoints, name):
    """Mean and first-token pooling of the packed body against the upstream hidden states."""
    case = goldens(golden)[name]
    model = FAMILY.load(str(checkpoints[name]), torch.float32, torch.device("cpu"))
    states = body_states(model, list(zip(case["input_ids"], case["token_type_ids"])))
    torch.testing.assert_close(torch.stack([s.mean(0) for s in states]), torch.tensor(case["mean_pooled"]),
                               **TOLERANCE)
    torch.testing.assert_close(torch.stack([s[0] for s in states]), torch.tensor(case["first_token"]), **TOLERANCE)


@pytest.mark.parametrize("name", ["v1.5", "variant"])
def test_a_packed_stream_equals_each_sequence_alone(golden, checkpoints, name):
    """Packing keeps the sequences apart: attention and rotary positions restart at each sequence."""
    case = goldens(golden)[name]
    model = FAMILY.load(str(checkpoints[name]), torch.float32, torch.device("cpu"))
    rows = list(zip(case["input_ids"], case["token_type_ids"]))
    packed = body_states(model, rows)
    for row, together in zip(rows, packed):
        (alone,) = body_states(model, [row])
        torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    # The same stream in another order gives every sequence the same states.
    reordered = body_states(model, rows[::-1])[::-1]
    for together, other in zip(packed, reordered):
        torch.testing.assert_close(together, other, rtol=1e-5, atol=1e-5)


def test_token_types_change_the_states(golden, checkpoints):
    case = golden["variants"][0]
    model = FAMILY.load(str(checkpoints["variant"]), torch.float32, torch.device("cpu"))
    ids, types = case["input_ids"][1], case["token_type_ids"][1]
    (typed,) = body_states(model, [(ids, types)])
    (untyped,) = body_states(model, [(ids, [0] * len(ids))])
    torch.testing.assert_close(typed.mean(0), torch.tensor(case["mean_pooled"][1]), **TOLERANCE)
    assert not torch.allclose(typed, untyped, atol=1e-3)


# --- Through the engine -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [16384, 20])  # one forward; several forwards of at most 20 tokens
@pytest.mark.parametrize("name", ["v1.5", "variant"])
def test_engine_without_sentence_transformers_files_pools_cls_normalised(golden, checkpoints, name, budget):
    case = goldens(golden)[name]
    engine = load_engine(checkpoints[name], budget)
    assert (engine.pooling, engine.normalizes) == ("cls", True)  # the family's default (vLLM's: CLS, normalised)
    outputs = engine.run(packed_batch(case))
    expected = torch.tensor(case["first_token"])
    torch.testing.assert_close(outputs["pooled"], expected, **TOLERANCE)
    torch.testing.assert_close(outputs["embeddings"], torch.nn.functional.normalize(expected, dim=-1), **TOLERANCE)


@pytest.mark.parametrize("budget", [16384, 20])
def test_engine_reads_the_sentence_transformers_files(golden, embedder, budget):
    """nomic-embed-text-v1.5's modules: mean pooling, then Normalize."""
    engine = load_engine(embedder, budget)
    assert (engine.pooling, engine.normalizes) == ("mean", True)
    assert "family=nomic_bert_embedding" in engine.describe() and "pooling=mean" in engine.describe()
    outputs = engine.run(packed_batch(golden))
    expected = torch.tensor(golden["mean_pooled"])
    torch.testing.assert_close(outputs["pooled"], expected, **TOLERANCE)
    torch.testing.assert_close(outputs["embeddings"], torch.nn.functional.normalize(expected, dim=-1), **TOLERANCE)
    cosines = torch.nn.functional.cosine_similarity(outputs["embeddings"].double(), expected.double(), dim=1)
    assert bool((cosines >= 0.99999).all()), cosines.tolist()


def test_the_card_the_family_and_the_folder(golden, embedder):
    family = declarations.family_for_config(declarations.read_config_dict(str(embedder)))
    assert family.name == "nomic_bert_embedding" and family.folder == "nomic_bert_embedder"
    assert families.by_folder("nomic_bert_embedder") is FAMILY and FAMILY.task == "embed"
    card = model_card(ModelParameters.from_mapping({}), family, str(embedder), task="embed",
                      token_type_input=family.uses_token_types, fallback_name="nomic", local_files_only=True)
    assert (card.task, card.family, card.architecture) == ("embed", "nomic_bert_embedding", "NomicBertModel")
    assert (card.embedding_size, card.normalizes, card.prompts) == (48, True, PROMPTS)
    # vLLM's default length: n_positions (512) capped at max_trained_positions (64), whatever
    # sentence_bert_config.json's max_seq_length (8192) says.
    assert card.max_model_len == 64 and card.vocab_size == 128 and card.sends_token_types

    from poolserve_contract.wire import SOURCE_FOLDER
    from poolserve_stack.plan import plan_models

    (planned,) = plan_models([str(embedder)], MODEL_REPOSITORY).values()
    assert planned[SOURCE_FOLDER] == "nomic_bert_embedder"


# --- Weights ----------------------------------------------------------------------------------------------------


def test_an_upstream_pooler_is_left_out(golden, tmp_path):
    """A checkpoint saved with upstream's pooler (``add_pooling_layer=True``) loads without it, as vLLM loads it."""
    directory = build_golden_checkpoint(golden, tmp_path / "with_pooler")
    state = load_file(str(directory / "model.safetensors"))
    state.update({"pooler.dense.weight": torch.randn(48, 48), "pooler.dense.bias": torch.randn(48)})
    save_file(state, str(directory / "model.safetensors"))
    model = FAMILY.load(str(directory), torch.float32, torch.device("cpu"))
    assert not any(name.startswith("pooler") for name in model.state_dict())
    states = body_states(model, list(zip(golden["input_ids"], golden["token_type_ids"])))
    torch.testing.assert_close(torch.stack([s[0] for s in states]), torch.tensor(golden["first_token"]), **TOLERANCE)


def test_swiglu_weights_are_stacked(golden):
    config = nomic_bert_config(golden["config"])
    state = {"encoder.layers.0.mlp.fc11.weight": torch.ones(256, 48), "encoder.layers.0.mlp.fc12.weight":
             torch.zeros(256, 48), "encoder.layers.0.norm1.weight": torch.ones(48)}
    converted = nomic_bert.convert_state_dict(state, config)
    assert set(converted) == {"encoder.layers.0.mlp.fc11_fc12.weight", "encoder.layers.0.norm1.weight"}
    stacked = converted["encoder.layers.0.mlp.fc11_fc12.weight"]
    assert stacked.shape == (512, 48) and bool(stacked[:256].eq(1).all()) and bool(stacked[256:].eq(0).all())


# --- Reading the config -----------------------------------------------------------------------------------------


def test_the_golden_configs_are_read(golden):
    config = nomic_bert_config(golden["config"])
    assert (config.hidden_size, config.num_attention_heads, config.num_hidden_layers) == (48, 4, 2)
    assert config.intermediate_size == 256  # n_inner 96, rounded up to a multiple of 256 as the gated MLP is
    assert config.vocab_size == 128  # 100 rows padded to pad_vocab_size_multiple 64
    assert config.layer_norm_eps == 1e-12 and config.max_position_embeddings == 64
    assert config.architectures == ["NomicBertModel"] and nomic_bert.rotary_dim(config) == 12
    variant = nomic_bert_config(golden["variants"][0]["config"])
    assert variant.intermediate_size == 80 and variant.vocab_size == 100  # GELU: n_inner as it is; no padding
    assert nomic_bert.rotary_dim(variant) == 6  # half of each 12-channel head


def test_defaults_for_keys_the_file_leaves_out():
    """NomicBertConfig's own defaults (a GPT2Config) fill what a config.json leaves out."""
    config = nomic_bert_config({"architectures": ["NomicBertModel"]})
    assert (config.hidden_size, config.num_attention_heads, config.num_hidden_layers) == (768, 12, 12)
    assert config.intermediate_size == 4 * 768  # gelu_new, not gated: 4 * n_embd
    assert (config.vocab_size, config.layer_norm_eps, config.max_position_embeddings) == (50257, 1e-5, 1024)
    assert (config.type_vocab_size, config.rotary_emb_fraction, config.qkv_proj_bias) == (2, 0.0, True)


@pytest.mark.parametrize("fields, width", [
    ({"activation_function": "swiglu", "n_embd": 768}, 2048),  # 8 * 768 / 3 = 2048, already a multiple of 256
    ({"activation_function": "swiglu", "n_embd": 96}, 256),  # int(8 * 96 / 3) = 256
    ({"activation_function": "swiglu", "n_embd": 100}, 512),  # int(266.7) = 266, rounded up
    ({"activation_function": "swiglu", "n_embd": 768, "n_inner": 3072}, 3072),  # nomic-embed-text-v1.5
    ({"activation_function": "swiglu", "n_embd": 768, "n_inner": 3000}, 3072),
    ({"activation_function": "gelu", "n_embd": 96, "n_inner": 100}, 100),  # not gated: never rounded
    ({"activation_function": "gelu", "n_embd": 96}, 384),
])
def test_the_mlp_width(fields, width):
    assert nomic_bert_config(fields).intermediate_size == width


@pytest.mark.parametrize("fields, rows", [
    ({"vocab_size": 30528, "pad_vocab_size_multiple": 64}, 30528),  # nomic-embed-text-v1.5: already a multiple
    ({"vocab_size": 30522, "pad_vocab_size_multiple": 64}, 30528),
    ({"vocab_size": 30522, "pad_vocab_size_multiple": 1}, 30522),
    ({"vocab_size": 30522, "pad_vocab_size_multiple": None}, 30522),
])
def test_the_vocabulary_is_padded(fields, rows):
    assert nomic_bert_config(fields).vocab_size == rows


@pytest.mark.parametrize("fields, length", [
    ({"n_positions": 8192, "max_trained_positions": 2048}, 2048),  # nomic-embed-text-v1 / v1.5
    ({"n_positions": 8192, "max_trained_positions": 2048, "rotary_scaling_factor": 2.0}, 2048),
    ({"n_positions": 512, "max_trained_positions": 2048}, 512),
    ({"n_positions": 0, "rotary_emb_fraction": 1.0, "max_trained_positions": 4096}, 2048),  # upstream's 2048
])
def test_the_length_is_vllms(fields, length):
    assert nomic_bert_config(fields).max_position_embeddings == length


def test_the_family_reads_the_checkpoint_itself(checkpoints, golden):
    """transformers' own nomic_bert config reads none of the n_* keys: the family and the card read the file."""
    config = FAMILY.read_config(str(checkpoints["v1.5"]))
    assert config.to_dict() == nomic_bert_config(golden["config"]).to_dict()
    assert FAMILY.checkpoint_config(str(checkpoints["v1.5"])).hidden_size == 48
    FAMILY.check_architecture(config)


# --- Refusals ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, message", [
    ({"activation_function": "gelu_new"}, "NomicBERT activation_function 'gelu_new' is not served"),
    ({"activation_function": "glu"}, "NomicBERT activation_function 'glu' is not served"),
    ({"qkv_proj_bias": True}, "NomicBERT mlp_fc1_bias / mlp_fc2_bias / qkv_proj_bias differ"),
    ({"prenorm": True}, "NomicBERT prenorm true"),
    ({"rotary_emb_fraction": 0.0}, "NomicBERT rotary_emb_fraction 0.0 \\(learned absolute positions\\)"),
    ({"rotary_emb_fraction": 0.25}, "NomicBERT rotary_emb_fraction 0.25 rotates 3.0 of 12 channels"),
    ({"rotary_emb_interleaved": True}, "NomicBERT rotary_emb_interleaved true"),
    ({"rotary_emb_scale_base": 512}, "NomicBERT rotary_emb_scale_base 512 \\(xPos scaling\\)"),
    ({"rotary_head_dim": True}, "NomicBERT rotary_head_dim true"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "NomicBERT rope_scaling"),
    ({"moe_every_n_layers": 2}, "NomicBERT moe_every_n_layers > 0"),
    ({"norm_mlp": True}, "NomicBERT norm_mlp true"),
    ({"n_embd": 50}, "NomicBERT n_embd is not a multiple of n_head"),
])
@pytest.mark.filterwarnings("ignore:`rope_scaling` is deprecated:FutureWarning")  # transformers, reading the key
def test_unserved_options_are_refused_by_name(golden, change, message):
    with pytest.raises(UnsupportedArchitecture, match=message):
        nomic_bert.check_config(nomic_bert_config({**golden["config"], **change}))


def test_the_served_configs_pass(golden):
    for case in goldens(golden).values():
        nomic_bert.check_config(nomic_bert_config(case["config"]))


def test_a_refused_checkpoint_fails_at_load(golden, tmp_path):
    directory = build_golden_checkpoint(golden, tmp_path / "prenorm")
    (directory / "config.json").write_text(json.dumps({**golden["config"], "prenorm": True}))
    with pytest.raises(UnsupportedArchitecture, match="prenorm"):
        load_engine(directory)
