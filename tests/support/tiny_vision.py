"""Tiny random-weight vision-language checkpoints: real configs shrunk, a local tokenizer and image processor.

Each kind is saved as the checkpoint users download would be: the multimodal generative model's
weights (``model.visual.*``, ``model.language_model.*``) plus the head vLLM reads (``score.*``), the
architecture vLLM serves in ``config.json``, the byte-level BPE tokenizer with the Qwen vision
tokens, and a ``preprocessor_config.json`` of the checkpoint's image processor (small pixel bounds).
Also: :func:`reference_scores`, the HF forward one sequence at a time (the parity reference), and
images made with Pillow.
"""

from __future__ import annotations

import base64
import inspect
import io
import json
from pathlib import Path

import numpy as np
import torch

from tests.support.tiny_models import byte_level_tokenizer

VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
VISION_KINDS = ("qwen2_5_vl", "jina_vl", "qwen3_vl", "qwen3_vl_reranker")
# kind → (generative class, architecture written to config.json, head)
_KINDS = {
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLForSequenceClassification", "linear"),
    "jina_vl": ("Qwen2VLForConditionalGeneration", "JinaVLForRanking", "mlp"),
    "qwen3_vl": ("Qwen3VLForConditionalGeneration", "Qwen3VLForSequenceClassification", "linear"),
    # the original generative form: converted with yes/no at load (the folder name says "reranker")
    "qwen3_vl_reranker": ("Qwen3VLForConditionalGeneration", "Qwen3VLForConditionalGeneration", "lm_head"),
}


def _configs(tf, kind: str, token_ids: dict[str, int], vocab_size: int, num_labels: int):
    text = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
                initializer_range=0.2, num_labels=num_labels)
    ids = dict(image_token_id=token_ids["<|image_pad|>"], video_token_id=token_ids["<|video_pad|>"],
               vision_start_token_id=token_ids["<|vision_start|>"], vision_end_token_id=token_ids["<|vision_end|>"])
    mrope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}
    if kind == "jina_vl":
        return tf.Qwen2VLConfig(text_config=dict(text, rope_parameters=mrope), vision_config=dict(
            depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=14, spatial_merge_size=2,
            temporal_patch_size=2, initializer_range=0.2), num_labels=num_labels, **ids), 14
    if kind == "qwen2_5_vl":
        return tf.Qwen2_5_VLConfig(text_config=dict(text, rope_parameters=mrope), vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32, fullatt_block_indexes=[1],
            window_size=56, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, initializer_range=0.2),
            num_labels=num_labels, **ids), 14
    rope3 = dict(mrope, mrope_interleaved=True)
    return tf.Qwen3VLConfig(text_config=dict(text, head_dim=8, rope_parameters=rope3, tie_word_embeddings=False),
                            vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4,
                                               out_hidden_size=32, patch_size=16, spatial_merge_size=2,
                                               temporal_patch_size=2, num_position_embeddings=64,
                                               deepstack_visual_indexes=[0], initializer_range=0.2),
                            num_labels=num_labels, tie_word_embeddings=False, **ids), 16


def build_vision_checkpoint(kind: str, directory: Path, seed: int = 0, num_labels: int = 1) -> Path:
    import transformers as tf
    from safetensors.torch import load_file, save_file

    torch.manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = byte_level_tokenizer(directory)
    tokenizer.add_special_tokens({"additional_special_tokens": VISION_TOKENS})
    tokenizer.add_tokens(["yes", "no"])  # the reranker's label tokens, one id each
    tokenizer.save_pretrained(directory)
    token_ids = {token: tokenizer.convert_tokens_to_ids(token) for token in VISION_TOKENS}
    generative, architecture, head = _KINDS[kind]
    config, patch_size = _configs(tf, kind, token_ids, len(tokenizer), num_labels)
    model = getattr(tf, generative)(config).eval()
    model.save_pretrained(directory)
    hidden = 32
    weights_file = directory / "model.safetensors"
    state = load_file(str(weights_file))
    if head == "linear":
        state["score.weight"] = torch.randn(num_labels, hidden) * 0.5
    elif head == "mlp":
        state.update({"score.0.weight": torch.randn(hidden, hidden) * 0.3, "score.0.bias": torch.randn(hidden) * 0.1,
                      "score.2.weight": torch.randn(1, hidden) * 0.5, "score.2.bias": torch.randn(1) * 0.1})
    save_file(state, str(weights_file), metadata={"format": "pt"})
    config_json = json.loads((directory / "config.json").read_text())
    config_json["architectures"] = [architecture]
    (directory / "config.json").write_text(json.dumps(config_json, indent=2))
    processor = tf.Qwen2VLImageProcessorPil(
        min_pixels=(patch_size * 2) ** 2 * 4, max_pixels=(patch_size * 2) ** 2 * 36, patch_size=patch_size,
        merge_size=2, temporal_patch_size=2)
    processor.save_pretrained(directory)
    return directory


