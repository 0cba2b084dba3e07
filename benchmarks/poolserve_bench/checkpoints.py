"""Random-weight checkpoints of real model shapes, with a synthetic tokenizer, saved to disk.

Every served system (Triton + adapter, the plain FastAPI server, sentence-transformers) loads
the same folder, so they all see the same weights and the same token ids. The vocabulary is made
of three-letter words (``aaa`` .. ``ttt``), each exactly one token, plus the family's special
tokens, so a text of k words is k tokens plus specials: workloads control token counts precisely.

Encoders get a word-level tokenizer. Decoders get a byte-level BPE in the GPT-2/Qwen style, because
for some model types (``qwen2``) ``AutoTokenizer`` ignores ``tokenizer.json``'s pre-tokenizer and
rebuilds the family's own byte-level one from the vocabulary and merges: a word-level vocabulary
then encodes every text as a single token.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from poolserve_bench.bench_engine import Shape, build_model

WORDS = 8000  # words in the vocabulary (capped below the model's); other ids are never used
LETTERS = "abcdefghijklmnopqrst"  # 20 letters, three per word: 8,000 words
BYTE_LEVEL_SPACE = "\u0120"  # how byte-level BPE spells the space that starts a word ("Ġ")
# Tokens a byte-level vocabulary needs besides the words: the space, the letters, and the one- and
# two-letter prefixes the merges build on the way to a word.
BPE_OVERHEAD = 1 + len(LETTERS) + len(LETTERS) + len(LETTERS) ** 2 + 8


def is_decoder(shape: Shape) -> bool:
    return shape.config["model_type"] not in ("bert", "xlm-roberta", "modernbert")


def word_count(shape: Shape) -> int:
    reserved = BPE_OVERHEAD if is_decoder(shape) else 8
    return min(WORDS, shape.config["vocab_size"] - reserved)


def spell(index: int) -> str:
    """The index-th word: three letters, base 20."""
    base = len(LETTERS)
    return LETTERS[index // base**2 % base] + LETTERS[index // base % base] + LETTERS[index % base]


def word_tokenizer(shape: Shape):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    model_type = shape.config["model_type"]
    if model_type == "modernbert":  # BERT-style [CLS] / [SEP] specials, as ModernBERT's own tokenizer
        model_type = "bert"
    if model_type == "bert":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    elif model_type == "xlm-roberta":
        specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    else:
        specials = ["<|endoftext|>", "<unk>"]
    if is_decoder(shape):
        return byte_level_tokenizer(shape)
    vocab = {token: index for index, token in enumerate(specials)}
    vocab.update({spell(i): len(specials) + i for i in range(word_count(shape))})
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
    raise AssertionError(model_type)


def byte_level_tokenizer(shape: Shape):
    """Byte-level BPE whose merges build each word, with its leading space, into one token.

    Every word is spelled ``Ġ`` + three letters (the pre-tokenizer adds the space before the first
    word), and every merge starts from a ``Ġ``-prefixed token, so the merges apply left to right
    and nothing else can merge: one token per word, whichever backend rebuilds the pre-tokenizer.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    space = BYTE_LEVEL_SPACE
    specials = ["<|endoftext|>", "<unk>"]
    tokens = specials + [space] + list(LETTERS)
    merges = []
    for first in LETTERS:
        tokens.append(space + first)
        merges.append((space, first))
    for first in LETTERS:
        for second in LETTERS:
            tokens.append(space + first + second)
            merges.append((space + first, second))
    for index in range(word_count(shape)):
        word = spell(index)
        tokens.append(space + word)
        merges.append((space + word[:2], word[2]))
    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    # The same pre-tokenizer as Qwen2Tokenizer builds, with a space added before the first word.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|\s+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    # Decoder rerankers/classifiers end each prompt with the end-of-text token they pool.
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A <|endoftext|>", pair="$A $B:1 <|endoftext|>:1", special_tokens=[("<|endoftext|>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   unk_token="<unk>", model_max_length=4096, add_prefix_space=True)


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
    return " ".join(spell(rng.randrange(vocabulary)) for _ in range(count))
