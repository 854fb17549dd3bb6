"""SD1.5, SDXL and the DiT families built with ComfyUI's own classes and random, initialised weights.

No weights can be downloaded here, and speed and memory do not depend on the
values, so the benchmark builds the real architectures (ComfyUI's model
configs, ``BaseModel``/``SDXL``, ``ModelPatcher``, ``comfy.sd.VAE``) and fills
every parameter: ComfyUI's ``ops`` leave weights uninitialised, and NaNs
would be a bug. ``tiny=True`` shrinks the UNet for CPU smoke tests (the VAE
is always the real SD KL VAE). The DiT families (Flux.1, Flux.2, Chroma, Qwen-Image,
Z-Image, SD3.5) are in ``dit_models``; ``build`` takes them too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "fp64": torch.float64,   # fp64: the CPU gradient tests' reference precision
          "fp8_e4m3fn": torch.float8_e4m3fn}   # weights only, as ComfyUI's loaders' weight_dtype

# ComfyUI 0.3.75 model_detection.unet_config_from_diffusers_unet: the released architectures.
SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
    "context_dim": 768, "num_heads": 8, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
SDXL_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
    "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
    "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
    "context_dim": 2048, "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
# Same families, a few MB: for CPU smoke tests of the benchmark itself.
TINY = {
    "sd15": {**SD15_UNET, "model_channels": 32, "num_res_blocks": [1, 1], "channel_mult": [1, 2],
             "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1],
             "transformer_depth_middle": 1},
    "sdxl": {**SDXL_UNET, "model_channels": 64, "num_res_blocks": [1, 1], "channel_mult": [1, 2],
             "transformer_depth": [0, 1], "transformer_depth_output": [0, 0, 1, 1],
             "transformer_depth_middle": 1},
}
FULL = {"sd15": SD15_UNET, "sdxl": SDXL_UNET}
RESOLUTION = {"sd15": 512, "sdxl": 1024}
TEXT = {"sd15": (768, None), "sdxl": (2048, 1280)}   # cross-attention width, pooled width


@dataclass
class Bench:
    kind: str
    model: object        # comfy.model_patcher.ModelPatcher
    vae: object          # comfy.sd.VAE
    positive: list
    negative: list
    width: int
    height: int
    steps: int = 50      # the family's usual sampling steps, CFG and scheduler
    cfg: float = 5.0
    scheduler: str = "normal"
    params: int = 0      # weights of the diffusion model (parameters and buffers)

    def empty_latent(self, batch: int = 1) -> torch.Tensor:
        """What the family's Empty*LatentImage node gives: the model's latent channels at the VAE's
        spatial compression (4 x /8 for SD, 16 x /8 for Flux.1/SD3/Qwen, 128 x /16 for Flux.2)."""
        channels = self.model.model.latent_format.latent_channels
        factor = self.vae.spacial_compression_decode()
        return torch.zeros(batch, channels, self.height // factor, self.width // factor)


@torch.no_grad()
def init_random_(module: torch.nn.Module, seed: int, scale: float = 0.5) -> int:
    """Fill every parameter: weights ~ N(0, scale^2 / fan_in), norm scales 1, biases 0.

    Fan-in scaling keeps activations O(1) through the deep UNet; the values
    are drawn on the parameter's device in its dtype, so SDXL fills in a blink.
    Returns the number of tensors filled.
    """
    gen = {}
    count = 0
    for name, p in module.named_parameters():
        if p.device not in gen:
            gen[p.device] = torch.Generator(device=p.device).manual_seed(seed)
        if p.dim() >= 2:
            fan_in = p[0].numel()
            p.copy_(torch.randn(p.shape, generator=gen[p.device], device=p.device, dtype=torch.float32)
                    .mul_(scale / math.sqrt(fan_in)).to(p.dtype))
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.fill_(1.0)
        count += 1
    return count


def build_model(kind: str, precision: str, device: torch.device, tiny: bool = False, seed: int = 0):
    """A ModelPatcher over ComfyUI's SD15 / SDXL model with weights in ``precision``."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models as sm
    config_class = {"sd15": sm.SD15, "sdxl": sm.SDXL}[kind]
    unet = dict((TINY if tiny else FULL)[kind])
    model_config = config_class(unet)
    dtype = DTYPES[precision]
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({}, "", device=device)
    init_random_(model.diffusion_model, seed)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=mm.unet_offload_device())


