"""TEI's ``/embed_sparse`` body (``router/src/http/types.rs::EmbedSparseRequest``) and answer."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class SparseValue(BaseModel):
    index: int
    value: float


class EmbedSparseRequest(BaseModel):
    """TEI ignores fields it does not know (serde's default), and so does this body."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    inputs: str | list[str] = Field(description="A text or texts (TEI's token-id inputs are not taken).")
    truncate: bool | None = Field(None, description="Cut an input longer than the model's maximum length instead "
                                  "of refusing it (null: TEI's --auto-truncate default, off).")
    truncation_direction: Literal["Left", "Right", "left", "right"] = Field(
        "Right", description="The side truncation cuts (lower case accepted, as TEI's serde aliases).")
    prompt_name: str | None = Field(None, description="A key of the model's sentence-transformers `prompts`; its "
                                    "text is prepended to every input.")
    model: str | None = Field(None, description="Not TEI's (it serves one model): which served model answers; "
                              "unset or unknown, the first sparse embedder.")

    def texts(self) -> list[str]:
        return [self.inputs] if isinstance(self.inputs, str) else list(self.inputs)
