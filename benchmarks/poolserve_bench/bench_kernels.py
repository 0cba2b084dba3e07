"""Time each Triton kernel against the torch eager composite it replaces (a GPU benchmark, not a test).

    python -m poolserve_bench.bench_kernels --out benchmarks/results [--sweep] [--commit SHA]

For each operation and size it reports the median time of both versions
(``triton.testing.do_bench``), the speedup, and the achieved bandwidth over the fewest bytes the
operation must move (each input read once, each output written once), as a share of the measured
device-to-device copy bandwidth (bytes read plus written). Rows go to ``kernels.csv`` with the GPU
name, versions and commit; ``--sweep`` also times the tile-size candidates whose winners are the
constants at the top of each kernel file (``kernels_sweep.csv``).

Composites (what a user writes in torch today):
  cls / last       hidden.index_select(0, cu[:-1] | cu[1:] - 1)
  mean             segment sum with index_add_ in fp32, divided by the lengths (the torch reference)
  mean_normalized  the same, then F.normalize
  score_head       index_select of the last tokens, then addmm in the model dtype, fp32 activation
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import platform
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

from poolserve_bench.results_csv import write_csv
from poolserve_kernels.pooling import pool_reference, pool_triton
from poolserve_kernels.score_head import score_head_triton

# The modules themselves (``poolserve_kernels.score_head`` the attribute is the dispatch function).
pooling_module = importlib.import_module("poolserve_kernels.pooling")
head_module = importlib.import_module("poolserve_kernels.score_head")

SEQUENCES = (64, 256, 1024, 4096)
HIDDEN_SIZES = (384, 1024, 4096)
MEAN_TOKENS = 128  # lengths drawn uniformly from [32, 224]
DTYPE = torch.bfloat16


def median_ms(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def sweep_ms(fn) -> float | None:
    """A candidate's time, or None if its tiles do not fit the chip (shared memory, registers)."""
    try:
        return round(median_ms(fn), 5)
    except triton.runtime.errors.OutOfResources:
        return None


def copy_bandwidth_gbps() -> float:
    source = torch.randn(1 << 29, device="cuda", dtype=DTYPE)  # 1 GiB
    target = torch.empty_like(source)
    ms = median_ms(lambda: target.copy_(source))
    return 2 * source.numel() * source.element_size() / ms / 1e6


def packed(num_seqs: int, hidden_size: int, seed: int = 0):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    lengths = torch.randint(MEAN_TOKENS - 96, MEAN_TOKENS + 97, (num_seqs,), device="cuda", generator=generator)
    cu = torch.zeros(num_seqs + 1, dtype=torch.int32, device="cuda")
    cu[1:] = torch.cumsum(lengths, 0)
    hidden = torch.randn(int(cu[-1]), hidden_size, device="cuda", dtype=DTYPE, generator=generator)
    return hidden, cu


def torch_head(hidden, cu, weight, bias, activation):
    rows = hidden.index_select(0, cu[1:].long() - 1)
    logits = torch.addmm(bias, rows, weight.t()).float()
    return logits, (torch.sigmoid(logits) if activation == "sigmoid" else torch.softmax(logits, -1))


def cases(copy_gbps: float):
    """(op, variant, num_seqs, hidden, tokens, bytes, triton_fn, torch_fn)"""
    element = torch.tensor([], dtype=DTYPE).element_size()
    for num_seqs, hidden_size in itertools.product(SEQUENCES, HIDDEN_SIZES):
        hidden, cu = packed(num_seqs, hidden_size)
        tokens = hidden.shape[0]
        out_bytes = num_seqs * hidden_size * element
        for method in ("cls", "last", "mean", "mean_normalized"):
            read = (tokens if method.startswith("mean") else num_seqs) * hidden_size * element
            yield ("pool", method, num_seqs, hidden_size, tokens, read + out_bytes,
                   lambda h=hidden, c=cu, m=method: pool_triton(h, c, m),
                   lambda h=hidden, c=cu, m=method: pool_reference(h, c, m))
        for num_labels, activation in ((1, "sigmoid"), (8, "softmax")):
            weight = torch.randn(num_labels, hidden_size, device="cuda", dtype=DTYPE) / hidden_size**0.5
            bias = torch.randn(num_labels, device="cuda", dtype=DTYPE)
            moved = num_seqs * hidden_size * element + weight.numel() * element + 2 * num_seqs * num_labels * 4
            yield ("score_head", f"last+linear+{activation} L={num_labels}", num_seqs, hidden_size, tokens, moved,
                   lambda h=hidden, c=cu, w=weight, b=bias, a=activation: score_head_triton(h, w, b, a, gather="last", cu_seqlens=c),
                   lambda h=hidden, c=cu, w=weight, b=bias, a=activation: torch_head(h, c, w, b, a))
        del hidden, cu


