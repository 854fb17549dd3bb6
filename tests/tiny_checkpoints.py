"""Tiny random-weight checkpoints in real formats, detected by ComfyUI's own loaders.

``sd15_checkpoint()`` writes an SD1.5-family single-file checkpoint (``model.diffusion_model.*``,
``first_stage_model.*``, ``cond_stage_model.transformer.text_model.*`` keys, fp16 safetensors,
as in the released SD1.5 files) that ``CheckpointLoaderSimple`` /
``comfy.sd.load_checkpoint_guess_config`` detect as ``SD15``.

What ComfyUI 0.3.75 allows to be small (see /work/notes/host_findings.md):

* UNet: detection reads the layout from the keys; the ``SD15`` entry only pins
  ``model_channels=320``, ``context_dim=768``, conv (not linear) transformer projections, no
  ``adm``. So one level with one res block + one transformer block, no middle block and plain
  output blocks is accepted (~13M params).
* Text encoder: ``SD1ClipModel`` always builds the full CLIP-L text model from a fixed json
  (12 layers, 768 wide, 49408 tokens, 123M params); missing keys would stay uninitialised, so
  all of it is written (the bulk of the file).
* VAE: the KL VAE config is fixed (ch 128, ch_mult 1,2,4,4; 83M params), so ``vae="kl"``
  writes all of it. ``vae="taesd"`` writes TAESD keys under ``first_stage_model.`` instead,
  which ComfyUI's VAE detection also accepts (1.2M params): same 8x downscale, much faster
  decode. Both are real VAE layouts ComfyUI reads.

``sd3_checkpoint()`` writes the flow-matching family: a 2-block MMDiT that detection maps to
``SD3`` (``ModelType.FLOW``), CLIP-L only, and a 16-channel VAE. Flux/SDXL/SD2 cannot be made
small (their detection pins large widths); v-prediction comes from the host's
``ModelSamplingDiscrete`` node applied to the SD1.5 model.

Key names and shapes come from instantiating ComfyUI's own modules on the ``meta`` device,
so they are exactly what its loaders expect; values are seeded per key, so a file is
deterministic. Files are cached under ``<repo>/.cache/tiny_checkpoints`` by a content key.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zlib
from pathlib import Path

import torch

from comfy_host import CACHE_DIR, _file_lock, import_comfy

FORMAT_VERSION = 3  # bump when the generator changes, so cached files are rebuilt

# The smallest UNet that ComfyUI's detection maps to the SD15 model config.
TINY_SD15_UNET = {
    "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "num_res_blocks": [1], "channel_mult": [1], "transformer_depth": [1],
    "transformer_depth_output": [0, 0], "transformer_depth_middle": -2,
    "context_dim": 768, "num_heads": 8, "num_head_channels": -1,
    "use_spatial_transformer": True, "use_linear_in_transformer": False, "legacy": False,
    "adm_in_channels": None, "use_checkpoint": False,
    "use_temporal_resblock": False, "use_temporal_attention": False,
}

# ComfyUI's fixed SD1.x KL-VAE config (comfy/sd.py VAE.__init__ default branch).
SD_KL_VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3,
             "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2,
             "attn_resolutions": [], "dropout": 0.0}

VAE_KINDS = ("kl", "taesd")


# --------------------------------------------------------------------------- layouts

def _meta_shapes(module: torch.nn.Module) -> dict[str, tuple[torch.Size, torch.dtype]]:
    return {k: (v.shape, v.dtype) for k, v in module.state_dict().items()}


def sd15_unet_layout(unet_config: dict = TINY_SD15_UNET) -> dict:
    import_comfy()
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    unet = UNetModel(**unet_config, device="meta", operations=comfy.ops.disable_weight_init)
    return {"model.diffusion_model." + k: v for k, v in _meta_shapes(unet).items()}


def sd15_controlnet_layout(unet_config: dict = TINY_SD15_UNET) -> dict:
    """A ControlNet for the tiny SD1.5 UNet (its encoder copy, zero convs and the hint
    encoder), under ``control_model.`` as in the released SD1.5 ControlNet files."""
    import_comfy()
    import comfy.ops
    from comfy.cldm.cldm import ControlNet
    config = {k: v for k, v in unet_config.items() if k != "out_channels"}
    net = ControlNet(**config, hint_channels=3, device="meta", operations=comfy.ops.disable_weight_init)
    return {"control_model." + k: v for k, v in _meta_shapes(net).items()}


# The smallest MMDiT that ComfyUI's detection maps to the SD3 model config: only
# in_channels=16 is pinned; depth comes from hidden_size // 64 and the block count.
TINY_SD3_MMDIT = {
    "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "input_size": None,
    "adm_in_channels": 2048, "num_patches": 1024, "pos_embed_max_size": 32,
    "pos_embed_scaling_factor": None, "x_block_self_attn_layers": [],
    "context_embedder_config": {"target": "torch.nn.Linear",
                                "params": {"in_features": 4096, "out_features": 128}},
}


def sd3_mmdit_layout(config: dict = TINY_SD3_MMDIT) -> dict:
    import_comfy()
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT
    mmdit = MMDiT(**config, device="meta", operations=comfy.ops.disable_weight_init)
    return {"model.diffusion_model." + k: v for k, v in _meta_shapes(mmdit).items()}


def clip_l_layout(prefix: str = "cond_stage_model.transformer.") -> dict:
    """CLIP-L text model keys; SD1.5 files use ``cond_stage_model.transformer.``, SD3 files
    ``text_encoders.clip_l.transformer.``."""
    import_comfy()
    import comfy.clip_model
    import comfy.ops
    config = json.loads((Path(comfy.clip_model.__file__).parent / "sd1_clip_config.json").read_text())
    clip = comfy.clip_model.CLIPTextModel(config, torch.float32, "meta",
                                          comfy.ops.disable_weight_init)
    # SD1.5 files carry the HF text model only; ComfyUI's SD15 saver drops the projection too.
    return {prefix + k: v for k, v in _meta_shapes(clip).items()
            if k.startswith("text_model.")}


def sd_vae_layout(kind: str, latent_channels: int = 4) -> dict:
    """SD1.x KL VAE (with quant convs, 4 channels) or, for 16 channels, the SD3 layout of
    the same network without quant convs; or TAESD with that many latent channels."""
    import_comfy()
    if kind == "kl":
        from comfy.ldm.models.autoencoder import AutoencoderKL
        with torch.device("meta"):
            vae = AutoencoderKL(ddconfig={**SD_KL_VAE, "z_channels": latent_channels},
                                embed_dim=latent_channels)
        shapes = _meta_shapes(vae)
        if latent_channels != 4:
            shapes = {k: v for k, v in shapes.items() if "quant_conv." not in k}
    elif kind == "taesd":
        from comfy.taesd.taesd import TAESD
        with torch.device("meta"):
            vae = TAESD(latent_channels=latent_channels)
        shapes = _meta_shapes(vae)
    else:
        raise ValueError(f"vae={kind!r} is not one of {VAE_KINDS}")
    return {"first_stage_model." + k: v for k, v in shapes.items()}


# --------------------------------------------------------------------------- values

def _init_tensor(key: str, shape: torch.Size, dtype: torch.dtype, seed: int,
                 gain: float) -> torch.Tensor:
    """Random but tame values: activations stay O(1) so every output is finite."""
    name = key.rsplit(".", 1)[-1]
    if not dtype.is_floating_point:
        raise ValueError(f"unexpected non-float tensor {key} ({dtype}) in a layout")
    if key.endswith("vae_scale"):
        return torch.ones(shape)
    if key.endswith("vae_shift") or name == "bias" or len(shape) == 0:
        return torch.zeros(shape)
    if len(shape) == 1:  # norm scales
        return torch.ones(shape)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
    if "embedding" in key or name == "pos_embed":  # lookup tables, as small as CLIP's init
        return torch.randn(shape, generator=gen) * 0.02
    fan_in = int(torch.tensor(shape[1:]).prod())
    return torch.randn(shape, generator=gen) * (gain / fan_in ** 0.5)


def _constant_overrides(layout: dict) -> dict[str, float]:
    """TAESD's decoder output *is* the image in [0, 1] (clamped): centring its last bias at
    0.5 keeps the random image off the clamp, so a differentiable decode has gradient."""
    prefix = "first_stage_model.taesd_decoder."
    last = max((int(k[len(prefix):].split(".")[0]) for k in layout if k.startswith(prefix)),
               default=None)
    return {} if last is None else {f"{prefix}{last}.bias": 0.5}


def build_state_dict(layout: dict, seed: int, dtype: torch.dtype = torch.float16,
                     gain: float = 1.0) -> dict:
    constants = _constant_overrides(layout)
    out = {}
    for k, (shape, dt) in layout.items():
        value = (torch.full(shape, constants[k]) if k in constants
                 else _init_tensor(k, shape, dt, seed, gain))
        out[k] = value.to(dtype)
    return out


# --------------------------------------------------------------------------- files

def _content_key(spec: dict) -> str:
    blob = json.dumps({"v": FORMAT_VERSION, **spec}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _cached_file(name: str, spec: dict, build) -> Path:
    """Build ``name`` once per content key; concurrent callers wait on a lock."""
    folder = CACHE_DIR / "tiny_checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{_content_key(spec)}.safetensors"
    if path.is_file():
        return path
    with _file_lock(folder / ".lock"):
        if not path.is_file():
            fd, tmp = tempfile.mkstemp(dir=folder, suffix=".partial")
            os.close(fd)
            try:
                build(Path(tmp))
                os.chmod(tmp, 0o644)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            # Entries of the same name from older generator versions are dead weight.
            for stale in folder.glob(f"{name}-*.safetensors"):
                if stale != path:
                    stale.unlink(missing_ok=True)
    return path


def _place(path: Path, folder: Path | str | None, filename: str | None) -> Path:
    if folder is None:
        return path
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / (filename or path.name)
    if dest.exists() or dest.is_symlink():
        dest.unlink()
    try:
        os.link(path, dest)  # cheap and independent of the cache entry's later removal
    except OSError:
        shutil.copyfile(path, dest)
    return dest


def sd15_checkpoint(folder: Path | str | None = None, *, seed: int = 0, vae: str = "kl",
                    filename: str | None = None) -> Path:
    """Path of a tiny SD1.5-family checkpoint (``.safetensors``), placed in ``folder`` if given.

    ``vae="kl"``: the SD1.x KL VAE (as in real SD1.5 files; ~440 MB file, mostly CLIP + VAE).
    ``vae="taesd"``: TAESD as the checkpoint's VAE (~280 MB, decodes much faster).
    """
    if vae not in VAE_KINDS:
        raise ValueError(f"vae={vae!r} is not one of {VAE_KINDS}; pick 'kl' (SD1.5's own VAE "
                         "layout) or 'taesd' (small and fast)")
    spec = {"family": "sd15", "unet": TINY_SD15_UNET, "vae": vae, "seed": seed,
            "dtype": "fp16"}

    def build(tmp: Path) -> None:
        from safetensors.torch import save_file
        layout = {**sd15_unet_layout(), **sd_vae_layout(vae), **clip_l_layout()}
        save_file(build_state_dict(layout, seed), str(tmp),
                  metadata={"dno_tiny_checkpoint": json.dumps(spec, default=str)})

    path = _cached_file(f"tiny-sd15-{vae}-s{seed}", spec, build)
    return _place(path, folder, filename)


def sd3_checkpoint(folder: Path | str | None = None, *, seed: int = 0, vae: str = "taesd",
                   filename: str | None = None) -> Path:
    """Path of a tiny SD3-family (rectified flow, ComfyUI ``ModelType.FLOW``) checkpoint.

    Keys as in SD3-medium single files: a 2-block MMDiT under ``model.diffusion_model.``, the
    VAE (16 latent channels) under ``first_stage_model.``, and only CLIP-L under
    ``text_encoders.clip_l.`` -- ComfyUI's SD3 text encoder pads the missing CLIP-G/T5
    outputs with zeros, so ``CLIPTextEncode`` works from this one file.
    """
    if vae not in VAE_KINDS:
        raise ValueError(f"vae={vae!r} is not one of {VAE_KINDS}")
    spec = {"family": "sd3", "mmdit": TINY_SD3_MMDIT, "vae": vae, "seed": seed,
            "dtype": "fp16"}

    def build(tmp: Path) -> None:
        from safetensors.torch import save_file
        layout = {**sd3_mmdit_layout(), **sd_vae_layout(vae, latent_channels=16),
                  **clip_l_layout("text_encoders.clip_l.transformer.")}
        save_file(build_state_dict(layout, seed), str(tmp),
                  metadata={"dno_tiny_checkpoint": json.dumps(spec, default=str)})

    path = _cached_file(f"tiny-sd3-{vae}-s{seed}", spec, build)
    return _place(path, folder, filename)


def sd15_controlnet(folder: Path | str | None = None, *, seed: int = 0,
                    filename: str | None = None) -> Path:
    """Path of a tiny SD1.5 ControlNet (``.safetensors``, ``control_model.*`` keys, fp16) that
    ``ControlNetLoader`` / ``comfy.controlnet.load_controlnet`` read. Its zero convs are random,
    not zero, so the control visibly changes the sample."""
    spec = {"family": "sd15-controlnet", "unet": TINY_SD15_UNET, "seed": seed, "dtype": "fp16"}

    def build(tmp: Path) -> None:
        from safetensors.torch import save_file
        save_file(build_state_dict(sd15_controlnet_layout(), seed), str(tmp),
                  metadata={"dno_tiny_checkpoint": json.dumps(spec, default=str)})

    path = _cached_file(f"tiny-sd15-controlnet-s{seed}", spec, build)
    return _place(path, folder, filename)
