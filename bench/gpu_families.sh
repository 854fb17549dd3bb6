#!/usr/bin/env bash
# The DiT families at full size on one GPU (issue 23), and the emulated cards (issue 24): one part
# per device call, each within the 10-minute command limit.
#   run(command="DNO_COMMIT=<sha> bash bench/gpu_families.sh flux", carry=[".cache/comfyui-slim", ".whl-bench"])
# .whl-bench: torchsde and trampoline (ComfyUI's k-diffusion imports them), open_clip and its two
# small dependencies (the real-size reward models); the device image has the rest.
# Each family runs with its released step count, CFG and 1024², random weights in bf16: the plain
# generation (median of 3 after a warm-up), then DNO in the default mode (auto) and the
# lowest-memory mode (blocks), 3 updates each (the middle one timed). Lines go to $OUT/results.jsonl.
set -euo pipefail
part=${1:?usage: bench/gpu_families.sh flux|dits|cards|more|tests}
out=${OUT:-/tmp/dno-bench}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl-bench/*.whl
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export COMFYUI_PATH=${COMFYUI_PATH:-$PWD/.cache/comfyui-slim}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
# a configuration past its limit is cut off (its line missing), and the part goes on with the next
bench() { timeout "$1" python3 bench/run.py "${@:2}" --out "$out/results.jsonl" 2>&1 | tee -a "$out/log.txt" | grep -v '^{"eager_run"' | cut -c1-700 || echo "bench: cut off after $1 s: ${*:2}"; }
modes=bf16:auto@3,bf16:blocks@3
case "$part" in
  # (the first argument of bench is its time limit in seconds: a part stays within the call's 10 minutes,
  # and every finished configuration's line is already in results.jsonl)
  flux) bench 220 --model flux-schnell --configs "$modes" --plain-repeats 3 --compare
        bench 340 --model flux-dev --configs "$modes" --plain-repeats 3 ;;
  dits) bench 150 --model z-image --configs "$modes" --plain-repeats 3
        bench 160 --model sd35-large --configs bf16:auto@3 --plain-repeats 3
        bench 250 --model qwen-image --configs bf16:auto@3 --plain-repeats 3 ;;
  cards) bench 110 --model flux-schnell --configs bf16:auto@3 --plain-repeats 1 --weight-dtype fp8_e4m3fn --card-gb 16
         bench 160 --model flux-dev --configs bf16:auto@3 --plain-repeats 1 --weight-dtype fp8_e4m3fn --card-gb 24
         bench 230 --model sdxl --configs bf16:auto@3 --plain-repeats 1 --card-gb 12 ;;
  more) bench 170 --model chroma --configs bf16:auto@3 --plain-repeats 3
        bench 190 --model flux-kontext --configs bf16:auto@3 --plain-repeats 3 ;;
  tests) python3 -m pytest tests/test_dit_gradients.py -q -p no:cacheprovider 2>&1 | tee "$out/pytest-dit.txt" | tail -20
         exit "${PIPESTATUS[0]}" ;;
  *) echo "unknown part: $part" >&2; exit 2 ;;
esac
python3 bench/summarize.py "$out/results.jsonl" || true
