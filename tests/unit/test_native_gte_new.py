"""The native GTE-new encoder (``NewForSequenceClassification``) against logits from the upstream code.

``tests/goldens/gte_new.json`` holds a tiny config shaped like gte-multilingual-reranker-base's, the
parameter names and shapes, the seed that draws the weights (``tests/goldens/build.py``), token ids
of mixed lengths (two of them text pairs with token types) and the logits that Alibaba-NLP's
new-impl ``modeling.py`` gave for them one sequence at a time. Here all of them run packed in one
batch, through the engine and through the module by hand.
"""

from __future__ import annotations

import pytest
import torch

from poolserve_runtime.activation import Activation
from poolserve_runtime.engine import PackedEngine
from poolserve_runtime.native import gte_new
from poolserve_runtime.native.gte_new import FAMILY
from poolserve_runtime.packing import PackedBatch, RequestSequences
from poolserve_runtime.settings import ModelSettings
from tests.goldens.build import build_golden_checkpoint, load_golden


@pytest.fixture(scope="module")
def golden():
    return load_golden("gte_new")


@pytest.fixture(scope="module")
def checkpoint(golden, tmp_path_factory):
    return build_golden_checkpoint(golden, tmp_path_factory.mktemp("gte_new"))


def packed_batch(golden) -> PackedBatch:
    ids = torch.tensor([token for row in golden["input_ids"] for token in row])
    types = torch.tensor([token for row in golden["token_type_ids"] for token in row])
    lengths = torch.tensor([len(row) for row in golden["input_ids"]])
    return PackedBatch.pack([RequestSequences(ids, lengths, types)])


def assert_matches_golden(logits: torch.Tensor, golden) -> None:
    expected = torch.tensor(golden["logits"])
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(logits[:, 0].argsort(descending=True), expected[:, 0].argsort(descending=True))


def test_golden_covers_mixed_lengths_and_pairs(golden):
    lengths = [len(row) for row in golden["input_ids"]]
    assert len(lengths) >= 5 and min(lengths) == 1 and max(lengths) == 40
    assert any(1 in row for row in golden["token_type_ids"])


@pytest.mark.parametrize("budget", [16384, 20])  # one forward; several forwards of at most 20 tokens
def test_engine_matches_upstream_logits(golden, checkpoint, budget):
    settings = ModelSettings(model_name="gte", checkpoint=str(checkpoint), device=torch.device("cpu"),
                             dtype=torch.float32, max_tokens_per_forward=budget, max_model_len=0, logit_mean=0.0,
                             logit_sigma=1.0, attention="varlen", output_names=("logits", "scores"), compile="none")
    engine = PackedEngine.load(FAMILY, settings)
    outputs = engine.run(packed_batch(golden))
    assert_matches_golden(outputs["logits"], golden)
    torch.testing.assert_close(outputs["scores"], torch.tensor(golden["scores"]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("split", [None, 3])  # the whole batch in one stream; two streams
def test_module_by_hand_matches_upstream_logits(golden, checkpoint, split):
    """Body + CLS pooling + head without the engine: the module alone against the golden."""
    model = FAMILY.load(str(checkpoint), torch.float32, torch.device("cpu"))
    rows = list(zip(golden["input_ids"], golden["token_type_ids"]))
    groups = [rows] if split is None else [rows[:split], rows[split:]]
    logits = []
    with torch.inference_mode():
        for group in groups:
            ids = torch.tensor([t for row, _ in group for t in row])
            types = torch.tensor([t for _, row in group for t in row])
            lengths = torch.tensor([len(row) for row, _ in group])
            cu = torch.zeros(len(group) + 1, dtype=torch.int32)
            cu[1:] = lengths.cumsum(0)
            positions = torch.cat([torch.arange(n) for n in lengths.tolist()]).unsqueeze(0)
            hidden = FAMILY.body(model)(input_ids=ids[None], position_ids=positions, cu_seq_lens_q=cu,
                                        cu_seq_lens_k=cu, max_length_q=int(lengths.max()),
                                        max_length_k=int(lengths.max()), token_type_ids=types[None],
                                        use_cache=False).last_hidden_state[0]
            pooled = hidden[cu[:-1].long()]  # CLS: the first token of each sequence
            logits.append(FAMILY.head_linear(model)(FAMILY.head_features(model, pooled)))
    assert_matches_golden(torch.cat(logits), golden)


def test_token_types_change_the_scores(golden, checkpoint):
    model = FAMILY.load(str(checkpoint), torch.float32, torch.device("cpu"))
    ids = torch.tensor(golden["input_ids"][5])
    with torch.inference_mode():
        typed = model(ids[None], token_type_ids=torch.tensor(golden["token_type_ids"][5])[None])
        untyped = model(ids[None])
    torch.testing.assert_close(typed, torch.tensor(golden["logits"][5:6]), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(typed, untyped)


def test_config_and_family(golden, checkpoint):
    config = FAMILY.read_config(str(checkpoint))
    FAMILY.check_architecture(config)
    assert config.architectures == ["NewForSequenceClassification"]
    assert (config.num_labels, config.vocab_size, config.pad_token_id) == (1, 320, 1)
    assert config.max_position_embeddings == 512 and config.type_vocab_size == 2
    assert config.gte_rope_theta == 20000 and config.gte_rope_scaling == {"factor": 8.0, "type": "ntk"}
    assert FAMILY.activation_for(config) is Activation.SIGMOID  # vLLM: one label, no problem_type
    assert FAMILY.pooling_for(config) == "cls" and FAMILY.bodies == ("varlen",)


def test_ntk_frequencies(golden):
    """Fixed NTK: base * factor, then divided by factor ** (2 / dim), as upstream's cache ends up."""
    config = gte_new.new_config(golden["config"])
    dim = config.hidden_size // config.num_attention_heads
    expected = 1.0 / (20000 * 8.0) ** (torch.arange(0, dim, 2).float() / dim) / 8.0 ** (2 / dim)
    torch.testing.assert_close(gte_new.rope_inv_freq(config), expected)


def test_unsupported_options_are_refused(golden):
    for change in ({"position_embedding_type": "absolute"}, {"rope_scaling": {"type": "yarn", "factor": 2.0}}):
        with pytest.raises(gte_new.UnsupportedArchitecture):
            gte_new.check_config(gte_new.new_config({**golden["config"], **change}))
