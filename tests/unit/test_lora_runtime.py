"""Multi-LoRA in the packed engine (fp32, CPU): one batch mixing the base model and three PEFT adapters
of ranks 4, 8 and 16 (one with its own classifier/score head) scores each sequence as the PEFT-merged
model of its adapter does; adapters that do not fit are refused by name; the adapter names each request sends
(lora_names) are checked per request, a name the model does not hold failing its request alone; the
lora_modules parameter is parsed and checked."""

from __future__ import annotations

import importlib
import json
import sys
import types

import pytest
import torch

from poolserve_contract.card import ModelCard
from poolserve_contract.parameters import ModelParameters, check_lora_folders
from poolserve_runtime import families
from poolserve_runtime.engine import PackedEngine
from poolserve_runtime.lora import LoraError, adapter_runs
from poolserve_runtime.packing import InvalidRequest, LoraNotLoaded, PackedBatch, RequestSequences, read_lora_names
from poolserve_runtime.settings import ModelSettings
from tests.support.tiny_models import build_checkpoint

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

# kind → (family, the module names its adapters target, the score head)
MODELS = {
    "bert": (families.BERT, ["query", "key", "value", "dense"], "classifier"),
    "qwen3": (families.QWEN3, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], "score"),
}
RANKS = (4, 8, 16)


def load_base(checkpoint):
    model = transformers.AutoModelForSequenceClassification.from_pretrained(checkpoint, torch_dtype=torch.float32)
    return model.eval()


def save_adapter(checkpoint, folder, targets, rank, seed, head=None, **options):
    """A PEFT adapter of ``rank`` with random non-zero lora_B (PEFT initialises it to zero), saved as PEFT does."""
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank + seed, target_modules=targets,
                             modules_to_save=[head] if head else None, **options)
    model = peft.get_peft_model(load_base(checkpoint), config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                parameter.normal_(0.0, 0.2)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=list(MODELS))
def served(request, tmp_path_factory):
    """(kind, checkpoint, adapter folders) for one tiny model."""
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    checkpoint = build_checkpoint(kind, root / "base")
    _, targets, head = MODELS[kind]
    adapters = [save_adapter(checkpoint, root / f"rank{rank}", targets, rank, seed=slot + 1,
                             head=head if slot == 1 else None) for slot, rank in enumerate(RANKS)]
    return kind, checkpoint, adapters


def engine(kind, checkpoint, adapters, attention="padded", compile="none", max_tokens_per_forward=16384):
    family = MODELS[kind][0]
    settings = ModelSettings(model_name=kind, checkpoint=str(checkpoint), device=torch.device("cpu"),
                             dtype=torch.float32, max_tokens_per_forward=max_tokens_per_forward, max_model_len=0,
                             logit_mean=0.0,
                             logit_sigma=1.0, attention=attention, output_names=("logits", "scores"), compile=compile,
                             lora_modules=tuple((f"adapter{i + 1}", str(path)) for i, path in enumerate(adapters)))
    return PackedEngine.load(family, settings)


def names_input(names: list[str], flat: bool = False) -> torch.Tensor:
    """The lora_names input of sequences on adapters ``names`` ("" the base): UTF-8 rows zero-padded to one width,
    ``[n, width]`` (``flat``: ``[1, n * width]``)."""
    width = max([1, *(len(name.encode()) for name in names)])
    rows = torch.zeros(len(names), width, dtype=torch.uint8)
    for row, name in zip(rows, names):
        row[:len(name.encode())] = torch.tensor(list(name.encode()), dtype=torch.uint8)
    return rows.reshape(1, -1) if flat else rows


def lora_names(ids) -> torch.Tensor:
    """The lora_names input of sequences on adapters ``ids`` (0: the base; i: adapter{i}, as engine() names them)."""
    return names_input([f"adapter{i}" if i else "" for i in ids])


def merged_logits(checkpoint, adapter, rows):
    """Each row's logits from HF's forward of the base, or of the PEFT-merged model of ``adapter``."""
    model = load_base(checkpoint)
    if adapter is not None:
        model = peft.PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().eval()
    with torch.no_grad():
        return torch.cat([model(input_ids=row.unsqueeze(0)).logits for row in rows])


