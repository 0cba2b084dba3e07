"""Random-weight checkpoints of real model shapes, with a word-level tokenizer, saved to disk.

Every served system (Triton + adapter, the plain FastAPI server, sentence-transformers) loads
the same folder, so they all see the same weights and the same token ids. The tokenizer maps the
words ``w0 .. w{n}`` to one token each and adds the family's special tokens, so a text of k words
is exactly k tokens plus specials: workloads control token counts precisely.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from benchmarks.bench_engine import Shape, build_model

WORDS = 8000  # word-level vocabulary (capped below the model's); other ids are never used


def word_count(shape: Shape) -> int:
    return min(WORDS, shape.config["vocab_size"] - 8)


def word_tokenizer(shape: Shape):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    model_type = shape.config["model_type"]
    if model_type == "bert":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    elif model_type == "xlm-roberta":
        specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    else:
        specials = ["<|endoftext|>", "<unk>"]
    vocab = {token: index for index, token in enumerate(specials)}
    vocab.update({f"w{i}": len(specials) + i for i in range(word_count(shape))})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]" if model_type == "bert" else "<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if model_type == "bert":
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
        return PreTrainedTokenizerFast(tokenizer_object=tokenizer, cls_token="[CLS]", sep_token="[SEP]",
                                       pad_token="[PAD]", unk_token="[UNK]", mask_token="[MASK]", model_max_length=512)
    if model_type == "xlm-roberta":
        tokenizer.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
        return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", cls_token="<s>",
                                       sep_token="</s>", pad_token="<pad>", unk_token="<unk>", mask_token="<mask>",
                                       model_max_length=512)
    # Decoder rerankers/classifiers end each prompt with the end-of-text token they pool.
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A <|endoftext|>", pair="$A $B:1 <|endoftext|>:1", special_tokens=[("<|endoftext|>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   unk_token="<unk>", model_max_length=4096)


def save_checkpoint(shape: Shape, directory: Path) -> Path:
    """Write the random-weight model (bf16) and its word-level tokenizer; reuse a finished one."""
    if (directory / "config.json").exists() and (directory / "tokenizer.json").exists():
        return directory
    model = build_model(shape, torch.device("cpu"), torch.bfloat16)
    model.config.pad_token_id = shape.config.get("pad_token_id", 0)
    model.save_pretrained(directory)
    word_tokenizer(shape).save_pretrained(directory)
    return directory


def words(rng: random.Random, count: int, vocabulary: int = WORDS) -> str:
    return " ".join(f"w{rng.randrange(vocabulary)}" for _ in range(count))
