"""Every knob of the adapter, in one place (environment variables prefixed ``ADAPTER_``)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from model_runtime.checkpoints import PROJECT_ROOT


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ADAPTER_", protected_namespaces=())

    triton_grpc_url: str = Field(
        "127.0.0.1:8001",
        description="Triton's gRPC address. The adapter keeps one aio client to it for its lifetime.",
    )
    model_repository: Path = Field(
        PROJECT_ROOT / "model_repository",
        description="The repository Triton serves; relative `checkpoint` parameters resolve against its folders "
        "so the adapter loads the same tokenizer the model uses.",
    )
    triton_timeout_s: float = Field(
        120.0,
        gt=0,
        description="gRPC deadline of one Triton call. Too low fails long batches under load with 504; too high "
        "keeps clients waiting on a stuck server.",
    )
    startup_timeout_s: float = Field(
        120.0, gt=0, description="How long to wait at start for Triton to be ready and to list its models."
    )
    max_sequences_per_triton_request: int = Field(
        64,
        ge=1,
        le=256,
        description="Sequences sent in one Triton request (padded to its longest). Larger requests are split and "
        "sent concurrently; Triton packs them back into one forward. Must not exceed the models' max_batch_size.",
    )
    tokenize_in_thread_above: int = Field(
        8,
        ge=0,
        description="Requests with more texts than this are tokenized in a worker thread, so one large request "
        "does not stall the event loop for the others.",
    )
    workers: int = Field(
        1,
        ge=1,
        description="Adapter processes (uvicorn workers), each with its own Triton client. Tokenization and JSON "
        "run on the CPU: more workers raise the request rate the adapter sustains; too many compete with Triton's "
        "own CPU work.",
    )
    tokenizer_threads: int = Field(
        0,
        ge=0,
        description="Threads each adapter process lets the Rust tokenizer use (RAYON_NUM_THREADS); 0 leaves the "
        "library default (all cores). Measured on an H100 host with 4 workers: a cap of 2 doubled tokenizing 64 "
        "rerank pairs (4 -> 9 ms) and did not remove the slowdown of Triton's execute() seen under adapter "
        "traffic, so the default is uncapped (benchmarks/results/systems_breakdown_*_h100.csv).",
    )
    host: str = Field("127.0.0.1", description="Address the HTTP server binds.")
    port: int = Field(8080, description="Port the HTTP server binds.")


@lru_cache
def get_settings() -> Settings:
    return Settings()