@pytest.mark.parametrize("attention", ["padded", "varlen"])
def test_mixed_batch_matches_the_merged_models(served, attention):
    kind, checkpoint, adapters = served
    lora = engine(kind, checkpoint, adapters, attention)
    generator = torch.Generator().manual_seed(7)
    lengths = [5, 12, 3, 9, 17, 6, 11, 4, 8]
    ids = [0, 1, 2, 3, 2, 0, 3, 1, 1]  # interleaved: base, every adapter, neighbours of one adapter
    rows = [torch.randint(5, lora.limits.vocab_size, (length,), generator=generator) for length in lengths]
    split = 4  # two requests: the adapters cross the request boundary
    requests = [read_lora_names(lora_names(ids[part]), RequestSequences(torch.cat(rows[part]), torch.tensor(lengths[part]),
                                                                       None), lora.lora.ids_by_name, kind)
                for part in (slice(0, split), slice(split, None))]
    got = lora.run(PackedBatch.pack(requests))["logits"]
    for adapter_id in range(len(adapters) + 1):
        members = [i for i, value in enumerate(ids) if value == adapter_id]
        expected = merged_logits(checkpoint, adapters[adapter_id - 1] if adapter_id else None,
                                 [rows[i] for i in members])
        torch.testing.assert_close(got[members], expected, rtol=0, atol=1e-5)
        if adapter_id:  # the adapter changes the scores: the comparison above could fail
            base = merged_logits(checkpoint, None, [rows[i] for i in members])
            assert (expected - base).abs().max() > 1e-2
    base_only = lora.run(PackedBatch.pack([RequestSequences(torch.cat(rows), torch.tensor(lengths), None)]))["logits"]
    torch.testing.assert_close(base_only, merged_logits(checkpoint, None, rows), rtol=0, atol=1e-5)
    lora.warm_up_adapters()  # what a CUDA engine runs at load (the kernels' tiles are tuned there): a valid batch


def test_compiled_layers_add_the_adapters_terms_without_recompiling(served):
    """compile=layers with adapters: the layers' graphs call the LoRA operator, so a batch mixing adapters and a
    base-only batch give the eager engine's scores, and new batch shapes and mixes reuse the warm graphs."""
    kind, checkpoint, adapters = served
    if kind != "qwen3":
        pytest.skip("one family is enough for the compiled path (compiling is slow on CPU)")
    eager = engine(kind, checkpoint, adapters, "varlen")
    compiled = engine(kind, checkpoint, adapters, "varlen", compile="layers")
    assert "compiled_layers=True" in compiled.describe() and "lora_adapters=3" in compiled.describe()
    generator = torch.Generator().manual_seed(11)
    graphs_when_warm = None
    for lengths, ids in (([5, 12, 3, 9], [0, 1, 2, 3]), ([7, 4, 15, 6, 10], [3, 3, 0, 1, 2]),
                         ([8, 9], [0, 0]), ([13, 5, 6], [2, 1, 2])):
        rows = [torch.randint(5, compiled.limits.vocab_size, (length,), generator=generator) for length in lengths]
        batch = [RequestSequences(torch.cat(rows), torch.tensor(lengths), None)]
        if any(ids):
            batch = [read_lora_names(lora_names(ids), batch[0], compiled.lora.ids_by_name, kind)]
        expected, got = eager.run(PackedBatch.pack(batch))["logits"], compiled.run(PackedBatch.pack(batch))["logits"]
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        if graphs_when_warm is None:
            graphs_when_warm = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs_when_warm, "recompiled for a batch"


def test_adapter_runs_cut_requests_where_the_adapter_changes():
    ids = torch.tensor([1, 1, 2, 2, 0, 3, 3, 3, 1], dtype=torch.int32)
    assert adapter_runs(ids, [4, 4, 1]) == [2, 2, 1, 3, 1]  # a run never crosses a request
    assert adapter_runs(torch.zeros(3, dtype=torch.int32), [3]) == [3]


@pytest.mark.parametrize("max_tokens_per_forward", [16384, 60])
def test_documents_sharing_a_prompt_reuse_it_within_one_adapter(served, monkeypatch, max_tokens_per_forward):
    """A causal model with adapters computes a shared prompt prefix once per run of one adapter (its keys and
    values are that adapter's): requests on adapters (one with its own score head), on the base, and one whose
    sequences name different adapters (gRPC's per-sequence lora_names) score as the PEFT-merged models of each
    sequence's adapter, in one reused stream or cut into several."""
    kind, checkpoint, adapters = served
    if kind != "qwen3":
        pytest.skip("prefix reuse serves causal models")
    lora = engine(kind, checkpoint, adapters, "varlen", max_tokens_per_forward=max_tokens_per_forward)
    assert lora.reuses_prefix
    reused = []
    plain_score = lora.score_reused_chunks
    monkeypatch.setattr(lora, "score_reused_chunks", lambda batch, chunks: reused.append(len(chunks)) or plain_score(
        batch, chunks))
    generator = torch.Generator().manual_seed(5)
    prompt = torch.randint(5, lora.limits.vocab_size, (24,), generator=generator)
    requests_ids = [[1, 1, 1], [2, 2, 0, 3], [0, 0]]
    rows_of, requests = [], []
    for ids in requests_ids:
        rows = [torch.cat([prompt, torch.randint(5, lora.limits.vocab_size, (length,), generator=generator)])
                for length in torch.randint(3, 12, (len(ids),), generator=generator).tolist()]
        rows_of.append(rows)
        sequences = RequestSequences(torch.cat(rows), torch.tensor([row.numel() for row in rows]), None)
        requests.append(read_lora_names(lora_names(ids), sequences, lora.lora.ids_by_name, kind))
    got = lora.run(PackedBatch.pack(requests))["logits"]
    assert reused, "the batch did not take the reused-prefix path"
    assert reused[0] == 1 if max_tokens_per_forward > 1000 else reused[0] > 2
    ids = [i for request in requests_ids for i in request]
    rows = [row for request in rows_of for row in request]
    for adapter_id in set(ids):
        members = [i for i, value in enumerate(ids) if value == adapter_id]
        expected = merged_logits(checkpoint, adapters[adapter_id - 1] if adapter_id else None, [rows[i] for i in members])
        torch.testing.assert_close(got[members], expected, rtol=0, atol=1e-5)


