#!/usr/bin/env bash
# Fill .whl/ (git-ignored, carried to the device machine) with diffusers 0.42.1 and the pure-Python
# packages it needs beyond what a ComfyUI-capable image has (transformers, huggingface_hub,
# safetensors, numpy, Pillow, regex, requests come with ComfyUI's own requirements).
# open_clip_torch (and ftfy, wcwidth, timm) for the reward fixtures of the GPU tests.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps -d .whl diffusers==0.42.1 importlib_metadata zipp tqdm open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth timm==1.0.31
ls -la .whl
