"""The shipped score templates render exactly the rerankers' published prompt formats.

Every expected string below is written out as a literal, from the model's own reference code:

* Qwen3-Reranker: QwenLM/Qwen3-Embedding, README.md (``format_instruction``, ``prefix``, ``suffix``;
  revision f4ad0c434c0e3534494e26a4a6bdfd8ab1431968), the same text as the Qwen/Qwen3-Reranker-* model cards.
* bge-reranker-v2-gemma: FlagOpen/FlagEmbedding, FlagEmbedding/inference/reranker/decoder_only/base.py
  (``sep = "\\n"``, default ``prompt``; BOS prepended as a token id, not text) and
  FlagEmbedding/abc/inference/AbsReranker.py (``"A: "`` / ``"B: "`` prefixes).
* mxbai-rerank-v2: mixedbread-ai/mxbai-rerank, mxbai_rerank/mxbai_rerank_v2.py (``chat_template`` prefix/suffix,
  ``instruction_prompt``, ``query_prompt``, ``doc_prompt``, ``task_prompt``, ``sep = "\\n"``).

vLLM ships the same formats as vllm-project/vllm examples/pooling/score/template/{qwen3_reranker,
bge-reranker-v2-gemma,mxbai_rerank_v2}.jinja (see the report in the change description for the byte-level
differences: their files end in newlines that Jinja's default keep_trailing_newline=False drops).
"""

from __future__ import annotations

import pytest

from poolserve_contract.score_templates import TEMPLATE_DIR, compiled, render, template_text

SHIPPED = ("bge_reranker_v2_gemma", "mxbai_rerank_v2", "qwen3_reranker", "qwen3_vl_reranker")

# Content that must pass through untouched: newlines, Jinja-looking text, a trailing space.
TRICKY_QUERY = "line one\nline two {{ x }} "
TRICKY_DOCUMENT = "{% if true %}not a block{% endif %}\n\n{# not a comment #}"


# --- Qwen3-Reranker ---------------------------------------------------------------------------------------
# QwenLM/Qwen3-Embedding README.md: prefix + "<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {doc}"
# + suffix, default instruction 'Given a web search query, retrieve relevant passages that answer the query'.

QWEN3_DEFAULT = (
    "<|im_start|>system\n"
    "Judge whether the Document meets the requirements based on the Query and the Instruct provided. "
    'Note that the answer can only be "yes" or "no".<|im_end|>\n'
    "<|im_start|>user\n"
    "<Instruct>: Given a web search query, retrieve relevant passages that answer the query\n"
    "<Query>: What is the capital of China?\n"
    "<Document>: The capital of China is Beijing.<|im_end|>\n"
    "<|im_start|>assistant\n"
    "<think>\n\n</think>\n\n"
)

QWEN3_INSTRUCTED = (
    "<|im_start|>system\n"
    "Judge whether the Document meets the requirements based on the Query and the Instruct provided. "
    'Note that the answer can only be "yes" or "no".<|im_end|>\n'
    "<|im_start|>user\n"
    "<Instruct>: Retrieve semantically similar text\n"
    "<Query>: What is the capital of China?\n"
    "<Document>: The capital of China is Beijing.<|im_end|>\n"
    "<|im_start|>assistant\n"
    "<think>\n\n</think>\n\n"
)

QWEN3_TRICKY = (
    "<|im_start|>system\n"
    "Judge whether the Document meets the requirements based on the Query and the Instruct provided. "
    'Note that the answer can only be "yes" or "no".<|im_end|>\n'
    "<|im_start|>user\n"
    "<Instruct>: Given a web search query, retrieve relevant passages that answer the query\n"
    "<Query>: line one\nline two {{ x }} \n"
    "<Document>: {% if true %}not a block{% endif %}\n\n{# not a comment #}<|im_end|>\n"
    "<|im_start|>assistant\n"
    "<think>\n\n</think>\n\n"
)

QUERY = "What is the capital of China?"
DOCUMENT = "The capital of China is Beijing."


