"""Multi-LoRA and FP8 through the whole stack (HTTP → adapter → Triton), with random weights of real configs.

    python -m poolserve_bench.bench_lora_fp8 --out benchmarks/results --name lora_fp8_h200 [--parts lora fp8 rm72b]
        [--smoke]

Every model is served with ``load_format=dummy`` (random weights of the config, seeded by tensor name), so a
checkpoint folder is a ``config.json`` and a word-level tokenizer: no 16 GB or 145 GB of weights are written.

* ``lora``: the Qwen3-Reranker-0.6B shape as ``Qwen3ForSequenceClassification``, ``/rerank`` of 64 documents
  (~140 words each) at 16 and 64 clients. ``base_alone``: the base model with no adapter; ``lora_mixed``: a
  second Triton model of the same weights with 8 rank-16 PEFT adapters on every projection, each request naming
  one of the 8 adapters or the base in turn, so every dynamic batch mixes adapters.
* ``fp8``: the 0.6B and the Qwen3-8B shapes in bf16 and with ``quantization=fp8``, the same levels; then 8
  requests of 64 pairs (512 pairs) sent to both: Spearman of the FP8 scores against bf16 and the largest
  score difference, and both against the fp32 model (bf16's own rounding, for scale).
* ``rm72b``: Qwen2.5-Math-RM-72B's config (``Qwen2ForRewardModel``) in FP8 on one GPU, ``/classify`` of 16
  conversations (~250 words each) per request at 1, 16 and 64 clients: pairs (scored texts) per second and
  p50, and the GPU memory it holds. Its bf16 reference does not fit one GPU (145 GB), so the parity rows
  compare bf16 and FP8 on the first ``--parity-layers`` of its 80 layers (the same seeded weights).

No request body repeats within a run. Rows go to ``<out>/<name>.csv``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import statistics
import subprocess
import sys
from pathlib import Path

import aiohttp
import numpy as np
import orjson
import torch
from safetensors.torch import save_file

from poolserve_bench.bench_engine import Shape
from poolserve_bench.bench_llm_rerankers import closed_loop, rerank_body, words
from poolserve_bench.bench_systems import start
from poolserve_bench.checkpoints import word_tokenizer
from poolserve_bench.results_csv import write_csv
from poolserve_runtime import families
from poolserve_stack.plan import plan_models
from poolserve_stack.processes import free_port, wait_for_http
from poolserve_stack.triton_server import TritonServer

PROJECT_ROOT = Path(__file__).resolve().parents[2]
QWEN3_0_6B = dict(model_type="qwen3", architectures=["Qwen3ForSequenceClassification"], vocab_size=151669,
                  hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                  intermediate_size=3072, max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000,
                  num_labels=1, pad_token_id=0, initializer_range=0.02)
QWEN3_8B = {**QWEN3_0_6B, "vocab_size": 151936, "hidden_size": 4096, "num_hidden_layers": 36,
            "num_attention_heads": 32, "intermediate_size": 12288}
# Qwen/Qwen2.5-Math-RM-72B config.json
QWEN25_RM_72B = dict(model_type="qwen2", architectures=["Qwen2ForRewardModel"], vocab_size=152064, hidden_size=8192,
                     num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, intermediate_size=29568,
                     max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000, num_labels=1, pad_token_id=0,
                     initializer_range=0.02, tie_word_embeddings=False)
SMOKE = {"0.6B": {**QWEN3_0_6B, "vocab_size": 4096, "hidden_size": 64, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 128},
         "72B": {**QWEN25_RM_72B, "vocab_size": 4096, "hidden_size": 64, "num_hidden_layers": 4,
                 "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128}}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_ADAPTERS = 8
LORA_RANK = 16
PARITY_REQUESTS = 8  # of 64 documents: 512 pairs


def write_config_folder(config: dict, directory: Path) -> Path:
    """``config.json`` and a word-level tokenizer: all that ``load_format=dummy`` reads."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    if not (directory / "tokenizer.json").exists():
        shape = Shape(directory.name, families.QWEN3, config, ())
        word_tokenizer(shape).save_pretrained(directory)
    return directory


