#!/usr/bin/env bash
# What the GPU memory-release test (tests/test_memory_release.py -m gpu) needs on the device machine,
# within the 64 MiB a device call carries (working tree included):
#   .whl-host/            PyAV and kornia (ComfyUI's nodes import them; the device image lacks them),
#                         open_clip and torchsde, installed with --no-deps into /tmp/site there;
#   .cache/comfyui-slim/  the cached ComfyUI less its tests and the llama / qwen tokenizers (13 MB
#                         that no SD1.5-family workflow reads).
# Then: run(command="DNO_WHEELS=.whl-host bash bench/gpu_graphs.sh tests-memory",
#           carry=[".cache/comfyui-slim", ".whl-host"])
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl-host
bin=(--only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64)
python3 -m pip download -q --no-deps "${bin[@]}" -d .whl-host av==19.0.2 kornia==0.9.0 kornia_rs==0.2.0 \
  open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 torchsde==0.2.6 trampoline==0.1.2
rm -rf .cache/comfyui-slim
cp -a .cache/comfyui .cache/comfyui-slim
rm -rf .cache/comfyui-slim/comfy/text_encoders/llama_tokenizer .cache/comfyui-slim/comfy/text_encoders/qwen25_tokenizer \
  .cache/comfyui-slim/tests .cache/comfyui-slim/tests-unit
du -sh .whl-host .cache/comfyui-slim
