"""A CLIP model read from a file in either of the two layouts users have.

* open_clip layout (``visual.conv1.weight``, ``token_embedding.weight``, ...): open_clip's
  ``pytorch_model.bin`` / ``open_clip_model.safetensors`` and the HPSv2 checkpoints.
* Hugging Face ``CLIPModel`` layout (``vision_model.*``, ``text_model.*``, ``visual_projection``):
  PickScore, ``openai/clip-vit-large-patch14``, and ComfyUI ``clip_vision`` files (vision only).

The architecture is inferred from the tensor shapes (see :mod:`clip_shapes`) or, for a Hugging Face
folder, read from its ``config.json``. The activation cannot be seen in the weights: OpenAI-trained
CLIPs use QuickGELU, LAION-trained ones GELU, so callers state it (``quick_gelu``).
open_clip and transformers are imported here, lazily, so ``import dno`` stays light.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

import torch

from . import clip_shapes
from .loading import RewardFileError, load_state_dict, read_json
from .preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ClipPreprocess

OPEN_CLIP_MARKER = "visual.conv1.weight"
HF_MARKER = "vision_model.embeddings.patch_embedding.weight"


def detect_layout(state: Dict[str, torch.Tensor]) -> Optional[str]:
    if OPEN_CLIP_MARKER in state:
        return "open_clip"
    if HF_MARKER in state:
        return "hf"
    return None


class ClipBackbone(torch.nn.Module):
    """Image and text towers of one CLIP model, frozen, with the tokenizer it was trained with."""

    layout: str = ""

    def __init__(self, preprocess: ClipPreprocess, has_text: bool):
        super().__init__()
        self.preprocess = preprocess
        self.has_text = has_text

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Projected image embeddings (not normalised) of already preprocessed pixels."""
        raise NotImplementedError

    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """Projected text embeddings (not normalised)."""
        raise NotImplementedError

    def logit_scale(self) -> torch.Tensor:
        """``exp(logit_scale)`` as trained (100 for released CLIPs)."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def image_embedding_size(self) -> int:
        """Width of the image embeddings (one probe of a blank image)."""
        size = self.preprocess.size
        with torch.no_grad():
            return int(self.encode_image(torch.zeros(1, 3, size, size, device=self.device, dtype=self.dtype)).shape[-1])

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised embeddings of (B, 3, H, W) images in [0, 1]; differentiable in the pixels.

        The resize and normalisation run in fp32 (antialiased bicubic has no bf16 kernel on a
        CPU, and 8-bit-exact rounding needs the precision), the towers in the weights' dtype.
        """
        pixels = self.preprocess(images.to(device=self.device, dtype=torch.float32)).to(self.dtype)
        return torch.nn.functional.normalize(self.encode_image(pixels).float(), dim=-1)

    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        if not self.has_text:
            raise ValueError(
                "This CLIP file has no text tower (an image-only clip_vision file?); the reward "
                "needs the full CLIP model with its text encoder."
            )
        with torch.no_grad():
            return torch.nn.functional.normalize(self.encode_text(prompts).float(), dim=-1)


def _simple_tokenizer(context_length: int):
    # open_clip ships its BPE vocabulary inside the package: nothing is downloaded.
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)


class OpenClipBackbone(ClipBackbone):
    layout = "open_clip"

    def __init__(self, model, preprocess: ClipPreprocess, has_text: bool, context_length: int):
        super().__init__(preprocess, has_text)
        self.model = model
        self.tokenizer = _simple_tokenizer(context_length) if has_text else None

    def encode_image(self, pixels):
        visual = self.model.visual if self.has_text else self.model
        return visual(pixels)

    def encode_text(self, prompts):
        tokens = self.tokenizer(list(prompts)).to(self.device)
        return self.model.encode_text(tokens)

    def logit_scale(self):
        return self.model.logit_scale.exp()


class HFClipBackbone(ClipBackbone):
    layout = "hf"

    def __init__(self, model, preprocess: ClipPreprocess, has_text: bool, tokenizer, context_length: int):
        super().__init__(preprocess, has_text)
        self.model = model
        self.hf_tokenizer = tokenizer
        self.context_length = context_length

    def encode_image(self, pixels):
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        return self.model.visual_projection(pooled)

    def _tokens(self, prompts: List[str]) -> torch.Tensor:
        if self.hf_tokenizer is not None:
            batch = self.hf_tokenizer(
                prompts, padding="max_length", truncation=True,
                max_length=self.context_length, return_tensors="pt",
            )
            return batch["input_ids"]
        return _simple_tokenizer(self.context_length)(prompts)

    def encode_text(self, prompts):
        tokens = self._tokens(list(prompts)).to(self.device)
        pooled = self.model.text_model(input_ids=tokens).pooler_output
        return self.model.text_projection(pooled)

    def logit_scale(self):
        return self.model.logit_scale.exp()


def _load_strict(module: torch.nn.Module, state: Dict[str, torch.Tensor], path: str, expected: str):
    result = module.load_state_dict(state, strict=False)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing or unexpected:
        raise RewardFileError(
            f"'{path}' does not match the {expected} architecture inferred from its shapes: "
            f"missing {missing[:4]}{' ...' if len(missing) > 4 else ''}, unexpected "
            f"{unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}. This CLIP variant is not "
            "supported; use a standard ViT CLIP checkpoint."
        )


def _freeze(module: torch.nn.Module) -> torch.nn.Module:
    module.eval()
    module.requires_grad_(False)
    return module