def random_state_dict(layout: dict, seed: int = 0) -> dict:
    """Random CPU tensors for a state-dict layout (meta tensors): weights ~ N(0, 0.25 / fan_in),
    biases and running means 0, norm scales (``gamma``) and running variances 1."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for key, t in layout.items():
        if key.endswith(("bias", "running_mean", "num_batches_tracked")):
            sd[key] = torch.zeros(t.shape, dtype=t.dtype)
        elif t.dim() >= 2 and not key.endswith("gamma"):
            sd[key] = torch.randn(t.shape, generator=gen) * (0.5 / math.sqrt(t[0].numel()))
        else:
            sd[key] = torch.ones(t.shape)
    return sd


def vae_state_dict(seed: int = 0) -> dict:
    """A random state dict in the SD KL-VAE layout (the layout read off ComfyUI's own module)."""
    from comfy.ldm.models.autoencoder import AutoencoderKL
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
                "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [],
                "dropout": 0.0}
    with torch.device("meta"):
        layout = AutoencoderKL(ddconfig=ddconfig, embed_dim=4).state_dict()
    return random_state_dict(layout, seed)


def build_vae(precision: str, device: torch.device):
    """``comfy.sd.VAE`` from a random KL state dict; ComfyUI picks its dtype (bf16 on recent
    GPUs) except for the fp32 configuration, which runs it in fp32."""
    import comfy.sd
    dtype = torch.float32 if precision == "fp32" else None
    return comfy.sd.VAE(sd=vae_state_dict(), device=device, dtype=dtype)


def conditioning(kind: str, width: int, height: int, device, seed: int = 0):
    """Random text conditioning in CLIPTextEncode's output format, positive and negative."""
    gen = torch.Generator().manual_seed(seed)
    cross, pooled = TEXT[kind]
    out = []
    for _ in range(2):
        extra = {}
        if pooled is not None:
            extra = {"pooled_output": torch.randn(1, pooled, generator=gen), "width": width,
                     "height": height, "crop_w": 0, "crop_h": 0, "target_width": width,
                     "target_height": height}
        out.append([[torch.randn(1, 77, cross, generator=gen), extra]])
    return out


def build(kind: str, precision: str, device, tiny: bool = False, resolution: int = 0, weights: str = "") -> Bench:
    """``weights``: the diffusion model's weight dtype when it differs from ``precision`` (fp8_e4m3fn:
    stored in fp8, computed in ComfyUI's manual-cast dtype, as its loaders' weight_dtype does)."""
    if kind not in FULL:
        return build_family(kind, precision, device, tiny, resolution, weights=weights)
    if weights:
        raise ValueError("--weight-dtype is for the DiT families")
    size = resolution or (64 if tiny else RESOLUTION[kind])
    model = build_model(kind, precision, torch.device(device), tiny)
    vae = build_vae(precision, torch.device(device))
    positive, negative = conditioning(kind, size, size, device)
    return Bench(kind, model, vae, positive, negative, size, size,
                 params=sum(t.numel() for t in model.model.diffusion_model.state_dict().values()))


def build_family(kind: str, precision: str, device, tiny: bool = False, resolution: int = 0,
                 seed: int = 0, weights: str = "") -> Bench:
    """A DiT family of ``dit_models.FAMILIES``: model, VAE, conditioning, steps, CFG, scheduler."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import dit_models
    family = dit_models.FAMILIES[kind]
    device = torch.device(device)
    size = resolution or (64 if tiny else family.resolution)
    model = dit_models.build_diffusion_model(kind, DTYPES[weights or precision], device, tiny, seed)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=mm.unet_offload_device())
    vae = dit_models.build_vae(family.vae, precision, device, tiny, seed)
    positive, negative = dit_models.conditioning(kind, model.latent_format, size, size, seed,
                                                 tokens=dit_models.TINY_TOKENS if tiny else 0)
    return Bench(kind, patcher, vae, positive, negative, size, size, steps=family.steps, cfg=family.cfg,
                 scheduler=family.scheduler, params=dit_models.weight_count(model.diffusion_model))
