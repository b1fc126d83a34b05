#!/usr/bin/env bash
# The GPU check of issue 17: sd against diffusers on one NVIDIA GPU, as a markdown report (default
# gpu-check.md). Needs only this repository and `make install`: full-size random-weight checkpoints are
# built on the spot (benchmarks/fullsize.py). Runs in a few minutes on a modern GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python benchmarks/gpu_check.py --out "${1:-gpu-check.md}"
