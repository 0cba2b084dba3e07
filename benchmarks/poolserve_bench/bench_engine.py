"""The packed engine against padded Hugging Face forwards, model by model (a GPU benchmark).

    python -m poolserve_bench.bench_engine --out benchmarks/results [--models NAME ...] [--smoke]

Model shapes are built from the real configs with random weights (no hub); workloads are drawn
with fixed seeds:

* rerank: one query (6-20 tokens) x 64 documents whose lengths follow a log-normal fitted to
  natural-questions passages (median ~140 tokens), pairs capped at 512 tokens;
* classify: 32 short texts of 8-64 tokens;
* reward: chat-formatted prompt + answer, 256-1,024 tokens (decoders only).

Systems, in one process on one GPU, all bf16:

* ``packed``: this project's engine (one packed stream per forward through varlen attention, the
  Triton pooling / score-head kernels, token budget 16,384), fed several requests at once as
  Triton's dynamic batcher would;
* ``packed_compiled``: the same with every transformer layer ``torch.compile``'d (the engine's
  ``compile`` setting; the attention call stays eager), compile time reported;
* ``padded``: what a plain server does: each request is one padded batch through
  ``AutoModelForSequenceClassification`` with SDPA.

Reported per (model, workload, system): sequences/s, tokens/s, median ms per request, model FLOP
utilisation against the measured bf16 matmul peak, and peak GPU memory. ``--smoke`` runs tiny
shapes on the CPU so CI checks the harness.
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from poolserve_bench.results_csv import write_csv
from poolserve_runtime import families, varlen
from poolserve_runtime.engine import PackedEngine
from poolserve_runtime.packing import PackedBatch, RequestSequences
from poolserve_runtime.settings import ModelSettings


@dataclass(frozen=True)
class Shape:
    name: str
    family: families.Family
    config: dict
    workloads: tuple[str, ...]


def model_shapes(smoke: bool) -> list[Shape]:
    if smoke:
        tiny = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
        return [
            Shape("tiny-xlm-roberta", families.XLM_ROBERTA, dict(model_type="xlm-roberta", vocab_size=1000,
                  max_position_embeddings=514, pad_token_id=1, num_labels=1, **tiny), ("rerank8",)),
            Shape("tiny-qwen3", families.QWEN3, dict(model_type="qwen3", vocab_size=1000, num_key_value_heads=1,
                  head_dim=16, pad_token_id=0, num_labels=1, **tiny), ("classify32",)),
            Shape("tiny-modernbert", families.MODERNBERT, dict(model_type="modernbert", vocab_size=1000,
                  local_attention=16, global_attn_every_n_layers=2, pad_token_id=0, num_labels=1, **tiny), ("rerank8",)),
            Shape("tiny-gemma2", families.GEMMA2, dict(model_type="gemma2", vocab_size=1000, num_key_value_heads=1,
                  head_dim=16, sliding_window=32, pad_token_id=0, num_labels=1, **tiny), ("classify32",)),
        ]
    return [
        Shape("bge-reranker-v2-m3", families.XLM_ROBERTA, dict(
            model_type="xlm-roberta", vocab_size=250002, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
            intermediate_size=4096, max_position_embeddings=8194, type_vocab_size=1, pad_token_id=1, num_labels=1),
            ("rerank8", "rerank64")),
        Shape("bge-reranker-base", families.XLM_ROBERTA, dict(
            model_type="xlm-roberta", vocab_size=250002, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
            intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1, num_labels=1),
            ("rerank64",)),
        Shape("ms-marco-MiniLM-L6", families.BERT, dict(
            model_type="bert", vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
            intermediate_size=1536, num_labels=1), ("rerank64", "classify1", "classify32")),
        Shape("Qwen3-Reranker-0.6B", families.QWEN3, dict(
            model_type="qwen3", vocab_size=151669, hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
            num_key_value_heads=8, head_dim=128, intermediate_size=3072, pad_token_id=0, num_labels=1,
            max_position_embeddings=40960), ("rerank64",)),
        Shape("Qwen2.5-1.5B-classifier", families.QWEN2, dict(
            model_type="qwen2", vocab_size=151936, hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
            num_key_value_heads=2, intermediate_size=8960, pad_token_id=0, num_labels=2,
            max_position_embeddings=32768), ("classify32", "rerank64")),
        Shape("Llama-3.2-1B-reward", families.LLAMA, dict(
            model_type="llama", vocab_size=128256, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
            num_key_value_heads=8, intermediate_size=8192, pad_token_id=0, num_labels=1,
            max_position_embeddings=131072), ("reward",)),
        # gte-reranker-modernbert-base: 22 layers, global attention every third, 128-token local windows.
        Shape("ModernBERT-base-reranker", families.MODERNBERT, dict(
            model_type="modernbert", vocab_size=50368, hidden_size=768, num_hidden_layers=22, num_attention_heads=12,
            intermediate_size=1152, global_attn_every_n_layers=3, local_attention=128, max_position_embeddings=8192,
            classifier_pooling="mean", pad_token_id=0, num_labels=1), ("rerank64",)),
        # A Gemma-2-2B reward model (e.g. Skywork-Reward-Gemma-2 / GRM-Gemma2-2B shapes): soft-capped
        # attention, so the engine runs it padded with eager attention, as HF does.
        Shape("Gemma2-2B-reward", families.GEMMA2, dict(
            model_type="gemma2", vocab_size=256000, hidden_size=2304, num_hidden_layers=26, num_attention_heads=8,
            num_key_value_heads=4, head_dim=256, intermediate_size=9216, sliding_window=4096,
            attn_logit_softcapping=50.0, final_logit_softcapping=30.0, query_pre_attn_scalar=256, pad_token_id=0,
            num_labels=1, max_position_embeddings=8192), ("reward",)),
    ]


def workload(name: str, vocab_size: int, requests: int, seed: int = 0) -> list[torch.Tensor]:
    """Token lengths per request (one 1-D tensor of lengths per request); ids are drawn later."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(requests):
        if name.startswith("rerank"):
            documents = int(name[len("rerank"):])
            query = torch.randint(6, 21, (1,), generator=generator)
            passages = torch.exp(torch.randn(documents, generator=generator) * 0.45 + math.log(140)).long()
            out.append((query + passages + 3).clamp(16, 512))
        elif name.startswith("classify"):
            out.append(torch.randint(8, 65, (int(name[len("classify"):]),), generator=generator))
        else:  # reward: one chat-formatted prompt + answer per request
            out.append(torch.randint(256, 1025, (1,), generator=generator))
    return out


