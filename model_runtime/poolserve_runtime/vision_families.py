"""Vision-language classifiers and rerankers: token ids with image placeholders plus pixels in, scores out.

Each family is declared torch-free in :mod:`poolserve_contract.families` (a ``VisionDeclaration``:
placeholders, score format, head kind) and implemented here by :class:`VisionFamily`: the stock
transformers multimodal body
(``Qwen2VLModel``, ``Qwen2_5_VLModel``, ``Qwen3VLModel``; or the project's own module for
architectures upstream ships only as remote code, :mod:`poolserve_runtime.native.llama_nemotron_vl`),
the pooling, and the head vLLM builds for it:

* ``linear``: the checkpoint's ``score`` ``[num_labels, hidden]`` (vLLM's ``as_seq_cls_model``), or,
  for an original generative reranker (Qwen3-VL-Reranker), ``lm_head[yes] - lm_head[no]`` as
  :mod:`poolserve_runtime.llm_rerankers` converts text rerankers;
* ``mlp``: jina-reranker-m0's ``score.0`` (dense) + ReLU + ``score.2`` (out_proj), with vLLM's
  ``logit_bias`` of 2.65 subtracted before the sigmoid.

The body runs padded through HF's own forward: multimodal RoPE positions (``get_rope_index``) and the
merge of vision embeddings into the placeholder tokens are HF's, so the scores are the reference
model's. The Triton-language kernels still pool (last token / mean over ``cu_seqlens``) and apply
the fused score head.

The wire contract (see docs/images.md): ``input_ids`` hold the placeholders already expanded
(one ``<|image_pad|>`` per merged patch, as the checkpoint's processor writes them);
``pixel_values`` ``[rows, patches, patch_dim]`` FP32 holds each row's images' patches in prompt order
(rows right-padded with zeros), ``image_grid_thw`` ``[rows, images, 3]`` INT64 their (t, h, w) patch
grids (a zero row ends the list).
"""

from __future__ import annotations

import inspect
import logging

import torch
from torch import nn

from poolserve_contract.families import QWEN_IMAGE, UnsupportedArchitecture, by_name  # noqa: F401  (QWEN_IMAGE: tests)
from poolserve_runtime.implementations import Family

logger = logging.getLogger(__name__)


class VisionFamily(Family):
    """A multimodal body (``backbone``) and the head its declaration names (``linear`` or ``mlp``)."""

    def head_linear(self, model: nn.Module) -> nn.Linear:
        return model.score if self.head == "linear" else model.score[2]

    def head_features(self, model: nn.Module, pooled: torch.Tensor) -> torch.Tensor | None:
        if self.head == "linear":
            return None
        return torch.relu(model.score[0](pooled))

    def load_vision(self, checkpoint: str, dtype: torch.dtype, device: torch.device, conversion=None) -> nn.Module:
        return VisionClassifier.load(self, checkpoint, dtype, device, conversion)


