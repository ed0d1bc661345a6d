#!/usr/bin/env bash
# The GPU run: bench.py presets in bf16 with and without torch.compile, a 500-step training
# run of configs/cifar10.yaml (throughput, peak memory) and the 2-GPU DDP smoke test, written
# to one JSON. Works offline (synthetic image folder). See docs/gpu.md.
#
#   bash benchmarks/gpu.sh --out gpu.json                  # CUDA machine, ~8 minutes
#   bash benchmarks/gpu.sh --device cpu --out dry.json     # dry run: tiny sizes, no GPU needed
#
# Options: bash benchmarks/gpu.sh --help. Exit status 0: every part ok or skipped;
# 1: a part failed (the JSON says which and why); 2: bad arguments or no CUDA device.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
# python3, not python: some images (the lent H200 among them) hold torch under python3 alone.
exec "${PYTHON:-python3}" "$root/benchmarks/gpu_run.py" "$@"