def build_model(shape: Shape, device: torch.device, dtype: torch.dtype):
    import transformers as tf

    config = tf.AutoConfig.for_model(**shape.config)
    config.architectures = [shape.family.architectures[0]]
    torch.manual_seed(0)
    with torch.device(device):
        model = tf.AutoModelForSequenceClassification.from_config(config)
    return model.to(dtype).eval()


def flops_per_request(shape: Shape, lengths: torch.Tensor, model) -> float:
    """2 x non-embedding parameters per token, plus attention (QK^T and AV), halved when causal."""
    embedding = sum(p.numel() for n, p in model.named_parameters() if "embed" in n)
    dense = sum(p.numel() for p in model.parameters()) - embedding
    layers, hidden = shape.config["num_hidden_layers"], shape.config["hidden_size"]
    causal = 0.5 if shape.family.caches_kv else 1.0
    attention = 4 * layers * hidden * float((lengths.double() ** 2).sum()) * causal
    return 2 * dense * float(lengths.sum()) + attention


def matmul_peak_tflops(device: torch.device) -> float:
    if device.type != "cuda":
        return float("nan")
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * 10 / (time.perf_counter() - start) / 1e12


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_calls(fn, calls: int, device) -> list[float]:
    fn()  # warm-up (compiles kernels, grows allocator pools)
    synchronize(device)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def run(shapes: list[Shape], device: torch.device, out_dir: Path, commit: str, requests: int, repeats: int):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = matmul_peak_tflops(device)
    meta = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
                torch=torch.__version__, python=platform.python_version(), commit=commit,
                matmul_peak_tflops=round(peak, 1))
    print(f"{meta['device']}: bf16 matmul peak {peak:.0f} TFLOP/s")
    rows = []
    for shape in shapes:
        model = build_model(shape, device, dtype)
        vocab = shape.config["vocab_size"]
        cases = []  # (workload name, packed batch, padded inputs, sequences, tokens, flops)
        for name in shape.workloads:
            per_request = workload(name, vocab, requests)
            generator = torch.Generator().manual_seed(1)
            ids = [torch.randint(5, vocab, (int(lengths.sum()),), generator=generator) for lengths in per_request]
            all_lengths = torch.cat(per_request)
            flops = sum(flops_per_request(shape, lengths, model) for lengths in per_request)
            batch = PackedBatch.pack([RequestSequences(i, lengths, None) for i, lengths in zip(ids, per_request)])
            padded_inputs = []
            for request_ids, lengths in zip(ids, per_request):
                keep = torch.arange(int(lengths.max()))[None, :] < lengths[:, None]
                padded = torch.full(keep.shape, shape.config.get("pad_token_id", 0), dtype=torch.int64)
                padded[keep] = request_ids
                padded_inputs.append((padded.to(device), keep.long().to(device)))
            cases.append((name, batch, padded_inputs, int(all_lengths.numel()), int(all_lengths.sum()), flops))

        def settings(compile_layers: bool) -> ModelSettings:
            return ModelSettings(
                model_name=shape.name, checkpoint="<random>", device=device, dtype=dtype,
                max_tokens_per_forward=16384,
                max_model_len=512 if shape.family in (families.BERT, families.XLM_ROBERTA) else 4096,
                logit_mean=0.0, logit_sigma=1.0, attention="varlen", output_names=("logits", "scores"),
                compile="layers" if compile_layers else "none")

        # Eager systems first: compiling rewires the shared model's layers for good.
        by_case: dict[str, dict[str, dict]] = {}
        # A family with no packed body (Gemma2's soft-capping) is measured as the engine's padded body.
        systems = ("padded", "packed", "packed_compiled") if shape.family.packed else ("padded", "packed")
        for system in systems:
            compile_start = time.perf_counter()
            engine = PackedEngine(shape.family, model, settings(system == "packed_compiled")) if system != "padded" else None
            compile_seconds = time.perf_counter() - compile_start if system == "packed_compiled" else 0.0
            # One model object serves every system: switch its attention for each.
            packed_body = system != "padded" and shape.family.packed
            model.set_attn_implementation(varlen.register() if packed_body else shape.family.padded_attention)
            for name, batch, padded_inputs, sequences, tokens, flops in cases:
                if system == "padded":
                    def fn(padded_inputs=padded_inputs, model=model):
                        with torch.inference_mode():
                            for input_ids, mask in padded_inputs:
                                model(input_ids=input_ids, attention_mask=mask).logits.float().cpu()
                else:
                    def fn(engine=engine, batch=batch):
                        engine.run(batch)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                seconds = sorted(time_calls(fn, repeats, device))[repeats // 2]
                peak_memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
                achieved = flops / seconds / 1e12
                row = {**meta, "model": shape.name, "workload": name, "system": system, "requests": requests,
                       "sequences": sequences, "tokens": tokens, "seconds": round(seconds, 5),
                       "sequences_per_s": round(sequences / seconds, 1), "tokens_per_s": round(tokens / seconds),
                       "ms_per_request": round(1000 * seconds / requests, 3),
                       "model_tflops": round(achieved, 1), "mfu_pct": round(100 * achieved / peak, 1),
                       "peak_memory_gib": round(peak_memory, 2), "compile_s": round(compile_seconds, 1)}
                rows.append(row)
                by_case.setdefault(name, {})[system] = row
            del engine
        for name, systems in by_case.items():
            padded_row, packed_row = systems["padded"], systems["packed"]
            compiled_row = systems.get("packed_compiled", packed_row)
            print(f"{shape.name:<26}{name:<11} padded {padded_row['sequences_per_s']:>9.0f} seq/s  "
                  f"packed {packed_row['sequences_per_s']:>9.0f}  compiled {compiled_row['sequences_per_s']:>9.0f} seq/s"
                  f"  x{compiled_row['sequences_per_s'] / padded_row['sequences_per_s']:.2f}"
                  f"  MFU {padded_row['mfu_pct']:>5}% -> {packed_row['mfu_pct']:>5}% -> {compiled_row['mfu_pct']:>5}%"
                  f"  (compile {compiled_row['compile_s']} s)")
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    write_csv(out_dir / "engine.csv", rows)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--models", nargs="*", default=None, help="model shape names (default: all)")
    parser.add_argument("--requests", type=int, default=16, help="requests per timed call")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (CI)")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    shapes = [s for s in model_shapes(args.smoke) if not args.models or s.name in args.models]
    return run(shapes, device, args.out, args.commit, 2 if args.smoke else args.requests, 2 if args.smoke else args.repeats)


if __name__ == "__main__":
    main()
