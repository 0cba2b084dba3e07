"""Every knob of the adapter, in one place (environment variables prefixed ``ADAPTER_``)."""

from __future__ import annotations

import math
import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from poolserve_contract.checkpoints import PROJECT_ROOT

# workers=0: one adapter worker per 4 cores, at most 4. Measured on 16-core H100/H200 hosts: 4 workers
# sustained the tuned rerank rates; more competed with Triton's stubs for the CPU (benchmarks/README.md).
CORES_PER_AUTO_WORKER = 4
MAX_AUTO_WORKERS = 4


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ADAPTER_", protected_namespaces=())

    triton_grpc_url: str = Field(
        "127.0.0.1:8001",
        description="Triton's gRPC address. The adapter keeps one aio client to it for its lifetime.",
    )
    triton_inference_key: str | None = Field(
        None,
        description="The key of Triton's inference protocol, when Triton was started with one (TRITON_INFERENCE_KEY "
        "there; `make serve` passes its own). Triton's control protocols need another key (triton_control_key), "
        "which the adapter holds only to update LoRA adapters at run time.",
    )
    allow_runtime_lora_updating: bool = Field(
        default_factory=lambda: vllm_allows_runtime_lora_updating(os.environ),
        description="Serve vLLM's POST /v1/load_lora_adapter and /v1/unload_lora_adapter (behind the API key like "
        "every route): each reloads the adapter's base model in Triton with the new set of adapters. Off (the "
        "default), the routes do not exist (404), as in vLLM; VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 or true turns it "
        "on as it does in vLLM, when this setting is not given.",
    )
    triton_control_key: str | None = Field(
        None,
        description="The key of Triton's control protocols (TRITON_CONTROL_KEY there), which runtime LoRA updates "
        "need to reload a model. `make serve` passes its own only when allow_runtime_lora_updating is on: whoever "
        "holds it may load models into the server.",
    )
    lora_update_timeout_s: float = Field(
        600.0, gt=0,
        description="Longest wait for the reload of a base model by a runtime LoRA update (the whole model loads "
        "again); longer is a 500, and the model keeps serving the adapters it had.",
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
    max_inflight_tokens_per_model: int = Field(
        131072, gt=0,
        description="Admission control, per served model and adapter worker: tokens being computed at once "
        "(sent to Triton). The default holds a few dynamic batches of the engine's 16,384-token forwards.",
    )
    max_queued_tokens_per_model: int | None = Field(
        None, ge=0,
        description="Admission control: an optional bound on the tokens that may wait for admission per worker. "
        "Unset (the default), only time bounds the queue: a request is refused with 429 and Retry-After when the "
        "model, at the speed measured across all adapter workers, cannot start it within admission_wait_s.",
    )
    admission_wait_s: float = Field(
        10.0, gt=0,
        description="Admission control: longest wait for admission before a 429 (an admitted request then runs "
        "under triton_timeout_s, which Triton's queue also honours).",
    )
    drain_timeout_s: float = Field(
        30.0, ge=0,
        description="Graceful shutdown: after SIGTERM, /health answers 503 at once and requests in flight get up "
        "to this long to finish before the server stops (new requests get 503 meanwhile).",
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
        0,
        ge=0,
        description="Adapter processes (uvicorn workers), each with its own Triton client. Tokenization and JSON "
        "run on the CPU: more workers raise the request rate the adapter sustains; too many compete with Triton's "
        "own CPU work. 0 (the default): one per 4 cores, 1 to 4 (the setting measured best on a 16-core H100/H200 "
        "host: benchmarks/README.md).",
    )
    tokenizer_threads: int = Field(
        0,
        ge=0,
        description="Threads each adapter process lets the Rust tokenizer use (RAYON_NUM_THREADS); 0 leaves the "
        "library default (all cores). Measured on an H100 host with 4 workers: a cap of 2 doubled tokenizing 64 "
        "rerank pairs (4 -> 9 ms) and did not remove the slowdown of Triton's execute() seen under adapter "
        "traffic, so the default is uncapped (benchmarks/results/systems_breakdown_*_h100.csv).",
    )
    api_key: str | None = Field(
        None,
        description="When set, every route except /health, /ping and /metrics requires `Authorization: Bearer "
        "<key>` (as vLLM's --api-key); others answer 401 {\"error\": \"Unauthorized\"}, the body vLLM and SGLang "
        "send.",
    )
    rerank_v1_flavour: Literal["vllm", "sglang"] = Field(
        "vllm",
        description="Which API /v1/rerank speaks: vLLM (an object with results, the default) or SGLang (a bare "
        "list). Each flavour is also served under its own path, /vllm/v1/rerank and /sglang/v1/rerank, so one "
        "deployment serves both kinds of client.",
    )
    max_items_per_request: int = Field(
        1024,
        ge=1,
        description="Most documents, texts or prompts in one request (vLLM's VLLM_MAX_COMPLETION_PROMPTS); more is "
        "a 400, so one request cannot monopolise the server.",
    )
    max_tokens_per_request: int = Field(
        1_048_576,
        ge=1,
        description="Most tokens one request may send to the model, all its sequences together; more is a 400.",
    )
    max_body_bytes: int = Field(
        16 * 2**20, ge=1024, description="Largest request body accepted; larger is a 413 before it is parsed."
    )
    triton_metrics_url: str | None = Field(
        None,
        description="Triton's Prometheus endpoint (http://host:8002/metrics). When set, GET /metrics appends it "
        "after the adapter's own metrics.",
    )
    # Images by URL (vision-language models). A server that fetches any URL it is sent is an SSRF hole,
    # so fetching is off until domains are named (vLLM's --allowed-media-domains; vLLM fetches any).
    allowed_media_domains: list[str] = Field(
        default_factory=list,
        description="Hosts whose http(s) image URLs are fetched (exact names; a JSON list in the environment). Empty: "
        "only data: URLs are read and every http(s) URL is a 400.",
    )
    media_fetch_timeout_s: float = Field(5.0, gt=0, description="Whole-download limit of one image URL "
                                         "(vLLM's VLLM_IMAGE_FETCH_TIMEOUT).")
    media_max_redirects: int = Field(3, ge=0, description="Redirects followed per image URL; each hop's host must be "
                                     "allowed too.")
    max_image_bytes: int = Field(20 * 2**20, ge=1, description="Largest encoded image, fetched or in a data: URL.")
    max_image_pixels: int = Field(50_000_000, ge=1, description="Largest decoded image (width x height).")
    max_pixel_bytes_per_request: int = Field(
        1 * 2**30, ge=1, description="Most bytes of preprocessed pixel values one request may make (a small "
        "compressed image of many pixels becomes hundreds of MB of patches); more is a 400.")
    max_images_per_prompt: int = Field(16, ge=0, description="Most images in one prompt (vLLM's "
                                       "--limit-mm-per-prompt '{\"image\": N}'); more is a 400.")
    # The HTTP server's own limits (poolserve_adapter.connections), per adapter worker.
    max_connections: int = Field(
        2048, ge=1,
        description="Open HTTP connections per adapter worker; one more is answered 503 and closed at once. The "
        "open-file limit is raised at start to hold them (lowered, with a warning, where the hard limit cannot).",
    )
    header_timeout_s: float = Field(
        10.0, gt=0, description="Time for a request's line and headers to arrive (from the connection or the "
        "request's first byte); later is a 408 and the connection closes. A connection that sends nothing is closed "
        "after it too.")
    body_timeout_s: float = Field(
        30.0, gt=0, description="Time for a request's body to arrive after its headers; later is a 408.")
    keep_alive_timeout_s: float = Field(
        5.0, gt=0, description="An idle kept-alive connection is closed after this long.")
    max_headers: int = Field(100, ge=1, description="Most header fields in one request; more is a 431.")
    max_header_bytes: int = Field(
        32768, ge=1024, description="Largest request line plus headers in bytes; larger is a 431.")
    log_format: Literal["text", "json"] = Field(
        "text", description="The console's format: text (uvicorn's `INFO:     ...` lines) or json (one JSON object "
        "per line with time, level, logger and message), for the access log and every other line alike.")
    host: str = Field("127.0.0.1", description="Address the HTTP server binds.")
    port: int = Field(8080, description="Port the HTTP server binds.")

    def worker_count(self) -> int:
        """``workers``, or one per 4 cores (1 to 4) when it is 0."""
        if self.workers:
            return self.workers
        return max(1, min(MAX_AUTO_WORKERS, usable_cores() // CORES_PER_AUTO_WORKER))


def usable_cores(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """The cores this process may run on: its CPU affinity, capped by the CPU quota of its cgroup (a
    container started with ``--cpus 2`` sees every host core in its affinity but gets two cores' time)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_quota(cgroup_root)
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def cgroup_cpu_quota(root: Path) -> float | None:
    """Cores' worth of CPU time the cgroup allows (cgroup v2 ``cpu.max``, else v1 ``cpu.cfs_quota_us``
    over ``cpu.cfs_period_us``); None when unlimited or unreadable."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota = (root / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (root / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    try:
        quota_us, period_us = int(quota), int(period)
    except ValueError:  # "max": no limit
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def vllm_allows_runtime_lora_updating(environ) -> bool:
    """vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING: on for 1 or true (any case, surrounding blanks ignored)."""
    return environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "0").strip().lower() in ("1", "true")


@lru_cache
def get_settings() -> Settings:
    return Settings()
