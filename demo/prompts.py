"""The objects model's 16 prompts, "a <colour> <kind>" (standard library only: the command line
checks a prompt before torch is imported)."""
from __future__ import annotations

from typing import Union

KINDS = ("circle", "square", "triangle", "cross")
COLOURS = ("red", "yellow", "green", "blue")
PROMPTS = tuple(f"a {colour} {kind}" for kind in KINDS for colour in COLOURS)
NUM_CLASSES = len(PROMPTS)          # 16; the conditional model's "no prompt" label is NUM_CLASSES


def label_of(prompt: Union[str, int]) -> int:
    """Class index of a prompt ("a red circle", "red circle") or of an index; a clear error otherwise."""
    if isinstance(prompt, int) and 0 <= prompt < NUM_CLASSES:
        return prompt
    text = " ".join(str(prompt).lower().split())
    if text in PROMPTS:
        return PROMPTS.index(text)
    if "a " + text in PROMPTS:
        return PROMPTS.index("a " + text)
    raise ValueError(f"unknown prompt {prompt!r} for the objects model; use one of: {', '.join(PROMPTS)}")
