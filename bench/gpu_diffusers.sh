#!/usr/bin/env bash
# Issue 15 on 2 GPUs of one host, one device call (the pipeline is built and saved once, then four
# torchrun runs of `python -m dno run`: prompt sharding and the split hybrid estimator, 1 vs 2 GPUs):
#
#   run(kind="nvidia-h200-x2", command="DNO_COMMIT=<sha> bash bench/gpu_diffusers.sh", carry=[".whl"])
#
# .whl: wheels the device image may lack, installed with --no-deps into /tmp/site only where an
# import fails (bash bench/diffusers_wheels.sh downloads diffusers and its own pure-Python
# dependencies there). The JSON lines go to $OUT/diffusers-scaling.jsonl; commit them as
# bench/results/<date>-h200x2-diffusers-scaling.jsonl.
set -euo pipefail
out=${OUT:-/tmp/dno-bench}
mkdir -p "$out"
if ! python3 -c "import diffusers, transformers, tqdm" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, diffusers, transformers, huggingface_hub as h; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'huggingface_hub', h.__version__)" | tee -a "$out/gpu.txt"
python3 bench/diffusers_scaling.py --gpus 2 --out "$out/diffusers-scaling.jsonl" "$@" 2>&1 | tee "$out/log.txt" | grep -v '^{' | tail -40
