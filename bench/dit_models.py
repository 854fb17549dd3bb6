"""The DiT families ComfyUI users run, built with ComfyUI's own classes and random weights.

Each family is the architecture ComfyUI loads from the released file:

* the diffusion model's config is what ``comfy.model_detection.model_config_from_unet``
  detects from a *signature*: the keys and shapes of the released checkpoint that the
  detection reads, as meta tensors (nothing is allocated), so the supported-model class and
  its ``unet_config`` are the host's own answer, not a copy of it;
* the VAE is ``comfy.sd.VAE(sd=...)`` from a random state dict in the released key layout,
  so the host's VAE detection picks the VAE class (16-channel KL for Flux.1 / Chroma /
  Z-Image / SD3.5, the batch-normed 32-channel KL of Flux.2, the Wan 2.1 VAE of Qwen-Image);
* the conditioning is random, in the shape the family's text encoder node gives (context width,
  a realistic token count, pooled output where the family has one) plus what FluxGuidance and
  ReferenceLatent add.

``tiny=True`` keeps every block type (two of each) at small widths, for CPU tests.
Full-size weights are created directly on the target device in the target dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass(frozen=True)
class Family:
    kind: str
    config_class: str               # comfy.supported_models.<name>, as the detection picks it
    signature: Callable[[], dict]   # released checkpoint: {key: shape} the detection reads
    tiny: dict                      # unet_config overrides for the CPU variant
    vae: str                        # "kl16" | "flux2" | "wan21" (key layout of the released VAE)
    context_dim: int                # width of the text tokens (c_crossattn)
    tokens: int                     # tokens of one short prompt, as the text encoder node gives them
    steps: int
    cfg: float
    pooled: Optional[int] = None    # pooled_output width
    guidance: Optional[float] = None  # FluxGuidance on the positive and negative
    reference_latent: bool = False  # ReferenceLatent on the positive (Kontext)
    resolution: int = 1024
    scheduler: str = "simple"
    note: str = ""


def _flux1(guidance_embed: bool) -> dict:
    """flux1-dev / flux1-schnell / flux1-kontext-dev (diffusion-model file, as UNETLoader reads it)."""
    sig = {"img_in.weight": (3072, 64), "txt_in.weight": (3072, 4096),
           "vector_in.in_layer.weight": (3072, 768)}
    if guidance_embed:
        sig["guidance_in.in_layer.weight"] = (3072, 256)
    sig.update({f"double_blocks.{i}.img_attn.norm.key_norm.scale": (128,) for i in range(19)})
    sig.update({f"single_blocks.{i}.norm.key_norm.scale": (128,) for i in range(38)})
    return sig


def _chroma() -> dict:
    """Chroma1-HD: Flux.1-schnell's trunk, no vector_in/guidance_in, a modulation approximator."""
    sig = {"img_in.weight": (3072, 64), "txt_in.weight": (3072, 4096),
           "distilled_guidance_layer.norms.0.scale": (5120,)}
    sig.update({f"double_blocks.{i}.img_attn.norm.key_norm.scale": (128,) for i in range(19)})
    sig.update({f"single_blocks.{i}.norm.key_norm.scale": (128,) for i in range(38)})
    return sig


def _flux2() -> dict:
    """FLUX.2-dev: global modulation, 128 latent channels (32 x 2x2), Mistral-3 text (3 x 5120)."""
    sig = {"img_in.weight": (6144, 128), "txt_in.weight": (6144, 15360),
           "guidance_in.in_layer.weight": (6144, 256),
           "double_stream_modulation_img.lin.weight": (6 * 2 * 6144, 6144)}
    sig.update({f"double_blocks.{i}.img_attn.norm.key_norm.scale": (128,) for i in range(8)})
    sig.update({f"single_blocks.{i}.norm.key_norm.scale": (128,) for i in range(48)})
    return sig


