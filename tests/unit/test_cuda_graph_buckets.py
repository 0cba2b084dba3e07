"""The CUDA-graph buckets of the varlen body, on the CPU: everything but the capture itself.

A graph replays :func:`poolserve_runtime.cuda_graphs.run_bucket` over a bucket's static buffers
(:class:`~poolserve_runtime.cuda_graphs.BucketInputs`): the chunk's tokens, then padding rows in one
dummy sequence, then zero-length sequences, with the bucket size as ``max_length``. Here that same
function runs eagerly on buffers the same ``load`` filled, and its real rows must equal the plain
varlen body's: the padding changes no output. The replay itself is checked on a GPU
(tests/gpu/test_cuda_graphs_gpu.py).
"""

from __future__ import annotations

import pytest
import torch

from poolserve_contract.parameters import ModelParameters
from poolserve_runtime import bodies, cuda_graphs, families
from poolserve_runtime.cuda_graphs import BucketInputs, bucket_for, padded_cu_seqlens, padded_positions, run_bucket
from poolserve_runtime.engine import PackedEngine
from poolserve_runtime.packing import PackedBatch, RequestSequences
from poolserve_runtime.settings import ModelSettings
from tests.support.tiny_models import build_checkpoint

# bert: token types; xlm_roberta: position offset 2; qwen2: causal with grouped-query attention;
# mistral: a 6-token sliding window
KINDS = ("bert", "xlm_roberta", "qwen2", "mistral")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("graph_buckets")
    return {kind: build_checkpoint(kind, root / kind) for kind in KINDS}


def load(checkpoint, attention: str = "varlen") -> PackedEngine:
    family = families.family_for_config(families.read_config_dict(str(checkpoint)))
    settings = ModelSettings(model_name="graphs", checkpoint=str(checkpoint), device=torch.device("cpu"),
                             dtype=torch.float32, max_tokens_per_forward=16384, max_model_len=0, logit_mean=0.0,
                             logit_sigma=1.0, attention=attention, output_names=("logits", "scores"),
                             compile="none")
    return PackedEngine.load(family, settings)


