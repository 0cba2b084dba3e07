"""Embedding families against sentence-transformers itself, fp32 on CPU, and the metadata they read.

Each tiny random checkpoint is saved by sentence-transformers (``SentenceTransformer(modules=[Transformer,
Pooling, Normalize]).save``), so its ``modules.json``, Pooling ``config.json`` and prompts are the files
a real checkpoint ships. The packed engine then embeds several texts of different lengths in one
packed batch, and every vector must match ``SentenceTransformer(folder).encode`` (cosine >= 0.99999);
``pooled`` must match the same model without its Normalize module.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from poolserve_contract import families as declarations
from poolserve_contract.card import ModelCard, model_card
from poolserve_contract.embedding_meta import UnsupportedEmbedding, has_sentence_pooling, read_embedding_meta
from poolserve_contract.parameters import ModelParameters
from poolserve_contract.triton_config import complete_config
from poolserve_runtime import families
from poolserve_runtime.engine import PackedEngine
from poolserve_runtime.packing import PackedBatch, RequestSequences
from poolserve_runtime.settings import ModelSettings
from tests.support.tiny_models import (
    build_checkpoint,
    byte_level_tokenizer,
    random_text,
    roberta_tokenizer,
    wordpiece_tokenizer,
)

ENCODER = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
               max_position_embeddings=128, initializer_range=0.3, hidden_dropout_prob=0.0,
               attention_probs_dropout_prob=0.0)
DECODER = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
               max_position_embeddings=128, initializer_range=0.3, tie_word_embeddings=False)
PROMPTS = {"query": "query: ", "passage": "passage: "}

# kind -> (family, sentence-transformers pooling mode, Normalize module)
CASES = {
    "bert_mean_normalize": ("bert_embedding", "mean", True),  # all-MiniLM-L6-v2's modules
    "bert_cls": ("bert_embedding", "cls", False),
    "xlm_roberta_cls_normalize": ("roberta_embedding", "cls", True),  # bge-m3 dense
    "roberta_mean_normalize": ("roberta_embedding", "mean", True),  # multilingual-e5
    "modernbert_mean_normalize": ("modernbert_embedding", "mean", True),  # modernbert-embed-base
    "modernbert_cls": ("modernbert_embedding", "cls", False),
    "qwen3_last_normalize": ("decoder_embedding", "lasttoken", True),  # Qwen3-Embedding
    "qwen3_causal_lm_last_normalize": ("decoder_embedding", "lasttoken", True),  # as Qwen3-Embedding ships
    "qwen2_last": ("decoder_embedding", "lasttoken", False),
    "llama_mean_normalize": ("decoder_embedding", "mean", True),
    "mistral_last_normalize": ("decoder_embedding", "lasttoken", True),
}


def base_model(kind: str, directory: Path):
    """A tiny base model (the Transformer module's checkpoint) of ``kind`` saved in ``directory``."""
    import transformers as tf

    torch.manual_seed(0)
    directory.mkdir(parents=True, exist_ok=True)
    if kind.startswith("bert"):
        return build_checkpoint("bert_embedding", directory)
    if kind.startswith(("xlm_roberta", "roberta")):
        tokenizer = roberta_tokenizer(directory)
        config_class, model_class = ((tf.XLMRobertaConfig, tf.XLMRobertaModel) if kind.startswith("xlm")
                                     else (tf.RobertaConfig, tf.RobertaModel))
        config = config_class(vocab_size=len(tokenizer), type_vocab_size=1, pad_token_id=1, bos_token_id=0,
                              eos_token_id=2, **{**ENCODER, "max_position_embeddings": 130})
        model = model_class(config, add_pooling_layer=False)
    elif kind.startswith("modernbert"):
        tokenizer = wordpiece_tokenizer(directory)
        # local_attention 8: the sliding window (4 tokens each side) is far shorter than the test texts.
        model = tf.ModernBertModel(tf.ModernBertConfig(
            vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=128, global_attn_every_n_layers=2, local_attention=8, initializer_range=0.3,
            pad_token_id=0, bos_token_id=2, eos_token_id=3, cls_token_id=2, sep_token_id=3))
    else:
        tokenizer = byte_level_tokenizer(directory)
        # sentence-transformers 6 wraps a text in the tokenizer's chat template when there is one (the
        # "message" modality); the engine embeds the tokens it is sent, so the reference gets plain text.
        tokenizer.chat_template = None
        (directory / "chat_template.jinja").unlink(missing_ok=True)
        common = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, **DECODER)
        if kind.startswith("qwen3_causal_lm"):
            model = tf.Qwen3ForCausalLM(tf.Qwen3Config(head_dim=12, **common))
        elif kind.startswith("qwen3"):
            model = tf.Qwen3Model(tf.Qwen3Config(head_dim=12, **common))
        elif kind.startswith("qwen2"):
            model = tf.Qwen2Model(tf.Qwen2Config(**common))
        elif kind.startswith("llama"):
            model = tf.LlamaModel(tf.LlamaConfig(**common))
        else:  # a sliding window far shorter than the test texts
            model = tf.MistralModel(tf.MistralConfig(sliding_window=6, **common))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def sentence_transformer_checkpoint(kind: str, root: Path) -> Path:
    """``kind``'s base model wrapped and saved by sentence-transformers, with prompts."""
    from sentence_transformers import SentenceTransformer, models

    _, mode, normalize = CASES[kind]
    transformer = models.Transformer(str(base_model(kind, root / f"{kind}-base")))
    modules = [transformer, models.Pooling(transformer.get_embedding_dimension(), pooling_mode=mode)]
    model = SentenceTransformer(modules=modules + ([models.Normalize()] if normalize else []), prompts=PROMPTS,
                                device="cpu")
    model.save(str(root / kind))
    return root / kind


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("embedders")
    return {kind: sentence_transformer_checkpoint(kind, root) for kind in CASES}


