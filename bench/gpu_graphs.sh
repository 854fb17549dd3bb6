#!/usr/bin/env bash
# Issue 12 on one H200, one device call per part (each fits 10 minutes):
#   run(command="DNO_COMMIT=<sha> bash bench/gpu_graphs.sh sd15", carry=[".cache/comfyui", ".whl"])
# Parts: tests (GPU tests of the graph path + the memory tests), sd15, sdxl, sdxl-more, explore, curve,
# peak (what SD1.5's lowest-memory peak is made of), budgets (SDXL under small budgets),
# layout (SDXL 1024² DNO with channels-last weights against the default layout, one process).
# DNO_WHEELS=DIR installs the wheels of DIR instead of .whl (e.g. .whl-host: PyAV for the ComfyUI host, within the 64 MiB a call carries)
set -euo pipefail
part=${1:?usage: bench/gpu_graphs.sh tests|tests-host|tests-memory|sd15|sdxl|sdxl-more|explore|curve|peak|budgets|layout|layout-sd15}
out=${OUT:-/tmp/dno-bench}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --target /tmp/site "${DNO_WHEELS:-.whl}"/*.whl
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
bench() { python3 bench/run.py "$@" --out "$out/results.jsonl" 2>&1 | tee -a "$out/log.txt" | grep -v '^{"eager_run"' | cut -c1-600; }
case "$part" in
  tests) python3 -m pytest tests/test_gpu_graphs.py tests/test_gpu_memory.py -m gpu -q -p no:cacheprovider 2>&1 | tee "$out/pytest-gpu.txt" | tail -30
         exit "${PIPESTATUS[0]}" ;;
  # issue 13: two DNO workflows back to back through ComfyUI's executor (bench/host_wheels.sh prepares it)
  tests-memory) COMFYUI_PATH=${COMFYUI_PATH:-$PWD/.cache/comfyui-slim} python3 -m pytest tests/test_memory_release.py -m gpu -v -p no:cacheprovider 2>&1 | tee "$out/pytest-memory-release-gpu.txt" | tail -20
         exit "${PIPESTATUS[0]}" ;;
  # issues 13 and 15: memory given back after two workflows, the budget probe, the diffusers adapter on CUDA
  tests-host) python3 -m pytest tests/test_memory_release.py tests/test_gpu_memory.py tests/test_diffusers_adapter.py -m gpu -q -p no:cacheprovider 2>&1 | tee "$out/pytest-gpu-host.txt" | tail -40
         exit "${PIPESTATUS[0]}" ;;
  sd15) bench --model sd15 --configs bf16:step@5,bf16:auto@5,bf16:blocks@4 --compare --plain-repeats 2 ;;
  sdxl) bench --model sdxl --configs bf16:step@4,bf16:auto=22@4,bf16:auto@4 --plain-repeats 1 ;;
  sdxl-more) bench --model sdxl --configs bf16:auto@3,bf16:blocks@3 --plain-repeats 1
             bench --model sdxl --resolution 512 --steps 1 --configs bf16:step@5 --plain-repeats 3
             bench --model sdxl --resolution 512 --steps 4 --configs bf16:step@5 --plain-repeats 3 ;;
  explore) bench --model sd15 --configs bf16:auto@4,bf16:blocks@3 --plain-repeats 2
           bench --model sd15 --configs bf16:auto@4,bf16:blocks@3 --plain-repeats 2 --channels-last
           bench --model sdxl --resolution 512 --steps 1 --configs bf16:auto@5 --plain-repeats 3
           bench --model sdxl --resolution 512 --steps 4 --configs bf16:auto@5 --plain-repeats 3
           bench --model sdxl --resolution 512 --steps 4 --configs bf16:auto@5 --plain-repeats 3 --channels-last ;;
  peak) python3 -c "import torch; print(torch.__version__, hasattr(torch.cuda, 'get_per_process_memory_fraction'))"
        bench --model sd15 --steps 10 --configs bf16:blocks@2 --plain-repeats 1 --memory-snapshot "$out/peak-sd15-blocks.txt"
        bench --model sd15 --configs bf16:blocks@3 --plain-repeats 2 ;;
  budgets) bench --model sdxl --configs bf16:auto=8@3,bf16:auto=12@3 --plain-repeats 1 ;;
  layout) bench --model sdxl --configs bf16:auto@3,bf16:auto@3/nchw,bf16:auto=8@2 --plain-repeats 2 ;;
  layout-sd15) bench --model sd15 --configs bf16:auto@4,bf16:auto@4/nchw,bf16:blocks@3 --plain-repeats 3 ;;
  curve) bench --model sdxl --configs bf16:blocks@3,bf16:auto=8@3,bf16:auto=12@3,bf16:auto=16@3,bf16:auto=24@3,bf16:auto=48@3 --plain-repeats 1 ;;
  *) echo "unknown part: $part" >&2; exit 2 ;;
esac
python3 bench/summarize.py "$out/results.jsonl" || true
