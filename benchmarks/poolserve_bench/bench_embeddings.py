"""Embeddings through this stack against what users run today, and ColBERT MaxSim against its forward (issue #25).

    python -m poolserve_bench.bench_embeddings --out benchmarks/results [--concurrency 1 16 64] [--texts 512]
        [--seconds S] [--name NAME] [--smoke]

Random-weight checkpoints of real shapes, saved with the word-level tokenizer of ``checkpoints.py`` (one token
per word, so token counts are exact and every system sees the same ids):

* ``dense``: a bge-m3-shaped XLM-RoBERTa body (24 layers, hidden 1,024) saved by sentence-transformers as
  Transformer + CLS Pooling + Normalize (what bge-m3's dense head is), served by
  model_repository/xlm_roberta_embedder. Each request embeds ``--texts`` texts (512) of ~128 tokens (log-normal,
  median 128); no body is sent twice. Systems:

  - ``http``: ``POST /v1/embeddings`` through the adapter (JSON floats unless ``--encoding-format``), swept
    over client concurrency with ``bench_systems``' closed-loop load generator;
  - ``sentence_transformers``: ``SentenceTransformer.encode`` in this process, default batch size, bf16;
  - ``padded_hf``: ``AutoModel`` in this process, padded batches of 32 with SDPA, CLS, L2 normalisation.
    In-process because the plain FastAPI server (``baseline_server.py``) has no embedding route: it pays no
    HTTP, so the http row's ratio to it understates the gain over a padded server.

* ``colbert``: a BERT-base-shaped ``HF_ColBERT`` checkpoint (projection 128) served by
  model_repository/colbert_embedder: ``POST /rerank`` of one query and ``--documents`` (64) documents
  (``http_rerank``: the forward plus MaxSim) against ``POST /pooling`` ``task: token_embed`` of the same 65
  texts (``http_token_embed``: the forward alone, its vectors sent as bf16 bytes so JSON does not dwarf the
  difference). ``maxsim_overhead_pct`` on the rerank rows is how much slower the rerank is at that concurrency.

Rows: texts/s (documents/s for colbert), tokens/s, p50/p99 latency, model-FLOP utilisation over the measured
bf16 matmul peak, GPU memory in use. ``--smoke`` runs tiny shapes on the CPU (CI checks that the harness works).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import platform
import random
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from poolserve_bench.bench_engine import Shape, build_model, flops_per_request, matmul_peak_tflops, model_shapes
from poolserve_bench.bench_systems import PROJECT_ROOT, body_stream, gpu_memory_gib, start, sweep_level
from poolserve_bench.checkpoints import word_count, word_tokenizer, words
from poolserve_bench.results_csv import write_csv
from poolserve_runtime import families
from poolserve_stack.processes import free_port, wait_for_http
from poolserve_stack.triton_server import TritonServer

TEXT_TOKENS = 128  # median tokens of an embedded text, its two special tokens included
PADDED_BATCH = 32  # the padded HF system's batch, sentence-transformers' default


def dense_shape(smoke: bool) -> Shape:
    """bge-m3's body is bge-reranker-v2-m3's (the reranker was trained from it): the same XLM-R config as an
    embedder."""
    name = "tiny-xlm-roberta" if smoke else "bge-reranker-v2-m3"
    reranker = next(shape for shape in model_shapes(smoke) if shape.name == name)
    config = {key: value for key, value in reranker.config.items() if key != "num_labels"}
    return replace(reranker, name="tiny-bge-m3" if smoke else "bge-m3", family=families.ROBERTA_EMBEDDING,
                   config=config, workloads=())


def colbert_shape(smoke: bool) -> Shape:
    size = (dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64) if smoke else
            dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072))
    return Shape("tiny-colbert" if smoke else "colbert-bert-base", families.COLBERT,
                 dict(model_type="bert", vocab_size=1000 if smoke else 30522, max_position_embeddings=512,
                      type_vocab_size=2, pad_token_id=0, **size), ())


def save_embedder(shape: Shape, directory: Path) -> Path:
    """A sentence-transformers embedder (Transformer, CLS Pooling, Normalize: bge-m3's dense layout) of random
    bf16 weights with the word-level tokenizer; reuses a finished one."""
    if (directory / "modules.json").exists():
        return directory
    import transformers as tf
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    config = tf.AutoConfig.for_model(**shape.config)
    config.architectures = [shape.family.architectures[0]]
    torch.manual_seed(0)
    tf.AutoModel.from_config(config).to(torch.bfloat16).save_pretrained(directory)
    word_tokenizer(shape).save_pretrained(directory)
    transformer = Transformer(str(directory), model_kwargs={"dtype": torch.bfloat16})
    SentenceTransformer(modules=[transformer, Pooling(shape.config["hidden_size"], "cls"), Normalize()]).save(
        str(directory))
    return directory


def save_colbert(shape: Shape, directory: Path, dim: int) -> Path:
    """An ``HF_ColBERT`` checkpoint as colbert-ai saves one: the BERT body under ``bert.`` and the bias-free
    projection ``linear.weight`` [dim, hidden] in one safetensors file; reuses a finished one."""
    if (directory / "tokenizer.json").exists():
        return directory
    import transformers as tf
    from safetensors.torch import save_file

    torch.manual_seed(0)
    config = tf.BertConfig(**{key: value for key, value in shape.config.items() if key != "model_type"})
    body = tf.BertModel(config, add_pooling_layer=False).to(torch.bfloat16)
    body.save_pretrained(directory)
    tensors = {f"bert.{name}": tensor.contiguous() for name, tensor in body.state_dict().items()}
    tensors["linear.weight"] = (torch.randn(dim, config.hidden_size) * config.initializer_range).to(torch.bfloat16)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config_file = directory / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "architectures": ["HF_ColBERT"]},
                                      indent=2))
    word_tokenizer(shape).save_pretrained(directory)
    return directory


def embedding_bodies(model: str, texts: int, vocabulary: int, seed: int = 0, encoding_format: str = "float"):
    """``/v1/embeddings`` bodies without end, none repeated: ``texts`` texts each, of log-normal length around
    :data:`TEXT_TOKENS` tokens."""
    rng = random.Random(seed)
    while True:
        lengths = [max(8, min(int(math.exp(rng.gauss(math.log(TEXT_TOKENS - 2), 0.3))), 500)) for _ in range(texts)]
        yield {"model": model, "input": [words(rng, length, vocabulary) for length in lengths],
               "encoding_format": encoding_format}


def token_embed_body(rerank_body: dict) -> dict:
    """The ``/pooling`` ``token_embed`` request of a rerank body's texts (query first), vectors as bf16 bytes."""
    return {"model": rerank_body["model"], "task": "token_embed", "input": [rerank_body["query"], *rerank_body["documents"]],
            "encoding_format": "bytes", "embed_dtype": "bfloat16"}


def flops_per_text(shape: Shape, tokenizer, texts: list[str]) -> tuple[float, float]:
    """(model FLOPs, tokens) per text over a sample, each text its own sequence."""
    lengths = torch.tensor([len(ids) for ids in tokenizer(texts)["input_ids"]])
    counter = build_model(shape, torch.device("meta"), torch.bfloat16)  # parameter counts only
    return flops_per_request(shape, lengths, counter) / len(texts), float(lengths.sum()) / len(texts)


def level_row(meta, model, workload, system, concurrency, units, seconds, latencies, refused, flops_per_unit,
              tokens_per_unit, peak, unit="texts"):
    per_s = units / seconds
    return {**meta, "model": model, "workload": workload, "system": system, "concurrency": concurrency,
            "requests": len(latencies), "refused": refused, f"{unit}_per_s": round(per_s, 1),
            "tokens_per_s": round(per_s * tokens_per_unit),
            "p50_ms": round(1000 * statistics.median(latencies), 2) if latencies else None,
            "p99_ms": round(1000 * float(np.percentile(latencies, 99)), 2) if latencies else None,
            "mfu_pct": round(100 * per_s * flops_per_unit / 1e12 / peak, 1), "gpu_memory_gib": gpu_memory_gib()}


def sweep(stream, url: str, concurrency: int, args) -> tuple[int, float, list[float], int]:
    """One concurrency level against ``url`` on fresh bodies; returns (requests answered, seconds, latencies,
    refused)."""
    level = list(itertools.islice(stream, concurrency + max(args.requests, 2 * concurrency)))
    _, seconds, latencies, refused = asyncio.run(sweep_level(
        "http", level, [], concurrency, args.seconds, args.requests, "", "", url, None))
    return len(latencies), seconds, latencies, refused


def bench_dense(shape, checkpoint, adapter_url, args, meta, peak, device) -> list[dict]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    stream = embedding_bodies(shape.name, args.texts, word_count(shape), encoding_format=args.encoding_format)
    # In-process systems embed the texts of a few requests (never sent over HTTP: the stream moves on).
    texts = [text for body in itertools.islice(stream, args.in_process_requests) for text in body["input"]]
    flops, tokens = flops_per_text(shape, tokenizer, texts)
    workload = f"embed{args.texts}"
    rows = []
    for concurrency in args.concurrency:
        answered, seconds, latencies, refused = sweep(stream, f"{adapter_url}/v1/embeddings", concurrency, args)
        rows.append(level_row(meta, shape.name, workload, "http", concurrency, answered * args.texts, seconds,
                              latencies, refused, flops, tokens, peak))
        report(rows[-1], "texts")
    for system, encode in (("sentence_transformers", sentence_transformers_encoder),
                           ("padded_hf", padded_hf_encoder)):
        embed = encode(checkpoint, device)
        embed(texts[:64])  # warm-up: kernels, allocator
        synchronize(device)
        started = time.perf_counter()
        embed(texts)
        synchronize(device)
        rows.append(level_row(meta, shape.name, workload, system, 1, len(texts), time.perf_counter() - started, [], 0,
                              flops, tokens, peak))
        report(rows[-1], "texts")
        del embed
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def sentence_transformers_encoder(checkpoint: Path, device: torch.device):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(checkpoint), device=str(device))
    model.to(torch.bfloat16 if device.type == "cuda" else torch.float32)  # as padded_hf (the checkpoint is bf16)
    return lambda texts: model.encode(texts)  # default batch size, as the published numbers use


