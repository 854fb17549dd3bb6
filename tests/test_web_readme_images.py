"""README's node screenshot, made the way tests/make_readme_images.py makes the committed one:
the txt2img example in the official frontend (headless Debian chromium) against a real ComfyUI
server on a tiny checkpoint, the DNO KSampler framed after its run.

Setup: ``bash tests/setup_browser.sh`` (as root).
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import make_readme_images

pytestmark = [pytest.mark.browser, pytest.mark.server]


def test_node_screenshot_shows_the_node_with_its_filled_chart(tmp_path):
    out = tmp_path / "node.png"
    shot = make_readme_images.make_node_screenshot(out)
    # the chart the page drew has one point per optimisation step (step 0 = the plain sample)
    assert [p[0] for p in shot["points"]] == list(range(make_readme_images.OPT_STEPS + 1)), shot["points"]
    image = Image.open(out)
    clip = shot["clip"]
    assert image.size == (round(clip["width"]), round(clip["height"]))
    assert image.size[1] > image.size[0] > 300                         # the tall DNO KSampler
    pixels = np.asarray(image.convert("RGB"), dtype=float)
    assert pixels.std() > 20, "the screenshot is (nearly) one colour: the node was not in frame"