def write_lora_adapters(config: dict, root: Path, count: int, rank: int) -> list[tuple[str, Path]]:
    """``count`` random PEFT LoRA adapters (rank ``rank``, alpha 2·rank) on every projection of every layer."""
    hidden, heads, kv_heads = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    shapes = {"q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv_heads * head_dim),
              "v_proj": (hidden, kv_heads * head_dim), "o_proj": (heads * head_dim, hidden),
              "gate_proj": (hidden, config["intermediate_size"]), "up_proj": (hidden, config["intermediate_size"]),
              "down_proj": (config["intermediate_size"], hidden)}
    adapters = []
    for index in range(count):
        folder = root / f"adapter-{index}"
        folder.mkdir(parents=True, exist_ok=True)
        generator = torch.Generator().manual_seed(100 + index)
        tensors = {}
        for layer in range(config["num_hidden_layers"]):
            for target in LORA_TARGETS:
                fan_in, fan_out = shapes[target]
                group = "self_attn" if target in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
                key = f"base_model.model.model.layers.{layer}.{group}.{target}"
                tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, fan_in, generator=generator) / fan_in ** 0.5
                                                   ).to(torch.bfloat16)
                tensors[f"{key}.lora_B.weight"] = (torch.randn(fan_out, rank, generator=generator) * 0.02
                                                   ).to(torch.bfloat16)
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "SEQ_CLS", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
            "target_modules": list(LORA_TARGETS), "bias": "none", "base_model_name_or_path": "Qwen3-Reranker-0.6B"}))
        adapters.append((f"adapter-{index}", folder))
    return adapters


def reward_body(rng: random.Random, model: str, texts: int = 16) -> dict:
    return {"model": model, "input": [f"user {words(rng, rng.randint(20, 60))} assistant "
                                      f"{words(rng, rng.randint(120, 280))}" for _ in range(texts)]}


def gpu_memory_used_gib() -> float | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        return round(int(out.split()[0]) / 1024, 1)
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


class Stack:
    """Triton with ``models`` (served name → (checkpoint folder, parameters)) and the adapter in front."""

    def __init__(self, models: dict[str, tuple[Path, dict]], args, label: str):
        self.plan = {}
        for served, (checkpoint, parameters) in models.items():
            (triton_name, planned), = plan_models([str(checkpoint)], PROJECT_ROOT / "model_repository").items()
            self.plan[f"{triton_name}-{served}".replace(".", "-")] = {**planned, **parameters,
                                                                     "served_model_name": served}
        self.args, self.label = args, label
        self.triton = TritonServer(PROJECT_ROOT / "model_repository", self.plan,
                                   log_path=args.work / f"{label}-triton.log", ready_timeout_s=1500)
        self.adapter = None

    def __enter__(self) -> Stack:
        try:
            self.triton.start()
            port = free_port()
            self.adapter = start([sys.executable, "-m", "poolserve_adapter"], {
                "ADAPTER_TRITON_GRPC_URL": self.triton.grpc_url, "ADAPTER_PORT": str(port),
                "ADAPTER_MAX_SEQUENCES_PER_TRITON_REQUEST": "64", "ADAPTER_WORKERS": str(self.args.adapter_workers)},
                self.args.work / f"{self.label}-adapter.log")
            wait_for_http(f"http://127.0.0.1:{port}/health", self.adapter, 600)
            self.url = f"http://127.0.0.1:{port}"
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.adapter is not None:
            self.adapter.terminate()
            self.adapter.wait(timeout=30)
        self.triton.stop()


def level_row(meta, model, workload, system, concurrency, result, count_name="pairs") -> dict:
    pairs, seconds, latencies, refused = result
    row = {**meta, "model": model, "workload": workload, "system": system, "concurrency": concurrency,
           "requests": len(latencies), "refused": refused, f"{count_name}_per_s": round(pairs / seconds, 1),
           "p50_ms": round(1000 * statistics.median(latencies), 1) if latencies else None,
           "p99_ms": round(1000 * float(np.percentile(latencies, 99)), 1) if latencies else None}
    print(f"{model:<22}{workload:<12}{system:<14}c={concurrency:<3}{row[f'{count_name}_per_s']:>9.0f} {count_name}/s  "
          f"p50 {row['p50_ms']} ms  p99 {row['p99_ms']} ms  refused {refused}", flush=True)
    return row


def keep(args, rows: list[dict]) -> None:
    """The part's rows so far, written after each measurement: a run cut short keeps what it measured."""
    write_csv(args.out / f"{args.name}.csv", rows)


def measure(url: str, make_body, levels, args, count=lambda body: len(body["documents"])):
    for concurrency in levels:
        yield concurrency, asyncio.run(closed_loop(url, make_body, concurrency, args.seconds,
                                                   max(args.requests, 3 * concurrency), count=count))


async def scores_of(url: str, bodies: list[dict], field: str) -> list[float]:
    """The scores of ``bodies`` in body and document order (``field``: /rerank or /classify)."""
    out = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as session:
        for body in bodies:
            async with session.post(url, data=orjson.dumps(body), headers={"Content-Type": "application/json"}) as r:
                answer = await r.json()
                r.raise_for_status()
            if field == "rerank":
                by_index = {item["index"]: item["relevance_score"] for item in answer["results"]}
                out += [by_index[i] for i in range(len(body["documents"]))]
            else:
                out += [item["probs"][0] for item in sorted(answer["data"], key=lambda item: item["index"])]
    return out


