"""The native Llama variants against golden outputs recorded from their references.

- ``llama_bidirectional``: NVIDIA's bidirectional Llama reranker, golden from NVIDIA's upstream classes
  (transformers 4.47.1), see tests/goldens/llama_bidirectional.json "note".
- ``llama_normal_weights``: URM-style reward model, golden from a standalone reimplementation of
  SGLang's forward, see tests/goldens/llama_normal_weights.json "note".

Every golden sequence runs in one packed batch through the engine (one forward, and several with a
token budget of 20), and by hand (body + pool + head) as a check of the model alone.
"""

from __future__ import annotations

import pytest
import torch

import poolserve_kernels
from poolserve_runtime import varlen
from poolserve_runtime.activation import apply_activation
from poolserve_runtime.engine import PackedEngine
from poolserve_runtime.native import llama_bidirectional, llama_normal_weights
from poolserve_runtime.packing import PackedBatch, RequestSequences
from poolserve_runtime.settings import ModelSettings
from tests.goldens.build import build_golden_checkpoint, load_golden

CASES = {
    "llama_bidirectional": llama_bidirectional.FAMILY,
    "llama_normal_weights": llama_normal_weights.FAMILY,
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    golden = load_golden(request.param)
    checkpoint = build_golden_checkpoint(golden, tmp_path_factory.mktemp(request.param))
    return CASES[request.param], golden, checkpoint


def settings_for(checkpoint, budget=16384, attention="varlen") -> ModelSettings:
    return ModelSettings(model_name="m", checkpoint=str(checkpoint), device=torch.device("cpu"), dtype=torch.float32,
                         max_tokens_per_forward=budget, max_model_len=0, logit_mean=0.0, logit_sigma=1.0,
                         attention=attention, output_names=("logits", "scores"), compile="none")


def golden_batch(golden) -> PackedBatch:
    ids = torch.tensor([token for sequence in golden["input_ids"] for token in sequence], dtype=torch.int64)
    lengths = torch.tensor([len(sequence) for sequence in golden["input_ids"]], dtype=torch.int64)
    return PackedBatch.pack([RequestSequences(ids, lengths, None)])


def assert_matches_golden(logits: torch.Tensor, golden) -> None:
    expected = torch.tensor(golden["logits"], dtype=torch.float32)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(torch.argsort(logits[:, 0], descending=True), torch.argsort(expected[:, 0], descending=True))


def test_golden_shape(case):
    family, golden, _ = case
    lengths = [len(sequence) for sequence in golden["input_ids"]]
    config = golden["config"]
    assert len(lengths) >= 5 and min(lengths) == 1 and max(lengths) == 40
    assert config["num_key_value_heads"] < config["num_attention_heads"]
    assert config["architectures"][0] in family.architectures


@pytest.mark.parametrize("budget", [16384, 20])
def test_engine_matches_golden(case, budget):
    family, golden, checkpoint = case
    engine = PackedEngine.load(family, settings_for(checkpoint, budget))
    out = engine.run(golden_batch(golden))
    assert_matches_golden(out["logits"], golden)
    torch.testing.assert_close(out["scores"], torch.tensor(golden["scores"]), rtol=1e-4, atol=1e-4)


def test_engine_padded_request(case):
    """attention=padded (the CPU default): the bidirectional family still runs packed (its only body),
    the URM family runs HF's padded causal body; both match the golden."""
    family, golden, checkpoint = case
    engine = PackedEngine.load(family, settings_for(checkpoint, attention="padded"))
    assert engine.body_mode == ("varlen" if family is llama_bidirectional.FAMILY else "padded")
    assert_matches_golden(engine.run(golden_batch(golden))["logits"], golden)


def test_model_by_hand_matches_golden(case):
    """Body + pool + head without the engine: the model alone against the golden."""
    family, golden, checkpoint = case
    config = family.read_config(str(checkpoint))
    family.check_architecture(config)
    model = family.load(str(checkpoint), torch.float32, torch.device("cpu"), "sdpa")
    model.set_attn_implementation(varlen.register())
    batch = golden_batch(golden)
    cu = batch.cu_seqlens
    max_length = int((cu[1:] - cu[:-1]).max())
    with torch.inference_mode():
        hidden = family.body(model)(
            input_ids=batch.input_ids.unsqueeze(0), position_ids=varlen.packed_positions(cu, batch.input_ids.numel()),
            cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max_length, max_length_k=max_length, use_cache=False,
        ).last_hidden_state[0]
        pooled = poolserve_kernels.pool(hidden, cu, family.pooling_for(config))
        features = family.head_features(model, pooled)
        x = pooled if features is None else features
        linear = family.head_linear(model)
        logits = torch.nn.functional.linear(x.float(), linear.weight.float(),
                                            None if linear.bias is None else linear.bias.float())
    assert_matches_golden(logits, golden)
    scores = apply_activation(logits, family.activation_for(config))
    torch.testing.assert_close(scores, torch.tensor(golden["scores"]), rtol=1e-4, atol=1e-4)


def test_bidirectional_attention_is_not_causal(tmp_path):
    """A later token changes an earlier token's hidden state (it would not under causal attention)."""
    golden = load_golden("llama_bidirectional")
    checkpoint = build_golden_checkpoint(golden, tmp_path / "c")
    family = llama_bidirectional.FAMILY
    model = family.load(str(checkpoint), torch.float32, torch.device("cpu"), "sdpa")
    model.set_attn_implementation(varlen.register())
    assert all(not module.is_causal for module in model.modules() if hasattr(module, "is_causal"))
    ids = torch.tensor([golden["input_ids"][-1]])
    changed = ids.clone()
    changed[0, -1] = (int(ids[0, -1]) + 1) % golden["config"]["vocab_size"]
    cu = torch.tensor([0, ids.shape[1]], dtype=torch.int32)
    outs = []
    with torch.inference_mode():
        for x in (ids, changed):
            outs.append(family.body(model)(input_ids=x, position_ids=varlen.packed_positions(cu, x.shape[1]),
                                           cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=x.shape[1],
                                           max_length_k=x.shape[1], use_cache=False).last_hidden_state[0, 0])
    assert not torch.allclose(outs[0], outs[1])


def test_families_declare_their_wiring():
    bidirectional, normal = llama_bidirectional.FAMILY, llama_normal_weights.FAMILY
    assert bidirectional.bodies == ("varlen",) and not bidirectional.fused_gather
    assert bidirectional.folder == "llama_bidirectional_classifier"
    assert normal.folder == "llama_normal_weights_reward" and not normal.fused_gather
    assert normal.activation_for(None).value == "identity"