def _qwen_image() -> dict:
    """Qwen-Image (20B): 60 MMDiT blocks, Qwen2.5-VL-7B text (3584)."""
    sig = {"txt_norm.weight": (3584,), "img_in.weight": (3072, 64)}
    sig.update({f"transformer_blocks.{i}.img_mod.1.weight": (6 * 3072, 3072) for i in range(60)})
    return sig


def _z_image() -> dict:
    """Z-Image-Turbo (6B): Lumina-2 family, dim 3840, 30 layers, Qwen3-4B text (2560), pad tokens."""
    sig = {"cap_embedder.1.weight": (3840, 2560), "cap_pad_token": (1, 3840), "x_pad_token": (1, 3840)}
    sig.update({f"layers.{i}.attention.qkv.weight": (3 * 3840, 3840) for i in range(30)})
    return sig


def _sd35(depth: int, pos_embed_max_size: int, x_block_layers: int) -> dict:
    """SD3.5 MMDiT (diffusion-model keys; the all-in-one file has them under model.diffusion_model.)."""
    hidden = 64 * depth
    sig = {"joint_blocks.0.context_block.attn.qkv.weight": (3 * hidden, hidden),
           "joint_blocks.0.context_block.attn.ln_q.weight": (64,),
           "x_embedder.proj.weight": (hidden, 16, 2, 2),
           "final_layer.linear.weight": (2 * 2 * 16, hidden),
           "y_embedder.mlp.0.weight": (hidden, 2048),
           "context_embedder.weight": (hidden, 4096),
           "pos_embed": (1, pos_embed_max_size ** 2, hidden)}
    sig.update({f"joint_blocks.{i}.x_block.attn2.qkv.weight": (3 * hidden, hidden) for i in range(x_block_layers)})
    return sig


# Tiny variants: two blocks of every kind, widths of 64-128, the real text widths.
_TINY_FLUX = {"hidden_size": 64, "num_heads": 2, "axes_dim": [4, 14, 14], "depth": 2, "depth_single_blocks": 2}
_TINY_SD3 = {"depth": 2, "pos_embed_max_size": 16, "num_patches": 256,
             "context_embedder_config": {"target": "torch.nn.Linear",
                                         "params": {"in_features": 4096, "out_features": 128}}}

FAMILIES = {f.kind: f for f in [
    Family("flux-dev", "Flux", lambda: _flux1(True), _TINY_FLUX, "kl16", 4096, 256, steps=28, cfg=1.0,
           pooled=768, guidance=3.5, note="T5-XXL padded to 256 tokens, CLIP-L pooled"),
    Family("flux-schnell", "FluxSchnell", lambda: _flux1(False), _TINY_FLUX, "kl16", 4096, 256, steps=4,
           cfg=1.0, pooled=768),
    Family("flux-kontext", "Flux", lambda: _flux1(True), _TINY_FLUX, "kl16", 4096, 256, steps=28, cfg=1.0,
           pooled=768, guidance=2.5, reference_latent=True,
           note="reference image latent of the output's size (ReferenceLatent), FluxGuidance 2.5"),
    Family("flux2", "Flux2", _flux2, {**_TINY_FLUX, "axes_dim": [8, 8, 8, 8]}, "flux2", 15360, 128,
           steps=28, cfg=1.0, guidance=4.0,
           note="Mistral-3 layers 10/20/30 stacked (3 x 5120); Flux2.extra_conds pads to 512 tokens"),
    Family("chroma", "Chroma", _chroma, {**_TINY_FLUX, "out_dim": 64, "hidden_dim": 64, "n_layers": 2},
           "kl16", 4096, 128, steps=28, cfg=4.0, note="T5-XXL unpadded"),
    Family("qwen-image", "QwenImage", _qwen_image,
           {"num_layers": 2, "attention_head_dim": 32, "num_attention_heads": 2, "axes_dims_rope": (4, 14, 14)},
           "wan21", 3584, 128, steps=28, cfg=4.0, note="Qwen2.5-VL hidden states, template dropped"),
    Family("z-image", "ZImage", _z_image,
           # dim 256 at least: the host's Z-Image modulation assumes min(dim, 256) == 256
           {"dim": 256, "n_heads": 2, "n_kv_heads": 2, "n_layers": 2, "multiple_of": 64},
           "kl16", 2560, 128, steps=8, cfg=1.0, note="Z-Image-Turbo; Qwen3-4B hidden states"),
    Family("sd35-large", "SD3", lambda: _sd35(38, 192, 0), {**_TINY_SD3, "num_blocks": 3}, "kl16", 4096, 154,
           steps=28, cfg=4.5, pooled=2048, scheduler="sgm_uniform",
           note="CLIP-L+G (77, zero-padded to 4096) + T5-XXL (77) tokens; pooled 768+1280"),
    Family("sd35-medium", "SD3", lambda: _sd35(24, 384, 13),
           {**_TINY_SD3, "num_blocks": 5, "x_block_self_attn_layers": [0, 1]}, "kl16", 4096, 154,
           steps=28, cfg=4.5, pooled=2048, scheduler="sgm_uniform",
           note="MMDiT-X: self-attention x-blocks in layers 0-12"),
]}