def spearman(a: list[float], b: list[float]) -> float:
    ranks_a = np.argsort(np.argsort(a)).astype(float)
    ranks_b = np.argsort(np.argsort(b)).astype(float)
    return float(np.corrcoef(ranks_a, ranks_b)[0, 1])


def parity_row(meta, model, reference: list[float], other: list[float], note: str,
               system: str = "fp8_vs_bf16") -> dict:
    """Agreement of ``other``'s scores with ``reference``'s (``system``: "<other>_vs_<reference>")."""
    difference = np.abs(np.asarray(reference) - np.asarray(other))
    row = {**meta, "model": model, "workload": f"parity{len(reference)}", "system": system,
           "spearman": round(spearman(reference, other), 5), "max_abs_diff": round(float(difference.max()), 5),
           "mean_abs_diff": round(float(difference.mean()), 5),
           "score_std_reference": round(float(np.std(reference)), 5), "note": note}
    print(f"{model:<22}{system} parity {len(reference)} pairs: spearman {row['spearman']}  max |diff| "
          f"{row['max_abs_diff']}  mean |diff| {row['mean_abs_diff']}  (reference score std "
          f"{row['score_std_reference']}) {note}", flush=True)
    return row


def bench_lora(args, meta, work: Path) -> list[dict]:
    config = SMOKE["0.6B"] if args.smoke else QWEN3_0_6B
    model = "Qwen3-Reranker-0.6B"
    checkpoint = write_config_folder(config, work / model)
    adapters = write_lora_adapters(config, work / "adapters", LORA_ADAPTERS, LORA_RANK)
    lora_modules = ",".join(f"{name}={path}" for name, path in adapters)
    dummy = {"load_format": "dummy", **dict(args.model_set)}
    rows = []
    with Stack({model: (checkpoint, dummy), f"{model}-lora": (checkpoint, {**dummy, "lora_modules": lora_modules})},
               args, "lora") as stack:
        rng = random.Random(1)
        names = [name for name, _ in adapters] + [f"{model}-lora"]
        turn = iter(range(1 << 62))
        systems = {"base_alone": lambda: rerank_body(rng, model),
                   "lora_mixed": lambda: rerank_body(rng, names[next(turn) % len(names)])}
        for make_body in systems.values():  # warm-up: every model and adapter once
            asyncio.run(closed_loop(f"{stack.url}/rerank", make_body, 1, 3600.0, args.warmup))
        for concurrency in args.concurrency:
            for system, make_body in systems.items():
                (_, result), = measure(f"{stack.url}/rerank", make_body, [concurrency], args)
                rows.append(level_row(meta, model, "rerank64", system, concurrency, result))
                rows[-1]["adapters"] = LORA_ADAPTERS if system == "lora_mixed" else 0
                rows[-1]["lora_rank"] = LORA_RANK if system == "lora_mixed" else ""
                keep(args, rows)
    return rows


def bench_fp8(args, meta, work: Path) -> list[dict]:
    shapes = {"Qwen3-Reranker-0.6B": SMOKE["0.6B"]} if args.smoke else {
        "Qwen3-Reranker-0.6B": QWEN3_0_6B, "Qwen3-8B-classifier": QWEN3_8B}
    if args.fp8_models:
        shapes = {model: shapes[model] for model in args.fp8_models}
    rows = []
    for model, config in shapes.items():
        checkpoint = write_config_folder(config, work / model)
        dummy = {"load_format": "dummy", **dict(args.model_set)}
        served = {f"{model}-bf16": (checkpoint, dummy), f"{model}-fp8": (checkpoint, {**dummy, "quantization": "fp8"})}
        # The fp32 model (parity only) tells FP8's error apart from bf16's own rounding on these random weights.
        references = {f"{model}-fp32": (checkpoint, {**dummy, "dtype": "float32", "compile": "none"})}
        with Stack({**served, **references}, args, f"fp8-{model}") as stack:
            rng = random.Random(2)
            url = f"{stack.url}/rerank"
            for name in served:
                asyncio.run(closed_loop(url, lambda name=name: rerank_body(rng, name), 1, 3600.0, args.warmup))
            parity_rng = random.Random(3)
            bodies = [rerank_body(parity_rng, "") for _ in range(PARITY_REQUESTS)]
            bf16, fp8, fp32 = (asyncio.run(scores_of(url, [{**body, "model": name} for body in bodies], "rerank"))
                               for name in (*served, *references))
            rows.append(parity_row(meta, model, bf16, fp8, "whole model"))
            rows.append(parity_row(meta, model, fp32, bf16, "whole model", system="bf16_vs_fp32"))
            rows.append(parity_row(meta, model, fp32, fp8, "whole model", system="fp8_vs_fp32"))
            keep(args, rows)
            for concurrency in args.concurrency:
                for name in served:
                    (_, result), = measure(url, lambda name=name: rerank_body(rng, name), [concurrency], args)
                    rows.append(level_row(meta, model, "rerank64", name.rsplit("-", 1)[1], concurrency, result))
                    keep(args, rows)
    return rows


