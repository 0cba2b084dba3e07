"""The family table of the runtime: every declared family with its torch implementation.

The declarations (architectures, task, pooling, bodies, folders, config rules) are torch-free
(:mod:`poolserve_contract.families`); the implementations (loading, body, head) are
:mod:`poolserve_runtime.implementations`, :mod:`poolserve_runtime.native` (architectures upstream ships
only as remote code) and :mod:`poolserve_runtime.vision_families`. Each declaration has exactly one
implementation, and the lookups here answer with it: ``model_repository/<folder>/1/model.py`` names
its family with :func:`by_name`, the engine loads through it.
"""

from __future__ import annotations

from poolserve_contract import families as declarations

# The engine and the tests read these through the table.
from poolserve_contract.families import BODIES, UnsupportedArchitecture, read_config_dict  # noqa: F401
from poolserve_runtime import native, vision_families
from poolserve_runtime.implementations import (
    BertFamily,
    BgeM3Family,
    DebertaV2Family,
    DecoderFamily,
    DistilBertFamily,
    EmbeddingFamily,
    Family,
    GenericFamily,
    LateInteractionFamily,
    ModernBertFamily,
    ModernBertTokenClassifierFamily,
    RobertaFamily,
    SpladeFamily,
    TokenClassifierFamily,
)

# The families of stock transformers architectures, in the declarations' order.
_STOCK: tuple[tuple[str, type[Family]], ...] = (
    ("bert", BertFamily), ("xlm_roberta", RobertaFamily), ("ernie", BertFamily), ("distilbert", DistilBertFamily),
    ("modernbert", ModernBertFamily), ("deberta_v2", DebertaV2Family), ("qwen2", DecoderFamily),
    ("qwen3", DecoderFamily), ("llama", DecoderFamily), ("mistral", DecoderFamily), ("gemma", DecoderFamily),
    ("gemma2", DecoderFamily), ("phi3", DecoderFamily), ("gpt2", DecoderFamily), ("jamba", DecoderFamily),
    ("bert_embedding", EmbeddingFamily), ("roberta_embedding", EmbeddingFamily),
    ("modernbert_embedding", EmbeddingFamily), ("decoder_embedding", EmbeddingFamily),
    ("colbert", LateInteractionFamily), ("splade", SpladeFamily), ("bge_m3", BgeM3Family), ("bert_token_classifier", TokenClassifierFamily),
    ("xlm_roberta_token_classifier", TokenClassifierFamily), ("distilbert_token_classifier", TokenClassifierFamily),
    ("modernbert_token_classifier", ModernBertTokenClassifierFamily),
    ("deberta_v2_token_classifier", TokenClassifierFamily),
)
FAMILIES: tuple[Family, ...] = tuple(implementation(declarations.by_name(name)) for name, implementation in _STOCK)
GENERIC = GenericFamily(declarations.GENERIC)

IMPLEMENTATIONS: dict[str, Family] = {
    family.name: family for family in (*FAMILIES, *native.FAMILIES, *vision_families.FAMILIES, GENERIC)}


def all_families() -> tuple[Family, ...]:
    """Every family but the generic fallback, in the declarations' order."""
    return tuple(implementation_of(declaration) for declaration in declarations.FAMILIES)


def implementation_of(declaration: declarations.FamilyDeclaration) -> Family:
    return IMPLEMENTATIONS[declaration.name]


def by_name(name: str) -> Family:
    return implementation_of(declarations.by_name(name))


def by_folder(folder: str) -> Family | None:
    """The family a model_repository folder serves (None for folders that are not the runtime's)."""
    declaration = declarations.by_folder(folder)
    return None if declaration is None else implementation_of(declaration)


def family_for_config(config_dict: dict, override: str = "") -> Family:
    """The family that serves a checkpoint (:func:`poolserve_contract.families.family_for_config`)."""
    return implementation_of(declarations.family_for_config(config_dict, override))


# Names the families were importable by before the table (model.py files, benchmarks, tests); the families
# declared after COLBERT are named by by_name only.
BERT, XLM_ROBERTA, ERNIE, DISTILBERT, MODERNBERT, DEBERTA_V2, QWEN2, QWEN3, LLAMA, MISTRAL, GEMMA, GEMMA2, PHI3, GPT2, \
    JAMBA, BERT_EMBEDDING, ROBERTA_EMBEDDING, MODERNBERT_EMBEDDING, DECODER_EMBEDDING, COLBERT = FAMILIES[:20]
