"""Tiny random-weight diffusers pipelines, built from configs here (nothing is downloaded).

One per family DNO's diffusers adapter runs: StableDiffusionPipeline, StableDiffusionXLPipeline,
StableDiffusion3Pipeline and FluxPipeline, with the schedulers their released configs use. The
tokenizer is a byte-level CLIP BPE with no merges (every byte a token, 514 tokens), so any
prompt tokenizes; text encoders, UNets, transformers and VAEs are a few layers of width 8-32.
Images are 32x32 (latents 16x16: the tiny VAEs downscale by 2). Weights are seeded per module.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

SIZE = 32       # pixels
VOCAB = 514     # 256 byte tokens, 256 word-final byte tokens, start, end
START, END = 512, 513

SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _byte_characters():
    """GPT-2's byte -> printable character table (what CLIP's BPE runs on)."""
    visible = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    codes = visible[:]
    extra = 0
    for b in range(256):
        if b not in visible:
            visible.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def byte_clip_tokenizer(max_length: int = 77):
    """A CLIPTokenizer whose vocabulary is every byte (plain and word-final) and no merges."""
    from transformers import CLIPTokenizer
    chars = _byte_characters()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": START, "<|endoftext|>": END})
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def _seeded(seed: int, build):
    torch.manual_seed(seed)
    return build().eval()


def clip_text(seed: int, hidden: int = 16, projection: Optional[int] = None, layers: int = 2):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    config = CLIPTextConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=layers, num_attention_heads=2, max_position_embeddings=77,
                            bos_token_id=START, eos_token_id=END, pad_token_id=END,
                            projection_dim=projection or hidden, hidden_act="quick_gelu")
    cls = CLIPTextModel if projection is None else CLIPTextModelWithProjection
    return _seeded(seed, lambda: cls(config))


def kl_vae(seed: int, latent_channels: int = 4, flow: bool = False):
    from diffusers import AutoencoderKL
    extra = dict(shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False,
                 use_post_quant_conv=False) if flow else dict(scaling_factor=0.18215)
    return _seeded(seed, lambda: AutoencoderKL(
        block_out_channels=[8, 16], in_channels=3, out_channels=3, layers_per_block=1, norm_num_groups=4,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=latent_channels, sample_size=SIZE, **extra))


def sd_scheduler(kind: str = "euler_ancestral", **overrides):
    """SD1.5's scheduler settings (scaled-linear betas, leading spacing, offset 1) as ``kind``."""
    import diffusers
    classes = {"euler_ancestral": diffusers.EulerAncestralDiscreteScheduler,
               "euler": diffusers.EulerDiscreteScheduler, "ddim": diffusers.DDIMScheduler,
               "pndm": diffusers.PNDMScheduler}
    options = dict(SD_BETAS, steps_offset=1, timestep_spacing="leading")
    if kind == "ddim":
        options.update(clip_sample=False, set_alpha_to_one=False)
    if kind == "pndm":
        options.update(skip_prk_steps=True, set_alpha_to_one=False)
    options.update(overrides)
    return classes[kind](**options)


def sd_unet(seed: int = 0, cross_attention_dim: int = 16, **extra):
    from diffusers import UNet2DConditionModel
    options = dict(block_out_channels=(8, 16), layers_per_block=1, sample_size=SIZE // 2, in_channels=4,
                   out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=cross_attention_dim,
                   norm_num_groups=4, attention_head_dim=4)
    options.update(extra)
    return _seeded(seed, lambda: UNet2DConditionModel(**options))


def tiny_sd(scheduler: str = "euler_ancestral", seed: int = 0, **scheduler_options):
    from diffusers import StableDiffusionPipeline
    return StableDiffusionPipeline(
        vae=kl_vae(seed + 1), text_encoder=clip_text(seed + 2), tokenizer=byte_clip_tokenizer(),
        unet=sd_unet(seed), scheduler=sd_scheduler(scheduler, **scheduler_options), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)


def tiny_sdxl(scheduler: str = "euler", seed: int = 0, **scheduler_options):
    from diffusers import StableDiffusionXLPipeline
    unet = sd_unet(seed, cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True,
                   addition_embed_type="text_time", addition_time_embed_dim=8,
                   projection_class_embeddings_input_dim=6 * 8 + 16)
    return StableDiffusionXLPipeline(
        vae=kl_vae(seed + 1), text_encoder=clip_text(seed + 2), text_encoder_2=clip_text(seed + 3, projection=16),
        tokenizer=byte_clip_tokenizer(), tokenizer_2=byte_clip_tokenizer(), unet=unet,
        scheduler=sd_scheduler(scheduler, **scheduler_options), force_zeros_for_empty_prompt=False,
        add_watermarker=False)


def tiny_sd3(seed: int = 0):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    transformer = _seeded(seed, lambda: SD3Transformer2DModel(
        sample_size=SIZE // 2, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
        out_channels=4, pos_embed_max_size=16))
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=kl_vae(seed + 1, flow=True),
        text_encoder=clip_text(seed + 2, projection=16), tokenizer=byte_clip_tokenizer(),
        text_encoder_2=clip_text(seed + 3, projection=16), tokenizer_2=byte_clip_tokenizer(),
        text_encoder_3=None, tokenizer_3=None)


def tiny_flux(seed: int = 0, guidance_embeds: bool = True, max_length: int = 32):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel
    transformer = _seeded(seed, lambda: FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=[4, 4, 8],
        guidance_embeds=guidance_embeds))
    t5 = _seeded(seed + 4, lambda: T5EncoderModel(T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2, pad_token_id=END,
        eos_token_id=END, decoder_start_token_id=0)))
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(
        scheduler=scheduler, vae=kl_vae(seed + 1, flow=True), text_encoder=clip_text(seed + 2),
        tokenizer=byte_clip_tokenizer(), text_encoder_2=t5, tokenizer_2=byte_clip_tokenizer(max_length),
        transformer=transformer)


BUILDERS = {"sd": tiny_sd, "sdxl": tiny_sdxl, "sd3": tiny_sd3, "flux": tiny_flux}


def save_tiny_sd(folder: Path, seed: int = 0, scheduler: str = "pndm") -> Path:
    """A tiny SD1.5-layout pipeline folder (``save_pretrained``, safetensors) with SD1.5's default
    scheduler (PNDM), as ``python -m dno run --pipeline`` reads it."""
    pipe = tiny_sd(scheduler, seed=seed)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return Path(folder)
