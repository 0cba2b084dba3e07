"""Charts from the benchmark CSVs (runs anywhere: no GPU needed).

    python -m poolserve_bench.plot_results [--results benchmarks/results]

kernels_<gpu>.csv → kernels_<gpu>.png: per kernel, achieved share of the device-to-device copy
bandwidth and speedup over the torch composite, against the number of sequences.
engine_<gpu>.csv → engine_<gpu>.png: sequences/s of the packed engine and padded HF per model and
workload, with model-FLOP utilisation.
reliability_soak_<name>.csv → reliability_soak_<name>.png: memory of every process over a soak.
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def save_next_to(figure, csv_path: Path, dpi: int) -> Path:
    """The chart as ``<csv name>.png`` beside its CSV."""
    figure.tight_layout()
    out = csv_path.with_suffix(".png")
    figure.savefig(out, dpi=dpi)
    plt.close(figure)
    return out


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
    return save_next_to(figure, csv_path, dpi=110)


def plot_engine(csv_path: Path) -> Path:
    rows = list(csv.DictReader(csv_path.open()))
    groups = defaultdict(dict)
    for r in rows:
        groups[f"{r['model']}\n{r['workload']}"][r["system"]] = r
    labels = list(groups)
    figure, axis = plt.subplots(figsize=(max(8, 1.5 * len(labels)), 5))
    systems = [(system, color) for system, color in
               (("padded", "#999999"), ("packed", "#1f77b4"), ("packed_compiled", "#ff7f0e"))
               if any(system in group for group in groups.values())]
    width = 0.8 / len(systems)
    for position, (system, color) in enumerate(systems):
        offset = (position - (len(systems) - 1) / 2) * width
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
    return save_next_to(figure, csv_path, dpi=110)


def plot_systems(csv_path: Path) -> Path:
    rows = list(csv.DictReader(csv_path.open()))
    groups = sorted({(r["model"], r["workload"]) for r in rows})
    figure, axes = plt.subplots(2, len(groups), figsize=(4.2 * len(groups), 7.5), squeeze=False)
    colors = {"http": "#1f77b4", "grpc": "#2ca02c", "baseline_http": "#7f7f7f"}
    for column, (model, workload) in enumerate(groups):
        mine = [r for r in rows if (r["model"], r["workload"]) == (model, workload)]
        top, bottom = axes[0][column], axes[1][column]
        for system, color in colors.items():
            points = sorted((int(r["concurrency"]), float(r["pairs_per_s"])) for r in mine if r["system"] == system)
            top.plot([p[0] for p in points], [p[1] for p in points], marker="o", color=color, label=system)
            for r in mine:
                if r["system"] == system and r["latencies_ms"] and r["concurrency"] == "16":
                    latencies = sorted(float(x) for x in r["latencies_ms"].split())
                    bottom.plot(latencies, [(i + 1) / len(latencies) for i in range(len(latencies))], color=color,
                                label=f"{system} (c=16)")
        for r in mine:
            if r["system"] == "sentence_transformers":
                top.axhline(float(r["pairs_per_s"]), color="#d62728", linestyle="--", label="ST CrossEncoder (offline)")
            if r["system"] == "bare_forward":
                bottom.axvline(float(r["p50_ms"]), color="black", linestyle=":", label="bare forward p50 (1 request)")
        top.set_xscale("log", base=2)
        top.set_xlabel("client concurrency")
        top.set_ylabel("pairs / s")
        top.set_title(f"{model}\n{workload}", fontsize=9)
        bottom.set_xscale("log")
        bottom.set_xlabel("latency ms")
        bottom.set_ylabel("CDF")
        top.legend(fontsize=7)
        bottom.legend(fontsize=7)
    figure.suptitle(f"Throughput and latency by system, bf16, {rows[0]['device']}")
    return save_next_to(figure, csv_path, dpi=100)


def plot_soak(csv_path: Path) -> Path:
    """reliability_soak_<name>.csv → its PNG: resident memory of every stack process over the soak."""
    rows = list(csv.DictReader(csv_path.open()))
    figure, axis = plt.subplots(figsize=(7.5, 4))
    minutes = [float(r["t_s"]) / 60 for r in rows]
    for name in [key for key in rows[0] if key.startswith("rss_mib:")]:
        axis.plot(minutes, [float(r[name]) for r in rows], label=name.removeprefix("rss_mib:"))
    axis.set_xlabel("minutes of steady load")
    axis.set_ylabel("resident memory (MiB)")
    axis.set_ylim(bottom=0)
    axis.legend(fontsize=8)
    axis.set_title(f"Soak: {rows[-1]['requests']} requests, memory of each process ({csv_path.stem})", fontsize=10)
    return save_next_to(figure, csv_path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    for path in sorted(args.results.glob("kernels_*.csv")):
        if "sweep" not in path.name:
            print("wrote", plot_kernels(path))
    for path in sorted(args.results.glob("engine_*.csv")):
        print("wrote", plot_engine(path))
    for path in sorted(args.results.glob("systems*.csv")):
        print("wrote", plot_systems(path))
    for path in sorted(args.results.glob("reliability_soak_*.csv")):
        print("wrote", plot_soak(path))


if __name__ == "__main__":
    main()
