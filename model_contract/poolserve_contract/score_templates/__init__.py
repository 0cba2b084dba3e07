"""Score templates: how an LLM reranker's (query, document[, instruction]) becomes one prompt.

vLLM's ``--chat-template`` for score models: the template is rendered with
``messages=[{"role": "query", "content": q}, {"role": "document", "content": d}]`` and the request's
``chat_template_kwargs`` (``instruction`` among them), then the text is tokenized as one prompt.
The project ships the templates of the known rerankers (``*.jinja`` here, written from their
published prompt formats); a ``score_template`` model parameter names one of them or a file.
Templates run in Jinja's immutable sandbox, as transformers runs chat templates.
"""

from __future__ import annotations

import functools
from pathlib import Path

TEMPLATE_DIR = Path(__file__).parent


def template_text(name_or_path: str) -> str:
    """A shipped template by name (``qwen3_reranker``) or a Jinja file by path."""
    shipped = TEMPLATE_DIR / f"{name_or_path}.jinja"
    if shipped.is_file():
        return shipped.read_text()
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path.read_text()
    known = ", ".join(sorted(p.stem for p in TEMPLATE_DIR.glob("*.jinja")))
    raise FileNotFoundError(f"score template {name_or_path!r} is neither a shipped template ({known}) nor a file")


@functools.lru_cache(maxsize=32)
def compiled(text: str):
    """The template compiled once per text (Jinja compiles are slow; LLM rerankers render one per pair)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # The settings transformers uses for chat templates (vLLM renders score templates through them).
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return environment.from_string(text)


def render(text: str, query: str, document: str, **kwargs) -> str:
    """The prompt for one pair; ``kwargs`` are the template variables (``instruction``, ...)."""
    messages = [{"role": "query", "content": query}, {"role": "document", "content": document}]
    return compiled(text).render(messages=messages, **kwargs)
