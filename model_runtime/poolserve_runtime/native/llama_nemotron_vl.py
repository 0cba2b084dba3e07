"""NVIDIA's multimodal reranker (``LlamaNemotronVLForSequenceClassification``, nvidia/llama-nemotron-rerank-vl).

Upstream ships it as remote code (``modeling_llama_nemotron_vl.py``, ``model_type:
llama_nemotron_vl_rerank``); vLLM serves it natively (``vllm/model_executor/models/nemotron_vl.py``).
Both, and this module (our own code on stock transformers parts):

* vision: a SigLIP vision tower (``SiglipVisionModel``, last layer with its post-LayerNorm) on
  ``force_image_size`` tiles; its ``[tiles, (S/p)^2, C]`` states pixel-shuffled by
  ``downsample_ratio`` (0.5: 2x2 neighbours into the channels, InternVL's "v2" order) and projected
  by ``mlp1`` (LayerNorm, Linear, GELU, Linear) to the LM's width;
* each ``<image>`` of the prompt becomes ``<img>`` + ``<IMG_CONTEXT>`` x (tokens per tile x tiles) +
  ``</img>``; the projected tile features replace the ``<IMG_CONTEXT>`` embeddings in order;
* a bidirectional Llama (every attention layer ``is_causal = False``, a padding-only mask), pooled
  by ``pooling`` ("avg": the mean over all tokens), and a bias-free ``score`` linear; vLLM's default
  activation (sigmoid for one label).

Images are cut into tiles as upstream's ``dynamic_preprocess`` by
:class:`poolserve_contract.tiling.TilingImageProcessor` (the adapter runs it); the declaration (pooling,
placeholders, how a pair is written) is :class:`poolserve_contract.families.NemotronVLDeclaration`.
"""

from __future__ import annotations

import torch
from torch import nn

from poolserve_contract.families import (
    NEMOTRON_IMAGE_CONTEXT,
    NEMOTRON_IMAGE_TOKEN_ID,
    by_name,
    llama_config_from_dict,
    read_config_dict,
)
from poolserve_contract.tiling import TilingImageProcessor, tiles_processor_for
from poolserve_runtime.native.weights import load_state
from poolserve_runtime.vision_families import VisionFamily
from poolserve_runtime.weights import checkpoint_folder


class TorchTilingImageProcessor(TilingImageProcessor):
    """The tiling processor answering ``return_tensors="pt"`` too, as HF's processors do (benchmarks, references)."""

    def __call__(self, images, return_tensors: str = "np") -> dict:
        result = super().__call__(images)
        if return_tensors == "pt":
            return {key: torch.from_numpy(value) for key, value in result.items()}
        return result


def pixel_shuffle(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """[N, w, h, C] → [N, w*r, h*r, C/r^2], upstream's order (two reshapes with a transpose each)."""
    n, w, h, c = x.shape
    x = x.view(n, w, int(h * ratio), int(c / ratio)).permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * ratio), int(w * ratio), int(c / (ratio * ratio)))
    return x.permute(0, 2, 1, 3).contiguous()