def one_chunk(engine: PackedEngine, lengths: list[int], seed: int = 5) -> bodies.Chunk:
    """One chunk of sequences of ``lengths`` (token types: the second half of each is segment 1)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    ids = torch.randint(5, engine.limits.vocab_size, (int(lengths.sum()),), generator=generator)
    types = None
    if engine.limits.type_vocab_size > 1:
        positions = torch.cat([torch.arange(int(n)) for n in lengths])
        types = (positions >= torch.repeat_interleave(lengths // 2, lengths)).long()
    (chunk,) = engine.chunks(PackedBatch.pack([RequestSequences(ids, lengths, types)]))
    return chunk


def allocate(engine: PackedEngine, bucket: int) -> BucketInputs:
    return BucketInputs.allocate(bucket, engine.device, engine.pad_token_id, engine.position_offset,
                                 engine.family.uses_token_types)


def test_buckets_double_from_16_up_to_the_limit():
    assert cuda_graphs.token_buckets(512) == (16, 32, 64, 128, 256, 512)
    assert cuda_graphs.token_buckets(100) == (16, 32, 64, 100)
    assert cuda_graphs.token_buckets(10) == (10,)
    assert cuda_graphs.token_buckets(0) == ()


def test_a_chunk_takes_the_smallest_bucket_that_holds_it():
    buckets = cuda_graphs.token_buckets(512)
    assert bucket_for(37, 1, buckets) == 64
    assert bucket_for(16, 16, buckets) == 16  # exactly full: 16 one-token sequences
    assert bucket_for(17, 3, buckets) == 32
    assert bucket_for(512, 40, buckets) == 512
    assert bucket_for(513, 1, buckets) is None  # eager
    assert bucket_for(10, 20, (16, 32)) == 32  # cu_seqlens has room for at most `bucket` sequences


def test_padded_cu_seqlens_end_the_chunk_then_a_dummy_sequence_then_empty_ones():
    host_cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    assert padded_cu_seqlens(host_cu, 8).tolist() == [0, 3, 5, 8, 8, 8, 8, 8, 8, 8]  # bucket + 2 entries
    full = torch.tensor([0, 4, 8], dtype=torch.int32)
    assert padded_cu_seqlens(full, 8).tolist() == [0, 4, 8, 8, 8, 8, 8, 8, 8, 8]  # an empty dummy sequence
    ones = torch.arange(9, dtype=torch.int32)  # 8 one-token sequences: every entry is a real boundary but one
    assert padded_cu_seqlens(ones, 8).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 8]
    assert padded_cu_seqlens(host_cu, 8).dtype == torch.int32


def test_padded_positions_restart_per_sequence_and_park_padding_at_the_first_position():
    host_cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    assert padded_positions(host_cu, 8, position_offset=0).tolist() == [[0, 1, 2, 0, 1, 0, 0, 0]]
    assert padded_positions(host_cu, 8, position_offset=2).tolist() == [[2, 3, 4, 2, 3, 2, 2, 2]]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("lengths, bucket", [
    ([37], 64),  # one short classify
    ([1] * 20, 32),  # many one-token sequences
    ([5, 11], 16),  # exactly fills its bucket: the dummy sequence is empty
    ([3, 40, 1, 20], 64),
    ([100], 256),  # a bucket longer than the 128-position table: padding positions stay inside it
])
def test_padded_bucket_forward_equals_the_plain_varlen_body(checkpoints, kind, lengths, bucket):
    engine = load(checkpoints[kind])
    assert isinstance(engine.body, bodies.VarlenBody)
    chunk = one_chunk(engine, lengths)
    inputs = allocate(engine, bucket)
    inputs.load(chunk, engine.position_offset)
    with torch.inference_mode():
        padded = run_bucket(engine.body, inputs)
        plain = engine.body.hidden_states(chunk)
    assert padded.shape == (bucket, engine.config.hidden_size)
    torch.testing.assert_close(padded[: sum(lengths)], plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["bert", "qwen2"])
def test_tokens_an_earlier_chunk_left_in_the_buffers_change_nothing(checkpoints, kind):
    """A graph's buffers are reused: a short chunk after a long one runs over the long one's tail."""
    engine = load(checkpoints[kind])
    inputs = allocate(engine, 64)
    long, short = one_chunk(engine, [30, 30], seed=1), one_chunk(engine, [7, 2], seed=2)
    with torch.inference_mode():
        inputs.load(long, engine.position_offset)
        run_bucket(engine.body, inputs)
        inputs.load(short, engine.position_offset)
        assert inputs.input_ids[0, 9:60].equal(long.input_ids[9:60])  # the stale tail is really there
        torch.testing.assert_close(run_bucket(engine.body, inputs)[:9], engine.body.hidden_states(short),
                                   rtol=1e-5, atol=1e-5)


def test_a_chunk_without_token_types_reads_segment_zero(checkpoints):
    engine = load(checkpoints["bert"])
    generator = torch.Generator().manual_seed(4)
    ids = torch.randint(5, engine.limits.vocab_size, (12,), generator=generator)
    (chunk,) = engine.chunks(PackedBatch.pack([RequestSequences(ids, torch.tensor([12]), None)]))
    assert chunk.token_type_ids is None
    inputs = allocate(engine, 16)
    inputs.token_type_ids.fill_(1)  # what a pair left there
    inputs.load(chunk, engine.position_offset)
    with torch.inference_mode():
        torch.testing.assert_close(run_bucket(engine.body, inputs)[:12], engine.body.hidden_states(chunk),
                                   rtol=1e-5, atol=1e-5)


def test_only_a_cuda_varlen_body_in_half_precision_without_compiled_layers_gets_buckets(checkpoints):
    varlen_engine, padded_engine = load(checkpoints["bert"]), load(checkpoints["bert"], "padded")
    cuda = torch.device("cuda")  # buckets_to_capture only decides; nothing runs on the device here
    assert cuda_graphs.buckets_to_capture(varlen_engine.body, cuda, torch.bfloat16, 64, False) == (16, 32, 64)
    assert cuda_graphs.buckets_to_capture(varlen_engine.body, cuda, torch.float16, 512, False)[-1] == 512
    assert cuda_graphs.buckets_to_capture(varlen_engine.body, cuda, torch.bfloat16, 0, False) == ()
    assert cuda_graphs.buckets_to_capture(varlen_engine.body, cuda, torch.float32, 512, False) == ()  # no FlashAttention
    assert cuda_graphs.buckets_to_capture(varlen_engine.body, cuda, torch.bfloat16, 512, True) == ()  # compiled
    assert cuda_graphs.buckets_to_capture(padded_engine.body, cuda, torch.bfloat16, 512, False) == ()
    assert cuda_graphs.buckets_to_capture(varlen_engine.body, torch.device("cpu"), torch.bfloat16, 512, False) == ()
    # On the CPU the engine keeps its plain body and says so.
    assert varlen_engine.graph_buckets == () and "cuda_graphs=none" in varlen_engine.describe()


def test_dynamic_rope_waits_for_the_device_so_it_gets_no_graphs():
    import transformers as tf

    common = dict(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    dynamic = tf.LlamaModel(tf.LlamaConfig(rope_scaling={"rope_type": "dynamic", "factor": 2.0}, **common))
    llama3 = tf.LlamaModel(tf.LlamaConfig(rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64, "rope_theta": 500000.0}, **common))
    assert "dynamic RoPE" in cuda_graphs.host_sync_reason(dynamic)
    assert cuda_graphs.host_sync_reason(llama3) is None and cuda_graphs.host_sync_reason(tf.LlamaModel(
        tf.LlamaConfig(**common))) is None


def test_cuda_graph_max_tokens_parameter():
    assert ModelParameters.from_mapping({}).cuda_graph_max_tokens == 512  # on by default (GPU varlen bodies)
    assert ModelParameters.from_mapping({"cuda_graph_max_tokens": ""}).cuda_graph_max_tokens == 512
    assert ModelParameters.from_mapping({"cuda_graph_max_tokens": "0"}).cuda_graph_max_tokens == 0
    assert ModelParameters.from_mapping({"cuda_graph_max_tokens": " 1024 "}).cuda_graph_max_tokens == 1024
    for value in ("many", "-1"):
        with pytest.raises(ValueError, match=f"cuda_graph_max_tokens parameter '{value}' is not a whole number"):
            ModelParameters.from_mapping({"cuda_graph_max_tokens": value})


def test_the_parameter_reaches_the_model_settings(tmp_path):
    import json

    config = {"parameters": {"checkpoint": {"string_value": str(tmp_path)},
                             "cuda_graph_max_tokens": {"string_value": "128"}}, "output": [{"name": "logits"}]}
    settings = ModelSettings.from_triton_args({"model_config": json.dumps(config), "model_repository": str(tmp_path),
                                               "model_name": "m", "model_instance_kind": "CPU"})
    assert settings.cuda_graph_max_tokens == 128


def test_a_capture_that_fails_or_disagrees_leaves_the_eager_body(monkeypatch, caplog):
    """At load: a forward that cannot be captured, or whose replay differs, is served eagerly with a warning
    instead of failing the model's load."""
    body = object()
    restored = []
    monkeypatch.setattr(cuda_graphs.torch.cuda, "default_stream", lambda device: f"default of {device}")
    monkeypatch.setattr(cuda_graphs.torch.cuda, "set_stream", restored.append)

    def failing_capture(*args):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(cuda_graphs, "GraphedVarlenBody", failing_capture)
    with caplog.at_level("WARNING"):
        assert cuda_graphs.graphed_or_eager(body, (16, 32), 0, "cuda:0", 100) == (body, ())
    assert restored == ["default of cuda:0"] and "capturing the forward failed" in caplog.text

    monkeypatch.setattr(cuda_graphs, "GraphedVarlenBody", lambda *args: "graphed")
    monkeypatch.setattr(cuda_graphs, "replay_mismatch", lambda *args: "largest difference 3")
    assert cuda_graphs.graphed_or_eager(body, (16, 32), 0, "cuda:0", 100) == (body, ())
    assert "a replay differs" in caplog.text
    monkeypatch.setattr(cuda_graphs, "replay_mismatch", lambda *args: None)
    assert cuda_graphs.graphed_or_eager(body, (16, 32), 0, "cuda:0", 100) == ("graphed", (16, 32))
