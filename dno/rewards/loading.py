"""Safe loading of reward weight files, with errors that name the file and what was expected.

Only two readers are ever used: ``safetensors`` and ``torch.load(weights_only=True)``. The latter
refuses to build arbitrary Python objects, so a pickle carrying code is rejected *before* any of it
runs; we turn that refusal into a :class:`RewardFileError` that says what happened and what to do.
"""
from __future__ import annotations

import os
import pickle
from typing import Dict, Iterable, Mapping, Optional

import torch

from ..errors import DNOError

# ".sft" is the short safetensors suffix ComfyUI lists beside ".safetensors" (Flux files use it).
SAFETENSORS_EXTENSIONS = (".safetensors", ".sft")
PICKLE_EXTENSIONS = (".pth", ".pt", ".bin", ".ckpt")
READABLE_EXTENSIONS = SAFETENSORS_EXTENSIONS + PICKLE_EXTENSIONS
# A Hugging Face model folder keeps its weights under one of these names (sharded files are not
# supported: reward models are small enough to come in one file).
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class RewardFileError(DNOError):
    """A reward weight file is missing, unreadable, unsafe or of the wrong kind."""


def _describe(path: str) -> str:
    return f"'{path}'"


def _check_exists(path: str, expected: str) -> None:
    if not os.path.exists(path):
        raise RewardFileError(
            f"Reward file {_describe(path)} does not exist (expected {expected}). "
            "Put the file in ComfyUI's models/dno_rewards folder (or clip / clip_vision for CLIP "
            "weights) and pick it from the list."
        )


def _read_safetensors(path: str, expected: str) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except Exception as exc:  # safetensors raises its own error types for truncated/corrupt headers
        raise RewardFileError(
            f"Could not read {_describe(path)} as a safetensors file (expected {expected}): {exc}. "
            "The file is probably corrupt or incomplete; download it again."
        ) from exc


def _unpickling_detail(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if "WeightsUnpickler error" in line]
    detail = lines[0].split("WeightsUnpickler error:", 1)[-1].strip() if lines else ""
    # drop torch's advice to allow-list the global: for a reward file that is the wrong fix
    return detail.split(" Please use", 1)[0]


def _read_pickle(path: str, expected: str) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only=True stops at the first instruction that is not plain tensor/container
        # data, before it takes effect: nothing from the file has been executed at this point.
        detail = _unpickling_detail(exc) or str(exc).splitlines()[-1]
        if "Unsupported global" in str(exc):
            raise RewardFileError(
                f"Refused to load {_describe(path)} (expected {expected}): it is a pickle that "
                "asks to run or build Python objects beyond plain tensors, which could execute "
                "code. Nothing from it was executed. Use a .safetensors version of the weights, "
                f"or a checkpoint that holds only tensors. ({detail})"
            ) from exc
        raise RewardFileError(
            f"Could not read {_describe(path)} as a PyTorch checkpoint of plain tensors (expected "
            f"{expected}): the file is corrupt, incomplete, or not a torch.save file. Nothing "
            f"from it was executed. ({detail})"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise RewardFileError(
            f"Could not read {_describe(path)} as a PyTorch checkpoint (expected {expected}): "
            f"{exc}. The file is probably corrupt or incomplete; download it again."
        ) from exc


def resolve_weight_file(path: str, expected: str) -> str:
    """A folder (Hugging Face layout) stands for the weight file inside it."""
    _check_exists(path, expected)
    if not os.path.isdir(path):
        return path
    for name in HF_WEIGHT_FILES:
        candidate = os.path.join(path, name)
        if os.path.isfile(candidate):
            return candidate
    raise RewardFileError(
        f"Folder {_describe(path)} holds none of {', '.join(HF_WEIGHT_FILES)} (expected {expected})."
    )


def load_checkpoint(path: str, expected: str) -> object:
    """Reads a weight file (or HF folder) into plain Python/tensor objects, safely."""
    file = resolve_weight_file(path, expected)
    lower = file.lower()
    if lower.endswith(SAFETENSORS_EXTENSIONS):
        return _read_safetensors(file, expected)
    if lower.endswith(PICKLE_EXTENSIONS):
        return _read_pickle(file, expected)
    raise RewardFileError(
        f"Unsupported file type for {_describe(file)} (expected {expected}): use .safetensors / .sft "
        f"(preferred) or one of {', '.join(PICKLE_EXTENSIONS)}."
    )


def _strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return dict(state)


def load_state_dict(
    path: str, expected: str, container_keys: Iterable[str] = ("state_dict",)
) -> Dict[str, torch.Tensor]:
    """Loads a flat ``name -> tensor`` dict from ``path``.

    Checkpoints that wrap the weights (``{'state_dict': {...}, 'epoch': 3}``) are unwrapped through
    ``container_keys``; a ``module.`` prefix left by DistributedDataParallel is removed.
    """
    obj = load_checkpoint(path, expected)
    if isinstance(obj, Mapping):
        for key in container_keys:
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise RewardFileError(
            f"{_describe(path)} does not hold a state dict of tensors (expected {expected})."
        )
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise RewardFileError(f"{_describe(path)} holds no tensors (expected {expected}).")
    return _strip_prefix(tensors, "module.")


def require_keys(
    state: Mapping[str, torch.Tensor], keys: Iterable[str], path: str, expected: str
) -> None:
    """Raises a clear error when a checkpoint is of another architecture than expected."""
    missing = [k for k in keys if k not in state]
    if missing:
        sample = ", ".join(sorted(state)[:5])
        raise RewardFileError(
            f"{_describe(path)} is not {expected}: it lacks {', '.join(missing[:4])}"
            f"{' ...' if len(missing) > 4 else ''} (its first keys are: {sample}). "
            "Pick the right file for this reward."
        )


def read_json(path: str) -> Optional[dict]:
    import json

    if not os.path.isfile(path):
        return None
    with open(path, "r", encoding="utf-8") as handle:
        return json.load(handle)
