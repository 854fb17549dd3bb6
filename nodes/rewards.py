"""DNO reward nodes: thin ComfyUI adapters over ``dno.rewards``.

Each loader node resolves file names through ``folder_paths`` and makes one call into the library.
Models are loaded once (``dno.rewards.cached_load``), outside inference mode so autograd can use
them, and wrapped in a ``ModelPatcher`` so ComfyUI moves them to the GPU for scoring and offloads
them when another model needs the memory.
"""
from __future__ import annotations

import logging
import os
from typing import List, Optional, Sequence

import torch

import comfy.model_management as mm
import comfy.model_patcher
import folder_paths

from ..dno import DNOError
from ..dno.rewards import (
    BUILTIN_FUNCTIONS, BuiltinReward, DEFAULT_JPEG_QUALITY, JpegReward, Reward, RewardFileError,
    WeightedReward, cached_load, load_aesthetic_reward, load_clip_score_reward, load_hps_reward,
    aesthetic_reward, load_aesthetic_mlp, load_pickscore_reward,
)
from ..dno.rewards.loading import READABLE_EXTENSIONS

log = logging.getLogger("DNO")

REWARD_FOLDER = "dno_rewards"
# Where users already keep CLIP weights; searched after our own folder.
CLIP_FOLDERS = (REWARD_FOLDER, "clip_vision", "clip")
CATEGORY = "DNO/rewards"
ACTIVATIONS = {"quick_gelu (OpenAI CLIP)": True, "gelu (LAION / open_clip)": False}
REWARD_TOOLTIP = "The reward, for the reward input of a DNO node, DNO Combine Rewards or DNO Score Image."
JPEG_OBJECTIVES = {"compressibility (smaller files)": True, "incompressibility (larger files)": False}


def register_reward_folder() -> None:
    """``models/dno_rewards`` through the host's own registration, first among the folders of that
    type: a user's ``extra_model_paths.yaml`` entry (read before custom nodes load) stays after it.
    A type made by ``add_model_folder_path`` has no extensions (every file would be listed): it
    gets the host's weight-file extensions."""
    default = os.path.join(folder_paths.models_dir, REWARD_FOLDER)
    folder_paths.add_model_folder_path(REWARD_FOLDER, default, is_default=True)
    paths, extensions = folder_paths.folder_names_and_paths[REWARD_FOLDER]
    if not extensions:
        folder_paths.folder_names_and_paths[REWARD_FOLDER] = (paths, set(folder_paths.supported_pt_extensions))


register_reward_folder()


def _file_list(folders: Sequence[str]) -> List[str]:
    """The weight files of these folder types that the reward loaders read. ComfyUI lists more
    suffixes (.pkl, .pt2) than safetensors and torch.load(weights_only=True) can open."""
    names: List[str] = []
    for folder in folders:
        try:
            found = folder_paths.get_filename_list(folder)
        except KeyError:  # a folder type this ComfyUI does not know
            continue
        names.extend(n for n in found if n.lower().endswith(READABLE_EXTENSIONS) and n not in names)
    return names


def resolve_file(name: str, folders: Sequence[str], what: str) -> str:
    for folder in folders:
        try:
            path = folder_paths.get_full_path(folder, name)
        except KeyError:
            path = None
        if path:
            return path
    raise RewardFileError(
        f"{what} file '{name}' was not found in ComfyUI's {', '.join(f'models/{f}' for f in folders)}"
        " folders. Put it there and refresh the node list."
    )


