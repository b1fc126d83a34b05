#!/bin/sh
# Trains the shipped demo model from scratch (docs/demo-model.md): the autoencoder in two parts, then the
# UNet + text tower. Run from the repository root; logs and intermediate weights go to checkpoints/demo/train/.
set -e
mkdir -p checkpoints/demo/train
start=$(date +%s)
python=${PYTHON:-.venv/bin/python}
for config in demo-autoencoder demo-autoencoder-2 demo-diffusion; do
    $python -m ldm.training --config configs/demo/$config.yaml > checkpoints/demo/train/$config.log 2>&1
    echo "$config done after $(( $(date +%s) - start )) s" >> checkpoints/demo/train/times.log
done
