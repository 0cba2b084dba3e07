"""Where the packed engine's GPU time goes, eager vs compiled layers (a GPU profile).

    python -m poolserve_bench.profile_engine --out benchmarks/results [--models NAME ...] [--workload rerank64]

For each model shape, one timed call of the packed engine (16 requests, as ``bench_engine``) runs
under ``torch.profiler``; CUDA kernel time is grouped into matmuls, attention, Triton kernels
(Inductor's fused ones and this project's pooling / head) and the rest (eager elementwise,
normalisation, copies). Written to ``profile.csv``; the top kernels are printed.
"""

from __future__ import annotations

import argparse
import platform
from collections import defaultdict
from pathlib import Path

import torch

from poolserve_bench.bench_engine import build_model, model_shapes, workload
from poolserve_bench.results_csv import write_csv
from poolserve_runtime import families
from poolserve_runtime.engine import PackedEngine
from poolserve_runtime.packing import PackedBatch, RequestSequences
from poolserve_runtime.settings import ModelSettings

CATEGORIES = (  # first match wins, on the lower-cased kernel name
    ("attention", ("flash", "fmha", "attn")),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "matmul")),
    ("triton (fused / pooling / head)", ("triton",)),
    ("copy / cast", ("copy", "cast", "cat", "index", "gather", "scatter", "fill")),
)


def category(kernel: str) -> str:
    name = kernel.lower()
    for label, needles in CATEGORIES:
        if any(needle in name for needle in needles):
            return label
    return "elementwise / reduce (eager)"


def profile(engine: PackedEngine, batch: PackedBatch) -> tuple[float, dict[str, float], list[tuple[str, float, int]]]:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for _ in range(3):
        engine.run(batch)
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine.run(batch)
        torch.cuda.synchronize()
    per_kernel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[event.name][0] += event.device_time / 1000  # us -> ms
            per_kernel[event.name][1] += 1
    by_category: dict[str, float] = defaultdict(float)
    for name, (ms, _) in per_kernel.items():
        by_category[category(name)] += ms
    top = sorted(((name, ms, count) for name, (ms, count) in per_kernel.items()), key=lambda item: -item[1])
    return sum(by_category.values()), dict(by_category), top


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default="h100")
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--models", nargs="*", default=["Qwen3-Reranker-0.6B", "bge-reranker-v2-m3"])
    parser.add_argument("--workload", default="rerank64")
    parser.add_argument("--requests", type=int, default=16)
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, python=platform.python_version(),
                commit=args.commit)
    rows = []
    for shape in model_shapes(smoke=False):
        if shape.name not in args.models:
            continue
        model = build_model(shape, device, torch.bfloat16)
        per_request = workload(args.workload, shape.config["vocab_size"], args.requests)
        generator = torch.Generator().manual_seed(1)
        batch = PackedBatch.pack([
            RequestSequences(torch.randint(5, shape.config["vocab_size"], (int(lengths.sum()),), generator=generator),
                             lengths, None) for lengths in per_request])
        for compiled in (False, True):  # eager first: compiling rewires the model's layers
            settings = ModelSettings(
                model_name=shape.name, checkpoint="<random>", device=device, dtype=torch.bfloat16,
                max_tokens_per_forward=16384,
                max_model_len=512 if shape.family in (families.BERT, families.XLM_ROBERTA) else 4096,
                logit_mean=0.0, logit_sigma=1.0, attention="varlen", output_names=("logits", "scores"),
                compile="layers" if compiled else "none")
            total, by_category, top = profile(PackedEngine(shape.family, model, settings), batch)
            system = "packed_compiled" if compiled else "packed"
            print(f"\n{shape.name} {args.workload} {system}: {total:.2f} ms of GPU kernels, "
                  f"{batch.input_ids.numel()} tokens")
            for label, ms in sorted(by_category.items(), key=lambda item: -item[1]):
                print(f"  {label:<34}{ms:>9.2f} ms {100 * ms / total:>5.1f}%")
                rows.append({**meta, "model": shape.name, "workload": args.workload, "system": system,
                             "category": label, "gpu_ms": round(ms, 3), "share_pct": round(100 * ms / total, 1),
                             "total_gpu_ms": round(total, 3), "tokens": batch.input_ids.numel()})
            for name, ms, count in top[:8]:
                print(f"    {ms:>8.2f} ms x{count:<4} {name[:110]}")
        del model
        torch.cuda.empty_cache()
    write_csv(args.out / f"profile_{args.name}.csv", rows)
    return rows


if __name__ == "__main__":
    main()