def texts() -> list[str]:
    rng = random.Random(11)
    return [random_text(rng, words) for words in (1, 17, 3, 30, 8, 2)]


def load(checkpoint: Path, family, body: str) -> PackedEngine:
    settings = ModelSettings(model_name="embedder", checkpoint=str(checkpoint), device=torch.device("cpu"),
                             dtype=torch.float32, max_tokens_per_forward=64, max_model_len=0, logit_mean=0.0,
                             logit_sigma=1.0, attention=body, output_names=("embeddings", "pooled"), compile="none")
    return PackedEngine.load(family, settings)


def embed(engine: PackedEngine, checkpoint: Path, sentences: list[str]) -> dict[str, torch.Tensor]:
    """The engine's outputs for ``sentences`` tokenised as sentence-transformers does, packed in two requests
    (a token budget of 64 makes it several forwards)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    encoded = [torch.tensor(tokenizer(text)["input_ids"]) for text in sentences]
    requests = [encoded[:2], encoded[2:]]
    batch = PackedBatch.pack([RequestSequences(torch.cat(ids), torch.tensor([len(i) for i in ids]), None)
                              for ids in requests])
    return engine.run(batch)


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1)


@pytest.mark.parametrize("body", ["padded", "varlen"])
@pytest.mark.parametrize("kind", list(CASES))
def test_embeddings_match_sentence_transformers(checkpoints, kind, body):
    from sentence_transformers import SentenceTransformer

    family_name, _, normalize = CASES[kind]
    checkpoint = checkpoints[kind]
    family = families.family_for_config(families.read_config_dict(str(checkpoint)),
                                        "Qwen3Model" if "causal_lm" in kind else "")
    assert family.name == family_name
    engine = load(checkpoint, family, body)
    sentences = texts()
    got = embed(engine, checkpoint, sentences)

    reference = SentenceTransformer(str(checkpoint), device="cpu")
    expected = reference.encode(sentences, convert_to_tensor=True, batch_size=len(sentences))
    similarity = cosines(got["embeddings"], expected)
    assert bool((similarity >= 0.99999).all()), f"{kind}: cosines {similarity.tolist()}"
    torch.testing.assert_close(got["embeddings"], expected.float(), rtol=1e-4, atol=1e-5)
    # `pooled` is the model before its Normalize module; without one the two outputs are the same vectors.
    unnormalized = SentenceTransformer(modules=[reference[0], reference[1]], device="cpu")
    expected_pooled = unnormalized.encode(sentences, convert_to_tensor=True, batch_size=len(sentences))
    torch.testing.assert_close(got["pooled"], expected_pooled.float(), rtol=1e-4, atol=1e-5)
    norms = got["embeddings"].norm(dim=1)
    assert bool(torch.allclose(norms, torch.ones_like(norms), atol=1e-5)) == normalize
    assert engine.normalizes == normalize and f"pooling={engine.pooling}" in engine.describe()


def test_the_builtin_minilm_is_mean_and_normalized_as_before(checkpoints):
    """all-MiniLM-L6-v2's modules (mean, Normalize): the embeddings are the former mean_normalized pooling's."""
    import poolserve_kernels

    engine = load(checkpoints["bert_mean_normalize"], families.BERT_EMBEDDING, "padded")
    assert (engine.pooling, engine.normalizes) == ("mean", True)
    hidden = torch.randn(30, 48)
    cu = torch.tensor([0, 4, 5, 30], dtype=torch.int32)
    outputs = engine.pool_and_score(hidden, cu)
    assert torch.equal(outputs["embeddings"], poolserve_kernels.pool(hidden, cu, "mean_normalized"))
    assert torch.equal(outputs["pooled"], poolserve_kernels.pool(hidden, cu, "mean"))


def test_a_checkpoint_without_sentence_transformers_files_gets_the_family_default(tmp_path):
    checkpoint = build_checkpoint("bert_embedding", tmp_path / "plain")
    engine = load(checkpoint, families.BERT_EMBEDDING, "padded")
    assert (engine.pooling, engine.normalizes) == ("mean", True)  # vLLM: normalised unless ST lacks Normalize
    decoder = base_model("qwen3_plain", tmp_path / "qwen3")
    assert read_embedding_meta(str(decoder), families.DECODER_EMBEDDING.pooling) == read_embedding_meta(
        str(decoder), "last")
    assert families.by_name("roberta_embedding").pooling == "cls"


# --- Choosing the family ------------------------------------------------------------------------------------------


def test_base_model_architectures_pick_the_embedding_families():
    expected = {"BertModel": "bert_embedding", "XLMRobertaModel": "roberta_embedding",
                "RobertaModel": "roberta_embedding", "ModernBertModel": "modernbert_embedding",
                "Qwen3Model": "decoder_embedding", "Qwen2Model": "decoder_embedding",
                "LlamaModel": "decoder_embedding", "MistralModel": "decoder_embedding"}
    for architecture, name in expected.items():
        family = declarations.family_for_config({"architectures": [architecture]})
        assert family.name == name and family.task == "embed"
    # A causal LM is no embedder by its architecture alone: only with a sentence-transformers Pooling module.
    assert declarations.family_for_config({"architectures": ["Qwen3ForCausalLM"]},
                                          "Qwen3ForSequenceClassification").name == "qwen3"
    assert declarations.embedding_family_for_causal_lm("Qwen3ForCausalLM").name == "decoder_embedding"
    assert declarations.embedding_family_for_causal_lm("GemmaForCausalLM") is None
    decoder = declarations.by_name("decoder_embedding")
    decoder.check_architecture({"architectures": ["Qwen3ForCausalLM"]})
    with pytest.raises(declarations.UnsupportedArchitecture):
        decoder.check_architecture({"architectures": ["Qwen3ForSequenceClassification"]})


def test_the_plan_serves_a_sentence_transformers_causal_lm_as_an_embedder(checkpoints, tmp_path):
    from poolserve_contract.wire import SOURCE_FOLDER
    from poolserve_stack.plan import plan_models

    repository = Path(__file__).resolve().parents[2] / "model_repository"

    def folder(checkpoint: Path) -> str:
        (planned,) = plan_models([str(checkpoint)], repository).values()
        return planned[SOURCE_FOLDER]

    embedder = checkpoints["qwen3_causal_lm_last_normalize"]
    assert has_sentence_pooling(str(embedder))
    assert folder(embedder) == "decoder_embedder"
    # The same causal LM without sentence-transformers files converts to a classifier (vLLM's --convert classify).
    plain = base_model("qwen3_causal_lm_plain", tmp_path / "plain")
    assert not has_sentence_pooling(str(plain))
    assert folder(plain) == "qwen3_classifier"
    assert folder(checkpoints["xlm_roberta_cls_normalize"]) == "xlm_roberta_embedder"
    assert folder(checkpoints["modernbert_cls"]) == "modernbert_embedder"


# --- The metadata -------------------------------------------------------------------------------------------------


def write_st_files(directory: Path, pooling: dict | None, normalize_type: str | None = None,
                   extra_modules: tuple[str, ...] = (), prompts: dict | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]
    if pooling is not None:
        modules.append({"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"})
        (directory / "1_Pooling").mkdir(exist_ok=True)
        (directory / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 48, **pooling}))
    for module_type in extra_modules:
        modules.append({"idx": len(modules), "name": str(len(modules)), "path": f"{len(modules)}_Dense",
                        "type": module_type})
    if normalize_type:
        modules.append({"idx": len(modules), "name": str(len(modules)), "path": f"{len(modules)}_Normalize",
                        "type": normalize_type})
    (directory / "modules.json").write_text(json.dumps(modules))
    if prompts is not None:
        (directory / "config_sentence_transformers.json").write_text(json.dumps({"prompts": prompts}))
    return directory


@pytest.mark.parametrize("pooling, method", [
    ({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}, "cls"),
    ({"pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False}, "mean"),
    ({"pooling_mode_lasttoken": True}, "last"),
    ({"pooling_mode": "cls"}, "cls"),
    ({"pooling_mode": "mean", "include_prompt": True}, "mean"),
    ({"pooling_mode": "lasttoken"}, "last"),
    ({"pooling_mode": ["mean"], "pooling_mode_mean_tokens": True}, "mean"),  # one mode, named twice
])
def test_each_pooling_mode_is_read(tmp_path, pooling, method):
    meta = read_embedding_meta(str(write_st_files(tmp_path, pooling)), "cls")
    assert (meta.pooling, meta.normalizes, meta.from_sentence_transformers) == (method, False, True)


@pytest.mark.parametrize("normalize_type", [
    "sentence_transformers.models.Normalize",  # v2-v4
    "sentence_transformers.base.modules.normalize.Normalize",  # v5+
])
def test_a_normalize_module_turns_normalisation_on(tmp_path, normalize_type):
    meta = read_embedding_meta(str(write_st_files(tmp_path, {"pooling_mode": "mean"}, normalize_type)), "cls")
    assert meta.normalizes and meta.pooling == "mean"


def test_prompts_and_the_defaults_without_a_pooling_module(tmp_path):
    with_prompts = write_st_files(tmp_path / "a", {"pooling_mode": "cls"}, prompts={"query": "q: ", "doc": ""})
    assert read_embedding_meta(str(with_prompts), "mean").prompts == {"query": "q: ", "doc": ""}
    # modules.json without a Pooling module, or no file at all: the family's pooling, normalised (vLLM's default).
    for directory in (write_st_files(tmp_path / "b", None), tmp_path):
        meta = read_embedding_meta(str(directory), "last")
        assert (meta.pooling, meta.normalizes, meta.prompts, meta.from_sentence_transformers) == ("last", True, {}, False)
    # A hub id with nothing cached and nothing downloaded: the defaults too.
    assert read_embedding_meta("nobody-here/no-such-embedder", "cls", local_files_only=True).pooling == "cls"


@pytest.mark.parametrize("pooling, message", [
    ({"pooling_mode_max_tokens": True}, "pooling mode 'max' is not served"),
    ({"pooling_mode": "weightedmean"}, "pooling mode 'weightedmean' is not served"),
    ({"pooling_mode_mean_sqrt_len_tokens": True}, "pooling mode 'mean_sqrt_len_tokens' is not served"),
    ({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True}, "several pooling modes at once \\(cls, mean"),
    ({"pooling_mode": ["cls", "max"]}, "several pooling modes at once"),
    ({"pooling_mode": "mean", "include_prompt": False}, "include_prompt false"),
    ({"pooling_mode_cls_token": False}, "no pooling mode is set"),
])
def test_unserved_pooling_is_refused_naming_the_file(tmp_path, pooling, message):
    checkpoint = write_st_files(tmp_path, pooling)
    with pytest.raises(UnsupportedEmbedding, match=message) as error:
        read_embedding_meta(str(checkpoint), "cls")
    assert "1_Pooling/config.json" in str(error.value)
    assert isinstance(error.value, declarations.UnsupportedArchitecture)


def test_a_dense_module_is_refused(tmp_path):
    checkpoint = write_st_files(tmp_path, {"pooling_mode": "mean"}, "sentence_transformers.models.Normalize",
                                ("sentence_transformers.models.Dense",))
    with pytest.raises(UnsupportedEmbedding, match="modules.json lists sentence_transformers.models.Dense: "
                                                   "a Dense projection after pooling is not served"):
        read_embedding_meta(str(checkpoint), "cls")


def test_the_engine_refuses_an_unserved_checkpoint_at_load(checkpoints, tmp_path):
    import shutil

    checkpoint = shutil.copytree(checkpoints["bert_cls"], tmp_path / "max")
    (checkpoint / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "max"}))
    with pytest.raises(UnsupportedEmbedding, match="'max' is not served"):
        load(checkpoint, families.BERT_EMBEDDING, "padded")


# --- The card and the Triton outputs ------------------------------------------------------------------------------


def card(checkpoint: Path, family_name: str) -> ModelCard:
    family = declarations.by_name(family_name)
    return model_card(ModelParameters.from_mapping({}), family, str(checkpoint), task=family.task,
                      token_type_input=family.uses_token_types, fallback_name="embedder", local_files_only=True)


def test_the_card_describes_the_embeddings(checkpoints, tmp_path):
    normalizing = card(checkpoints["qwen3_causal_lm_last_normalize"], "decoder_embedding")
    assert (normalizing.task, normalizing.embedding_size, normalizing.normalizes, normalizing.num_labels) == \
        ("embed", 48, True, 0)
    written = json.loads((checkpoints["qwen3_causal_lm_last_normalize"] / "config_sentence_transformers.json").read_text())
    assert normalizing.prompts == written["prompts"] and PROMPTS.items() <= normalizing.prompts.items()
    assert not normalizing.is_matryoshka and normalizing.matryoshka_dimensions == []
    assert card(checkpoints["bert_cls"], "bert_embedding").normalizes is False
    # Matryoshka: config.json's matryoshka_dimensions (or is_matryoshka alone).
    config_file = checkpoints["modernbert_cls"] / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "matryoshka_dimensions": [48, 32, 16]}))
    try:
        matryoshka = card(checkpoints["modernbert_cls"], "modernbert_embedding")
    finally:
        config_file.write_text(json.dumps(config))
    assert matryoshka.is_matryoshka and matryoshka.matryoshka_dimensions == [48, 32, 16]
    assert ModelCard.from_json(matryoshka.to_json()) == matryoshka
    # A classifier's card keeps the defaults, and a card written before these fields still parses.
    old = json.loads(normalizing.to_json())
    for key in ("embedding_size", "normalizes", "is_matryoshka", "matryoshka_dimensions", "prompts"):
        del old[key]
    parsed = ModelCard.from_json(json.dumps(old))
    assert (parsed.embedding_size, parsed.normalizes, parsed.prompts, parsed.matryoshka_dimensions) == (0, False, {}, [])


def test_an_embed_model_outputs_embeddings_and_pooled():
    config = complete_config({"name": "x"}, "embed", uses_token_types=False)
    assert [output["name"] for output in config["output"]] == ["embeddings", "pooled"]
    assert all(output["data_type"] == "TYPE_FP32" for output in config["output"])
