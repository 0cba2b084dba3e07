"""Each engine body against Hugging Face's own forward, fp32 on CPU.

A body turns one chunk of packed sequences into hidden states ``[tokens, hidden]`` (the generic
body: the head's logits); the engine pools and scores them. Here every body's output is checked
on its own, before any pooling, against a reference written without the project's padding code:
the HF body run one sequence at a time (``[1, length]``), so no padding rule of ours can leak into
it. The engine picks the body at load; the last test checks which it picks.
"""

from __future__ import annotations

import pytest
import torch

from poolserve_runtime import bodies, families
from poolserve_runtime.engine import PackedEngine
from poolserve_runtime.packing import PackedBatch, PaddedRows, RequestSequences
from poolserve_runtime.settings import ModelSettings
from tests.support.tiny_models import build_checkpoint

LENGTHS = [1, 9, 40, 3, 23, 2]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("bodies")
    return {kind: build_checkpoint(kind, root / kind) for kind in ("bert", "xlm_roberta", "qwen3", "electra")}


def load(checkpoint, attention: str, budget: int = 16384, reuse: str = "off") -> PackedEngine:
    family = families.family_for_config(families.read_config_dict(str(checkpoint)))
    outputs = ("embeddings",) if family.task == "embed" else ("logits", "scores")
    settings = ModelSettings(model_name="bodies", checkpoint=str(checkpoint), device=torch.device("cpu"),
                             dtype=torch.float32, max_tokens_per_forward=budget, max_model_len=0, logit_mean=0.0,
                             logit_sigma=1.0, attention=attention, output_names=outputs, compile="none",
                             prefix_reuse=reuse)
    return PackedEngine.load(family, settings)


