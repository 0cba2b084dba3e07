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
    if kind in ("ernie", "distilbert", "modernbert", "modernbert_cls", "deberta_v2", "electra"):
        tokenizer = wordpiece_tokenizer(directory)
        return _save(_encoder_model(tf, kind, len(tokenizer), encoder), tokenizer, directory)
    if kind in CAUSAL_KINDS:  # LLM rerankers in their original form: a causal LM whose vocabulary has the labels
        tokenizer = byte_level_tokenizer(directory)
        tokenizer.add_tokens(list(LABEL_TOKENS))
        # 512 positions: rendered reranker prompts (system prompt, instruction, query, document) are long
        common = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, **{**decoder, "max_position_embeddings": 512})
        return _save(_causal_model(tf, kind, common), tokenizer, directory)
    if kind in DECODER_KINDS:
        tokenizer = byte_level_tokenizer(directory)
        common = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      tie_word_embeddings=False, **decoder)
        model = _decoder_model(tf, kind, common)
        return _save(model, tokenizer, directory)
    raise ValueError(f"unknown tiny checkpoint kind {kind!r}")


def _encoder_model(tf, kind: str, vocab_size: int, encoder: dict):
    if kind == "ernie":  # ernie-3.0: 4 token types, task ids on (HF feeds task id 0)
        config = tf.ErnieConfig(vocab_size=vocab_size, type_vocab_size=4, use_task_id=True, task_type_vocab_size=3,
                                pad_token_id=0, num_labels=2, **encoder)
        return tf.ErnieForSequenceClassification(config)
    if kind == "distilbert":
        config = tf.DistilBertConfig(vocab_size=vocab_size, dim=48, n_layers=2, n_heads=4, hidden_dim=96,
                                     max_position_embeddings=128, initializer_range=0.3, dropout=0.0,
                                     attention_dropout=0.0, seq_classif_dropout=0.0, pad_token_id=0, num_labels=2)
        return tf.DistilBertForSequenceClassification(config)
    if kind in ("modernbert", "modernbert_cls"):
        # local_attention 8: the sliding window (4 tokens each side) is far shorter than the test sequences.
        config = tf.ModernBertConfig(
            vocab_size=vocab_size, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=128, global_attn_every_n_layers=2, local_attention=8, initializer_range=0.3,
            pad_token_id=0, bos_token_id=2, eos_token_id=3, cls_token_id=2, sep_token_id=3, num_labels=1,
            classifier_pooling="cls" if kind == "modernbert_cls" else "mean",
        )
        return tf.ModernBertForSequenceClassification(config)
    if kind == "deberta_v2":  # DeBERTa-v3 shape: relative attention, no absolute positions, no token types
        config = tf.DebertaV2Config(
            vocab_size=vocab_size, type_vocab_size=0, relative_attention=True, pos_att_type=["p2c", "c2p"],
            position_buckets=16, max_relative_positions=-1, position_biased_input=False, norm_rel_ebd="layer_norm",
            share_att_key=True, pooler_hidden_size=48, pooler_hidden_act="gelu", pad_token_id=0, num_labels=3,
            **encoder,
        )
        return tf.DebertaV2ForSequenceClassification(config)
    config = tf.ElectraConfig(vocab_size=vocab_size, embedding_size=48, pad_token_id=0, num_labels=2, **encoder)
    return tf.ElectraForSequenceClassification(config)  # not in the table: the generic fallback's test model


DECODER_KINDS = ("qwen2", "qwen3", "llama", "mistral", "gemma", "gemma2", "phi3", "gpt2", "jamba",
                 "skywork_llama", "skywork_qwen3", "skywork_gemma2")


LABEL_TOKENS = ("yes", "no", "Yes")  # "0" and "1" are single bytes of the byte-level alphabet already
CAUSAL_KINDS = ("qwen3_causal", "gemma_causal", "qwen2_causal", "llama_causal")


def _causal_model(tf, kind: str, common: dict):
    if kind == "qwen3_causal":  # Qwen3-Reranker-0.6B ties its embeddings, as Qwen3-0.6B does
        return tf.Qwen3ForCausalLM(tf.Qwen3Config(head_dim=12, tie_word_embeddings=True, **common))
    if kind == "gemma_causal":
        return tf.GemmaForCausalLM(tf.GemmaConfig(head_dim=12, **common))
    if kind == "qwen2_causal":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(tie_word_embeddings=False, **common))
    return tf.LlamaForCausalLM(tf.LlamaConfig(tie_word_embeddings=False, **common))


