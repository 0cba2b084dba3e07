"""Charts from the benchmark CSVs (runs anywhere: no GPU needed).

    python -m benchmarks.plot_results [--results benchmarks/results]

kernels_<gpu>.csv → kernels_<gpu>.png: per kernel, achieved share of the device-to-device copy
bandwidth and speedup over the torch composite, against the number of sequences.
engine_<gpu>.csv → engine_<gpu>.png: sequences/s of the packed engine and padded HF per model and
workload, with model-FLOP utilisation.
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_kernels(csv_path: Path) -> Path:
    rows = list(csv.DictReader(csv_path.open()))
    variants = sorted({(r["op"], r["variant"]) for r in rows}, key=lambda v: (v[0] != "pool", v))
    hiddens = sorted({int(r["hidden"]) for r in rows})
    figure, axes = plt.subplots(2, len(variants), figsize=(3.2 * len(variants), 6.4), sharex=True)
    for column, (op, variant) in enumerate(variants):
        for hidden in hiddens:
            points = sorted((int(r["num_seqs"]), float(r["pct_of_copy_bw"]), float(r["speedup"]))
                            for r in rows if (r["op"], r["variant"], int(r["hidden"])) == (op, variant, hidden))
            seqs = [p[0] for p in points]
            axes[0][column].plot(seqs, [p[1] for p in points], marker="o", label=f"hidden {hidden}")
            axes[1][column].plot(seqs, [p[2] for p in points], marker="o", label=f"hidden {hidden}")
        axes[0][column].set_title(f"{op}\n{variant}", fontsize=9)
        axes[0][column].axhline(70, color="grey", linestyle=":", linewidth=1)
        axes[1][column].axhline(1, color="grey", linestyle=":", linewidth=1)
        axes[1][column].set_xscale("log", base=2)
        axes[1][column].set_xlabel("sequences")
    axes[0][0].set_ylabel("% of D2D copy bandwidth")
    axes[1][0].set_ylabel("speedup over torch")
    axes[0][0].legend(fontsize=8)
    figure.suptitle(f"Triton kernels vs torch eager, bf16, {rows[0]['gpu']} (copy {rows[0]['copy_gbps']} GB/s)")
    figure.tight_layout()
    out = csv_path.with_suffix(".png")
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


def plot_engine(csv_path: Path) -> Path:
    rows = list(csv.DictReader(csv_path.open()))
    groups = defaultdict(dict)
    for r in rows:
        groups[f"{r['model']}\n{r['workload']}"][r["system"]] = r
    labels = list(groups)
    figure, axis = plt.subplots(figsize=(max(8, 1.5 * len(labels)), 5))
    width = 0.38
    for offset, system, color in ((-width / 2, "padded", "#999999"), (width / 2, "packed", "#1f77b4")):
        values = [float(groups[label][system]["sequences_per_s"]) for label in labels]
        bars = axis.bar([i + offset for i in range(len(labels))], values, width, label=system, color=color)
        for bar, label in zip(bars, labels):
            axis.annotate(f"{groups[label][system]['mfu_pct']}%", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                          ha="center", va="bottom", fontsize=7)
    axis.set_yscale("log")
    axis.set_xticks(range(len(labels)), labels, fontsize=7)
    axis.set_ylabel("sequences / s (log); labels: model FLOP utilisation")
    axis.set_title(f"Packed engine vs padded HF forward, bf16, {rows[0]['device']}")
    axis.legend()
    figure.tight_layout()
    out = csv_path.with_suffix(".png")
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    for path in sorted(args.results.glob("kernels_*.csv")):
        if "sweep" not in path.name:
            print("wrote", plot_kernels(path))
    for path in sorted(args.results.glob("engine_*.csv")):
        print("wrote", plot_engine(path))


if __name__ == "__main__":
    main()