class ManagedReward(Reward):
    """A reward whose weights ComfyUI's model management loads and offloads.

    ``host_models``: (ModelPatcher, module) pairs of models the host loaded and owns that the
    reward runs (a CLIP_VISION): loaded with the reward, through their own patchers."""

    def __init__(self, inner: Reward, host_models: Sequence = ()):
        super().__init__()
        self.inner = inner
        self.name = inner.name
        self.differentiable = inner.differentiable
        self.needs_prompt = getattr(inner, "needs_prompt", False)
        self.host_models = tuple(host_models)
        self.patcher = comfy.model_patcher.ModelPatcher(
            inner, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device(),
            size=mm.module_size(inner),
        )

    @property
    def dtype(self) -> Optional[torch.dtype]:
        return next((p.dtype for p in self.inner.parameters() if p.is_floating_point()), None)

    def cast(self, dtype: torch.dtype) -> None:
        """Keep the weights in ``dtype`` (a DNO run's compute dtype). A loaded model is unloaded
        first and cast on its offload device, so ComfyUI counts the size it then loads. Casting
        down and up again keeps the lower precision (the file is not read again)."""
        from .memory import unload

        if self.dtype in (None, dtype):
            return
        unload(self.patcher)
        with torch.inference_mode(False):
            self.inner.to(dtype=dtype)
        self.patcher.size = mm.module_size(self.inner)
        log.info("DNO: %s reward weights in %s", self.name, str(dtype).replace("torch.", ""))

    def prepare(self, device=None, dtype: Optional[torch.dtype] = None) -> None:
        """Load onto the sampling device (freeing other models if needed), autograd-ready; in
        ``dtype`` when given (else as they are)."""
        from .host import make_autograd_ready

        if dtype is not None:
            self.cast(dtype)
        with torch.inference_mode(False):
            mm.load_models_gpu([self.patcher, *(patcher for patcher, _ in self.host_models)],
                               force_full_load=True)
            make_autograd_ready(self.inner)
            for _, module in self.host_models:
                make_autograd_ready(module)
                module.requires_grad_(False)    # DNO needs gradients of the pixels, never of weights

    def _on_load_device(self) -> bool:
        for patcher, module in ((self.patcher, self.inner), *self.host_models):
            param = next(module.parameters(), None)
            if param is not None and param.device != torch.device(patcher.load_device):
                return False
        return True

    def score(self, images: torch.Tensor, prompts: Optional[Sequence[str]] = None) -> torch.Tensor:
        if not self._on_load_device():
            self.prepare()
        return self.inner.score(images, prompts).to(images.device)


def _managed(loader, *args, **options):
    """Loads (once) outside inference mode, so the weights are ordinary tensors."""
    def load_and_wrap(*paths, **opts):
        with torch.inference_mode(False):
            return ManagedReward(loader(*paths, **opts))

    load_and_wrap.__qualname__ = f"managed_{loader.__name__}"
    load_and_wrap.__module__ = loader.__module__
    return cached_load(load_and_wrap, list(args), **options)


def _prompt_list(prompt: str) -> Optional[List[str]]:
    prompt = (prompt or "").strip()
    return [prompt] if prompt else None


def require_prompt(reward, prompts: Optional[List[str]], input_name: str, node: str) -> None:
    """A reward that scores the image against a text gets one, else an error naming the input."""
    if prompts is None and getattr(reward, "needs_prompt", False):
        raise DNOError(f"The {reward.name} reward scores the image against a text, and {input_name} on "
                       f"the {node} node is empty: type into {input_name} the text the image should "
                       "match, e.g. your positive prompt's text")


def aesthetic_mlp_input():
    """The aesthetic predictor's file input, shared by both aesthetic reward nodes."""
    return (_file_list([REWARD_FOLDER]), {
        "tooltip": "sac+logos+ava1-l14-linearMSE.pth (or .safetensors) in models/dno_rewards"})


class DNOAestheticReward:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "aesthetic_mlp": aesthetic_mlp_input(),
            "clip_model": (_file_list(CLIP_FOLDERS), {
                "tooltip": "CLIP ViT-L/14 weights (open_clip or Hugging Face / clip_vision layout)"}),
            "clip_activation": (list(ACTIVATIONS), {
                "tooltip": "OpenAI's ViT-L/14 (what the predictor was trained on) uses QuickGELU"}),
        }}

    RETURN_TYPES = ("DNO_REWARD",)
    OUTPUT_TOOLTIPS = (REWARD_TOOLTIP,)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "LAION aesthetic predictor: an MLP on CLIP ViT-L/14 image embeddings."

    def load(self, aesthetic_mlp, clip_model, clip_activation):
        mlp = resolve_file(aesthetic_mlp, [REWARD_FOLDER], "Aesthetic MLP")
        clip = resolve_file(clip_model, CLIP_FOLDERS, "CLIP")
        return (_managed(load_aesthetic_reward, mlp, clip, quick_gelu=ACTIVATIONS[clip_activation]),)


