"""Matching prompts to a batch of images."""
from __future__ import annotations

from typing import List, Optional, Sequence


def prompts_for_batch(prompts: Optional[Sequence[str]], batch: int, reward_name: str) -> List[str]:
    """One prompt per image: a single prompt (or a plain string) is used for every image."""
    if prompts is None:
        raise ValueError(f"The {reward_name} reward compares images with a prompt; pass prompts "
                         "(on the DNO nodes: the reward_prompt input).")
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if any(not str(p).strip() for p in prompts):
        raise ValueError(f"The {reward_name} reward compares images with a prompt and got a blank one; "
                         "pass the text the images should match.")
    if len(prompts) == 1:
        return prompts * batch
    if len(prompts) != batch:
        raise ValueError(
            f"The {reward_name} reward got {len(prompts)} prompts for {batch} images; pass one "
            "prompt, or one per image."
        )
    return prompts