def test_qwen3_default_instruction():
    text = template_text("qwen3_reranker")
    assert render(text, QUERY, DOCUMENT) == QWEN3_DEFAULT
    # None / empty fall back to the default, as ``default(..., true)`` does in vLLM's template.
    assert render(text, QUERY, DOCUMENT, instruction=None) == QWEN3_DEFAULT
    assert render(text, QUERY, DOCUMENT, instruction="") == QWEN3_DEFAULT


def test_qwen3_with_instruction():
    text = template_text("qwen3_reranker")
    assert render(text, QUERY, DOCUMENT, instruction="Retrieve semantically similar text") == QWEN3_INSTRUCTED


def test_qwen3_instruction_sources_in_vllm_order():
    # vLLM's newest qwen3_reranker.jinja: instruction, else instruct, else a system message, else the default.
    text = template_text("qwen3_reranker")
    assert render(text, QUERY, DOCUMENT, instruct="Retrieve semantically similar text") == QWEN3_INSTRUCTED
    assert render(text, QUERY, DOCUMENT, instruction="Retrieve semantically similar text",
                  instruct="ignored") == QWEN3_INSTRUCTED
    messages = [{"role": "system", "content": "Retrieve semantically similar text"},
                {"role": "query", "content": QUERY}, {"role": "document", "content": DOCUMENT}]
    assert compiled(text).render(messages=messages) == QWEN3_INSTRUCTED
    assert compiled(text).render(messages=messages, instruction="Given a web search query, retrieve relevant "
                                 "passages that answer the query") == QWEN3_DEFAULT


def test_qwen3_content_is_literal():
    assert render(template_text("qwen3_reranker"), TRICKY_QUERY, TRICKY_DOCUMENT) == QWEN3_TRICKY


# --- bge-reranker-v2-gemma --------------------------------------------------------------------------------
# FlagEmbedding decoder_only/base.py: [bos] + tok("A: " + query) + tok("\n") + tok("B: " + passage) + tok("\n")
# + tok(prompt). The template leaves BOS to the tokenizer (as vLLM's bge-reranker-v2-gemma.jinja does).

GEMMA_DEFAULT = (
    "A: What is the capital of China?\n"
    "B: The capital of China is Beijing.\n"
    "Given a query A and a passage B, determine whether the passage contains an answer to the query by "
    "providing a prediction of either 'Yes' or 'No'."
)

GEMMA_TRICKY = (
    "A: line one\nline two {{ x }} \n"
    "B: {% if true %}not a block{% endif %}\n\n{# not a comment #}\n"
    "Given a query A and a passage B, determine whether the passage contains an answer to the query by "
    "providing a prediction of either 'Yes' or 'No'."
)


def test_gemma_default_prompt():
    text = template_text("bge_reranker_v2_gemma")
    assert render(text, QUERY, DOCUMENT) == GEMMA_DEFAULT
    assert render(text, QUERY, DOCUMENT, instruction=None) == GEMMA_DEFAULT
    assert not render(text, QUERY, DOCUMENT).startswith("<bos>")


def test_gemma_ignores_the_instruction_as_vllm():
    # vLLM's bge-reranker-v2-gemma.jinja reads no instruction: one sent for every reranker must not
    # replace this model's Yes/No question.
    text = template_text("bge_reranker_v2_gemma")
    assert render(text, QUERY, DOCUMENT, instruction="Given a web search query, retrieve passages") == GEMMA_DEFAULT


def test_gemma_content_is_literal():
    assert render(template_text("bge_reranker_v2_gemma"), TRICKY_QUERY, TRICKY_DOCUMENT) == GEMMA_TRICKY


# --- mxbai-rerank-v2 --------------------------------------------------------------------------------------
# mxbai_rerank_v2.py: prefix + ["instruction: {instruction}" + "\n"] + "query: {query}" + "\n"
# + "document: {document}" + "\n" + task_prompt + suffix.