def signature_state_dict(kind: str) -> dict:
    """The released file's detection keys as meta tensors (shapes only, nothing allocated)."""
    return {k: torch.empty(shape, device="meta") for k, shape in FAMILIES[kind].signature().items()}


def detected_config(kind: str):
    """What ComfyUI's detection makes of the released file: (supported-model class, unet_config)."""
    import comfy.model_detection
    config = comfy.model_detection.model_config_from_unet(signature_state_dict(kind), "")
    family = FAMILIES[kind]
    if config is None or type(config).__name__ != family.config_class:
        raise RuntimeError(f"{kind}: ComfyUI detected {type(config).__name__}, expected {family.config_class}")
    return type(config), dict(config.unet_config)


def unet_config(kind: str, tiny: bool = False):
    config_class, unet = detected_config(kind)
    if tiny:
        unet = {**unet, **FAMILIES[kind].tiny}
    return config_class, unet


def build_diffusion_model(kind: str, dtype: torch.dtype, device, tiny: bool = False, seed: int = 0,
                          init: bool = True):
    """ComfyUI's BaseModel for ``kind``, weights created on ``device`` in ``dtype`` (meta: shapes only).

    Computes in the dtype ComfyUI would (``unet_manual_cast``: e.g. fp16 weights of a bf16-only
    family compute in bf16), as ``comfy.sd.load_diffusion_model`` sets it.
    """
    import comfy.model_management as mm
    from models import init_random_
    config_class, unet = unet_config(kind, tiny)
    model_config = config_class(unet)
    device = torch.device(device)
    manual_cast = None
    if device.type != "meta" and dtype != torch.float64:   # float64: computed as it is (CPU references)
        manual_cast = mm.unet_manual_cast(dtype, device, model_config.supported_inference_dtypes)
    model_config.set_inference_dtype(dtype, manual_cast)
    model = model_config.get_model({}, "", device=device)
    if init and device.type != "meta":
        init_random_(model.diffusion_model, seed)
        fill_buffers_(model.diffusion_model, seed)
    model.eval()
    return model


@torch.no_grad()
def fill_buffers_(module: torch.nn.Module, seed: int) -> None:
    """Floating-point buffers ComfyUI creates empty and fills from the file (MMDiT's ``pos_embed``)."""
    for _, b in module.named_buffers():
        if b.is_floating_point():
            gen = torch.Generator(device=b.device).manual_seed(seed)
            b.normal_(0.0, 0.5, generator=gen)


def weight_count(module: torch.nn.Module) -> int:
    """Numbers in the module's state dict (parameters and buffers: what its file holds)."""
    return sum(t.numel() for t in module.state_dict().values())


