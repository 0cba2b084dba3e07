"""Tiny random-weight checkpoints and locally trained tokenizers for every served architecture.

No hub access: tokenizers are trained here on a small corpus (WordPiece for BERT, a Unigram with
RoBERTa-style specials for XLM-R, byte-level BPE for Qwen/Llama) and the models are built from
configs with ``save_pretrained``. Weights use a large init range so that outputs depend strongly on
the input and a pooling or packing mistake cannot hide in near-constant scores.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

WORDS = (
    "the a an of to in on for with is was are were be this that it its by from at as or and but not "
    "paris france capital city river bank money loan rate market stock price movie film great good bad "
    "terrible awful wonderful love hate boring exciting happy sad query document passage answer question "
    "search engine ranking model token sequence batch server triton python kernel gpu memory fast slow "
    "weather rain sun cloud snow cold warm summer winter spring autumn food pizza pasta bread coffee tea"
).split()


def corpus(count: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))) for _ in range(count)]


def random_text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def wordpiece_tokenizer(directory: Path):
    from transformers import BertTokenizerFast

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer.train_from_iterator(corpus(), trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials))
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tokenizer.decoder = decoders.WordPiece()
    fast = BertTokenizerFast(tokenizer_object=tokenizer, model_max_length=512)
    fast.save_pretrained(directory)
    return fast


def roberta_tokenizer(directory: Path):
    from transformers import XLMRobertaTokenizerFast

    tokenizer = Tokenizer(models.Unigram())  # sentencepiece-style, as XLM-R's
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # ids 0..4, pad = 1 as in XLM-R
    tokenizer.train_from_iterator(
        corpus(), trainers.UnigramTrainer(vocab_size=300, special_tokens=specials, unk_token="<unk>")
    )
    tokenizer.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    fast = XLMRobertaTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
        unk_token="<unk>", pad_token="<pad>", mask_token="<mask>", model_max_length=512,
    )
    fast.save_pretrained(directory)
    return fast


CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_level_tokenizer(directory: Path):
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer.train_from_iterator(
        corpus(),
        trainers.BpeTrainer(vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>", model_max_length=512
    )
    fast.chat_template = CHATML_TEMPLATE  # so /classify's chat form and /tokenize's can be tested
    fast.save_pretrained(directory)
    return fast


def _save(model, tokenizer, directory: Path) -> Path:
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def build_checkpoint(kind: str, directory: Path, seed: int = 0) -> Path:
    """Build the tiny checkpoint named ``kind`` in ``directory``."""
    import transformers as tf

    torch.manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    encoder = dict(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
        max_position_embeddings=128, initializer_range=0.3, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    decoder = dict(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=96, max_position_embeddings=128, initializer_range=0.3,
    )
    if kind in ("bert", "bert_embedding"):
        tokenizer = wordpiece_tokenizer(directory)
        config = tf.BertConfig(vocab_size=len(tokenizer), type_vocab_size=2, pad_token_id=0, **encoder)
        if kind == "bert":
            config.num_labels = 3
            config.id2label = {0: "negative", 1: "neutral", 2: "positive"}
            config.label2id = {v: k for k, v in config.id2label.items()}
            return _save(tf.BertForSequenceClassification(config), tokenizer, directory)
        return _save(tf.BertModel(config), tokenizer, directory)
    if kind == "xlm_roberta":
        tokenizer = roberta_tokenizer(directory)
        config = tf.XLMRobertaConfig(
            vocab_size=len(tokenizer), type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
            num_labels=1, **{**encoder, "max_position_embeddings": 130},
        )
        return _save(tf.XLMRobertaForSequenceClassification(config), tokenizer, directory)
    if kind in ("qwen2", "qwen3", "llama"):
        tokenizer = byte_level_tokenizer(directory)
        common = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      tie_word_embeddings=False, **decoder)
        if kind == "qwen2":
            config = tf.Qwen2Config(num_labels=2, **common)
            return _save(tf.Qwen2ForSequenceClassification(config), tokenizer, directory)
        if kind == "qwen3":
            config = tf.Qwen3Config(num_labels=1, head_dim=12, **common)
            return _save(tf.Qwen3ForSequenceClassification(config), tokenizer, directory)
        config = tf.LlamaConfig(num_labels=1, problem_type="regression", **common)
        return _save(tf.LlamaForSequenceClassification(config), tokenizer, directory)
    raise ValueError(f"unknown tiny checkpoint kind {kind!r}")


# Model folder in model_repository/ → tiny checkpoint kind.
MODEL_FOLDERS = {
    "bert_classifier": "bert",
    "xlm_roberta_classifier": "xlm_roberta",
    "qwen2_classifier": "qwen2",
    "qwen3_classifier": "qwen3",
    "llama_classifier": "llama",
    "bert_embedder": "bert_embedding",
}