def bench_rm72b(args, meta, work: Path) -> list[dict]:
    config = SMOKE["72B"] if args.smoke else QWEN25_RM_72B
    model = "Qwen2.5-Math-RM-72B"
    rows = []
    checkpoint = write_config_folder(config, work / model)
    parity = write_config_folder({**config, "num_hidden_layers": args.parity_layers if not args.smoke else 2},
                                 work / f"{model}-{args.parity_layers}layers")
    dummy = {"load_format": "dummy", "compile": "none", **dict(args.model_set)}
    with Stack({f"{model}-part-bf16": (parity, dummy), f"{model}-part-fp8": (parity, {**dummy, "quantization": "fp8"})},
               args, "rm72b-parity") as stack:
        rng = random.Random(4)
        bodies = [reward_body(rng, "", texts=64) for _ in range(PARITY_REQUESTS)]
        reference, fp8 = (asyncio.run(scores_of(f"{stack.url}/classify", [{**body, "model": name} for body in bodies],
                                                "classify")) for name in (f"{model}-part-bf16", f"{model}-part-fp8"))
        layers = args.parity_layers if not args.smoke else 2
        rows.append(parity_row(meta, model, reference, fp8, f"first {layers} of {config['num_hidden_layers']} layers"))
        keep(args, rows)
    with Stack({model: (checkpoint, {**dummy, "quantization": "fp8"})}, args, "rm72b") as stack:
        memory = gpu_memory_used_gib()
        rng = random.Random(5)
        url = f"{stack.url}/classify"
        asyncio.run(closed_loop(url, lambda: reward_body(rng, model), 1, 3600.0, args.warmup,
                                count=lambda body: len(body["input"])))
        for concurrency, result in measure(url, lambda: reward_body(rng, model), [1, *args.concurrency], args,
                                           count=lambda body: len(body["input"])):
            rows.append(level_row(meta, model, "classify16", "fp8", concurrency, result))
            rows[-1]["gpu_memory_used_gib"] = memory
            keep(args, rows)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default="lora_fp8")
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--parts", nargs="*", default=["lora", "fp8", "rm72b"])
    parser.add_argument("--fp8-models", nargs="*", default=[], help="the fp8 part's shapes, in this order (default: all)")
    parser.add_argument("--concurrency", type=int, nargs="*", default=[16, 64])
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--requests", type=int, default=48, help="request bound of one concurrency level")
    parser.add_argument("--warmup", type=int, default=6, help="requests per system, one at a time, before the levels")
    parser.add_argument("--parity-layers", type=int, default=0,
                        help="layers of the 72B parity pair (0: 40 where the GPU holds 100 GiB or more, else 16)")
    parser.add_argument("--adapter-workers", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-lora-fp8"))
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the script, not speed")
    parser.add_argument("--model-set", type=lambda v: tuple(v.split("=", 1)), action="append", default=[],
                        metavar="KEY=VALUE", help="a parameter of every served model")
    args = parser.parse_args(argv)
    if args.smoke:
        args.concurrency, args.seconds, args.requests, args.adapter_workers, args.warmup = [2], 1.0, 2, 1, 1
    args.work.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.is_available() and not args.smoke
    if not args.parity_layers:  # bf16 and FP8 side by side: 1.76 + 0.88 GB a layer
        memory = torch.cuda.get_device_properties(0).total_memory if gpu else 0
        args.parity_layers = 40 if memory >= 100 * 2 ** 30 else 16
    meta = dict(device=torch.cuda.get_device_name() if gpu else "cpu", torch=torch.__version__,
                python=platform.python_version(), commit=args.commit)
    rows: list[dict] = []
    for part, bench in (("lora", bench_lora), ("fp8", bench_fp8), ("rm72b", bench_rm72b)):
        if part in args.parts:
            rows += bench(args, meta, args.work)
            write_csv(args.out / f"{args.name}.csv", rows)
    return rows


if __name__ == "__main__":
    main()