class DNOAestheticRewardCLIPVision:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "aesthetic_mlp": aesthetic_mlp_input(),
            "clip_vision": ("CLIP_VISION", {
                "tooltip": "CLIP ViT-L/14 from ComfyUI's Load CLIP Vision node (e.g. OpenAI's "
                           "clip-vit-large-patch14 model.safetensors in models/clip_vision)"}),
        }}

    RETURN_TYPES = ("DNO_REWARD",)
    OUTPUT_TOOLTIPS = (REWARD_TOOLTIP,)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = ("LAION aesthetic predictor on the CLIP vision model ComfyUI already loaded (Load CLIP "
                   "Vision): the same score as DNO Reward: LAION Aesthetic on that file.")

    def load(self, aesthetic_mlp, clip_vision):
        from .clip_vision import HostClipVisionBackbone

        path = resolve_file(aesthetic_mlp, [REWARD_FOLDER], "Aesthetic MLP")
        backbone = HostClipVisionBackbone(clip_vision)
        with torch.inference_mode(False):       # ordinary tensors, so autograd can use the MLP
            reward = aesthetic_reward(load_aesthetic_mlp(path), backbone, path, "of the clip_vision input")
            return (ManagedReward(reward, host_models=[backbone.host_model]),)


class DNOHPSReward:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"hps_checkpoint": (_file_list([REWARD_FOLDER]), {
            "tooltip": "HPS_v2_compressed.pt or HPS_v2.1_compressed.pt in models/dno_rewards"})}}

    RETURN_TYPES = ("DNO_REWARD",)
    OUTPUT_TOOLTIPS = (REWARD_TOOLTIP,)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Human Preference Score v2 / v2.1 (needs the prompt)."

    def load(self, hps_checkpoint):
        return (_managed(load_hps_reward, resolve_file(hps_checkpoint, [REWARD_FOLDER], "HPSv2")),)


class DNOPickScoreReward:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"pickscore_model": (_file_list(CLIP_FOLDERS), {
            "tooltip": "PickScore_v1 model.safetensors (with its config.json beside it, or alone)"})}}

    RETURN_TYPES = ("DNO_REWARD",)
    OUTPUT_TOOLTIPS = (REWARD_TOOLTIP,)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "PickScore (needs the prompt)."

    def load(self, pickscore_model):
        return (_managed(load_pickscore_reward, resolve_file(pickscore_model, CLIP_FOLDERS, "PickScore")),)


class DNOCLIPScoreReward:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip_model": (_file_list(CLIP_FOLDERS), {"tooltip": "Any full CLIP (image and text towers)"}),
            "clip_activation": (list(ACTIVATIONS), {"default": "gelu (LAION / open_clip)",
                                                    "tooltip": "The activation the CLIP was trained with "
                                                               "(not visible in the weights): QuickGELU for "
                                                               "OpenAI's CLIP, GELU for LAION's"}),
            "scale": ("FLOAT", {"default": 100.0, "min": 0.0, "max": 1000.0, "step": 0.1,
                                "tooltip": "score = scale * cosine(image, prompt)"}),
        }}

    RETURN_TYPES = ("DNO_REWARD",)
    OUTPUT_TOOLTIPS = (REWARD_TOOLTIP,)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "CLIP score: scaled cosine similarity of image and prompt."

    def load(self, clip_model, clip_activation, scale):
        path = resolve_file(clip_model, CLIP_FOLDERS, "CLIP")
        return (_managed(load_clip_score_reward, path, quick_gelu=ACTIVATIONS[clip_activation],
                         scale=float(scale)),)


class DNOBuiltinReward:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"kind": (list(BUILTIN_FUNCTIONS), {
            "default": "brightness", "tooltip": "What to maximise: mean brightness, darkness, saturation or "
                                                "contrast (standard deviation) of the pixels"})}}

    RETURN_TYPES = ("DNO_REWARD",)
    OUTPUT_TOOLTIPS = (REWARD_TOOLTIP,)
    FUNCTION = "make"
    CATEGORY = CATEGORY
    DESCRIPTION = "Rewards computed from the pixels alone: brightness, darkness, saturation, contrast."

    def make(self, kind):
        return (BuiltinReward(kind),)


class DNOJPEGReward:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "objective": (list(JPEG_OBJECTIVES), {"tooltip": "compressibility rewards smaller JPEG files "
                                                             "(simpler images), incompressibility larger ones"}),
            "quality": ("INT", {"default": DEFAULT_JPEG_QUALITY, "min": 1, "max": 100,
                                "tooltip": "JPEG quality of the encode that is measured (95 as in the paper's code)"}),
        }}

    RETURN_TYPES = ("DNO_REWARD",)
    OUTPUT_TOOLTIPS = (REWARD_TOOLTIP,)
    FUNCTION = "make"
    CATEGORY = CATEGORY
    DESCRIPTION = "JPEG file size in kB (non-differentiable: optimised with the hybrid estimator)."

    def make(self, objective, quality):
        return (JpegReward(quality=int(quality), compress=JPEG_OBJECTIVES[objective]),)