def make_image(width: int = 90, height: int = 70, seed: int = 0, mode: str = "RGB"):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((height, width, 3)) * 255).astype("uint8")).convert(mode)


def image_bytes(image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def data_url(image, fmt: str = "PNG") -> str:
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(image_bytes(image, fmt)).decode()}"


def packed_vision_requests(family, checkpoint: Path, prompts: list[str], images: list[list], placeholder: str,
                           extra_ids: tuple[int, ...] = ()) -> tuple[list, list]:
    """One engine request per prompt, as the adapter sends it: each ``placeholder`` expanded into the
    image tokens the checkpoint's processor writes for that image, the ids then ``extra_ids``; and
    the request's pixel values and grids. Returns (RequestSequences list, RequestImages list)."""
    from transformers import AutoTokenizer

    from poolserve_runtime.packing import RequestSequences
    from poolserve_runtime.vision import RequestImages

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    processor = family.image_processor(str(checkpoint))
    requests, request_images = [], []
    for prompt, these in zip(prompts, images):
        text, pixels, grids = prompt, torch.zeros(0, 0), torch.zeros(0, 3, dtype=torch.int64)
        if these:
            processed = processor(images=these, return_tensors="pt")
            pixels, grids = processed["pixel_values"], processed["image_grid_thw"]
            pieces = prompt.split(placeholder)
            text = pieces[0] + "".join(family.image_text(grid, processor) + rest for grid, rest in zip(grids, pieces[1:]))
        ids = tokenizer(text)["input_ids"] + list(extra_ids)
        requests.append(RequestSequences(torch.tensor(ids), torch.tensor([len(ids)]), None))
        request_images.append(RequestImages(pixels.float(), grids, torch.tensor([len(grids)])))
    return requests, request_images


