"""FP8 matmuls (``torch._scaled_mm``) of model_runtime/poolserve_runtime/fp8.py against the dequantised
fallback, on a GPU of compute capability 8.9 or more (Ada, Hopper).

The FP8 path also rounds the activations to e4m3 (3 mantissa bits: at most 2^-4 of a normal value,
2^-10 of the row's scale below the smallest normal) and writes bf16 (8 bits: 2^-9 of the output);
the bound below adds those to an fp32 product of the dequantised weight.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from poolserve_runtime.fp8 import Fp8Linear, quantize_linear_fp8, quantize_linears, scaled_mm_supported

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or not scaled_mm_supported(torch.device("cuda")),
    reason="needs a CUDA GPU of compute capability 8.9 or more",
)


def scaled_mm_bound(x: torch.Tensor, weight: torch.Tensor, activation_scale: torch.Tensor,
                    exact: torch.Tensor) -> torch.Tensor:
    """Largest |FP8 output - exact| from rounding the activations to e4m3 and the output to bf16."""
    x, weight = x.float(), weight.float()
    activation_error = 2.0 ** -4 * x.abs() + 2.0 ** -10 * activation_scale
    return activation_error @ weight.abs().T + 2.0 ** -8 * exact.abs() + 1e-3


@pytest.mark.parametrize("strategy", ["tensor", "channel"])
def test_scaled_mm_matches_the_dequantised_weight(strategy):
    torch.manual_seed(0)
    linear = nn.Linear(256, 128).cuda()
    fp8 = quantize_linear_fp8(linear, strategy).to(torch.bfloat16)
    x = torch.randn(4, 33, 256, device="cuda", dtype=torch.bfloat16)  # 3-d input, 132 rows
    assert fp8.uses_scaled_mm(x)

    out = fp8(x)
    exact = torch.nn.functional.linear(x.float(), fp8.dequantized_weight(), fp8.bias.float())
    assert out.dtype == torch.bfloat16 and out.shape == (4, 33, 128)
    row_scale = x.float().abs().amax(dim=-1, keepdim=True) / 448.0
    assert torch.all((out.float() - exact).abs() <= scaled_mm_bound(x, fp8.dequantized_weight(), row_scale, exact))
    # The fallback (float32 input on the same GPU) uses the same dequantised weight.
    assert not fp8.uses_scaled_mm(x.float())
    assert torch.allclose(fp8(x.float()), exact, rtol=1e-5, atol=1e-4)


def test_static_input_scale():
    torch.manual_seed(1)
    weight_fp8 = (torch.randn(64, 128) * 100).clamp(-448, 448).to(torch.float8_e4m3fn).cuda()
    weight_scale = torch.rand(64, 1, device="cuda") / 100 + 1e-3
    x = torch.randn(10, 128, device="cuda", dtype=torch.bfloat16)
    input_scale = x.float().abs().amax() / 448.0
    fp8 = Fp8Linear(weight_fp8, weight_scale, input_scale=input_scale.reshape(1))
    assert fp8.uses_scaled_mm(x)

    exact = x.float() @ fp8.dequantized_weight().T
    assert torch.all((fp8(x).float() - exact).abs() <= scaled_mm_bound(x, fp8.dequantized_weight(), input_scale, exact))


def test_misaligned_features_fall_back():
    fp8 = quantize_linear_fp8(nn.Linear(24, 40).cuda(), "channel").to(torch.bfloat16)
    x = torch.randn(5, 24, device="cuda", dtype=torch.bfloat16)
    assert not fp8.uses_scaled_mm(x)
    assert torch.equal(fp8(x), torch.nn.functional.linear(x, fp8.dequantized_weight(torch.bfloat16), fp8.bias))


def test_bert_classifier_scores_stay_close_to_bf16():
    import transformers as tf

    torch.manual_seed(2)
    config = tf.BertConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                           intermediate_size=1024, num_labels=1)
    model = tf.BertForSequenceClassification(config).cuda().to(torch.bfloat16).eval()
    input_ids = torch.randint(0, 1000, (32, 48), device="cuda")
    with torch.no_grad():
        bf16_scores = model(input_ids=input_ids).logits.float().squeeze(-1)
        assert len(quantize_linears(model, "channel")) == 4 * 6
        fp8_scores = model(input_ids=input_ids).logits.float().squeeze(-1)
    assert not torch.equal(fp8_scores, bf16_scores)
    ranks = [scores.argsort().argsort().float() for scores in (fp8_scores, bf16_scores)]
    assert torch.corrcoef(torch.stack(ranks))[0, 1] > 0.95  # 0.999 in an fp32 emulation on the CPU


@pytest.mark.parametrize("compile_mode", ["none", "auto"])
def test_engine_in_fp8_on_the_gpu(tmp_path, compile_mode):
    """A Qwen3 classifier served with quantization=fp8 as Triton serves it (varlen body, CUDA graphs for short
    chunks, layers compiled by default): FP8 GEMMs run, and the scores stay within e4m3's rounding of bf16: a loose
    bound per score and a correlation over 32 sequences (a wrong scale or layout gives scores unrelated to bf16's).
    Loose, because e4m3 keeps 3 mantissa bits, and each
    layer re-rounds its input, so any perturbation grows. On this 128-wide random model an fp32 emulation on the
    CPU differs from the fp32 model by up to 0.74x the scores' spread, and on an H100 an fp32 emulation of the
    very same FP8 arithmetic differed from the _scaled_mm engine by as much as bf16 does. Per layer, the GEMM
    equals its emulation tightly (the tests above). load_format=dummy draws the same weights for both."""
    import dataclasses

    from poolserve_runtime import families
    from poolserve_runtime.engine import PackedEngine
    from poolserve_runtime.packing import PackedBatch, RequestSequences
    from poolserve_runtime.settings import ModelSettings
    from tests.support.tiny_models import build_gpu_qwen3

    checkpoint = build_gpu_qwen3(tmp_path / "qwen3")
    family = families.family_for_config(families.read_config_dict(str(checkpoint)))
    settings = ModelSettings(model_name="fp8", checkpoint=str(checkpoint), device=torch.device("cuda"),
                             dtype=torch.bfloat16, max_tokens_per_forward=4096, max_model_len=0, logit_mean=0.0,
                             logit_sigma=1.0, attention="varlen", output_names=("logits", "scores"),
                             compile=compile_mode, cuda_graph_max_tokens=512)
    engines = {name: PackedEngine.load(family, dataclasses.replace(settings, **overrides)) for name, overrides in (
        ("bf16", {}), ("fp8", {"quantization": "fp8"}), ("dummy_bf16", {"load_format": "dummy"}),
        ("dummy_fp8", {"load_format": "dummy", "quantization": "fp8"}))}
    layers = [module for module in engines["fp8"].model.modules() if isinstance(module, Fp8Linear)]
    assert layers
    generator = torch.Generator().manual_seed(0)
    for lengths in ([5, 40, 17], [300, 700, 120, 900]):  # a graphed chunk, then an eager one
        lengths = torch.tensor(lengths)
        ids = torch.randint(4, engines["bf16"].limits.vocab_size, (int(lengths.sum()),), generator=generator)
        batch = PackedBatch.pack([RequestSequences(ids, lengths, None)])
        scores = {name: engine.run(batch)["logits"].float() for name, engine in engines.items()}
        for reference, fp8 in (("bf16", "fp8"), ("dummy_bf16", "dummy_fp8")):
            spread = scores[reference].std().item() + 1e-3
            assert (scores[fp8] - scores[reference]).abs().max().item() <= spread + 0.03, (reference, scores)
    # 32 sequences: enough for a correlation that scores unrelated to bf16's (a wrong scale or layout) cannot reach.
    # An fp32 emulation of this FP8 arithmetic on the CPU keeps a Pearson of 0.992-0.996 with the fp32 model here.
    lengths = torch.randint(5, 300, (32,), generator=generator)
    ids = torch.randint(4, engines["bf16"].limits.vocab_size, (int(lengths.sum()),), generator=generator)
    batch = PackedBatch.pack([RequestSequences(ids, lengths, None)])
    scores = {name: engine.run(batch)["logits"].float().squeeze(-1) for name, engine in engines.items()}
    for reference, fp8 in (("bf16", "fp8"), ("dummy_bf16", "dummy_fp8")):
        assert torch.corrcoef(torch.stack([scores[reference], scores[fp8]]))[0, 1].item() > 0.9, (reference, scores)
    x = torch.randn(7, layers[0].in_features, device="cuda", dtype=torch.bfloat16)
    assert layers[0].uses_scaled_mm(x)
