#!/usr/bin/env bash
# Fill .whl/ (git-ignored, carried to the device machine) with diffusers 0.42.1 and the pure-Python
# packages it needs beyond what a ComfyUI-capable image has (transformers, huggingface_hub,
# safetensors, numpy, Pillow, regex, requests come with ComfyUI's own requirements).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps -d .whl diffusers==0.42.1 importlib_metadata zipp tqdm
ls -la .whl
