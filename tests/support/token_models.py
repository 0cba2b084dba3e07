"""Tiny random token-level checkpoints for tests: a ColBERT model laid out as colbert-ai's ``HF_ColBERT`` saves
one (answerai-colbert-small-v1): a BERT body under ``bert.`` and the bias-free projection ``linear.weight``
[dim, hidden] in one ``model.safetensors``, config.json ``architectures: ["HF_ColBERT"]``; and stock
``*ForTokenClassification`` models of every token-classifier family, with their transformers reference."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.support.tiny_models import roberta_tokenizer, wordpiece_tokenizer

ENCODER = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
               max_position_embeddings=128, initializer_range=0.3, hidden_dropout_prob=0.0,
               attention_probs_dropout_prob=0.0)
COLBERT_DIM = 24


def colbert_checkpoint(directory: Path, seed: int = 0, architecture: str = "HF_ColBERT") -> Path:
    """A tiny ColBERT checkpoint in ``directory`` (``architecture`` None: a plain BertModel config.json)."""
    import transformers as tf
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = wordpiece_tokenizer(directory)
    config = tf.BertConfig(vocab_size=len(tokenizer), type_vocab_size=2, pad_token_id=0, **ENCODER)
    body = tf.BertModel(config, add_pooling_layer=False)
    body.save_pretrained(directory)
    tensors = {f"bert.{name}": tensor.contiguous() for name, tensor in body.state_dict().items()}
    tensors["linear.weight"] = torch.randn(COLBERT_DIM, config.hidden_size) * 0.2
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config_file = directory / "config.json"
    written = json.loads(config_file.read_text())
    written["architectures"] = [architecture] if architecture else ["BertModel"]
    config_file.write_text(json.dumps(written, indent=2))
    return directory


def colbert_reference(directory: Path, texts: list[str]) -> list[torch.Tensor]:
    """vLLM's test_colbert reference: ``F.normalize(F.linear(BertModel(x).last_hidden_state, W), dim=-1)``
    of each text alone (fp32, CPU), every token included."""
    import transformers as tf
    from safetensors import safe_open

    tokenizer = tf.AutoTokenizer.from_pretrained(str(directory))
    body = tf.BertModel.from_pretrained(str(directory), add_pooling_layer=False).eval()
    with safe_open(str(directory / "model.safetensors"), framework="pt") as weights:
        projection = weights.get_tensor("linear.weight")
    vectors = []
    with torch.inference_mode():
        for text in texts:
            hidden = body(**tokenizer(text, return_tensors="pt")).last_hidden_state[0]
            vectors.append(torch.nn.functional.normalize(torch.nn.functional.linear(hidden, projection), dim=-1))
    return vectors


# Token-classifier kind -> its family (poolserve_contract.families).
TOKEN_CLASSIFIER_FAMILIES = {"bert": "bert_token_classifier", "xlm_roberta": "xlm_roberta_token_classifier",
                             "distilbert": "distilbert_token_classifier", "modernbert": "modernbert_token_classifier",
                             "deberta_v2": "deberta_v2_token_classifier"}
TOKEN_LABELS = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC")


def token_classifier_checkpoint(directory: Path, kind: str = "bert", seed: int = 0, num_labels: int = len(TOKEN_LABELS),
                                problem_type: str | None = None) -> Path:
    """A tiny random ``*ForTokenClassification`` checkpoint of ``kind`` (a TOKEN_CLASSIFIER_FAMILIES key)."""
    import transformers as tf

    torch.manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = roberta_tokenizer(directory) if kind == "xlm_roberta" else wordpiece_tokenizer(directory)
    labels = dict(num_labels=num_labels, problem_type=problem_type,
                  id2label={i: (TOKEN_LABELS[i] if num_labels == len(TOKEN_LABELS) else f"LABEL_{i}")
                            for i in range(num_labels)})
    vocab = len(tokenizer)
    if kind == "bert":
        model = tf.BertForTokenClassification(tf.BertConfig(vocab_size=vocab, type_vocab_size=2, pad_token_id=0,
                                                            **ENCODER, **labels))
    elif kind == "xlm_roberta":
        model = tf.XLMRobertaForTokenClassification(tf.XLMRobertaConfig(
            vocab_size=vocab, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
            **{**ENCODER, "max_position_embeddings": 130}, **labels))
    elif kind == "distilbert":
        model = tf.DistilBertForTokenClassification(tf.DistilBertConfig(
            vocab_size=vocab, dim=48, n_layers=2, n_heads=4, hidden_dim=96, max_position_embeddings=128,
            initializer_range=0.3, dropout=0.0, attention_dropout=0.0, pad_token_id=0, **labels))
    elif kind == "modernbert":
        # local_attention 8: the sliding window (4 tokens each side) is far shorter than the test sequences.
        model = tf.ModernBertForTokenClassification(tf.ModernBertConfig(
            vocab_size=vocab, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=128, global_attn_every_n_layers=2, local_attention=8, initializer_range=0.3,
            pad_token_id=0, bos_token_id=2, eos_token_id=3, cls_token_id=2, sep_token_id=3, **labels))
    elif kind == "deberta_v2":  # DeBERTa-v3 shape: relative attention, no absolute positions, no token types
        model = tf.DebertaV2ForTokenClassification(tf.DebertaV2Config(
            vocab_size=vocab, type_vocab_size=0, relative_attention=True, pos_att_type=["p2c", "c2p"],
            position_buckets=16, max_relative_positions=-1, position_biased_input=False, norm_rel_ebd="layer_norm",
            share_att_key=True, pad_token_id=0, **ENCODER, **labels))
    else:
        raise ValueError(f"unknown token classifier kind {kind!r}")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def token_classifier_reference(directory: Path, texts: list[str]) -> list[torch.Tensor]:
    """``AutoModelForTokenClassification(...).logits`` of each text alone (fp32, CPU, eval): ``[tokens, labels]``."""
    import transformers as tf

    tokenizer = tf.AutoTokenizer.from_pretrained(str(directory))
    model = tf.AutoModelForTokenClassification.from_pretrained(str(directory), attn_implementation="eager").eval()
    with torch.inference_mode():
        return [model(**tokenizer(text, return_tensors="pt")).logits[0] for text in texts]


def splade_checkpoint(directory: Path, seed: int = 0, special_ids: bool = True) -> Path:
    """A tiny random ``BertForMaskedLM`` (naver/splade-* layout: ``architectures: ["BertForMaskedLM"]``, decoder tied
    to the word embeddings) with a WordPiece tokenizer; ``special_ids``: config.json names ``cls_token_id`` and
    ``sep_token_id`` (vLLM drops those tokens only when it does)."""
    import transformers as tf

    torch.manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = wordpiece_tokenizer(directory)
    ids = dict(cls_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id) if special_ids else {}
    model = tf.BertForMaskedLM(tf.BertConfig(vocab_size=len(tokenizer), type_vocab_size=2, pad_token_id=0, **ENCODER,
                                             **ids))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def splade_reference(directory: Path, texts: list[str]) -> list[torch.Tensor]:
    """vLLM's SPLADE vector of each text alone (fp32, CPU), from ``BertForMaskedLM(...).logits``: a first token equal
    to the config's ``cls_token_id`` and a last equal to its ``sep_token_id`` dropped, then ``log1p(relu(.))`` and
    the max over the remaining tokens (a zero vector when none remain)."""
    import transformers as tf

    tokenizer = tf.AutoTokenizer.from_pretrained(str(directory))
    model = tf.BertForMaskedLM.from_pretrained(str(directory), attn_implementation="eager").eval()
    cls_id, sep_id = getattr(model.config, "cls_token_id", None), getattr(model.config, "sep_token_id", None)
    vectors = []
    with torch.inference_mode():
        for text in texts:
            encoded = tokenizer(text, return_tensors="pt")
            logits, ids = model(**encoded).logits[0], encoded["input_ids"][0].tolist()
            start = 1 if cls_id is not None and ids[0] == cls_id else 0
            end = max(start, len(ids) - 1) if sep_id is not None and ids[-1] == sep_id else len(ids)
            if end <= start:
                vectors.append(torch.zeros(model.config.vocab_size))
            else:
                vectors.append(torch.log1p(torch.relu(logits[start:end])).max(dim=0).values)
    return vectors


def bge_m3_checkpoint(directory: Path, seed: int = 0) -> Path:
    """A tiny random BGE-M3 laid out as BAAI/bge-m3: an ``XLMRobertaModel`` checkpoint (``architectures:
    ["XLMRobertaModel"]``, no sentence-transformers files) with FlagEmbedding's heads saved beside it as
    ``torch.save(linear.state_dict())``: ``sparse_linear.pt`` (``Linear(hidden, 1)``) and ``colbert_linear.pt``
    (``Linear(hidden, hidden)``)."""
    import transformers as tf

    torch.manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = roberta_tokenizer(directory)
    config = tf.XLMRobertaConfig(vocab_size=len(tokenizer), type_vocab_size=1, pad_token_id=1, bos_token_id=0,
                                 eos_token_id=2, **{**ENCODER, "max_position_embeddings": 130})
    tf.XLMRobertaModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    for name, width in (("sparse_linear", 1), ("colbert_linear", config.hidden_size)):
        linear = torch.nn.Linear(config.hidden_size, width)
        torch.nn.init.normal_(linear.weight, std=0.3)
        torch.nn.init.normal_(linear.bias, std=0.3)
        if name == "sparse_linear":
            linear.bias.data.fill_(-0.1)  # many tokens' weights negative: their relu is zero
        torch.save(linear.state_dict(), directory / f"{name}.pt")
    return directory


def bge_m3_reference(directory: Path, texts: list[str]) -> list[dict]:
    """BGE-M3's outputs of each text alone (fp32, CPU) from ``XLMRobertaModel(x).last_hidden_state`` ``h`` and the two
    heads: ``dense`` normalize(h[0]); ``colbert`` normalize(colbert_linear(h[1:])) (vLLM drops only BOS, keeps
    ``</s>``); ``weights`` relu(sparse_linear(h[1:-1]))[:, 0] (BOS and EOS dropped); ``ids`` the token ids
    (every one); ``lexical`` FlagEmbedding's ``_process_token_weights``: {token id: max weight} over every token,
    skipping the cls / eos / pad / unk ids and weights <= 0."""
    import transformers as tf

    tokenizer = tf.AutoTokenizer.from_pretrained(str(directory))
    body = tf.XLMRobertaModel.from_pretrained(str(directory), attn_implementation="eager").eval()
    heads = {}
    for name in ("sparse_linear", "colbert_linear"):
        state = torch.load(directory / f"{name}.pt", weights_only=True)
        heads[name] = torch.nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
        heads[name].load_state_dict(state)
    skipped = {tokenizer.cls_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id}
    outputs = []
    with torch.inference_mode():
        for text in texts:
            encoded = tokenizer(text, return_tensors="pt")
            hidden = body(**encoded).last_hidden_state[0]
            weights = torch.relu(heads["sparse_linear"](hidden))[:, 0]
            ids = encoded["input_ids"][0].tolist()
            lexical: dict[int, float] = {}
            for token, weight in zip(ids, weights.tolist()):
                if token not in skipped and weight > 0:
                    lexical[token] = max(weight, lexical.get(token, 0.0))
            outputs.append({"dense": torch.nn.functional.normalize(hidden[0], dim=-1),
                            "colbert": torch.nn.functional.normalize(heads["colbert_linear"](hidden[1:]), dim=-1),
                            "weights": weights[1:-1], "ids": ids, "lexical": lexical})
    return outputs