def parameter_count(kind: str, tiny: bool = False) -> int:
    """Weights of the diffusion model (parameters + buffers), counted on the meta device."""
    return weight_count(build_diffusion_model(kind, torch.bfloat16, "meta", tiny, init=False).diffusion_model)


# --------------------------------------------------------------------------- VAEs

def vae_layout(vae: str, tiny: bool = False) -> dict:
    """The released VAE's state-dict layout (meta tensors), read off ComfyUI's own modules.

    kl16: Flux.1 ae.safetensors / SD3.5 VAE (KL encoder/decoder, z 16, no quant convs).
    flux2: Flux.2 VAE (KL, z 32, quant convs inside encoder/decoder, latent batch-norm over 2x2 patches).
    wan21: Wan 2.1 VAE, which Qwen-Image uses (``tiny``: base width 16 instead of 96; ComfyUI reads the
    width off ``decoder.head.0.gamma``). The KL detections fix the widths, so those are always full size.
    """
    from comfy.ldm.models.autoencoder import AutoencoderKL, AutoencodingEngine
    kl = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
          "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    with torch.device("meta"):
        if vae == "kl16":
            module = AutoencodingEngine(
                regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
                encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": kl},
                decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": kl})
            return module.state_dict()
        if vae == "flux2":
            module = AutoencoderKL(ddconfig={**kl, "z_channels": 32, "batch_norm_latent": True}, embed_dim=32)
            rename = {"quant_conv.": "encoder.quant_conv.", "post_quant_conv.": "decoder.post_quant_conv."}
            out = {}
            for key, t in module.state_dict().items():
                prefix = next((p for p in rename if key.startswith(p)), None)
                out[rename[prefix] + key[len(prefix):] if prefix else key] = t
            return out
        if vae == "wan21":
            import comfy.ldm.wan.vae
            module = comfy.ldm.wan.vae.WanVAE(dim=16 if tiny else 96, z_dim=16, dim_mult=[1, 2, 4, 4],
                                              num_res_blocks=2, attn_scales=[],
                                              temperal_downsample=[False, True, True], dropout=0.0)
            return module.state_dict()
    raise ValueError(f"unknown VAE layout {vae!r}")


def build_vae(vae: str, precision: str, device, tiny: bool = False, seed: int = 0):
    """``comfy.sd.VAE`` from a random state dict in the released layout; ComfyUI's detection picks
    the class. fp32 runs it in fp32, otherwise ComfyUI picks its working dtype."""
    import comfy.sd
    from models import random_state_dict
    dtype = torch.float32 if precision == "fp32" else None
    return comfy.sd.VAE(sd=random_state_dict(vae_layout(vae, tiny), seed), device=torch.device(device), dtype=dtype)


# --------------------------------------------------------------------------- conditioning

TINY_TOKENS = 8      # text tokens of the CPU variants: attention cost grows with them, nothing else does


def conditioning(kind: str, latent_format, width: int, height: int, seed: int = 0, tokens: int = 0):
    """Random (positive, negative) in the format of the family's text encode node, with what
    FluxGuidance (``guidance``) and ReferenceLatent (``reference_latents``: one VAE latent of the
    output's size, in the VAE's own space, on the positive only) add. ``tokens``: the text length
    (default: the family's)."""
    family = FAMILIES[kind]
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(2):
        # CLIPTextEncode always sets pooled_output: None where the text encoder has none
        extra = {"pooled_output": None if family.pooled is None else torch.randn(1, family.pooled, generator=gen)}
        if family.guidance is not None:
            extra["guidance"] = family.guidance
        cross = torch.randn(1, tokens or family.tokens, family.context_dim, generator=gen)
        if family.reference_latent and i == 0:
            shape = (1, latent_format.latent_channels, height // 8, width // 8)
            extra["reference_latents"] = [latent_format.process_out(torch.randn(shape, generator=gen))]
        out.append([[cross, extra]])
    return out
