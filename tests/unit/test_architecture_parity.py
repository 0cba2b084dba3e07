"""Every HF-native architecture against its reference implementation, fp32 on CPU.

The reference is the transformers class itself (``AutoModelForSequenceClassification``), run one
sequence at a time so no padding rule of ours can leak into it; vLLM's activation rule turns its
logits into probabilities. Our engine runs all sequences of mixed lengths (and text pairs with
token types where the architecture has them) in one packed batch, through every body the family
has: the packed varlen stream and the padded path. Probabilities must agree to 1e-4 and rankings
must be identical. The family comes from the checkpoint's config.json, as ``make serve`` picks it.
"""

from __future__ import annotations

import pytest
import torch

from poolserve_runtime import families
from poolserve_runtime.activation import activation_for_config, apply_activation
from poolserve_runtime.engine import PackedEngine
from poolserve_runtime.packing import PackedBatch, RequestSequences
from poolserve_runtime.settings import ModelSettings
from tests.support.tiny_models import ARCHITECTURE_KINDS, build_checkpoint

LENGTHS = [1, 9, 40, 3, 23, 2, 17]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    return {kind: build_checkpoint(kind, root / kind) for kind in set(ARCHITECTURE_KINDS.values())}


def engine_for(checkpoint, attention: str, budget: int = 16384) -> PackedEngine:
    family = families.family_for_config(families.read_config_dict(str(checkpoint)))
    settings = ModelSettings(model_name="parity", checkpoint=str(checkpoint), device=torch.device("cpu"),
                             dtype=torch.float32, max_tokens_per_forward=budget, max_model_len=0, logit_mean=0.0,
                             logit_sigma=1.0, attention=attention, output_names=("logits", "scores"), compile="none")
    return PackedEngine.load(family, settings)


