"""Every pooling task of issue #25 on a GPU: the compiled kernels (pool_normalized, MaxSim, the SPLADE max, the
bge-m3 heads) and CUDA graphs against the CPU engine, which the unit tests pin to sentence-transformers and the
direct torch computations; and bf16 against fp32 within the reference model's own bf16 noise.

* fp32 on CUDA, varlen, graphs on: every output equals the fp32 CPU engine (padded body) to 1e-4;
* bf16 on CUDA: each dense embedder's cosine to the fp32 sentence-transformers vectors is no worse than
  three times what sentence-transformers itself loses in bf16 on the same GPU (floor 1e-4).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from poolserve_runtime import families
from poolserve_runtime.engine import PackedEngine
from poolserve_runtime.packing import PackedBatch, RequestSequences
from poolserve_runtime.settings import ModelSettings
from tests.support.tiny_models import random_text
from tests.support.token_models import (
    bge_m3_checkpoint,
    colbert_checkpoint,
    splade_checkpoint,
    token_classifier_checkpoint,
)
from tests.unit.test_embedding_families import sentence_transformer_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DENSE = ("bert_mean_normalize", "xlm_roberta_cls_normalize", "modernbert_mean_normalize", "qwen3_last_normalize")
DENSE_OUTPUTS = ("embeddings", "pooled")
# case -> (checkpoint builder, family, architecture parameter, Triton outputs)
TOKEN_CASES = {
    "colbert": (colbert_checkpoint, "colbert", "", ("token_embeddings", "token_projected", "maxsim_scores")),
    "splade": (splade_checkpoint, "splade", "BertSpladeSparseEmbeddingModel", ("sparse",)),
    "bge_m3": (
        bge_m3_checkpoint,
        "bge_m3",
        "BgeM3EmbeddingModel",
        ("embeddings", "pooled", "token_embeddings", "token_projected", "token_logits"),
    ),
    "token_classifier": (token_classifier_checkpoint, "bert_token_classifier", "", ("token_logits",)),
}


def texts() -> list[str]:
    rng = random.Random(3)
    return [random_text(rng, words) for words in (1, 17, 3, 30, 8, 2, 25, 12)]


def load(
    checkpoint: Path, family, outputs: tuple[str, ...], device: str, dtype: torch.dtype, architecture: str = ""
) -> PackedEngine:
    on_gpu = device == "cuda"
    settings = ModelSettings(
        model_name="pooling",
        checkpoint=str(checkpoint),
        device=torch.device(device),
        dtype=dtype,
        max_tokens_per_forward=64,
        max_model_len=0,
        logit_mean=0.0,
        logit_sigma=1.0,
        attention="varlen" if on_gpu else "padded",
        output_names=outputs,
        compile="none",
        cuda_graph_max_tokens=64 if on_gpu else 0,
        architecture=architecture,
    )
    return PackedEngine.load(family, settings)


def packed(checkpoint: Path, sentences: list[str]) -> PackedBatch:
    """Two requests; with a budget of 64 tokens they run as several forwards."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    requests = []
    for part in (sentences[:3], sentences[3:]):
        ids = [torch.tensor(tokenizer(text)["input_ids"]) for text in part]
        requests.append(RequestSequences(torch.cat(ids), torch.tensor([len(i) for i in ids]), None))
    return PackedBatch.pack(requests)


def assert_gpu_equals_cpu(checkpoint: Path, family, outputs: tuple[str, ...], architecture: str = "") -> None:
    batch = packed(checkpoint, texts())
    on_cpu = load(checkpoint, family, outputs, "cpu", torch.float32, architecture).run(batch)
    on_gpu = load(checkpoint, family, outputs, "cuda", torch.float32, architecture).run(batch)
    for name in outputs:
        torch.testing.assert_close(
            on_gpu[name].cpu().float(),
            on_cpu[name].float(),
            rtol=1e-4,
            atol=1e-4,
            msg=lambda message, name=name: f"{name}: {message}",
        )


@pytest.fixture(scope="module")
def dense_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    return {kind: sentence_transformer_checkpoint(kind, root) for kind in DENSE}


@pytest.mark.parametrize("kind", DENSE)
def test_dense_embedders_fp32_gpu_equal_the_cpu_engine(dense_checkpoints, kind):
    checkpoint = dense_checkpoints[kind]
    family = families.family_for_config(families.read_config_dict(str(checkpoint)))
    assert_gpu_equals_cpu(checkpoint, family, DENSE_OUTPUTS)


@pytest.mark.parametrize("kind", DENSE)
def test_dense_embedders_bf16_within_the_references_bf16_noise(dense_checkpoints, kind):
    from sentence_transformers import SentenceTransformer

    checkpoint = dense_checkpoints[kind]
    sentences = texts()
    exact = SentenceTransformer(str(checkpoint), device="cuda").encode(sentences, convert_to_tensor=True).double()
    reference_bf16 = SentenceTransformer(str(checkpoint), device="cuda", model_kwargs={"torch_dtype": torch.bfloat16})
    theirs = reference_bf16.encode(sentences, convert_to_tensor=True).double()
    family = families.family_for_config(families.read_config_dict(str(checkpoint)))
    ours = load(checkpoint, family, DENSE_OUTPUTS, "cuda", torch.bfloat16).run(packed(checkpoint, sentences))
    ours_error = 1 - torch.nn.functional.cosine_similarity(ours["embeddings"].double(), exact, dim=1)
    their_error = 1 - torch.nn.functional.cosine_similarity(theirs, exact, dim=1)
    bound = max(3 * float(their_error.max()), 1e-4)
    print(
        f"{kind}: 1-cos ours {float(ours_error.max()):.2e}, sentence-transformers bf16 {float(their_error.max()):.2e}"
    )
    assert float(ours_error.max()) <= bound


@pytest.mark.parametrize("case", list(TOKEN_CASES))
def test_token_level_and_sparse_outputs_fp32_gpu_equal_the_cpu_engine(case, tmp_path):
    build, family_name, architecture, outputs = TOKEN_CASES[case]
    checkpoint = build(tmp_path / case)
    assert_gpu_equals_cpu(checkpoint, families.by_name(family_name), outputs, architecture)