def packed(engine: PackedEngine, lengths=LENGTHS, seed: int = 7) -> tuple[PackedBatch, torch.Tensor | None]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    ids = torch.randint(5, engine.limits.vocab_size, (int(lengths.sum()),), generator=generator)
    pad = getattr(engine.config, "pad_token_id", None)
    if pad is not None:
        ids[ids == pad] = 4
    types = None
    if engine.limits.type_vocab_size > 1:  # text pairs: the second half of each sequence is segment 1
        positions = torch.cat([torch.arange(int(n)) for n in lengths])
        types = (positions >= torch.repeat_interleave(lengths // 2, lengths)).long()
    return PackedBatch.pack([RequestSequences(ids, lengths, types)]), types


def reference_hidden(checkpoint, family, batch: PackedBatch, types) -> torch.Tensor:
    """HF's body (a fresh copy with SDPA attention), one unpadded sequence at a time, rows stacked."""
    model = family.load(str(checkpoint), torch.float32, torch.device("cpu"), "sdpa")
    bounds = batch.cu_seqlens.tolist()
    rows = []
    with torch.inference_mode():
        for start, end in zip(bounds[:-1], bounds[1:]):
            inputs = {"input_ids": batch.input_ids[start:end].unsqueeze(0)}
            if types is not None:
                inputs["token_type_ids"] = types[start:end].unsqueeze(0)
            rows.append(family.body(model)(**inputs).last_hidden_state[0])
    return torch.cat(rows)


def test_padded_rows_lay_sequences_out_as_rows_and_back():
    cu_seqlens = torch.tensor([0, 2, 5, 6], dtype=torch.int32)
    rows = PaddedRows.of(cu_seqlens, width=3)
    tokens = torch.tensor([11, 12, 21, 22, 23, 31])
    assert rows.pad(tokens, fill=0).tolist() == [[11, 12, 0], [21, 22, 23], [31, 0, 0]]
    assert rows.attention_mask.tolist() == [[1, 1, 0], [1, 1, 1], [1, 0, 0]]
    hidden = torch.arange(3 * 3 * 2).reshape(3, 3, 2)
    assert rows.unpad(hidden).tolist() == [[0, 1], [2, 3], [6, 7], [8, 9], [10, 11], [12, 13]]


@pytest.mark.parametrize("kind", ["bert", "xlm_roberta", "qwen3"])  # token types; position offset; causal
@pytest.mark.parametrize("attention, body_class", [("varlen", bodies.VarlenBody), ("padded", bodies.PaddedBody)])
def test_varlen_and_padded_bodies_give_hf_hidden_states(checkpoints, kind, attention, body_class):
    engine = load(checkpoints[kind], attention, budget=30)  # several chunks: each is its own forward
    assert isinstance(engine.body, body_class)
    batch, types = packed(engine)
    chunks = list(engine.chunks(batch))
    assert len(chunks) > 1
    with torch.inference_mode():
        got = torch.cat([engine.body.hidden_states(chunk) for chunk in chunks])
    expected = reference_hidden(checkpoints[kind], engine.family, batch, types)
    assert got.shape == expected.shape == (sum(LENGTHS), engine.config.hidden_size)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_reused_prefix_body_gives_each_sequence_its_full_prompt_s_hidden_state(checkpoints):
    engine = load(checkpoints["qwen3"], "varlen", reuse="auto")
    generator = torch.Generator().manual_seed(3)
    prefix = torch.randint(5, engine.limits.vocab_size, (30,), generator=generator)
    rows = [torch.cat([prefix, torch.randint(5, engine.limits.vocab_size, (n,), generator=generator)])
            for n in (1, 12, 5)]
    batch = PackedBatch.pack([RequestSequences(torch.cat(rows), torch.tensor([len(r) for r in rows]), None)])
    (chunk,) = engine.reused_prefix_chunks(batch)
    assert chunk.tokens == 30 + 1 + 12 + 5  # the prefix once
    with torch.inference_mode():
        hidden = engine.reused_body.hidden_states(chunk)
    assert hidden.shape[0] == chunk.tokens
    last_rows = (batch.cu_seqlens[1:] - 1).long()
    expected = reference_hidden(checkpoints["qwen3"], engine.family, batch, None)[last_rows]
    torch.testing.assert_close(hidden[chunk.pool_rows], expected, rtol=1e-4, atol=1e-5)


def test_generic_body_gives_the_checkpoint_s_own_logits(checkpoints):
    from transformers import AutoModelForSequenceClassification

    engine = load(checkpoints["electra"], "varlen", budget=30)
    assert engine.family is families.GENERIC and isinstance(engine.body, bodies.GenericBody)
    batch, _ = packed(engine)
    with torch.inference_mode():
        got = torch.cat([engine.body.logits(chunk) for chunk in engine.chunks(batch)])
        model = AutoModelForSequenceClassification.from_pretrained(str(checkpoints["electra"])).eval()
        bounds = batch.cu_seqlens.tolist()
        expected = torch.cat([model(input_ids=batch.input_ids[a:b].unsqueeze(0)).logits
                              for a, b in zip(bounds[:-1], bounds[1:])])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_vision_body_gives_hf_scores_with_images_split_across_chunks(tmp_path):
    """The padded multimodal forward, with each chunk's own images, scored by the engine, equals HF's
    forward one sequence at a time (the reference the real-stack vision tests use)."""

    from poolserve_runtime.vision import BatchImages
    from poolserve_runtime.vision_families import QWEN_IMAGE
    from tests.support.tiny_vision import build_vision_checkpoint, make_image, packed_vision_requests, reference_scores

    checkpoint = build_vision_checkpoint("qwen2_5_vl", tmp_path / "qwen2_5_vl")
    family = families.by_name("qwen2_5_vl")
    images = [[make_image(90, 70, 1)], [], [make_image(60, 120, 2), make_image(50, 50, 3)]]
    prompts = [f"{QWEN_IMAGE} question one", "plain text only", f"{QWEN_IMAGE} two {QWEN_IMAGE}"]
    requests, request_images = packed_vision_requests(family, checkpoint, prompts, images, QWEN_IMAGE)
    engine = PackedEngine.load(family, ModelSettings(
        model_name="vision", checkpoint=str(checkpoint), device=torch.device("cpu"), dtype=torch.float32,
        max_tokens_per_forward=1, max_model_len=0, logit_mean=0.0, logit_sigma=1.0, attention="padded",
        output_names=("logits", "scores")))  # a budget of one token: a chunk per sequence
    assert isinstance(engine.body, bodies.VisionBody)
    batch, batch_images = PackedBatch.pack(requests), BatchImages.concat(request_images)
    chunks = list(engine.chunks(batch, batch_images))
    assert [chunk.image_grid_thw is None for chunk in chunks] == [False, True, False]
    assert chunks[2].image_grid_thw.shape[0] == 2
    got = engine.run(batch, batch_images)["scores"].flatten()
    expected = reference_scores("qwen2_5_vl", checkpoint, prompts, images).flatten()
    torch.testing.assert_close(got, expected.float(), rtol=1e-4, atol=1e-4)


def test_the_engine_picks_its_bodies_at_load(checkpoints):
    assert isinstance(load(checkpoints["bert"], "varlen").body, bodies.VarlenBody)
    assert isinstance(load(checkpoints["bert"], "padded").body, bodies.PaddedBody)
    reusing = load(checkpoints["qwen3"], "varlen", reuse="auto")
    assert isinstance(reusing.body, bodies.VarlenBody) and isinstance(reusing.reused_body, bodies.ReusedPrefixBody)
    assert load(checkpoints["qwen3"], "varlen").reused_body is None
    assert load(checkpoints["qwen3"], "padded", reuse="auto").reused_body is None  # reuse needs the varlen body
    # No shared prefix worth reusing: the plain chunks serve the batch.
    batch, _ = packed(reusing)
    assert reusing.reused_prefix_chunks(batch) is None
    generic = load(checkpoints["electra"], "varlen")
    assert isinstance(generic.body, bodies.GenericBody) and "slow path" in generic.describe()