def sequences(vocab_size: int, type_vocab_size: int, pad_token_id: int | None):
    generator = torch.Generator().manual_seed(11)
    lengths = torch.tensor(LENGTHS)
    ids = torch.randint(4, vocab_size, (int(lengths.sum()),), generator=generator)
    if pad_token_id is not None:
        ids[ids == pad_token_id] = 5  # pad ids inside sequences are covered by their own test
    types = None
    if type_vocab_size > 1:  # text pairs: the second half of each sequence is segment 1
        positions = torch.cat([torch.arange(int(n)) for n in lengths])
        halves = torch.repeat_interleave(lengths // 2, lengths)
        types = (positions >= halves).long()
    return ids, lengths, types


def reference_logits(checkpoint, ids, lengths, types) -> torch.Tensor:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    rows, start = [], 0
    with torch.inference_mode():
        for length in lengths.tolist():
            inputs = {"input_ids": ids[start : start + length].unsqueeze(0)}
            if types is not None:
                inputs["token_type_ids"] = types[start : start + length].unsqueeze(0)
            rows.append(model(**inputs).logits[0].float())
            start += length
    return torch.stack(rows), model.config


def assert_matches_reference(got: dict, expected_logits: torch.Tensor, config) -> None:
    expected_scores = apply_activation(expected_logits, activation_for_config(config))
    scale = float(expected_logits.abs().max()) or 1.0
    torch.testing.assert_close(got["logits"], expected_logits, rtol=1e-4, atol=1e-4 * scale)
    torch.testing.assert_close(got["scores"], expected_scores, rtol=1e-4, atol=1e-4)
    if got["scores"].shape[1] == 1:  # a reranker: the order of documents must not change
        assert torch.equal(got["scores"][:, 0].argsort(), expected_scores[:, 0].argsort())
    else:
        assert torch.equal(got["scores"].argmax(dim=1), expected_scores.argmax(dim=1))


@pytest.mark.parametrize("architecture", list(ARCHITECTURE_KINDS))
def test_probabilities_equal_the_reference(checkpoints, architecture):
    checkpoint = checkpoints[ARCHITECTURE_KINDS[architecture]]
    engines = [engine_for(checkpoint, body) for body in families.BODIES]
    engines.append(engine_for(checkpoint, "varlen", budget=24))  # several forwards per batch
    family = engines[0].family
    if architecture.endswith("(generic)"):
        assert family is families.GENERIC
    config = engines[0].config
    ids, lengths, types = sequences(engines[0].limits.vocab_size,
                                    int(getattr(config, "type_vocab_size", 1) or 1) if family.uses_token_types else 1,
                                    getattr(config, "pad_token_id", None))
    expected, reference_config = reference_logits(checkpoint, ids, lengths, types)
    batch = PackedBatch.pack([RequestSequences(ids[:52], lengths[:3], None if types is None else types[:52]),
                              RequestSequences(ids[52:], lengths[3:], None if types is None else types[52:])])
    for engine in engines:
        assert_matches_reference(engine.run(batch), expected, reference_config)
    runs = {engine.body_mode for engine in engines}
    assert runs == ({"varlen", "padded"} if family.packed and "padded" in family.bodies else set(family.bodies))


@pytest.mark.parametrize("kind", ["qwen3", "gpt2"])
def test_decoders_pool_the_last_non_pad_token_as_hf(checkpoints, kind):
    """A sequence ending in pad ids (pad = eos in these tokenizers) is pooled before them, as HF's
    *ForSequenceClassification does; the packed gather and the fused path agree with HF."""
    from transformers import AutoModelForSequenceClassification

    checkpoint = checkpoints[kind]
    engine = engine_for(checkpoint, "varlen")
    pad = int(engine.config.pad_token_id)
    generator = torch.Generator().manual_seed(2)
    rows = [torch.randint(4, engine.limits.vocab_size, (n,), generator=generator) for n in (6, 9, 4)]
    rows[0] = torch.cat([rows[0], torch.tensor([pad, pad])])  # trailing pads
    rows[1][3] = pad  # a pad id inside a sequence is a token like any other for the last-token rule
    rows[2] = torch.full((3,), pad)  # only pads: HF pools the first token
    lengths = torch.tensor([len(r) for r in rows])
    got = engine.run(PackedBatch.pack([RequestSequences(torch.cat(rows), lengths, None)]))
    model = AutoModelForSequenceClassification.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    with torch.inference_mode():
        expected = torch.stack([model(input_ids=r.unsqueeze(0)).logits[0] for r in rows])
    torch.testing.assert_close(got["logits"], expected, rtol=1e-4, atol=1e-4)


def test_modernbert_local_attention_is_honoured_by_the_packed_body(checkpoints):
    """ModernBERT's local layers see 4 tokens each side here: a packed body that ignored the window
    would still match on short sequences, so check it differs from global attention on long ones."""
    engine = engine_for(checkpoints["modernbert"], "varlen")
    ids = torch.randint(4, engine.limits.vocab_size, (40,), generator=torch.Generator().manual_seed(0))
    batch = PackedBatch.pack([RequestSequences(ids, torch.tensor([40]), None)])
    windowed = engine.run(batch)["logits"]
    for layer in engine.model.model.layers:
        layer.attn.sliding_window = None
    assert not torch.allclose(engine.run(batch)["logits"], windowed, rtol=1e-3, atol=1e-3)


def test_padded_only_families_say_why(checkpoints, caplog):
    engine = engine_for(checkpoints["deberta_v2"], "varlen")
    assert engine.body_mode == "padded"
    assert "relative-position attention" in engine.describe()
    assert "Gemma2" in families.GEMMA2.padded_reason and "padded" in families.JAMBA.padded_reason


def test_family_detection_and_the_unsupported_message():
    assert families.family_for_config({"architectures": ["ModernBertForSequenceClassification"]}) is families.MODERNBERT
    # Remote-code checkpoints: the class named in auto_map decides when architectures names nothing served.
    remote = {"architectures": ["MyRemoteModel"],
              "auto_map": {"AutoModelForSequenceClassification": "modeling.MyForSequenceClassification"}}
    assert families.family_for_config(remote) is families.GENERIC
    # An explicit architecture override wins (vLLM's --hf-overrides '{"architectures": [...]}').
    assert families.family_for_config({"architectures": ["BertModel"]},
                                      override="BertForSequenceClassification") is families.BERT
    with pytest.raises(families.UnsupportedArchitecture) as error:
        families.family_for_config({"architectures": ["T5ForConditionalGeneration"]})
    message = str(error.value)
    assert "T5ForConditionalGeneration" in message and "ModernBertForSequenceClassification" in message
    with pytest.raises(families.UnsupportedArchitecture, match="Qwen3ForSequenceClassification"):
        families.QWEN2.check_architecture({"architectures": ["Qwen3ForSequenceClassification"]})


def test_docs_model_table_lists_every_family_and_folder():
    from pathlib import Path

    models_doc = (Path(__file__).resolve().parents[2] / "docs" / "models.md").read_text()
    table = models_doc.split("<!-- model-table:start -->")[1].split("<!-- model-table:end -->")[0]
    rows = {line.split("|")[2].strip().strip("`"): line for line in table.splitlines()[2:] if line.startswith("|")}
    for family in (*families.all_families(), families.GENERIC):
        assert family.folder in rows, f"docs/models.md model table lacks {family.folder}"
        if family is not families.GENERIC:
            for architecture in family.architectures:
                assert f"`{architecture}`" in rows[family.folder], (family.folder, architecture)
        assert ("padded" in rows[family.folder]) == (not family.packed), family.folder


def test_docs_model_table_marks_lora_and_fp8_where_the_code_refuses_them():
    """Folders the engine refuses LoRA adapters for say `no` in the LoRA column; vision and the generic
    fallback say `no` for FP8 too; every mark is one the legend above the table defines."""
    from pathlib import Path

    from poolserve_runtime.implementations import DebertaV2Family, Family

    models_doc = (Path(__file__).resolve().parents[2] / "docs" / "models.md").read_text()
    table = models_doc.split("<!-- model-table:start -->")[1].split("<!-- model-table:end -->")[0]
    header, _, *lines = [line for line in table.splitlines() if line.startswith("|")]
    columns = [cell.strip() for cell in header.split("|")]
    lora_column, fp8_column = columns.index("LoRA"), columns.index("FP8")
    rows = {cells[2].strip().strip("`"): cells for cells in (line.split("|") for line in lines)}
    for family in (*families.all_families(), families.GENERIC):
        lora, fp8 = rows[family.folder][lora_column].strip(), rows[family.folder][fp8_column].strip()
        assert lora in ("yes", "yes (untested)", "no") and fp8 in ("load + ckpt", "load", "no"), family.folder
        if family.vision or family is families.GENERIC or isinstance(family, DebertaV2Family) or \
                family.name.startswith("deberta_v2"):
            assert lora == "no", family.folder
        # FP8 checkpoints (and dummy weights) need the family's model built empty: the auto-class loader, or a
        # build_empty of the family's own (PackedEngine.load refuses vision and generic before anything).
        streamed = type(family).load is Family.load or type(family).build_empty is not Family.build_empty
        expected = "no" if family.vision or family is families.GENERIC else "load + ckpt" if streamed else "load"
        assert fp8 == expected, family.folder
