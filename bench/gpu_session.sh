#!/usr/bin/env bash
# The GPU work of issue 7, one device-tool call per part (each fits the 10-minute command limit).
#
#   run(command="bash bench/gpu_session.sh sd15", carry=[".cache/comfyui", ".whl"])
#
# Parts, in the order bench/NOTES.md plans them:
#   sd15          SD1.5 512²: bf16 auto/step/blocks, fp16 auto, and the torch.profiler table
#   sd15-compile  SD1.5 512²: bf16 auto/step through TorchCompileModel (inductor)
#   sdxl          SDXL 1024²: bf16 auto, bf16 blocks (low memory), fp16 auto
#   sdxl-compile  SDXL 1024²: bf16 auto through TorchCompileModel (inductor)
#   fp32          SD1.5 512² fp32 auto (3 updates)
#   channels-last SD1.5 bf16 auto and SDXL bf16 blocks with NHWC weights (21 % of run 2's GPU time
#                 was cuDNN's layout conversion)
#   confirm       what issue 7 still needs after session 10, in one call: SDXL/SD1.5 bf16 blocks
#                 (layer checkpointing of the UNet, predicted 8.6 / 2.7 GiB), SD1.5 auto with and
#                 without --stock-conv on the same machine, SDXL fp32 auto
#   alloc         SD1.5 bf16 auto: allocator counters, a 40 GiB budget, expandable segments
#   tests         the gpu-marked tests (CUDA core tests and the ComfyUI path on CUDA)
#
# .cache/comfyui is ComfyUI 0.3.75 (the tests fetch it); .whl holds the two pure-Python wheels
# ComfyUI needs that the device image lacks (torchsde, trampoline). Results go to $OUT
# (results.jsonl, the log, the profile); the markdown table is printed last.
set -euo pipefail
part=${1:?usage: bench/gpu_session.sh sd15|sd15-compile|sdxl|sdxl-compile|fp32|channels-last|confirm|alloc|tests}
out=${OUT:-/tmp/dno-bench}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"

bench() { python3 bench/run.py "$@" --out "$out/results.jsonl" 2>&1 | tee -a "$out/log.txt"; }
case "$part" in
  sd15) bench --model sd15 --configs bf16:auto,bf16:step,bf16:blocks,fp16:auto \
              --profile bf16:auto --profile-out "$out/profile-sd15-bf16-auto.txt" ;;
  sd15-compile) bench --model sd15 --configs bf16:auto,bf16:step --compile inductor ;;
  sdxl-compile) bench --model sdxl --configs bf16:auto@3 --plain-repeats 1 --compile inductor ;;
  sdxl) bench --model sdxl --configs bf16:auto@3,bf16:blocks@2,fp16:auto@3 ;;
  fp32) bench --model sd15 --configs fp32:auto@3 ;;
  confirm) bench --model sdxl --configs bf16:blocks@2 --plain-repeats 1
           bench --model sd15 --configs bf16:blocks@3,bf16:auto@4
           bench --model sd15 --configs bf16:auto@4 --stock-conv
           bench --model sdxl --configs fp32:auto@2 --plain-repeats 1 ;;
  # the SD1.5 step times spread 3.2-6.0 s within one run with 62-70 GiB stored: allocator
  # retries near the cap? the counters, a lower budget, and expandable segments
  alloc) bench --model sd15 --configs bf16:auto@6,bf16:auto=40@6
         PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True bench --model sd15 --configs bf16:auto@6 ;;
  channels-last) bench --model sd15 --configs bf16:auto@4 --channels-last
                 bench --model sdxl --configs bf16:blocks@2 --plain-repeats 1 --channels-last ;;
  # only the file with gpu tests: the device image lacks open_clip and the browser stack that
  # other test modules import at collection
  tests) python3 -m pytest tests/test_gpu_memory.py -m gpu -q -p no:cacheprovider 2>&1 | tee "$out/pytest-gpu.txt"
         exit "${PIPESTATUS[0]}" ;;
  *) echo "unknown part: $part" >&2; exit 2 ;;
esac
python3 bench/summarize.py "$out/results.jsonl"
