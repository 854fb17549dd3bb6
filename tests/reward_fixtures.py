"""Tiny random-weight reward models saved in the real file layouts (same keys and nesting as the
public checkpoints, small sizes), and the reference models they came from, for direct comparison.

Sizes: vision width 128 (2 heads of 64, as the loader infers for unknown widths), 2 layers,
32x32 images in 8x8 patches; text width 64 (1 head), 2 layers, the real 49408-token vocabulary
and 77-token context (the loaders use open_clip's bundled tokenizer).
"""
from __future__ import annotations

import os
import pickle
from typing import Dict, Tuple

import torch

TINY_EMBED = 32
TINY_IMAGE = 32
TINY_VISION = dict(image_size=TINY_IMAGE, layers=2, width=128, head_width=64, patch_size=8)
TINY_TEXT = dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=2)


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial weights everywhere (LayerNorms and biases included) so any mismatch shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=gen) * 0.05
            if name.endswith("logit_scale"):
                param.copy_(torch.tensor(4.6052))  # log(100), as trained CLIPs have
            elif param.ndim == 1 and ("ln" in name or "norm" in name) and name.endswith("weight"):
                param.copy_(1.0 + noise)
            else:
                param.copy_(param + noise if param.ndim > 1 else noise)


def tiny_open_clip(seed: int = 0, quick_gelu: bool = False):
    import open_clip.model as oc_model

    torch.manual_seed(seed)
    model = oc_model.CLIP(TINY_EMBED, vision_cfg=dict(TINY_VISION), text_cfg=dict(TINY_TEXT),
                          quick_gelu=quick_gelu)
    _randomize(model, seed)
    return model.eval()


def tiny_hf_clip(seed: int = 0, hidden_act: str = "gelu"):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=64, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=1,
                         max_position_embeddings=77, hidden_act=hidden_act),
        vision_config=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                           num_attention_heads=2, image_size=TINY_IMAGE, patch_size=8,
                           hidden_act=hidden_act),
        projection_dim=TINY_EMBED,
    )
    model = CLIPModel(config)
    _randomize(model, seed)
    return model.eval()


def tiny_aesthetic_state(embed: int = TINY_EMBED, seed: int = 0) -> Dict[str, torch.Tensor]:
    """``layers.{0,2,4,6,7}`` like ``sac+logos+ava1-l14-linearMSE.pth`` (768-1024-128-64-16-1)."""
    gen = torch.Generator().manual_seed(seed)
    dims = [embed, 48, 24, 16, 8, 1]
    state = {}
    for (index, (d_in, d_out)) in zip((0, 2, 4, 6, 7), zip(dims[:-1], dims[1:])):
        state[f"layers.{index}.weight"] = torch.randn(d_out, d_in, generator=gen) / d_in ** 0.5
        state[f"layers.{index}.bias"] = torch.randn(d_out, generator=gen) * 0.1
    return state


def save_safetensors(state: Dict[str, torch.Tensor], path: str) -> str:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, path)
    return path


def save_open_clip_file(directory: str, seed: int = 0, quick_gelu: bool = False) -> Tuple[str, object]:
    model = tiny_open_clip(seed, quick_gelu)
    path = save_safetensors(model.state_dict(), os.path.join(directory, "tiny_open_clip.safetensors"))
    return path, model


def save_hps_file(directory: str, seed: int = 1) -> Tuple[str, object]:
    """``{'state_dict': ...}`` in fp16, like ``HPS_v2_compressed.pt``."""
    model = tiny_open_clip(seed)
    state = {k: v.detach().half() for k, v in model.state_dict().items()}
    path = os.path.join(directory, "HPS_v2_tiny.pt")
    torch.save({"state_dict": state}, path)
    # the reference sees the same (fp16-rounded) weights the file holds
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return path, model


def save_hf_clip_folder(directory: str, seed: int = 2) -> Tuple[str, object]:
    model = tiny_hf_clip(seed)
    folder = os.path.join(directory, "pickscore_tiny")
    model.save_pretrained(folder, safe_serialization=True)
    return folder, model


def save_hf_clip_file(directory: str, seed: int = 2, hidden_act: str = "gelu") -> Tuple[str, object]:
    model = tiny_hf_clip(seed, hidden_act)
    path = save_safetensors(model.state_dict(), os.path.join(directory, "pickscore_tiny.safetensors"))
    return path, model


def save_aesthetic_file(directory: str, seed: int = 3, suffix: str = ".pth") -> Tuple[str, Dict]:
    state = tiny_aesthetic_state(seed=seed)
    path = os.path.join(directory, "sac+logos+ava1-l14-linearMSE" + suffix)
    if suffix == ".safetensors":
        save_safetensors(state, path)
    else:
        torch.save(state, path)
    return path, state


class _CreatesMarker:
    """A pickle whose loading would create a file: proof of code execution if it ever appears."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def save_malicious_pickle(path: str, marker: str) -> str:
    with open(path, "wb") as handle:
        # protocol 2: the classic GLOBAL/REDUCE form of a poisoned .pth
        pickle.dump({"layers.0.weight": _CreatesMarker(marker)}, handle, protocol=2)
    return path


def save_malicious_torch_file(path: str, marker: str) -> str:
    """Same payload inside torch's zip format, the way a real poisoned ``.pth`` is made."""
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _CreatesMarker(marker)}, path)
    return path