def run_benchmark(out_dir: Path, commit: str) -> None:
    copy_gbps = copy_bandwidth_gbps()
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                python=platform.python_version(), commit=commit, dtype=str(DTYPE).replace("torch.", ""),
                copy_gbps=round(copy_gbps, 1))
    print(f"{meta['gpu']}: device-to-device copy {copy_gbps:.0f} GB/s (read + write)")
    rows = []
    for op, variant, num_seqs, hidden_size, tokens, moved, fast, slow in cases(copy_gbps):
        fast_ms, slow_ms = median_ms(fast), median_ms(slow)
        rows.append({**meta, "op": op, "variant": variant, "num_seqs": num_seqs, "hidden": hidden_size,
                     "tokens": tokens, "bytes": moved, "triton_ms": round(fast_ms, 5), "torch_ms": round(slow_ms, 5),
                     "speedup": round(slow_ms / fast_ms, 2), "triton_gbps": round(moved / fast_ms / 1e6, 1),
                     "torch_gbps": round(moved / slow_ms / 1e6, 1),
                     "pct_of_copy_bw": round(100 * moved / fast_ms / 1e6 / copy_gbps, 1)})
    write_csv(out_dir / "kernels.csv", rows)
    print(f"{'op':<11}{'variant':<28}{'seqs':>6}{'hidden':>7}{'triton ms':>11}{'torch ms':>10}{'x':>7}{'GB/s':>8}{'%copy':>7}")
    for row in rows:
        print(f"{row['op']:<11}{row['variant']:<28}{row['num_seqs']:>6}{row['hidden']:>7}{row['triton_ms']:>11.4f}"
              f"{row['torch_ms']:>10.4f}{row['speedup']:>7.2f}{row['triton_gbps']:>8.0f}{row['pct_of_copy_bw']:>7.1f}")


def run_sweep(out_dir: Path, commit: str) -> None:
    """Tile-size candidates for each kernel; the chosen constants are the module defaults."""
    rows = []
    defaults = {module: {name: getattr(module, name) for name in names} for module, names in (
        (pooling_module, ("MEAN_BLOCK_H", "BLOCK_T", "NUM_WARPS", "GATHER_BLOCK_H")),
        (head_module, ("BLOCK_N", "BLOCK_H")),
    )}
    for num_seqs, hidden_size in itertools.product((1024, 4096), (384, 1024, 4096)):
        hidden, cu = packed(num_seqs, hidden_size)
        weight = torch.randn(8, hidden_size, device="cuda", dtype=DTYPE)
        for block_h, block_t, warps in itertools.product((128, 256, 512), (8, 16, 32), (2, 4, 8)):
            pooling_module.MEAN_BLOCK_H, pooling_module.BLOCK_T, pooling_module.NUM_WARPS = block_h, block_t, warps
            rows.append(dict(op="pool mean", config=f"BLOCK_H={block_h} BLOCK_T={block_t} warps={warps}",
                             num_seqs=num_seqs, hidden=hidden_size, ms=sweep_ms(lambda: pool_triton(hidden, cu, "mean"))))
        for block_h in (256, 512, 1024, 2048):
            pooling_module.GATHER_BLOCK_H = block_h
            rows.append(dict(op="pool last", config=f"GATHER_BLOCK_H={block_h}", num_seqs=num_seqs,
                             hidden=hidden_size, ms=sweep_ms(lambda: pool_triton(hidden, cu, "last"))))
        for block_n, block_h in itertools.product((16, 32, 64), (64, 128, 256, 512)):
            head_module.BLOCK_N, head_module.BLOCK_H = block_n, block_h
            rows.append(dict(op="score_head", config=f"BLOCK_N={block_n} BLOCK_H={block_h}", num_seqs=num_seqs,
                             hidden=hidden_size, ms=sweep_ms(lambda: score_head_triton(
                                 hidden, weight, None, "softmax", gather="last", cu_seqlens=cu))))
        for module, values in defaults.items():
            for name, value in values.items():
                setattr(module, name, value)
    for row in rows:
        row.update(gpu=torch.cuda.get_device_name(), commit=commit)
    write_csv(out_dir / "kernels_sweep.csv", rows)
    # The best config per (op, size), and how far the defaults are from it.
    print("\nsweep: best per size, and the default's distance from it")
    for (op, num_seqs, hidden_size), group in itertools.groupby(
        sorted(rows, key=lambda r: (r["op"], r["num_seqs"], r["hidden"])), key=lambda r: (r["op"], r["num_seqs"], r["hidden"])
    ):
        group = [row for row in group if row["ms"] is not None]
        best = min(group, key=lambda r: r["ms"])
        print(f"  {op:<11}{num_seqs:>6}{hidden_size:>6}  best {best['config']:<36}{best['ms']:.4f} ms")




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--sweep", action="store_true", help="also time the tile-size candidates")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels needs a CUDA GPU")
    if args.sweep:
        run_sweep(args.out, args.commit)
    run_benchmark(args.out, args.commit)


if __name__ == "__main__":
    main()
