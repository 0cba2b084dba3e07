"""Tiny random token-level checkpoints for tests: a ColBERT model laid out as colbert-ai's ``HF_ColBERT`` saves
one (answerai-colbert-small-v1): a BERT body under ``bert.`` and the bias-free projection ``linear.weight``
[dim, hidden] in one ``model.safetensors``, config.json ``architectures: ["HF_ColBERT"]``."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.support.tiny_models import wordpiece_tokenizer

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