class VisionClassifier(nn.Module):
    """A multimodal body and the head vLLM puts on it; ``model`` is the HF body, ``score`` the head."""

    def __init__(self, family: VisionFamily, body: nn.Module, score: nn.Module):
        super().__init__()
        self.model = body
        self.score = score
        self.config = body.config
        self.family = family
        accepted = inspect.signature(body.forward).parameters
        # transformers >= 5.2x computes M-RoPE from mm_token_type_ids (the processor's output); older
        # versions derive it from the ids. Both are given the same placeholders.
        self.takes_token_types = "mm_token_type_ids" in accepted
        self.image_token_id = getattr(self.config, "image_token_id", None)
        self.video_token_id = getattr(self.config, "video_token_id", None)

    @property
    def base_model(self) -> nn.Module:
        return self.model

    @classmethod
    def load(cls, family: VisionFamily, checkpoint: str, dtype: torch.dtype, device: torch.device,
             conversion=None) -> VisionClassifier:
        import transformers

        from poolserve_runtime.weights import checkpoint_folder

        body_class = getattr(transformers, family.backbone)
        body = body_class.from_pretrained(checkpoint, dtype=dtype, attn_implementation="sdpa")
        folder = checkpoint_folder(checkpoint)
        if conversion is not None and conversion.method:
            score = _converted_score(conversion, checkpoint, folder, body, dtype)
        else:
            score = _checkpoint_score(family, folder, dtype)
        model = cls(family, body, score)
        model.config.num_labels = score.out_features if isinstance(score, nn.Linear) else 1
        return model.to(device).eval()

    def image_tokens(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """Pad tokens each image takes in the prompt: one per merged patch."""
        merge = int(getattr(self.config.vision_config, "spatial_merge_size", 2) or 2) ** 2
        return grid_thw.prod(dim=-1) // merge

    def token_types(self, input_ids: torch.Tensor) -> torch.Tensor:
        types = torch.zeros_like(input_ids, dtype=torch.int32)
        if self.image_token_id is not None:
            types[input_ids == self.image_token_id] = 1
        if self.video_token_id is not None:
            types[input_ids == self.video_token_id] = 2
        return types

    def hidden_states(self, input_ids, attention_mask, pixel_values=None, image_grid_thw=None) -> torch.Tensor:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        if pixel_values is not None:
            inputs["pixel_values"] = pixel_values
            inputs["image_grid_thw"] = image_grid_thw
        if self.takes_token_types:
            inputs["mm_token_type_ids"] = self.token_types(input_ids)
        return self.model(**inputs).last_hidden_state


def _checkpoint_score(family: VisionFamily, folder, dtype: torch.dtype) -> nn.Module:
    from poolserve_runtime.native.weights import read_tensors

    tensors = read_tensors(folder, "score.")
    if not tensors:
        raise UnsupportedArchitecture(
            f"{folder} has no score head (score.* weights); an original generative reranker is converted with "
            "hf_overrides '{\"architectures\": [\"...ForSequenceClassification\"], \"classifier_from_token\": "
            "[\"no\", \"yes\"], \"is_original_qwen3_reranker\": true}'")
    if family.head == "mlp":
        dense_w, out_w = tensors["score.0.weight"], tensors["score.2.weight"]
        head = nn.Sequential(nn.Linear(dense_w.shape[1], dense_w.shape[0]), nn.ReLU(),
                             nn.Linear(out_w.shape[1], out_w.shape[0]))
        head[0].weight.data, head[0].bias.data = dense_w, tensors["score.0.bias"]
        head[2].weight.data, head[2].bias.data = out_w, tensors["score.2.bias"]
        return head.to(dtype)
    weight = tensors["score.weight"]
    head = nn.Linear(weight.shape[1], weight.shape[0], bias="score.bias" in tensors)
    head.weight.data = weight
    if "score.bias" in tensors:
        head.bias.data = tensors["score.bias"]
    return head.to(dtype)


def _converted_score(conversion, checkpoint: str, folder, body: nn.Module, dtype: torch.dtype) -> nn.Linear:
    """vLLM's from_2_way_softmax / no_post_processing: rows of the LM head (or the tied embeddings)."""
    from transformers import AutoTokenizer

    from poolserve_runtime.llm_rerankers import FROM_2_WAY_SOFTMAX, token_ids
    from poolserve_runtime.native.weights import read_tensors

    ids = token_ids(AutoTokenizer.from_pretrained(checkpoint), conversion.tokens)
    lm_head = read_tensors(folder, "lm_head.").get("lm_head.weight")
    if lm_head is None:  # tied word embeddings
        lm_head = body.get_input_embeddings().weight.detach()
    rows = lm_head.float()[ids]
    weight = rows[1:2] - rows[0:1] if conversion.method == FROM_2_WAY_SOFTMAX else rows
    head = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    head.weight.data = weight
    return head.to(dtype)


FAMILIES: tuple[VisionFamily, ...] = tuple(VisionFamily(by_name(name)) for name in ("qwen2_5_vl", "jina_vl", "qwen3_vl"))