class DNOCombineRewards:
    @classmethod
    def INPUT_TYPES(cls):
        def weight(i):
            return ("FLOAT", {"default": 1.0, "min": -1000.0, "max": 1000.0, "step": 0.01,
                              "tooltip": f"Factor of reward_{i} in the sum (negative to minimise it)"})

        def reward(i):
            return ("DNO_REWARD", {"tooltip": f"Reward {i} of the weighted sum"})

        optional = {}
        for i in (2, 3, 4):
            optional[f"reward_{i}"] = reward(i)
            optional[f"weight_{i}"] = weight(i)
        return {"required": {"reward_1": reward(1), "weight_1": weight(1)}, "optional": optional}

    RETURN_TYPES = ("DNO_REWARD",)
    OUTPUT_TOOLTIPS = (REWARD_TOOLTIP,)
    FUNCTION = "combine"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Weighted sum of rewards; if any part is non-differentiable the whole is "
                   "optimised with the hybrid estimator.")

    def combine(self, reward_1, weight_1, **optional):
        parts = [(reward_1, weight_1)]
        for i in (2, 3, 4):
            if optional.get(f"reward_{i}") is not None:
                parts.append((optional[f"reward_{i}"], optional.get(f"weight_{i}", 1.0)))
        return (WeightedReward(parts),)


class DNOScoreImage:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE", {"tooltip": "The images to score"}),
                             "reward": ("DNO_REWARD", {"tooltip": "The reward that scores them"})},
                "optional": {"prompt": ("STRING", {"default": "", "multiline": True,
                                                   "tooltip": "Text for text-image rewards (HPS, PickScore, "
                                                              "CLIP score)"})}}

    RETURN_TYPES = ("FLOAT", "STRING")
    RETURN_NAMES = ("mean_score", "scores")
    OUTPUT_TOOLTIPS = ("The mean score of the batch.", "Every image's score, comma-separated (also shown "
                                                        "on the node).")
    FUNCTION = "score"
    OUTPUT_NODE = True
    CATEGORY = CATEGORY
    DESCRIPTION = ("Scores images with a DNO reward: the mean as FLOAT, every score as text, shown on the "
                   "node.")

    def score(self, image, reward, prompt=""):
        require_prompt(reward, _prompt_list(prompt), "prompt", "DNO Score Image")
        images = image[..., :3].permute(0, 3, 1, 2).float()  # ComfyUI IMAGE is (B, H, W, C)
        prepare = getattr(reward, "prepare", None)
        if callable(prepare):
            prepare(mm.get_torch_device())
        with torch.no_grad():
            scores = reward(images.to(mm.get_torch_device()), _prompt_list(prompt)).float().cpu()
        text = ", ".join(f"{s:.4f}" for s in scores.tolist())
        log.info("DNO %s score: %s", reward.name, text)
        print(f"[DNO] {reward.name}: {text}")
        return {"ui": {"text": [text]}, "result": (float(scores.mean()), text)}


NODE_CLASS_MAPPINGS = {
    "DNOAestheticReward": DNOAestheticReward,
    "DNOAestheticRewardCLIPVision": DNOAestheticRewardCLIPVision,
    "DNOHPSReward": DNOHPSReward,
    "DNOPickScoreReward": DNOPickScoreReward,
    "DNOCLIPScoreReward": DNOCLIPScoreReward,
    "DNOBuiltinReward": DNOBuiltinReward,
    "DNOJPEGReward": DNOJPEGReward,
    "DNOCombineRewards": DNOCombineRewards,
    "DNOScoreImage": DNOScoreImage,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "DNOAestheticReward": "DNO Reward: LAION Aesthetic",
    "DNOAestheticRewardCLIPVision": "DNO Reward: LAION Aesthetic (CLIP Vision)",
    "DNOHPSReward": "DNO Reward: HPSv2",
    "DNOPickScoreReward": "DNO Reward: PickScore",
    "DNOCLIPScoreReward": "DNO Reward: CLIP Score",
    "DNOBuiltinReward": "DNO Reward: Brightness / Darkness / Saturation / Contrast",
    "DNOJPEGReward": "DNO Reward: JPEG (In)compressibility",
    "DNOCombineRewards": "DNO Combine Rewards",
    "DNOScoreImage": "DNO Score Image",
}