MXBAI_DEFAULT = (
    "<|im_start|>system\n"
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n"
    "query: What is the capital of China?\n"
    "document: The capital of China is Beijing.\n"
    "You are a search relevance expert who evaluates how well documents match search queries. For each "
    "query-document pair, carefully analyze the semantic relationship between them, then provide your binary "
    "relevance judgment (0 for not relevant, 1 for relevant).\n"
    "Relevance:<|im_end|>\n"
    "<|im_start|>assistant\n"
)

MXBAI_INSTRUCTED = (
    "<|im_start|>system\n"
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n"
    "instruction: Find the passage about geography\n"
    "query: What is the capital of China?\n"
    "document: The capital of China is Beijing.\n"
    "You are a search relevance expert who evaluates how well documents match search queries. For each "
    "query-document pair, carefully analyze the semantic relationship between them, then provide your binary "
    "relevance judgment (0 for not relevant, 1 for relevant).\n"
    "Relevance:<|im_end|>\n"
    "<|im_start|>assistant\n"
)

MXBAI_TRICKY = (
    "<|im_start|>system\n"
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n"
    "query: line one\nline two {{ x }} \n"
    "document: {% if true %}not a block{% endif %}\n\n{# not a comment #}\n"
    "You are a search relevance expert who evaluates how well documents match search queries. For each "
    "query-document pair, carefully analyze the semantic relationship between them, then provide your binary "
    "relevance judgment (0 for not relevant, 1 for relevant).\n"
    "Relevance:<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def test_mxbai_without_instruction():
    text = template_text("mxbai_rerank_v2")
    assert render(text, QUERY, DOCUMENT) == MXBAI_DEFAULT
    assert render(text, QUERY, DOCUMENT, instruction=None) == MXBAI_DEFAULT
    assert render(text, QUERY, DOCUMENT, instruction="") == MXBAI_DEFAULT  # the package tests `if instruction`


def test_mxbai_with_instruction():
    text = template_text("mxbai_rerank_v2")
    assert render(text, QUERY, DOCUMENT, instruction="Find the passage about geography") == MXBAI_INSTRUCTED


def test_mxbai_content_is_literal():
    assert render(template_text("mxbai_rerank_v2"), TRICKY_QUERY, TRICKY_DOCUMENT) == MXBAI_TRICKY


# --- lookup ----------------------------------------------------------------------------------------------


QWEN3_VL_EXPECTED = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
    "provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n"
    "<Instruct>: Find the photo<Query>:a cat\n<Document>:<|vision_start|><|image_pad|><|vision_end|>snow"
    "<|im_end|>\n<|im_start|>assistant\n"
)


def test_qwen3_vl_reranker_prompt_follows_the_published_format():
    """No newline before <Query>:, none after the colons, no think block; the prompt ends in the opened
    assistant turn (the model card's builder and vLLM's qwen3_vl_reranker.jinja)."""
    text = template_text("qwen3_vl_reranker")
    document = "<|vision_start|><|image_pad|><|vision_end|>snow"
    assert render(text, "a cat", document, instruction="Find the photo") == QWEN3_VL_EXPECTED
    default = render(text, "a cat", document)
    assert "<Instruct>: Given a search query, retrieve relevant candidates that answer the query.<Query>:" in default


def test_shipped_templates_present():
    assert tuple(sorted(p.stem for p in TEMPLATE_DIR.glob("*.jinja"))) == SHIPPED


def test_template_by_path(tmp_path):
    path = tmp_path / "custom.jinja"
    path.write_text("Query: {{ messages[0].content }}\nDocument: {{ messages[1].content }}\n")
    assert render(template_text(str(path)), "q", "d") == "Query: q\nDocument: d"


def test_unknown_template_lists_shipped_ones():
    with pytest.raises(FileNotFoundError) as excinfo:
        template_text("no_such_reranker")
    message = str(excinfo.value)
    assert "no_such_reranker" in message
    assert f"({', '.join(SHIPPED)})" in message
