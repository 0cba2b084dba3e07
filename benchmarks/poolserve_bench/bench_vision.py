"""Vision-language models on a GPU: bf16 parity per family, and a rerank of image documents through HTTP.

``--parity``: each VL family's tiny checkpoint (tests/support/tiny_vision.py) scored by the engine in
bfloat16 on the GPU against HF's fp32 CPU forward (the same reference the CPU tests use at 1e-4).
``--bench``: a random checkpoint of jina-reranker-m0's shape (Qwen2-VL-2B body: 28 layers of 1536,
a 32-layer 1280-wide vision tower; the MLP score head) served by the real stack (tritonserver +
adapter), ``/rerank`` with 16 image documents per request (unique images per request, 448x448: 256
image tokens each) at several client counts. Rows go to ``vision_<name>.csv``.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def parity(kinds: list[str], device: torch.device) -> list[dict]:
    from poolserve_runtime.engine import PackedEngine
    from poolserve_runtime.families import by_name
    from poolserve_runtime.packing import PackedBatch
    from poolserve_runtime.settings import ModelSettings
    from poolserve_runtime.vision import BatchImages
    from poolserve_runtime.vision_families import QWEN_IMAGE
    from tests.support.tiny_vision import (
        build_nemotron_vl_checkpoint,
        build_vision_checkpoint,
        make_image,
        nemotron_reference_scores,
        packed_vision_requests,
        reference_scores,
    )

    rows = []
    images = [[make_image(90, 70, 1)], [], [make_image(60, 120, 2), make_image(50, 50, 3)]]
    for kind in kinds:
        root = Path(tempfile.mkdtemp())
        nemotron = kind == "llama_nemotron_vl"
        checkpoint = build_nemotron_vl_checkpoint(root / kind) if nemotron else build_vision_checkpoint(kind, root / kind)
        family = by_name({"qwen3_vl_reranker": "qwen3_vl"}.get(kind, kind))
        placeholder = "<image>" if nemotron else QWEN_IMAGE
        row_images = [images[0], [], images[2][:1]] if nemotron else images
        prompts = [f"{placeholder} question one", "plain text only", f"{placeholder} two {placeholder if not nemotron else ''}"]
        reference = (nemotron_reference_scores(checkpoint, prompts, row_images) if nemotron
                     else reference_scores(kind, checkpoint, prompts, row_images)).flatten()
        settings = ModelSettings(model_name=kind, checkpoint=str(checkpoint), device=device, dtype=torch.bfloat16,
                                 max_tokens_per_forward=8192, max_model_len=0, logit_mean=0, logit_sigma=1,
                                 attention="padded", output_names=("logits", "scores"))
        engine = PackedEngine.load(family, settings)
        requests, request_images = packed_vision_requests(family, checkpoint, prompts, row_images, placeholder,
                                                          (100,) if kind == "jina_vl" else ())
        scores = engine.run(PackedBatch.pack(requests), BatchImages.concat(request_images))["scores"].flatten()
        difference = float((scores - reference.float()).abs().max())
        rows.append({"kind": kind, "dtype": "bfloat16", "device": torch.cuda.get_device_name(device)
                     if device.type == "cuda" else "cpu", "max_abs_diff": f"{difference:.2e}",
                     "reference": "HF fp32 CPU", "scores": json.dumps([round(float(s), 5) for s in scores])})
        print(rows[-1], flush=True)
    return rows


def jina_m0_checkpoint(directory: Path, smoke: bool) -> Path:
    """Random weights in jina-reranker-m0's shape, saved in bf16 (tiny in smoke mode)."""
    import transformers as tf
    from safetensors.torch import load_file, save_file

    from tests.support.tiny_vision import build_vision_checkpoint

    tiny = build_vision_checkpoint("jina_vl", directory)  # tokenizer, processor and config layout
    if smoke:
        return tiny
    config = json.loads((directory / "config.json").read_text())
    text = {k: v for k, v in config["text_config"].items() if k not in ("layer_types", "max_window_layers")}
    text = dict(text, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})
    vision = dict(config["vision_config"], depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4)
    model_config = tf.Qwen2VLConfig(text_config=text, vision_config=vision, **{
        k: config[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")})
    with torch.device("cuda"):
        model = tf.Qwen2VLForConditionalGeneration(model_config).to(torch.bfloat16)
    model.save_pretrained(directory)
    state = load_file(str(directory / "model.safetensors"))
    state.update({"score.0.weight": torch.randn(1536, 1536, dtype=torch.bfloat16) * 0.02,
                  "score.0.bias": torch.zeros(1536, dtype=torch.bfloat16),
                  "score.2.weight": torch.randn(1, 1536, dtype=torch.bfloat16) * 0.02,
                  "score.2.bias": torch.zeros(1, dtype=torch.bfloat16)})
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    saved = json.loads((directory / "config.json").read_text())
    saved["architectures"] = ["JinaVLForRanking"]
    (directory / "config.json").write_text(json.dumps(saved))
    processor = json.loads((directory / "preprocessor_config.json").read_text())
    processor["size"] = {"shortest_edge": 3136, "longest_edge": 602112}  # jina's compute_score pixel bounds
    (directory / "preprocessor_config.json").write_text(json.dumps(processor))
    return directory


def bench(clients: list[int], seconds: float, smoke: bool, path: Path) -> list[dict]:
    import httpx

    from poolserve_stack.plan import plan_models
    from poolserve_stack.triton_server import TritonServer
    from tests.support.stack import MODEL_REPOSITORY, running_adapter
    from tests.support.tiny_vision import data_url, make_image

    root = Path(tempfile.mkdtemp())
    checkpoint = jina_m0_checkpoint(root / "jina-reranker-m0-shape", smoke)
    plan = plan_models([str(checkpoint)], MODEL_REPOSITORY, {str(checkpoint): {"served_model_name": "jina-m0"}})
    side = 64 if smoke else 448
    rows = []
    with TritonServer(MODEL_REPOSITORY, plan, log_path=root / "tritonserver.log", ready_timeout_s=600) as server:
        with running_adapter(server, root, max_sequences_per_triton_request="16", workers="2",
                             max_body_bytes=str(256 * 2**20)) as url:
            counter = iter(range(10**9))

            def body() -> dict:
                seed = next(counter)
                documents = [{"content": [{"type": "image_url", "image_url": {
                    "url": data_url(make_image(side, side, seed=seed * 16 + i), "JPEG")}}]} for i in range(16)]
                return {"model": "jina-m0", "query": f"query {seed} about a chart", "documents": documents}

            bodies = [body() for _ in range(64 if not smoke else 4)]  # unique per request within a level
            for count in clients:
                async def run(count=count):
                    latencies, done, deadline = [], 0, time.perf_counter() + seconds
                    async with httpx.AsyncClient(timeout=300) as client:
                        async def worker(index):
                            nonlocal done
                            i = index
                            while time.perf_counter() < deadline:
                                started = time.perf_counter()
                                response = await client.post(f"{url}/rerank", json=bodies[i % len(bodies)])
                                response.raise_for_status()
                                latencies.append(time.perf_counter() - started)
                                done += 1
                                i += count
                        started = time.perf_counter()
                        await asyncio.gather(*(worker(i) for i in range(count)))
                        return latencies, done, time.perf_counter() - started
                latencies, done, elapsed = asyncio.run(run())
                row = {"workload": "rerank16_images_448", "clients": count, "requests": done,
                       "docs_per_s": f"{16 * done / elapsed:.1f}", "p50_ms": f"{1000 * statistics.median(latencies):.1f}",
                       "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                       "model": "jina-reranker-m0 shape (random weights, bf16)" if not smoke else "tiny jina_vl"}
                rows.append(row)
                print(row, flush=True)
                write(rows, path)  # each level as it finishes: a run cut short keeps what it measured
    return rows


def write(rows: list[dict], path: Path) -> None:
    if not rows:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", default="h200")
    parser.add_argument("--parity", action="store_true")
    parser.add_argument("--bench", action="store_true")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seconds", type=float, default=15)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.parity:
        write(parity(["qwen2_5_vl", "jina_vl", "qwen3_vl", "qwen3_vl_reranker", "llama_nemotron_vl"], device),
              args.out / f"vision_parity_{args.name}.csv")
    if args.bench:
        bench(args.clients, args.seconds, args.smoke, args.out / f"vision_rerank_{args.name}.csv")


if __name__ == "__main__":
    main()