class NemotronVLClassifier(nn.Module):
    def __init__(self, config: dict, family: VisionFamily):
        super().__init__()
        from transformers import LlamaModel, SiglipVisionConfig, SiglipVisionModel

        self.raw_config = config
        vision = {k: v for k, v in config["vision_config"].items() if k not in ("model_type", "architectures")}
        # SigLIP's attention-pooling head is not used (upstream reads the last hidden states).
        self.vision_model = SiglipVisionModel(SiglipVisionConfig(**{**vision, "vision_use_head": False}))
        text = llama_config_from_dict(config["llm_config"])
        text._attn_implementation = "sdpa"
        self.language_model = LlamaModel(text)
        for module in self.language_model.modules():
            if hasattr(module, "is_causal"):
                module.is_causal = False
        self.ratio = float(config.get("downsample_ratio", 0.5))
        vision_width = self.vision_model.config.hidden_size * int(1 / self.ratio) ** 2
        hidden = text.hidden_size
        self.mlp1 = nn.Sequential(nn.LayerNorm(vision_width), nn.Linear(vision_width, hidden), nn.GELU(),
                                  nn.Linear(hidden, hidden))
        self.num_labels = int(config.get("num_labels") or text.num_labels or 1)
        self.score = nn.Linear(hidden, self.num_labels, bias=False)
        self.config = text
        self.config.num_labels = self.num_labels
        self.config.id2label = {int(k): v for k, v in (config.get("id2label") or {}).items()} or {
            i: f"LABEL_{i}" for i in range(self.num_labels)}
        self.image_size = int(config.get("force_image_size") or self.vision_model.config.image_size)
        self.image_token_id = int(config.get("img_context_token_id", NEMOTRON_IMAGE_TOKEN_ID))
        self.config.image_token_id = self.image_token_id
        self.family = family

    @property
    def base_model(self) -> nn.Module:
        return self.language_model

    def image_tokens(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """<IMG_CONTEXT> tokens per image: tokens per tile x tiles."""
        side = self.image_size // self.vision_model.config.patch_size
        return grid_thw.prod(dim=-1) * int(side * side * self.ratio * self.ratio)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        tiles = pixel_values.reshape(-1, 3, self.image_size, self.image_size)
        states = self.vision_model(pixel_values=tiles).last_hidden_state  # [N, (S/p)^2, C]
        side = int(states.shape[1] ** 0.5)
        states = pixel_shuffle(states.reshape(states.shape[0], side, side, -1), self.ratio)
        return self.mlp1(states.reshape(states.shape[0], -1, states.shape[-1]))

    def hidden_states(self, input_ids, attention_mask, pixel_values=None, image_grid_thw=None) -> torch.Tensor:
        embeds = self.language_model.embed_tokens(input_ids)
        if pixel_values is not None:
            features = self.image_features(pixel_values).reshape(-1, embeds.shape[-1]).to(embeds.dtype)
            slots = input_ids == self.image_token_id
            if int(slots.sum()) != features.shape[0]:
                from poolserve_runtime.packing import InvalidRequest

                raise InvalidRequest(f"the prompts hold {int(slots.sum())} {NEMOTRON_IMAGE_CONTEXT} tokens where their tiles "
                                     f"need {features.shape[0]}")
            embeds = embeds.masked_scatter(slots.unsqueeze(-1), features)
        keep = attention_mask.bool()
        # Bidirectional: every token sees every real token of its sequence (a padding-only mask), positions
        # 0..L-1 per sequence as vLLM runs it unpadded.
        mask = keep[:, None, None, :].expand(-1, 1, keep.shape[1], -1)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0).expand_as(input_ids)
        return self.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                   use_cache=False).last_hidden_state


def _checkpoint_names(state: dict[str, torch.Tensor], vision_prefix: str) -> dict[str, torch.Tensor]:
    """Upstream's names (with or without a ``model.`` prefix, the vision tower flat or nested, the LM
    bare or under ``.model``) → this module's, whose vision prefix depends on the transformers version."""
    renamed = {}
    for name, tensor in state.items():
        name = name.removeprefix("model.")
        if name.startswith("vision_model."):
            rest = name.removeprefix("vision_model.").removeprefix("vision_model.")
            if rest.startswith("head."):
                continue  # SigLIP's attention-pooling head: not used
            name = vision_prefix + rest
        elif name.startswith("language_model."):
            rest = name.removeprefix("language_model.")
            if rest.startswith(("score.", "lm_head.")):
                continue  # the inner LM's own heads: never run
            name = "language_model." + rest.removeprefix("model.")
        renamed[name] = tensor
    return renamed


class NemotronVLFamily(VisionFamily):
    """Our module on stock SigLIP and Llama parts, the checkpoint's weights renamed into it."""

    def read_config(self, checkpoint: str, trust_remote_code: bool = False):
        return llama_config_from_dict(read_config_dict(checkpoint)["llm_config"])

    def load_vision(self, checkpoint: str, dtype: torch.dtype, device: torch.device, conversion=None) -> nn.Module:
        config = read_config_dict(checkpoint)
        model = NemotronVLClassifier(config, self)
        model.config.pooling = config.get("pooling", model.config.__dict__.get("pooling", "avg"))
        nested = any(key.startswith("vision_model.vision_model.") for key in model.state_dict())
        vision_prefix = "vision_model.vision_model." if nested else "vision_model."
        model.load_state_dict(_checkpoint_names(load_state(checkpoint_folder(checkpoint)), vision_prefix), strict=True)
        return model.to(device=device, dtype=dtype).eval()

    def image_processor(self, checkpoint: str) -> TorchTilingImageProcessor:
        processor = tiles_processor_for(read_config_dict(checkpoint))
        return TorchTilingImageProcessor(processor.size, processor.min_tiles, processor.max_tiles,
                                         processor.use_thumbnail, processor.tokens_per_tile)


FAMILY = NemotronVLFamily(by_name("llama_nemotron_vl"))
