"""Native reward-model families against goldens recorded from the upstream code.

``InternLM2ForRewardModel`` and ``Qwen2ForRewardModel`` are remote code upstream; their golden
files (``tests/goldens/internlm2_reward.json``, ``qwen2_reward.json``) hold a tiny config, the
parameter list the seeded weights are drawn for, the token ids and the reward upstream computed
for each sequence alone (see each file's ``note``). Here every golden sequence runs in one packed
batch through the engine, varlen and padded, and must give the same rewards and ranking.
"""

from __future__ import annotations

import pytest
import torch

from poolserve_runtime.activation import Activation
from poolserve_runtime.engine import PackedEngine
from poolserve_runtime.native import internlm2, qwen2_reward
from poolserve_runtime.packing import PackedBatch, RequestSequences
from poolserve_runtime.settings import ModelSettings
from tests.goldens.build import build_golden_checkpoint, load_golden

CASES = {"internlm2_reward": internlm2.FAMILY, "qwen2_reward": qwen2_reward.FAMILY}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("native_rewards")
    return {name: build_golden_checkpoint(load_golden(name), root / name) for name in CASES}


def golden_batch(golden):
    ids = torch.tensor([token for sequence in golden["input_ids"] for token in sequence], dtype=torch.int64)
    lengths = torch.tensor([len(sequence) for sequence in golden["input_ids"]], dtype=torch.int64)
    return PackedBatch.pack([RequestSequences(ids, lengths, None)])


@pytest.mark.parametrize("attention", ["varlen", "padded"])
@pytest.mark.parametrize("name", list(CASES))
def test_engine_matches_upstream_golden(checkpoints, name, attention):
    golden = load_golden(name)
    family = CASES[name]
    settings = ModelSettings(model_name="rm", checkpoint=str(checkpoints[name]), device=torch.device("cpu"),
                             dtype=torch.float32, max_tokens_per_forward=16384, max_model_len=0, logit_mean=0.0,
                             logit_sigma=1.0, attention=attention, output_names=("logits", "scores"), compile="none")
    engine = PackedEngine.load(family, settings)
    out = engine.run(golden_batch(golden))
    expected = torch.tensor(golden["logits"])
    torch.testing.assert_close(out["logits"], expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(out["logits"][:, 0].argsort(), expected[:, 0].argsort())
    activation = family.activation_for(engine.config)
    if activation is Activation.IDENTITY:
        torch.testing.assert_close(out["scores"], out["logits"], rtol=0, atol=0)
    else:
        assert activation is Activation.SIGMOID
        torch.testing.assert_close(out["scores"], torch.sigmoid(out["logits"]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(CASES))
def test_model_by_hand_matches_upstream_golden(checkpoints, name):
    """Body + last token + head without the engine: pins the weight conversion on its own."""
    golden = load_golden(name)
    family = CASES[name]
    config = family.read_config(str(checkpoints[name]))
    family.check_architecture(config)
    assert config.architectures == golden["config"]["architectures"] and config.num_labels == 1
    model = family.load(str(checkpoints[name]), torch.float32, torch.device("cpu"), "sdpa")
    rewards = []
    with torch.inference_mode():
        for ids in golden["input_ids"]:
            hidden = family.body(model)(input_ids=torch.tensor([ids]), use_cache=False).last_hidden_state[0, -1:]
            features = family.head_features(model, hidden)
            rewards.append(family.head_linear(model)(hidden if features is None else features)[0])
    torch.testing.assert_close(torch.stack(rewards), torch.tensor(golden["logits"]), rtol=1e-4, atol=1e-4)


def test_family_declarations():
    assert internlm2.FAMILY.architectures == ("InternLM2ForRewardModel",)
    assert internlm2.FAMILY.fused_gather and internlm2.FAMILY.pooling == "last"
    assert qwen2_reward.FAMILY.architectures == ("Qwen2ForRewardModel",)
    assert not qwen2_reward.FAMILY.fused_gather and qwen2_reward.FAMILY.pooling == "last"
    assert qwen2_reward.FAMILY.activation_for(None) is Activation.IDENTITY
    assert internlm2.FAMILY.activation_for(None) is Activation.SIGMOID


def test_wqkv_split_follows_upstream_interleave():
    """Upstream: rearrange(qkv, 'b q (h gs d) -> b q h gs d'); q = [..., :groups, :] -> (h gs), k = -2, v = -1."""
    heads, kv_heads, head_dim, hidden = 8, 2, 4, 5
    groups = heads // kv_heads
    weight = torch.randn((heads + 2 * kv_heads) * head_dim, hidden)
    x = torch.randn(3, hidden)
    qkv = (x @ weight.T).view(3, kv_heads, groups + 2, head_dim)
    q_ref = qkv[:, :, :groups].reshape(3, heads * head_dim)
    k_ref, v_ref = qkv[:, :, -2].reshape(3, -1), qkv[:, :, -1].reshape(3, -1)
    q, k, v = internlm2.split_wqkv(weight, heads, kv_heads, head_dim)
    torch.testing.assert_close(x @ q.T, q_ref)
    torch.testing.assert_close(x @ k.T, k_ref)
    torch.testing.assert_close(x @ v.T, v_ref)