@torch.inference_mode()
def reference_scores(kind: str, directory: Path, prompts: list[str], images: list[list], activation: bool = True):
    """HF's own forward, one unpadded sequence at a time, then the head vLLM applies: the reference."""
    import transformers as tf

    from poolserve_runtime.vision_families import QWEN_IMAGE

    generative = _KINDS[kind][0]
    model = getattr(tf, generative).from_pretrained(directory, dtype=torch.float32).eval()
    tokenizer = tf.AutoTokenizer.from_pretrained(directory)
    processor = tf.AutoImageProcessor.from_pretrained(directory)
    from safetensors.torch import load_file

    state = load_file(str(directory / "model.safetensors"))
    scores = []
    for prompt, row_images in zip(prompts, images):
        text, pixel_values, grid = prompt, None, None
        if row_images:
            processed = processor(images=row_images, return_tensors="pt")
            pixel_values, grid = processed["pixel_values"], processed["image_grid_thw"]
            for g in grid:  # the processor's expansion: one pad token per merged patch
                text = text.replace(QWEN_IMAGE, QWEN_IMAGE.replace("<|image_pad|>", "<|placeholder|>" * (
                    int(g.prod()) // 4)), 1)
            text = text.replace("<|placeholder|>", "<|image_pad|>")
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        if kind == "jina_vl":
            ids = torch.cat([ids, torch.tensor([[100]])], dim=1)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}
        if pixel_values is not None:
            inputs.update(pixel_values=pixel_values, image_grid_thw=grid)
            if "mm_token_type_ids" in inspect.signature(model.model.forward).parameters:
                inputs["mm_token_type_ids"] = (ids == model.config.image_token_id).int()
        last = model.model(**inputs).last_hidden_state[0, -1]
        if kind == "jina_vl":
            h = torch.relu(last @ state["score.0.weight"].T + state["score.0.bias"])
            logit = h @ state["score.2.weight"].T + state["score.2.bias"] - 2.65
        elif kind == "qwen3_vl_reranker":
            yes, no = tokenizer.convert_tokens_to_ids(["yes", "no"])
            logit = (last @ (state["lm_head.weight"][yes] - state["lm_head.weight"][no])).reshape(1)
        else:
            logit = last @ state["score.weight"].T
        scores.append(torch.sigmoid(logit) if activation and logit.numel() == 1 else (
            torch.softmax(logit, -1) if activation else logit))
    return torch.stack(scores)


NEMOTRON_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>"]


def build_nemotron_vl_checkpoint(directory: Path, seed: int = 0) -> Path:
    """LlamaNemotronVLForSequenceClassification shrunk: SigLIP on 32 px tiles of 8 px patches (4 tokens per
    tile after the pixel shuffle), a 2-layer bidirectional Llama; weights under upstream's names."""
    from safetensors.torch import save_file

    from poolserve_runtime.native.llama_nemotron_vl import FAMILY, NemotronVLClassifier

    torch.manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = byte_level_tokenizer(directory)
    tokenizer.add_special_tokens({"additional_special_tokens": NEMOTRON_TOKENS})
    tokenizer.save_pretrained(directory)
    config = {
        "architectures": ["LlamaNemotronVLForSequenceClassification"], "model_type": "llama_nemotron_vl_rerank",
        "auto_map": {"AutoModelForSequenceClassification": "modeling_llama_nemotron_vl.LlamaNemotronVLForSequenceClassification"},
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 16, "intermediate_size": 32,
                          "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        "llm_config": {"model_type": "llama_bidirec", "architectures": ["LlamaBidirectionalForSequenceClassification"],
                       "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
                       "pad_token_id": 0, "pooling": "avg"},
        "downsample_ratio": 0.5, "force_image_size": 32, "min_dynamic_patch": 1, "max_dynamic_patch": 4,
        "dynamic_image_size": True, "use_thumbnail": True, "pooling": "avg", "num_labels": 1,
        "img_context_token_id": tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"), "template": "bidirectional-llama-retriever",
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    model = NemotronVLClassifier(config, FAMILY)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0, 0.2)
    state = {}
    for name, tensor in model.state_dict().items():  # upstream's layout: the vision tower flat
        name = name.replace("vision_model.vision_model.", "vision_model.")
        name = "model." + name if name.startswith("language_model.") else name  # a prefix some exports carry
        state[name] = tensor.contiguous()
    state["vision_model.head.probe"] = torch.zeros(1, 1, 16)  # SigLIP's unused pooling head, as shipped
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


@torch.inference_mode()
def nemotron_reference_scores(directory: Path, prompts: list[str], images: list[list]) -> torch.Tensor:
    """One unpadded sequence at a time, attention over the whole sequence (no mask), SigLIP tiles
    pixel-shuffled by index arithmetic, mean pooling, sigmoid of the score."""
    import transformers as tf
    from safetensors.torch import load_file

    from poolserve_runtime.native.llama_nemotron_vl import FAMILY

    config = json.loads((directory / "config.json").read_text())
    state = load_file(str(directory / "model.safetensors"))
    vision = tf.SiglipVisionModel(tf.SiglipVisionConfig(**{k: v for k, v in config["vision_config"].items()
                                                          if k != "model_type"}, vision_use_head=False)).eval()
    nested = any(key.startswith("vision_model.") for key in vision.state_dict())
    vision.load_state_dict({("vision_model." if nested else "") + k.removeprefix("vision_model."): v
                            for k, v in state.items()
                            if k.startswith("vision_model.") and not k.startswith("vision_model.head.")})
    llm_values = {k: v for k, v in config["llm_config"].items() if k not in ("model_type", "architectures")}
    llm = tf.LlamaModel(tf.LlamaConfig(**llm_values)).eval()
    llm.load_state_dict({k.removeprefix("model.language_model."): v for k, v in state.items()
                         if k.startswith("model.language_model.")})
    tokenizer = tf.AutoTokenizer.from_pretrained(directory)
    processor = FAMILY.image_processor(str(directory))
    scores = []
    for prompt, row_images in zip(prompts, images):
        text = prompt
        features = []
        for image in row_images:
            tiles = processor([image])["pixel_values"]
            text = text.replace("<image>", "<img>" + "<IMG_CONTEXT>" * (4 * len(tiles)) + "</img>", 1)
            states = vision(pixel_values=torch.from_numpy(tiles).reshape(-1, 3, 32, 32)).last_hidden_state  # [N,16,16]
            grid = states.reshape(-1, 4, 4, 16)  # [N, w, h, C] as upstream reads it
            # out[n, a, b] = concat over (di, dj) of grid[n, 2a+di?...]: written as upstream's two transposes
            x = grid.reshape(-1, 4, 2, 32).transpose(1, 2).reshape(-1, 2, 2, 64).transpose(1, 2)
            h = x.reshape(-1, 4, 64)
            h = torch.nn.functional.layer_norm(h, (64,), state["mlp1.0.weight"], state["mlp1.0.bias"])
            h = torch.nn.functional.gelu(h @ state["mlp1.1.weight"].T + state["mlp1.1.bias"])
            features.append(h @ state["mlp1.3.weight"].T + state["mlp1.3.bias"])
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        embeds = llm.embed_tokens(ids)
        if features:
            slots = ids[0] == config["img_context_token_id"]
            embeds[0, slots] = torch.cat([f.reshape(-1, 32) for f in features])
        for layer in llm.layers:
            layer.self_attn.is_causal = False
        hidden = llm(inputs_embeds=embeds, attention_mask=torch.ones(1, 1, ids.shape[1], ids.shape[1], dtype=torch.bool),
                     use_cache=False).last_hidden_state[0]
        scores.append(torch.sigmoid(hidden.mean(0) @ state["score.weight"].T))
    return torch.stack(scores)
