"""ComfyUI's own CLIP_VISION (the core CLIPVisionLoader's output) as a DNO ``ClipBackbone``.

The reward then scores with the model the host already loaded, differentiably in the pixels:

* The host's ``CLIPLayer.forward`` adds its residuals in place (``x += ...``), which autograd
  refuses (the LayerNorm before it saved that tensor). ``image_embeds`` runs the same modules
  with the same attention function, adding out of place: the same numbers, with a gradient.
* The host's ``clip_preprocess`` rounds to 8 bit (no gradient); the backbone uses the pack's
  differentiable preprocessing with the model's own size, mean and std, as for a file.
* The host loaded the weights under inference mode: the reward node hands ``host_model`` to
  ``ManagedReward``, which loads it through its own ModelPatcher and swaps its inference tensors
  for ordinary ones (``make_autograd_ready``).
"""
from __future__ import annotations

import torch

import comfy.clip_model
from comfy.ldm.modules.attention import optimized_attention_for_device

from ..dno import DNOError
from ..dno.rewards import ClipBackbone, ClipPreprocess


def check_clip_vision(clip_vision, input_name: str) -> None:
    """A CLIP image tower (class token, projection), not SigLIP / DINOv2, else a DNOError."""
    model = getattr(clip_vision, "model", None)
    if not isinstance(model, comfy.clip_model.CLIPVisionModelProjection):
        raise DNOError(f"{input_name} is a {type(model).__name__} image encoder; this reward needs a CLIP "
                       "vision model: load a CLIP ViT file with the Load CLIP Vision node")
    if model.vision_model.embeddings.class_embedding is None:
        raise DNOError(f"{input_name} is a SigLIP vision model (no class token); this reward needs a CLIP "
                       "vision model: load a CLIP ViT file with the Load CLIP Vision node")


def image_embeds(model, pixels: torch.Tensor) -> torch.Tensor:
    """``CLIPVisionModelProjection(pixel_values)[2]`` (projected image embeddings), with the
    residuals added out of place so that autograd can go through it."""
    vision = model.vision_model
    x = vision.pre_layrnorm(vision.embeddings(pixels))
    attention = optimized_attention_for_device(x.device, mask=False, small_input=True)
    for layer in vision.encoder.layers:
        x = x + layer.self_attn(layer.layer_norm1(x), None, attention)
        x = x + layer.mlp(layer.layer_norm2(x))
    return model.visual_projection(vision.post_layernorm(x[:, 0, :]))


class HostClipVisionBackbone(ClipBackbone):
    """The image tower of a host CLIP_VISION. The host model is kept outside this module's
    children: its own ModelPatcher loads and offloads it, not the reward's."""

    layout = "comfy_clip_vision"

    def __init__(self, clip_vision):
        check_clip_vision(clip_vision, "clip_vision")
        preprocess = ClipPreprocess(size=int(clip_vision.image_size), mean=tuple(clip_vision.image_mean),
                                    std=tuple(clip_vision.image_std), crop_rounding="floor")
        super().__init__(preprocess, has_text=False)
        self._host = (clip_vision,)

    @property
    def clip_vision(self):
        return self._host[0]

    @property
    def host_model(self):
        """(ModelPatcher, module) of the host model this backbone runs."""
        return self.clip_vision.patcher, self.clip_vision.model

    @property
    def device(self) -> torch.device:
        return next(self.clip_vision.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        # the host feeds float32 pixels and its manual-cast layers cast the weights to them
        return torch.float32

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return image_embeds(self.clip_vision.model, pixels)

    def image_embedding_size(self) -> int:
        projection = self.clip_vision.model.visual_projection
        if isinstance(projection, torch.nn.Module):
            return int(projection.weight.shape[0])
        return int(self.clip_vision.model.vision_model.post_layernorm.weight.shape[0])