def test_an_adapter_of_another_base_is_refused(served, tmp_path):
    kind, checkpoint, adapters = served
    family, targets, _ = MODELS[kind]
    other = build_checkpoint("qwen3" if kind == "bert" else "bert", tmp_path / "other")
    wrong = save_adapter(other, tmp_path / "wrong", MODELS["qwen3" if kind == "bert" else "bert"][1], 4, seed=9)
    with pytest.raises(LoraError, match=r"adapter2.*does not fit this base model \(wrong base\?\).*which the model "
                                        r"does not have"):
        engine(kind, checkpoint, [adapters[0], wrong])
    # The same architecture, another hidden size: the shapes do not fit.
    config = transformers.AutoConfig.from_pretrained(checkpoint)
    config.hidden_size, config.intermediate_size = 32, 64
    if kind == "bert":
        config.num_attention_heads = 4
    narrow = tmp_path / "narrower"
    transformers.AutoModelForSequenceClassification.from_config(config).save_pretrained(narrow)
    narrower = save_adapter(narrow, tmp_path / "narrower_adapter", targets, 4, seed=3)
    with pytest.raises(LoraError, match=r"adapter1.*wrong base\?\): \S+ is \d+ -> \d+, the adapter's lora_A is \[4, (32|64)\]"):
        engine(kind, checkpoint, [narrower])


def test_dora_and_missing_files_are_refused(served, tmp_path):
    kind, checkpoint, adapters = served
    dora = save_adapter(checkpoint, tmp_path / "dora", MODELS[kind][1], 4, seed=5, use_dora=True)
    with pytest.raises(LoraError, match=r"LoRA adapter 'adapter1': DoRA \(use_dora\) is not supported"):
        engine(kind, checkpoint, [dora])
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "adapter_config.json").write_text((adapters[0] / "adapter_config.json").read_text())
    with pytest.raises(LoraError, match=r"adapter1.*adapter_model.safetensors is missing"):
        engine(kind, checkpoint, [no_weights])


def test_families_without_a_packed_body_refuse_adapters(served, tmp_path):
    kind, checkpoint, adapters = served
    settings = ModelSettings(model_name="generic", checkpoint=str(checkpoint), device=torch.device("cpu"),
                             dtype=torch.float32, max_tokens_per_forward=16384, max_model_len=0, logit_mean=0.0,
                             logit_sigma=1.0, attention="padded", output_names=("logits", "scores"),
                             trust_remote_code=False, lora_modules=(("a", str(adapters[0])),))
    with pytest.raises(LoraError, match="generic .* does not serve LoRA adapters"):
        PackedEngine.load(families.GENERIC, settings)


def sequences(count):
    return RequestSequences(torch.arange(1, count + 1), torch.ones(count, dtype=torch.int64), None)


def test_lora_names_are_checked_per_request():
    held = {"alpha": 1, "beta": 2}
    padded = read_lora_names(names_input(["", "beta", "alpha"]), sequences(3), held, "m")
    assert padded.lora_ids.tolist() == [0, 2, 1]
    flat = read_lora_names(names_input(["alpha", ""], flat=True), sequences(2), {"alpha": 1}, "m")
    assert flat.lora_ids.tolist() == [1, 0]
    assert read_lora_names(names_input(["", ""]), sequences(2), held, "m").lora_ids is None
    assert read_lora_names(None, sequences(2), held, "m").lora_ids is None
    with pytest.raises(LoraNotLoaded, match=r"^LoRA adapter 'gamma' is not loaded on model 'm'$"):
        read_lora_names(names_input(["", "gamma"]), sequences(2), held, "m")
    with pytest.raises(LoraNotLoaded, match="'alpha' is not loaded on model 'plain'"):
        read_lora_names(names_input(["alpha"]), sequences(1), {}, "plain")
    for shape in ([2, 5], [1, 7], [3], [3, 0]):  # rows for another count; a flat row that does not divide; not 2-D
        with pytest.raises(InvalidRequest, match=r"one zero-padded name per sequence \(3\)"):
            read_lora_names(torch.zeros(shape, dtype=torch.uint8), sequences(3), held, "m")
    with pytest.raises(InvalidRequest, match="UINT8"):
        read_lora_names(torch.zeros(1, 1, dtype=torch.int32), sequences(1), held, "m")
    with pytest.raises(InvalidRequest, match="UTF-8"):
        read_lora_names(torch.tensor([[0xFF]], dtype=torch.uint8), sequences(1), held, "m")
    # Requests without names pack as the base model beside those with them.
    batch = PackedBatch.pack([sequences(2), flat])
    assert batch.lora_ids.tolist() == [0, 0, 1, 0]
    assert PackedBatch.pack([sequences(2)]).lora_ids is None