def _decoder_model(tf, kind: str, common: dict):
    if kind == "qwen2":
        return tf.Qwen2ForSequenceClassification(tf.Qwen2Config(num_labels=2, **common))
    if kind in ("qwen3", "skywork_qwen3"):
        return tf.Qwen3ForSequenceClassification(tf.Qwen3Config(num_labels=1, head_dim=12, **common))
    if kind == "llama":
        return tf.LlamaForSequenceClassification(tf.LlamaConfig(num_labels=1, problem_type="regression", **common))
    if kind == "skywork_llama":  # Skywork-Reward-V2-Llama-3.1: llama3 rope scaling, one label, no problem_type
        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64, "rope_theta": 500000.0}
        return tf.LlamaForSequenceClassification(tf.LlamaConfig(num_labels=1, rope_scaling=rope, **common))
    if kind == "mistral":  # sliding window far shorter than the test sequences
        return tf.MistralForSequenceClassification(tf.MistralConfig(num_labels=1, sliding_window=6, **common))
    if kind == "gemma":
        return tf.GemmaForSequenceClassification(tf.GemmaConfig(num_labels=1, head_dim=12, **common))
    if kind in ("gemma2", "skywork_gemma2"):
        config = tf.Gemma2Config(num_labels=1, head_dim=12, sliding_window=6, attn_logit_softcapping=3.0,
                                 final_logit_softcapping=30.0, query_pre_attn_scalar=12, **common)
        return tf.Gemma2ForSequenceClassification(config)
    if kind == "phi3":
        return tf.Phi3ForSequenceClassification(tf.Phi3Config(num_labels=2, sliding_window=7, **common))
    if kind == "gpt2":
        config = tf.GPT2Config(vocab_size=common["vocab_size"], n_embd=48, n_layer=2, n_head=4, n_positions=128,
                               initializer_range=0.3, pad_token_id=common["pad_token_id"],
                               eos_token_id=common["eos_token_id"], bos_token_id=common["eos_token_id"],
                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, num_labels=2)
        return tf.GPT2ForSequenceClassification(config)
    if kind == "jamba":  # ai21labs/Jamba-tiny-reward-dev shape: attention every other layer, MoE, Mamba
        config = tf.JambaConfig(num_labels=1, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                                expert_layer_offset=1, num_experts=2, num_experts_per_tok=1, mamba_d_state=8,
                                mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=4, use_mamba_kernels=False, **common)
        return tf.JambaForSequenceClassification(config)
    raise ValueError(kind)


def build_gpu_qwen3(directory: Path, seed: int = 0) -> Path:
    """A small Qwen3 classifier whose sizes the GPU kernels take: flash-attention's head size (a multiple of 8) and
    the FP8 GEMMs' feature sizes (multiples of 16), which the tiny checkpoints above (head_dim 12) do not meet."""
    import transformers as tf

    torch.manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = byte_level_tokenizer(directory)
    config = tf.Qwen3Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=tokenizer.eos_token_id, hidden_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=32, intermediate_size=256,
                            max_position_embeddings=1024, initializer_range=0.05, num_labels=1,
                            tie_word_embeddings=False)
    return _save(tf.Qwen3ForSequenceClassification(config), tokenizer, directory)


# Model folder in model_repository/ → tiny checkpoint kind.
MODEL_FOLDERS = {
    "bert_classifier": "bert",
    "xlm_roberta_classifier": "xlm_roberta",
    "qwen2_classifier": "qwen2",
    "qwen3_classifier": "qwen3",
    "llama_classifier": "llama",
    "bert_embedder": "bert_embedding",
}


def build_model_folder_checkpoints(root: Path) -> dict[str, Path]:
    """Model folder → a tiny checkpoint of its architecture, each in ``root / <folder>``."""
    return {folder: build_checkpoint(kind, root / folder) for folder, kind in MODEL_FOLDERS.items()}

# Architecture → tiny checkpoint kind, for the parity tests (every HF-native family and the fallback).
ARCHITECTURE_KINDS = {
    "BertForSequenceClassification": "bert",
    "XLMRobertaForSequenceClassification": "xlm_roberta",
    "ErnieForSequenceClassification": "ernie",
    "DistilBertForSequenceClassification": "distilbert",
    "ModernBertForSequenceClassification": "modernbert",
    "ModernBertForSequenceClassification/cls": "modernbert_cls",
    "DebertaV2ForSequenceClassification": "deberta_v2",
    "Qwen2ForSequenceClassification": "qwen2",
    "Qwen3ForSequenceClassification": "qwen3",
    "LlamaForSequenceClassification": "llama",
    "MistralForSequenceClassification": "mistral",
    "GemmaForSequenceClassification": "gemma",
    "Gemma2ForSequenceClassification": "gemma2",
    "Phi3ForSequenceClassification": "phi3",
    "GPT2ForSequenceClassification": "gpt2",
    "JambaForSequenceClassification": "jamba",
    "Skywork-Reward-V2-Llama": "skywork_llama",
    "Skywork-Reward-V2-Qwen3": "skywork_qwen3",
    "Skywork-Reward-Gemma-2": "skywork_gemma2",
    "ElectraForSequenceClassification (generic)": "electra",
}
