"""Multi-LoRA on CUDA: the segmented shrink/expand Triton kernels inside the packed engine against the CPU engine's
torch path (which tests/unit/test_lora_runtime.py holds equal to PEFT's merged models, 1e-5), one batch mixing
the base and three adapters of ranks 4 / 8 / 16, one with its own score head."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from poolserve_runtime import families
from poolserve_runtime.engine import PackedEngine
from poolserve_runtime.packing import PackedBatch, RequestSequences, read_lora_names
from poolserve_runtime.settings import ModelSettings
from tests.support.tiny_models import build_gpu_qwen3

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANKS = (4, 8, 16)


def write_adapter(base, folder, rank: int, seed: int, head: bool) -> str:
    """A PEFT adapter folder written as PEFT names it (base_model.model.<module>.lora_A/B.weight)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in base.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS:
            key = f"base_model.model.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=generator) * 0.2
            tensors[f"{key}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=generator) * 0.2
    if head:
        tensors["base_model.model.score.weight"] = torch.randn(base.score.weight.shape, generator=generator)
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank + seed, "target_modules": list(TARGETS),
        "bias": "none", "modules_to_save": ["score"] if head else None}))
    return str(folder)


def names_input(names: list[str]) -> torch.Tensor:
    width = max([1, *(len(name.encode()) for name in names)])
    rows = torch.zeros(len(names), width, dtype=torch.uint8)
    for row, name in zip(rows, names):
        row[:len(name.encode())] = torch.tensor(list(name.encode()), dtype=torch.uint8)
    return rows


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import transformers

    root = tmp_path_factory.mktemp("lora_gpu")
    checkpoint = build_gpu_qwen3(root / "base")
    base = transformers.AutoModelForSequenceClassification.from_pretrained(checkpoint)
    adapters = tuple((f"adapter{slot + 1}", write_adapter(base, root / f"rank{rank}", rank, slot + 1, head=slot == 1))
                     for slot, rank in enumerate(RANKS))
    return checkpoint, adapters


def load(checkpoint, adapters, device: str, dtype: torch.dtype) -> PackedEngine:
    settings = ModelSettings(model_name="lora", checkpoint=str(checkpoint), device=torch.device(device), dtype=dtype,
                             max_tokens_per_forward=16384, max_model_len=0, logit_mean=0.0, logit_sigma=1.0,
                             attention="varlen", output_names=("logits", "scores"), compile="none",
                             cuda_graph_max_tokens=512, lora_modules=adapters)
    return PackedEngine.load(families.QWEN3, settings)


def mixed_batch(engine: PackedEngine) -> tuple[PackedBatch, list[int]]:
    generator = torch.Generator().manual_seed(7)
    lengths = [5, 120, 3, 9, 170, 6, 11, 40, 8, 1]
    ids = [0, 1, 2, 3, 2, 0, 3, 1, 1, 2]
    rows = [torch.randint(5, engine.limits.vocab_size, (length,), generator=generator) for length in lengths]
    names = names_input([f"adapter{i}" if i else "" for i in ids])
    request = read_lora_names(names, RequestSequences(torch.cat(rows), torch.tensor(lengths), None),
                              engine.lora.ids_by_name, "lora")
    return PackedBatch.pack([request]), ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_kernels_in_the_engine_match_the_cpu_engine(served, dtype):
    checkpoint, adapters = served
    cpu = load(checkpoint, adapters, "cpu", torch.float32)
    gpu = load(checkpoint, adapters, "cuda", dtype)
    batch, ids = mixed_batch(cpu)
    expected = cpu.run(batch)["logits"]
    got = gpu.run(batch)["logits"]
    base_only = cpu.run(PackedBatch.pack([RequestSequences(batch.input_ids, batch.lengths, None)]))["logits"]
    adapted = [i for i, value in enumerate(ids) if value]
    assert (expected[adapted] - base_only[adapted]).abs().max() > 1e-2  # the adapters change the scores
    tolerance = 1e-4 if dtype == torch.float32 else 0.05 * expected.abs().max().item() + 0.02
    torch.testing.assert_close(got, expected, rtol=0, atol=tolerance)
    # A batch of base sequences only replays the CUDA graphs as before the adapters were attached.
    short = PackedBatch.pack([RequestSequences(batch.input_ids[:20], torch.tensor([5, 15]), None)])
    torch.testing.assert_close(gpu.run(short)["logits"], cpu.run(short)["logits"], rtol=0, atol=tolerance)
