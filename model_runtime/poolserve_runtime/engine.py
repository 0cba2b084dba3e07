"""The packed engine: one token stream in, pooled and scored sequences out.

``PackedEngine.run`` takes a :class:`~poolserve_runtime.packing.PackedBatch`, splits it into chunks
of at most ``max_tokens_per_forward`` tokens, has the body it picked at load turn each chunk into
hidden states (:mod:`poolserve_runtime.bodies`), and pools and scores every sequence by
``cu_seqlens`` through ``kernels`` (Triton kernels on CUDA, the torch reference on CPU): for
embedding models the pooling their sentence-transformers files name (cls, mean or last), then L2
normalisation when they normalise (``pooled`` keeps the vectors before it); for late-interaction
(ColBERT) models every token through the projection, L2-normalised, and each sequence's MaxSim against
its request's first sequence (the MaxSim kernel); for token classifiers every token through the
classifier; for BGE-M3 the dense vectors and every token's ColBERT vector and lexical weight, all from one
forward (its per-token outputs only when a request asks for them); for sparse (SPLADE) embedders each sequence's vocabulary-wide vector from its MLM logits;
CLS pooling, the family's head features and the fused linear + activation head for encoders; one fused last-token + linear + activation launch for decoders.

The body runs one of two ways (the ``attention`` parameter; ``auto`` picks by device):
``varlen`` (the GPU default) feeds the packed stream straight to the stock HF model with
per-sequence position ids and ``cu_seqlens`` through :mod:`poolserve_runtime.varlen`, so no padding
is computed; ``padded`` (the CPU default) pads each chunk internally and runs HF's padded SDPA
path, whose results it matches exactly. Vision-language families run their padded multimodal
forward; the generic fallback runs the checkpoint's own forward and head, whose logits the engine
only calibrates. A causal varlen engine runs a batch whose documents share a prompt prefix as
reused-prefix streams (:mod:`poolserve_runtime.prefix_reuse`). On CUDA, a varlen chunk of up to
``cuda_graph_max_tokens`` tokens replays a CUDA graph of the body captured at load
(:mod:`poolserve_runtime.cuda_graphs`). With ``lora_modules``, a chunk whose sequences use LoRA adapters
runs the body without CUDA graphs (its layers compiled as the base's are) with each sequence's adapter and
head (:mod:`poolserve_runtime.lora`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

import poolserve_kernels
from poolserve_contract.checkpoints import max_model_len_for
from poolserve_contract.embedding_meta import read_embedding_meta
from poolserve_contract.parameters import check_step_pooling
from poolserve_runtime import bodies, cuda_graphs, prefix_reuse
from poolserve_runtime.activation import apply_activation
from poolserve_runtime.families import Family, GenericFamily
from poolserve_runtime.fp8 import Fp8Linear, quantize_linears
from poolserve_runtime.implementations import DebertaV2Family
from poolserve_runtime.lora import LoraError, LoraModel, adapter_runs
from poolserve_runtime.packing import PackedBatch, RequestSequences, SequenceLimits, token_budget_chunks
from poolserve_runtime.prefix_cache import PrefixCache
from poolserve_runtime.settings import ModelSettings
from poolserve_runtime.weights import WeightLoadError, weight_plan

if TYPE_CHECKING:
    from poolserve_runtime.vision import BatchImages

logger = logging.getLogger(__name__)

# The Triton outputs of each output set (a family's output_kind, poolserve_contract.triton_config), and those
# with one row per token.
OUTPUT_NAMES = {"classify": ("logits", "scores"), "embed": ("embeddings", "pooled"), "sparse_embed": ("sparse",),
                "token_embed": ("token_embeddings", "token_projected", "maxsim_scores"),
                "token_classify": ("token_logits",),
                "bge_m3": ("embeddings", "pooled", "token_embeddings", "token_projected", "token_logits")}
TOKEN_OUTPUTS = {"token_embed": ("token_embeddings", "token_projected"), "token_classify": ("token_logits",),
                 "bge_m3": ("token_embeddings", "token_projected", "token_logits")}


def body_for(family: Family, requested: str) -> str:
    """The body an engine runs: the requested one when the architecture has it, else its only one."""
    return requested if requested in family.bodies else family.bodies[0]


def body_strategy(family: Family, model: torch.nn.Module, mode: str, position_offset: int,
                  pad_token_id: int) -> bodies.Body | bodies.GenericBody:
    """The body an engine runs its chunks through (``mode``: :func:`body_for`'s answer)."""
    if family.vision:
        return bodies.VisionBody(model, pad_token_id)
    if isinstance(family, GenericFamily):
        return bodies.GenericBody(model, pad_token_id)
    if mode == "varlen":
        return bodies.VarlenBody(family, model, position_offset)
    return bodies.PaddedBody(family, model, pad_token_id)


class PackedEngine:
    def __init__(self, family: Family, model: torch.nn.Module, settings: ModelSettings):
        self.family = family
        self.model = model
        self.settings = settings
        self.device = settings.device
        self.body_mode = body_for(family, settings.attention)
        config = model.config
        self.config = config
        self.pooling = family.pooling_for(config)
        self.normalizes = False
        if family.task == "embed" and not family.sparse:  # pooling and normalisation from the ST files
            embedding = read_embedding_meta(settings.checkpoint, family.pooling)
            self.pooling, self.normalizes = embedding.pooling, embedding.normalizes
        self.activation = family.activation_for(config)
        check_step_pooling(settings.step_tag_id, settings.returned_token_ids, family.task,
                           family.output_labels(config))
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.limits = SequenceLimits(
            vocab_size=int(text_config.vocab_size),
            max_model_len=settings.max_model_len or max_model_len_for(config, settings.checkpoint),
            type_vocab_size=int(getattr(config, "type_vocab_size", 1) or 1) if family.uses_token_types else 1,
        )
        self.pad_token_id = int(getattr(text_config, "pad_token_id", None) or getattr(config, "pad_token_id", None) or 0)
        self.output_names = OUTPUT_NAMES[family.output_kind]
        # Outputs with one row per token (the rest: one per sequence); split per request as padded matrices.
        self.token_outputs = TOKEN_OUTPUTS.get(family.output_kind, ())

        self.position_offset = family.position_offset(config)
        self.body = body_strategy(family, model, self.body_mode, self.position_offset, self.pad_token_id)
        self.is_generic = isinstance(self.body, bodies.GenericBody)
        # LoRA adapters mixed per sequence into the packed bodies (poolserve_runtime.lora); a chunk that uses
        # one runs without CUDA graphs (compiled layers add its terms) and reuses a prompt prefix only within a
        # run of one adapter, without the prefix cache.
        self.lora = self.attach_lora() if settings.lora_modules else None
        self.eager_body = self.body
        # Documents of one request that share a prompt prefix compute it once (causal packed bodies).
        self.reuses_prefix = (settings.prefix_reuse == "auto" and self.body_mode == "varlen" and family.causal
                              and not self.is_generic and family.task == "classify")  # reused rows: pooled as rows
        self.reused_body = bodies.ReusedPrefixBody(family, model, self.device) if self.reuses_prefix else None
        # Prefixes' keys/values kept across requests (prefix_cache_tokens > 0) for the reused streams.
        self.prefix_cache = PrefixCache.for_model(
            text_config, settings.prefix_cache_tokens, settings.dtype, self.device,
        ) if self.reuses_prefix and settings.prefix_cache_tokens > 0 else None
        self.compiled = not self.is_generic and (settings.compile == "layers" or (
            settings.compile == "auto" and self.body_mode == "varlen" and family.compile_by_default))
        if self.compiled:
            compile_layers(family.body(model))
            self.warm_up()
        if self.lora is not None and self.device.type == "cuda":
            self.warm_up_adapters()
        # Chunks of up to cuda_graph_max_tokens tokens replay a CUDA graph of the varlen body.
        self.graph_buckets = cuda_graphs.buckets_to_capture(self.body, self.device, settings.dtype,
                                                            settings.cuda_graph_max_tokens, self.compiled)
        if self.graph_buckets:
            self.body, self.graph_buckets = cuda_graphs.graphed_or_eager(
                self.body, self.graph_buckets, self.pad_token_id, self.device, self.limits.vocab_size)

    def attach_lora(self) -> LoraModel:
        """The lora_modules adapters on this engine's model; refused where the body is not a packed HF body."""
        # DeBERTa-v2 projects its relative position embeddings through the attention's linear layers, rows
        # shared by every sequence of the batch: one forward cannot give each sequence its adapter's there.
        relative_positions = isinstance(self.family, DebertaV2Family) or self.config.model_type == "deberta-v2"
        if self.family.vision or self.is_generic or relative_positions:
            kind = ("vision-language" if self.family.vision else "generic (the checkpoint's own forward)"
                    if self.is_generic else "relative positions through the adapted layers")
            raise LoraError(f"lora_modules: the {self.family.name} family ({kind}) does not serve LoRA adapters")
        if any(isinstance(module, Fp8Linear) for module in self.model.modules()):
            raise LoraError("lora_modules: the model's Linear layers are FP8 (an FP8 checkpoint); LoRA adapters are "
                            "served on the model's own dtype weights")
        try:
            head = self.family.head_linear(self.model) if self.family.task == "classify" else None
        except NotImplementedError:
            head = None
        return LoraModel.attach(self.model, self.settings.lora_modules, self.family.body(self.model), head)

    def warm_up(self) -> None:
        """Run batches of a few shapes so compilation happens at load, not on the first requests."""
        generator = torch.Generator().manual_seed(0)
        longest = min(self.limits.max_model_len, 64)
        for lengths in ([longest // 2] * 2, [1, longest, 3], [longest] * 3 + [7]):
            lengths = torch.tensor(lengths)
            ids = torch.randint(0, self.limits.vocab_size, (int(lengths.sum()),), generator=generator)
            self.run(PackedBatch.pack([RequestSequences(ids, lengths, None)]))

    def warm_up_adapters(self) -> None:
        """One batch of serving size that mixes every adapter and the base, so that the LoRA kernels choose their
        tiles for each layer shape (triton.autotune, poolserve_kernels.lora) at load, on a batch of the size
        they will serve, rather than on the first requests."""
        length = min(self.limits.max_model_len, 256)
        count = max(self.lora.count + 1, min(self.settings.max_tokens_per_forward, 8192) // length)
        lengths = torch.full((count,), length)
        ids = torch.randint(0, self.limits.vocab_size, (count * length,), generator=torch.Generator().manual_seed(0))
        lora_ids = torch.arange(count, dtype=torch.int32) % (self.lora.count + 1)
        self.run(PackedBatch.pack([RequestSequences(ids, lengths, None, lora_ids=lora_ids)]))

    @classmethod
    def load(cls, family: Family, settings: ModelSettings) -> PackedEngine:
        from poolserve_runtime import llm_rerankers
        from poolserve_runtime.families import read_config_dict

        raw = read_config_dict(settings.checkpoint)  # read once: the weight plan and the LLM-reranker conversion
        plan = weight_plan(raw, settings.quantization, settings.load_format)
        if (plan.fp8 or plan.dummy) and (family.vision or isinstance(family, GenericFamily)):
            kind = "vision-language" if family.vision else "generic (the checkpoint's own forward)"
            raise WeightLoadError(f"the {family.name} family ({kind}) is served in its checkpoint's own weights: "
                                  "quantization=fp8, FP8 checkpoints and load_format=dummy are not served for it")
        if family.vision:
            return cls._load_vision(family, settings)
        body = body_for(family, settings.attention)
        if body != settings.attention:
            logger.warning("%s: %s", settings.model_name, family.padded_reason)
        attention = family.padded_attention if body == "padded" else "sdpa"
        conversion = None
        # Only decoder classifiers are converted from a causal LM (an embedder loads its base model).
        if family.task == "classify" and (settings.hf_overrides or family.caches_kv):
            conversion = llm_rerankers.conversion_for(raw, settings.checkpoint, settings.hf_overrides)
            if conversion is not None and not (conversion.method or family.architecture_is_causal_lm(raw)):
                conversion = None  # an architecture override only: the family loads it as usual
        if conversion is not None:
            if conversion.architecture not in family.architectures:
                raise llm_rerankers.UnsupportedArchitecture(
                    f"{settings.checkpoint} converts to {conversion.architecture}, which the {family.name} family "
                    f"does not serve; {llm_rerankers.supported_hint(conversion.architecture)}")
            if plan.streamed:
                raise WeightLoadError(f"{settings.checkpoint}: a causal LM converted to a reranker loads its own "
                                      "weights; FP8 checkpoints and load_format=dummy are not served for it "
                                      "(quantization=fp8 is)")
            model = llm_rerankers.load_converted(conversion, settings.checkpoint, settings.dtype, settings.device,
                                                 attention)
        else:
            config = family.read_config(settings.checkpoint, settings.trust_remote_code)
            if settings.architecture not in family.architectures:
                family.check_architecture(config)
            if plan.streamed:
                model = family.load_streamed(settings.checkpoint, config, plan, settings.dtype, settings.device,
                                             attention)
            else:
                model = family.load(settings.checkpoint, settings.dtype, settings.device, attention,
                                    settings.trust_remote_code)
        if plan.quantize and not plan.streamed:
            quantize_linears(model)  # quantised in place: the model was whole in its dtype until now
        return cls(family, model, settings)

    @classmethod
    def _load_vision(cls, family, settings: ModelSettings) -> PackedEngine:
        """A vision-language family (:mod:`poolserve_runtime.vision_families`): its own body and head; an
        original generative reranker converted from its LM head as the text ones are."""
        import dataclasses

        from poolserve_runtime import llm_rerankers
        from poolserve_runtime.families import read_config_dict

        conversion = llm_rerankers.conversion_for(read_config_dict(settings.checkpoint), settings.checkpoint,
                                                  settings.hf_overrides)
        if conversion is not None and conversion.architecture not in family.architectures:
            raise llm_rerankers.UnsupportedArchitecture(
                f"{settings.checkpoint} converts to {conversion.architecture}, which the {family.name} family "
                f"does not serve; {llm_rerankers.supported_hint(conversion.architecture)}")
        model = family.load_vision(settings.checkpoint, settings.dtype, settings.device, conversion)
        # vLLM's pooler logit_bias (jina-reranker-m0: 2.65) is the kernel's logit_mean shift.
        settings = dataclasses.replace(settings, logit_mean=settings.logit_mean + family.logit_bias)
        return cls(family, model, settings)

    def describe(self) -> str:
        return (
            f"family={self.family.name} checkpoint={self.settings.checkpoint} device={self.device} "
            f"dtype={self.settings.dtype} pooling={self.pooling}"
            f"{' normalized' if self.normalizes else ''} activation={self.activation.value} "
            f"max_model_len={self.limits.max_model_len} max_tokens_per_forward={self.settings.max_tokens_per_forward} "
            f"body={self.body_mode} compiled_layers={self.compiled} prefix_reuse={self.reuses_prefix} "
            f"cuda_graphs={','.join(map(str, self.graph_buckets)) or 'none'} "
            f"prefix_cache_tokens={self.prefix_cache.budget_tokens if self.prefix_cache else 0} "
            f"lora_adapters={self.lora.count if self.lora is not None else 0} "
            f"load_format={self.settings.load_format} "
            f"fp8_linears={sum(isinstance(module, Fp8Linear) for module in self.model.modules())} "
            f"pooling_and_head={poolserve_kernels.implementation(self.device)}"
            + (f" (slow path: {self.family.padded_reason})" if self.body_mode != self.settings.attention
               or self.is_generic else "")
        )

    @torch.inference_mode()
    def run(self, batch: PackedBatch, images: BatchImages | None = None,
            wanted: frozenset[str] | None = None) -> dict[str, torch.Tensor]:
        """Float32 CPU outputs, one row per sequence, in batch order (``images``: a vision family's
        :class:`~poolserve_runtime.vision.BatchImages`). ``wanted``: the outputs some request of the batch asks
        for (None: all); BGE-M3 computes and returns only those of its per-token outputs (its dense ones always:
        they cost nothing beside the body), every other family all of its outputs."""
        reused = self.reused_prefix_chunks(batch)
        if reused is not None:
            outputs = self.score_reused_chunks(batch, reused)
        else:
            outputs = [self.score_chunk(chunk, wanted) for chunk in self.chunks(batch, images)]
        merged = {name: torch.cat([output[name] for output in outputs]) for name in outputs[0]}
        if self.family.task == "token_embed":
            merged["maxsim_scores"] = self.maxsim_scores(batch, merged["token_embeddings"])
        return {name: merged[name].float().cpu() for name in self.output_names if name in merged}

    def maxsim_scores(self, batch: PackedBatch, token_embeddings: torch.Tensor) -> torch.Tensor:
        """``[num_seqs, 1]``: each sequence's MaxSim against the first sequence of its request (the query)."""
        counts = torch.tensor(batch.sequences_per_request)
        first_of_request = torch.cumsum(counts, 0) - counts
        query_index = torch.repeat_interleave(first_of_request, counts).to(torch.int32)
        return poolserve_kernels.maxsim(token_embeddings, batch.cu_seqlens.to(self.device, non_blocking=True),
                                        query_index.to(self.device, non_blocking=True)).unsqueeze(1)

    def chunks(self, batch: PackedBatch, images: BatchImages | None = None) -> Iterator[bodies.Chunk]:
        """The batch as forwards of at most ``max_tokens_per_forward`` tokens (a longer sequence alone),
        made one at a time, as the forwards run."""
        input_ids = batch.input_ids.to(self.device, non_blocking=True)
        token_types = None
        if self.family.uses_token_types and batch.token_type_ids is not None:
            token_types = batch.token_type_ids.to(self.device, non_blocking=True)
        cu_seqlens = batch.cu_seqlens
        for first, last in token_budget_chunks(batch.lengths, self.settings.max_tokens_per_forward):
            begin, end = int(cu_seqlens[first]), int(cu_seqlens[last])
            host_cu = cu_seqlens[first : last + 1] - begin
            pixels, grids = images.rows(first, last) if images is not None else (None, None)
            yield bodies.Chunk(
                input_ids=input_ids[begin:end],
                cu_seqlens=host_cu.to(self.device, non_blocking=True),
                host_ids=batch.input_ids[begin:end],
                host_cu=host_cu,
                max_length=int((host_cu[1:] - host_cu[:-1]).max()),  # from the host copy: no device sync
                token_type_ids=None if token_types is None else token_types[begin:end],
                pixel_values=None if pixels is None else pixels.to(self.device, self.settings.dtype),
                image_grid_thw=None if grids is None else grids.to(self.device),
                lora_ids=None if batch.lora_ids is None else batch.lora_ids[first:last],
            )

    def reused_prefix_chunks(self, batch: PackedBatch) -> list[prefix_reuse.ReusedChunk] | None:
        """The batch as reused-prefix streams; None when the plain chunks serve it (reuse off, no
        request sharing a prefix worth it, or a sequence ending in pad ids, which the last-non-pad
        rule pools from the plain stream)."""
        if not self.reuses_prefix or (self.family.skips_trailing_pad and self._ends_in_pad(batch)):
            return None
        if batch.lora_ids is None:
            return prefix_reuse.plan_chunks(batch.input_ids, batch.cu_seqlens, batch.sequences_per_request,
                                            self.settings.max_tokens_per_forward, self.position_offset,
                                            cache=self.prefix_cache)
        # With adapters a prefix is shared only within a run of one adapter (its keys and values are the
        # adapter's), and the prefix cache, which does not know adapters, stays out of the batch.
        return prefix_reuse.plan_chunks(batch.input_ids, batch.cu_seqlens,
                                        adapter_runs(batch.lora_ids, batch.sequences_per_request),
                                        self.settings.max_tokens_per_forward, self.position_offset)

    def score_reused_chunks(self, batch: PackedBatch, chunks: list[prefix_reuse.ReusedChunk],
                            ) -> list[dict[str, torch.Tensor]]:
        """The reused-prefix streams of ``batch`` through the body, pooled and scored, each with its sequences'
        adapters when it has some (a batch without adapters stores the prefix blocks it computed in the prefix
        cache; one with adapters does not use the cache)."""
        if batch.lora_ids is None:
            return [self.score_reused_chunk(chunk) for chunk in chunks]
        outputs, first = [], 0
        for chunk in chunks:
            lora_ids = batch.lora_ids[first:first + chunk.sequences]
            lengths = batch.lengths[first:first + chunk.sequences]
            run_starts = torch.tensor((0, *chunk.request_sequences[:-1])).cumsum(0)
            with self.lora.forward(lora_ids, chunk.request_bounds, self.device, span_ids=lora_ids[run_starts]):
                hidden = self.reused_body.hidden_states(chunk)  # no prefix cache: nothing to capture
                outputs.append(self.lora.score_by_head(
                    lora_ids, lengths, lambda: self.pool_and_score(hidden, rows=chunk.pool_rows)))
            first += chunk.sequences
        return outputs

    def score_reused_chunk(self, chunk: prefix_reuse.ReusedChunk) -> dict[str, torch.Tensor]:
        """One reused-prefix stream through the body, pooled and scored; the prefix blocks it computed
        go to the prefix cache."""
        captured = self.prefix_cache.capture_buffer(chunk.capture_rows.numel()) if chunk.stores else None
        hidden = self.reused_body.hidden_states(chunk, captured)
        if captured is not None:
            self.prefix_cache.store(chunk.stores, captured)
        return self.pool_and_score(hidden, rows=chunk.pool_rows)

    def score_chunk(self, chunk: bodies.Chunk, wanted: frozenset[str] | None = None) -> dict[str, torch.Tensor]:
        """One chunk through the body, then pooled and scored (the generic body's logits: calibrated)."""
        if self.is_generic:
            return self.score_logits(self.body.logits(chunk))
        if self.lora is not None and chunk.lora_ids is not None:
            return self.score_lora_chunk(chunk, wanted)
        hidden = self.body.hidden_states(chunk)
        if self.family.sparse:  # the token ids decide which rows count (vLLM drops CLS and SEP)
            return {"sparse": self.family.sparse_vectors(self.model, hidden, chunk.host_ids, chunk.host_cu)}
        rows = self._last_non_pad_rows(chunk.host_ids, chunk.host_cu) if self.family.skips_trailing_pad else None
        return self.pool_and_score(hidden, chunk.cu_seqlens, rows, wanted)

    def score_lora_chunk(self, chunk: bodies.Chunk, wanted: frozenset[str] | None) -> dict[str, torch.Tensor]:
        """A chunk whose sequences use LoRA adapters: the body (no CUDA graph), pooling and heads with each
        sequence's adapter (its modules_to_save heads too)."""
        lengths = chunk.host_cu[1:] - chunk.host_cu[:-1]
        # The rows the body's linear layers see: the packed stream, or the padded body's [n, longest] rows.
        token_bounds = chunk.host_cu if self.body_mode == "varlen" else torch.arange(lengths.numel() + 1) * chunk.max_length
        with self.lora.forward(chunk.lora_ids, token_bounds, self.device):
            hidden = self.eager_body.hidden_states(chunk)
            if self.family.sparse:
                return self.lora.score_by_head(chunk.lora_ids, lengths, lambda: {"sparse": self.family.sparse_vectors(
                    self.model, hidden, chunk.host_ids, chunk.host_cu)})
            rows = self._last_non_pad_rows(chunk.host_ids, chunk.host_cu) if self.family.skips_trailing_pad else None
            return self.lora.score_by_head(chunk.lora_ids, lengths,
                                           lambda: self.pool_and_score(hidden, chunk.cu_seqlens, rows, wanted))

    def pool_and_score(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                       rows: torch.Tensor | None = None, wanted: frozenset[str] | None = None,
                       ) -> dict[str, torch.Tensor]:
        """Outputs of the sequences whose hidden states ``[tokens, hidden]`` are ``hidden``: pooled by
        ``cu_seqlens`` (on the device), or, for a score head, at ``rows`` (on the host: each sequence's
        row, when a last-token rule or a reused-prefix stream places it), then the head."""
        if self.family.task == "token_embed":
            projected = self.family.token_head(self.model)(hidden)
            normalized = F.normalize(projected.float(), p=2.0, dim=-1).to(projected.dtype)
            return {"token_embeddings": normalized, "token_projected": projected}
        if self.family.task == "token_classify":
            # Calibrated as vLLM's TokenClassifierPoolerHead does before its activation (the adapter's).
            logits = self.family.token_head(self.model)(hidden).float()
            return {"token_logits": (logits - self.settings.logit_mean) / self.settings.logit_sigma}
        if self.family.output_kind == "bge_m3":  # every output from the same hidden states
            return {**self.embedded(hidden, cu_seqlens), **self.family.token_outputs(self.model, hidden, wanted)}
        if self.family.task == "embed":
            return self.embedded(hidden, cu_seqlens)
        linear = self.family.head_linear(self.model)
        if rows is not None:
            # HF pools these rows (a sequence ending in pad ids: its last non-pad token), so gather them.
            pooled = hidden.index_select(0, rows.to(self.device, non_blocking=True))
            features = self.family.head_features(self.model, pooled)
            x, gather = (pooled if features is None else features), "rows"
        elif self.family.fused_gather:
            # Nothing between pooling and the linear layer: the gather joins the head's launch.
            x, gather = hidden, self.pooling
        else:
            pooled = poolserve_kernels.pool(hidden, cu_seqlens, self.pooling)
            features = self.family.head_features(self.model, pooled)
            x, gather = (pooled if features is None else features), "rows"
        logits, scores = poolserve_kernels.score_head(
            x, linear.weight, linear.bias, self.activation.value, gather=gather, cu_seqlens=cu_seqlens,
            logit_mean=self.settings.logit_mean, logit_sigma=self.settings.logit_sigma,
        )
        return {"logits": logits, "scores": scores}

    def embedded(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> dict[str, torch.Tensor]:
        """An embedding model's ``embeddings`` and ``pooled`` (the same tensor when it does not normalise)."""
        if not self.normalizes:
            pooled = poolserve_kernels.pool(hidden, cu_seqlens, self.pooling)
            return {"embeddings": pooled, "pooled": pooled}
        pooled, normalized = poolserve_kernels.pool_normalized(hidden, cu_seqlens, self.pooling)
        return {"embeddings": normalized, "pooled": pooled}

    def score_logits(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """The generic body's head logits, calibrated in fp32, then the activation."""
        logits = (logits.float() - self.settings.logit_mean) / self.settings.logit_sigma
        return {"logits": logits, "scores": apply_activation(logits, self.activation)}

    def _ends_in_pad(self, batch: PackedBatch) -> bool:
        pad = getattr(self.config, "pad_token_id", None)
        return pad is not None and bool((batch.input_ids[batch.cu_seqlens[1:].long() - 1] == pad).any())

    def _last_non_pad_rows(self, host_ids: torch.Tensor, host_cu: torch.Tensor) -> torch.Tensor | None:
        """Row of each sequence's last non-pad token (HF's sequence-classification rule), or None when
        every sequence already ends in a non-pad token (the common case: the fused last-token gather).
        A sequence of pad ids only is pooled at its first token, as HF's argmax gives."""
        pad = getattr(self.config, "pad_token_id", None)
        if pad is None:
            return None
        ends = host_cu[1:].long() - 1
        if not bool((host_ids[ends] == pad).any()):
            return None
        lengths = (host_cu[1:] - host_cu[:-1]).long()
        starts = host_cu[:-1].long()
        positions = torch.arange(host_ids.numel())
        owner = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
        candidate = torch.where(host_ids != pad, positions, starts[owner])
        return torch.zeros_like(starts).scatter_reduce(0, owner, candidate, reduce="amax", include_self=False)


def compile_layers(body: torch.nn.Module) -> int:
    """``torch.compile`` every transformer layer of ``body``; returns how many.

    Eager HF layers launch one kernel per elementwise op (RMSNorm alone is five, rotary embedding
    another eight): at hidden sizes of 384-1,536 those memory-bound launches cost as much GPU time
    as the matmuls. Inductor fuses them into a few Triton kernels per layer. The attention call
    stays eager (:func:`poolserve_runtime.varlen.packed_attention` is excluded from tracing), so the
    graphs hold only dense ops, ``dynamic=True`` makes one graph serve every token count, and all
    layers of a model share the same compiled code (parameters are graph inputs).
    """
    layers = max((m for m in body.modules() if isinstance(m, torch.nn.ModuleList)), key=len, default=None)
    if layers is None or len(layers) == 0:
        return 0
    # Token counts that happen to equal a model dimension must not specialise the graphs.
    torch.fx.experimental._config.use_duck_shape = False
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)
