"""URM-style Llama reward models (``LlamaForSequenceClassificationWithNormal_Weights``).

LxzGordon/URM-LLaMa-3.1-8B (an uncertainty-aware reward model fine-tuned from
Skywork-Reward-Llama-3.1-8B) ships this architecture as remote code. vLLM has no implementation;
SGLang does, and is the reference here (sgl-project/sglang ``python/sglang/srt/models/llama_reward.py``):

- a causal Llama body and ``score = Linear(hidden, num_labels, bias=False)``: ``num_labels`` (10)
  outputs that are ``num_labels // 2`` (mean, uncertainty) pairs of a normal distribution per
  attribute;
- a gating head ``weights.fc`` = Linear(h, h) + SELU + Linear(h, h) + SELU + Linear(h, num_labels // 2),
  whose parameters are float16 and whose input is cast to float16, whatever the model dtype;
- both pooled at the last token of each sequence (SGLang's ``PoolingType.LAST``), and the reward is
  ``sum_k mean_k * weight_k``: one score per sequence, returned raw (no activation).

Here the body is a stock transformers ``LlamaForSequenceClassification`` (its ``model`` and ``score``
carry the checkpoint's names) with SGLang's ``weights`` module attached. The head is split for the
engine: ``head_features`` gives the per-attribute products ``mean_k * weight_k`` (float32) and
``head_linear`` is a fixed all-ones ``Linear(num_labels // 2, 1)``, which sums them.
"""

from __future__ import annotations

import torch
from torch import nn

from poolserve_contract.families import UnsupportedArchitecture, by_name
from poolserve_runtime.activation import Activation
from poolserve_runtime.native.llama_bidirectional import NativeLlamaFamily


class NormalWeights(nn.Module):
    """SGLang's ``Weights`` gate: three float16 linears with SELU between them."""

    def __init__(self, hidden_size: int, num_labels: int):
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(hidden_size, hidden_size, dtype=torch.float16), nn.SELU(),
            nn.Linear(hidden_size, hidden_size, dtype=torch.float16), nn.SELU(),
            nn.Linear(hidden_size, num_labels // 2, dtype=torch.float16),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.to(torch.float16))


class LlamaNormalWeightsFamily(NativeLlamaFamily):
    """The gate (``weights``) and the sum over (mean, uncertainty) pairs on a stock Llama."""

    def customize(self, model: nn.Module, config) -> None:
        num_labels = int(config.num_labels)
        if num_labels < 2 or num_labels % 2:
            raise UnsupportedArchitecture(
                f"{self.architectures[0]} needs an even num_labels ((mean, uncertainty) pairs), got {num_labels}")
        model.weights = NormalWeights(config.hidden_size, num_labels)

    def load(self, checkpoint: str, dtype: torch.dtype, device: torch.device, attention: str = "sdpa",
             trust_remote_code: bool = False) -> nn.Module:
        model = self.load_llama(checkpoint, attention)
        num_labels = int(model.config.num_labels)
        model.to(device=device, dtype=dtype)
        model.weights.to(torch.float16)  # as SGLang: the gate computes in float16 at every model dtype
        # The sum over attributes, as the engine's last linear (not a checkpoint parameter).
        model.normal_weights_sum = nn.Linear(num_labels // 2, 1, bias=False, device=device, dtype=torch.float32)
        with torch.no_grad():
            model.normal_weights_sum.weight.fill_(1.0)
        return model.eval()

    def activation_for(self, config) -> Activation:
        return Activation.IDENTITY  # SGLang returns the raw reward

    def head_features(self, model: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
        half = model.config.num_labels // 2
        logits = model.score(pooled)  # [n, num_labels], model dtype
        means = logits.view(-1, half, 2)[:, :, 0]
        gate = model.weights(pooled)  # [n, half], float16
        # SGLang multiplies model-dtype means by the fp16 gate: float32 for fp32/bf16 models (type promotion),
        # float16 for fp16 models; float32 here at every dtype.
        return means.float() * gate.float()

    def head_linear(self, model: nn.Module) -> nn.Linear:
        return model.normal_weights_sum


FAMILY = LlamaNormalWeightsFamily(by_name("llama_normal_weights"))