def build_open_clip(
    state: Dict[str, torch.Tensor], path: str, quick_gelu: bool, preprocess: Optional[ClipPreprocess]
) -> OpenClipBackbone:
    import open_clip.model as oc_model

    try:
        vision_cfg = clip_shapes.open_clip_vision_config(state)
        text_cfg = clip_shapes.open_clip_text_config(state)
        embed_dim = clip_shapes.open_clip_embed_dim(state)
    except (KeyError, ValueError, IndexError) as exc:
        raise RewardFileError(
            f"'{path}' looks like an open_clip checkpoint but its shapes are not a ViT CLIP: {exc}"
        ) from exc
    if text_cfg is not None:
        model = oc_model.CLIP(embed_dim, vision_cfg=vision_cfg, text_cfg=text_cfg, quick_gelu=quick_gelu)
        _load_strict(model, state, path, "open_clip CLIP")
        context_length = text_cfg["context_length"]
    else:
        model = oc_model._build_vision_tower(embed_dim, vision_cfg, quick_gelu=quick_gelu)
        visual = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
        _load_strict(model, visual, path, "open_clip vision tower")
        context_length = 0
    preprocess = preprocess or ClipPreprocess(size=vision_cfg["image_size"])
    return _freeze(OpenClipBackbone(model.float(), preprocess, text_cfg is not None, context_length))


def _hf_folder_config(folder: str):
    from transformers import CLIPConfig

    if read_json(os.path.join(folder, "config.json")) is None:
        return None
    return CLIPConfig.from_pretrained(folder, local_files_only=True)


def _hf_folder_tokenizer(folder: Optional[str]):
    if folder is None:
        return None
    if not all(os.path.isfile(os.path.join(folder, f)) for f in ("vocab.json", "merges.txt")):
        return None
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(folder, local_files_only=True)


def _hf_folder_preprocess(folder: Optional[str], image_size: int) -> ClipPreprocess:
    spec = read_json(os.path.join(folder, "preprocessor_config.json")) if folder else None
    spec = spec or {}
    crop = spec.get("crop_size", image_size)
    size = crop.get("height", image_size) if isinstance(crop, dict) else int(crop)
    return ClipPreprocess(
        size=size,
        mean=tuple(spec.get("image_mean", OPENAI_CLIP_MEAN)),
        std=tuple(spec.get("image_std", OPENAI_CLIP_STD)),
        crop_rounding="floor",  # CLIPImageProcessor floors the crop offset
    )


def _hf_model_folder(path: str) -> Optional[str]:
    """The HF folder that ``path`` is, or whose weight file it is (config.json says CLIP)."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    config = read_json(os.path.join(folder, "config.json")) if folder else None
    if config is not None and config.get("model_type") == "clip":
        return folder
    return None


def build_hf_clip(
    state: Dict[str, torch.Tensor], path: str, quick_gelu: bool, preprocess: Optional[ClipPreprocess]
) -> HFClipBackbone:
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    folder = _hf_model_folder(path)
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    act = "quick_gelu" if quick_gelu else "gelu"
    try:
        vision = clip_shapes.hf_vision_config(state)
        text = clip_shapes.hf_text_config(state)
    except (KeyError, ValueError, IndexError) as exc:
        raise RewardFileError(
            f"'{path}' looks like a Hugging Face CLIP checkpoint but its shapes are not a ViT "
            f"CLIP: {exc}"
        ) from exc
    config = _hf_folder_config(folder) if folder else None
    if text is not None:
        if config is None:
            projection_dim = vision.pop("projection_dim")
            text.pop("projection_dim")
            config = CLIPConfig(
                text_config=dict(text, hidden_act=act),
                vision_config=dict(vision, hidden_act=act),
                projection_dim=projection_dim,
            )
        model = CLIPModel(config)
        _load_strict(model, state, path, "Hugging Face CLIPModel")
    else:
        vision_config = config.vision_config if config is not None else CLIPVisionConfig(
            **dict(vision, hidden_act=act)
        )
        model = CLIPVisionModelWithProjection(vision_config)
        _load_strict(model, state, path, "Hugging Face CLIP vision model")
    image_size = model.config.image_size if text is None else model.config.vision_config.image_size
    preprocess = preprocess or _hf_folder_preprocess(folder, image_size)
    context = text["max_position_embeddings"] if text is not None else 0
    if text is not None and config is not None:
        context = model.config.text_config.max_position_embeddings
    backbone = HFClipBackbone(
        model.float(), preprocess, text is not None, _hf_folder_tokenizer(folder), context
    )
    return _freeze(backbone)


def load_clip_backbone(
    path: str,
    quick_gelu: bool,
    preprocess: Optional[ClipPreprocess] = None,
    expected: str = "a CLIP checkpoint (open_clip or Hugging Face CLIPModel layout)",
    state: Optional[Dict[str, torch.Tensor]] = None,
) -> ClipBackbone:
    """Reads a CLIP model from ``path`` (file or HF folder) in whichever layout it has."""
    if state is None:
        state = load_state_dict(path, expected)
    layout = detect_layout(state)
    if layout == "open_clip":
        return build_open_clip(state, path, quick_gelu, preprocess)
    if layout == "hf":
        return build_hf_clip(state, path, quick_gelu, preprocess)
    sample = ", ".join(sorted(state)[:5])
    raise RewardFileError(
        f"'{path}' is not {expected}: found neither '{OPEN_CLIP_MARKER}' (open_clip) nor "
        f"'{HF_MARKER}' (Hugging Face); its first keys are: {sample}."
    )