def padded_hf_encoder(checkpoint: Path, device: torch.device):
    """What a plain server does with an embedder: padded batches through ``AutoModel`` (SDPA), the CLS state,
    L2-normalised, back on the host."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModel.from_pretrained(checkpoint, dtype=dtype).to(device).eval()

    def embed(texts: list[str]) -> list[np.ndarray]:
        vectors = []
        for first in range(0, len(texts), PADDED_BATCH):
            encoded = tokenizer(texts[first:first + PADDED_BATCH], padding=True, truncation=True,
                                return_tensors="pt").to(device)
            with torch.inference_mode():
                cls = model(**encoded).last_hidden_state[:, 0].float()
            vectors.append(torch.nn.functional.normalize(cls, dim=-1).cpu().numpy())
        return vectors
    return embed


def bench_colbert(shape, checkpoint, adapter_url, args, meta, peak) -> list[dict]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    workload = f"rerank{args.documents}"
    sample = list(itertools.islice(body_stream(workload, shape.name, word_count(shape), seed=1), 4))
    texts = [text for body in sample for text in (body["query"], *body["documents"])]
    flops, tokens = flops_per_text(shape, tokenizer, texts)
    # Per document: its own forward plus its share of the query's.
    per_document = flops * (args.documents + 1) / args.documents, tokens * (args.documents + 1) / args.documents
    # Both systems get the same texts, level by level (the encoders' path caches nothing), and never a body twice.
    streams = {"http_token_embed": ("/pooling", map(token_embed_body, body_stream(workload, shape.name,
                                                                                 word_count(shape), seed=2))),
               "http_rerank": ("/rerank", body_stream(workload, shape.name, word_count(shape), seed=2))}
    rows = []
    for concurrency in args.concurrency:
        by_system = {}
        for system, (path, bodies) in streams.items():
            answered, seconds, latencies, refused = sweep(bodies, f"{adapter_url}{path}", concurrency, args)
            by_system[system] = level_row(meta, shape.name, workload, system, concurrency, answered * args.documents,
                                          seconds, latencies, refused, *per_document, peak, unit="documents")
            rows.append(by_system[system])
        rerank, forward = by_system["http_rerank"], by_system["http_token_embed"]
        rerank["maxsim_overhead_pct"] = round(100 * (forward["documents_per_s"] / rerank["documents_per_s"] - 1), 1)
        report(forward, "documents")
        report(rerank, "documents")
    return rows


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def report(row: dict, unit: str) -> None:
    extra = f"  MaxSim {row['maxsim_overhead_pct']:+}%" if "maxsim_overhead_pct" in row else ""
    print(f"{row['model']:<20}{row['workload']:<10}{row['system']:<22}c={row['concurrency']:<3} "
          f"{row[f'{unit}_per_s']:>9.0f} {unit}/s  refused {row['refused']}  p50 {row['p50_ms']} ms  "
          f"p99 {row['p99_ms']} ms  MFU {row['mfu_pct']}%{extra}", flush=True)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 16, 64])
    parser.add_argument("--texts", type=int, default=512, help="texts per /v1/embeddings request")
    parser.add_argument("--documents", type=int, default=64, help="documents per ColBERT rerank")
    parser.add_argument("--colbert-dim", type=int, default=128, help="the ColBERT projection's width")
    parser.add_argument("--encoding-format", default="float", choices=["float", "base64"],
                        help="/v1/embeddings encoding_format (the OpenAI SDK sends base64)")
    parser.add_argument("--seconds", type=float, default=15.0, help="time bound of one concurrency level")
    parser.add_argument("--requests", type=int, default=64, help="request bound of one concurrency level")
    parser.add_argument("--in-process-requests", type=int, default=4,
                        help="requests' worth of texts the in-process systems embed")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-embeddings"))
    parser.add_argument("--adapter-workers", type=int, default=4, help="0: the adapter's default (one per 4 cores)")
    parser.add_argument("--name", default="", help="suffix of the CSV name (embeddings_<name>.csv)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (CI)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.concurrency, args.texts, args.documents, args.colbert_dim = [1, 2], 32, 8, 16
        args.seconds, args.requests, args.in_process_requests, args.adapter_workers = 1.0, 3, 1, 1
    args.work.mkdir(parents=True, exist_ok=True)
    on_gpu = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if on_gpu else "cpu")
    peak = matmul_peak_tflops(device)
    meta = dict(device=torch.cuda.get_device_name() if on_gpu else "cpu", torch=torch.__version__,
                python=platform.python_version(), commit=args.commit, matmul_peak_tflops=round(peak, 1))
    dense, colbert = dense_shape(args.smoke), colbert_shape(args.smoke)
    dense_checkpoint = save_embedder(dense, args.work / dense.name)
    colbert_checkpoint = save_colbert(colbert, args.work / f"{colbert.name}-{args.colbert_dim}", args.colbert_dim)
    models = {dense.family.folder: {"checkpoint": str(dense_checkpoint), "served_model_name": dense.name},
              colbert.family.folder: {"checkpoint": str(colbert_checkpoint), "served_model_name": colbert.name}}
    rows: list[dict] = []
    adapter = None
    with TritonServer(PROJECT_ROOT / "model_repository", models, log_path=args.work / "triton.log",
                      ready_timeout_s=600) as triton:
        try:
            port = free_port()
            adapter = start([sys.executable, "-m", "poolserve_adapter"], {
                "ADAPTER_TRITON_GRPC_URL": triton.grpc_url, "ADAPTER_PORT": str(port),
                "ADAPTER_WORKERS": str(args.adapter_workers)}, args.work / "adapter.log")
            url = f"http://127.0.0.1:{port}"
            wait_for_http(f"{url}/health", adapter, 300)
            rows += bench_dense(dense, dense_checkpoint, url, args, meta, peak, device)
            write_rows(args, rows)  # after each part: a later failure keeps what was measured
            rows += bench_colbert(colbert, colbert_checkpoint, url, args, meta, peak)
            write_rows(args, rows)
        finally:
            if adapter is not None:
                adapter.terminate()
                try:
                    adapter.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    adapter.kill()
    return rows


def write_rows(args, rows: list[dict]) -> None:
    write_csv(args.out / f"embeddings{'_' + args.name if args.name else ''}.csv", rows)


if __name__ == "__main__":
    main()