def test_lora_modules_parameter(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({"r": 4}))
    parsed = ModelParameters.from_mapping({"lora_modules": f"first={tmp_path / 'a'}, second = /x/y"})
    assert parsed.lora_modules == (("first", str(tmp_path / "a")), ("second", "/x/y"))
    assert ModelParameters.from_mapping({}).lora_modules == ()
    for value, message in (("first", "not name=path"), ("=path", "not name=path"), ("a=b=c", "not name=path"),
                           ("a=/x,a=/y", "names 'a' twice"), ("a=/x,,b=/y", "not name=path")):
        with pytest.raises(ValueError, match=message):
            ModelParameters.from_mapping({"lora_modules": value})
    check_lora_folders(parsed.lora_modules[:1])
    with pytest.raises(ValueError, match=r"adapter 'second' at '/x/y' is not a PEFT adapter folder"):
        check_lora_folders(parsed.lora_modules)


def test_the_card_names_the_adapters_and_old_cards_parse():
    card = ModelCard(served_name="m", family="bert", task="classify", architecture="BertForSequenceClassification",
                     max_model_len=512, num_labels=2, lora_modules=("a", "b"), lora_paths=("/a", "/b"))
    assert ModelCard.from_json(card.to_json()) == card
    old = json.loads(card.to_json())
    del old["lora_modules"], old["lora_paths"]
    assert ModelCard.from_json(json.dumps(old)).lora_modules == ()


def test_an_adapter_the_model_does_not_hold_fails_its_request_alone(served, monkeypatch):
    """PackedTritonModel.execute (the stub's module faked): the request naming an adapter the model does not hold
    gets NOT_FOUND with the runtime's message (the adapter answers it as a 404); the others are scored with their
    adapters."""
    kind, checkpoint, adapters = served
    utils = types.ModuleType("triton_python_backend_utils")
    utils.TritonError = type("TritonError", (), {"INVALID_ARG": "INVALID_ARG", "INTERNAL": "INTERNAL", "NOT_FOUND": "NOT_FOUND",
                                                 "__init__": lambda self, message, code: setattr(self, "args", (message, code))})
    utils.InferenceResponse = lambda output_tensors=None, error=None: types.SimpleNamespace(outputs=output_tensors,
                                                                                           error=error)
    utils.Tensor = types.SimpleNamespace(from_dlpack=lambda name, tensor: (name, tensor))
    utils.get_input_tensor_by_name = lambda request, name: request.inputs.get(name)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", utils)
    monkeypatch.delitem(sys.modules, "poolserve_runtime.triton_model", raising=False)
    module = importlib.import_module("poolserve_runtime.triton_model")
    model = module.PackedTritonModel()
    model.family = MODELS[kind][0]
    model.engine = engine(kind, checkpoint, adapters)

    def request(ids, names):
        tensors = {"input_ids": torch.tensor(ids), "lora_names": names_input(names)}
        inputs = {name: types.SimpleNamespace(to_dlpack=lambda t=t: t) for name, t in tensors.items()}
        return types.SimpleNamespace(inputs=inputs, is_cancelled=lambda: False, requested_output_names=lambda: ["logits"])

    rows = [[5, 6, 7, 8], [9, 10, 11, 12]]
    responses = model.execute([request(rows, ["adapter1", "adapter3"]), request(rows, ["", "adapter4"]),
                               request(rows, ["adapter2", ""])])
    sys.modules.pop("poolserve_runtime.triton_model", None)
    assert responses[1].error.args == (f"LoRA adapter 'adapter4' is not loaded on model '{kind}'", "NOT_FOUND")
    for response, ids in ((responses[0], (1, 3)), (responses[2], (2, 0))):
        assert response.error is None
        (name, logits), = response.outputs
        expected = torch.cat([merged_logits(checkpoint, adapters[i - 1] if i else None, [torch.tensor(row)])
                              for i, row in zip(ids, rows)])
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
