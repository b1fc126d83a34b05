#!/bin/sh
# Trains the shipped demo model from scratch, as it was trained (docs/demo-model.md): the autoencoder
# (15 minutes, one thread), then the UNet + text tower on its latents (40 minutes, two threads, the learning
# rate annealed over the last quarter).
# Run from the repository root; logs and intermediate weights go to checkpoints/demo/train/.
set -e
mkdir -p checkpoints/demo/train
start=$(date +%s)
sd=${SD:-.venv/bin/sd}
log=checkpoints/demo/train
$sd train --config configs/demo/demo-autoencoder.yaml > $log/demo-autoencoder.log 2>&1
echo "demo-autoencoder done after $(( $(date +%s) - start )) s" >> $log/times.log
$sd train --config configs/demo/demo-diffusion.yaml > $log/demo-diffusion.log 2>&1
echo "all done after $(( $(date +%s) - start )) s" >> $log/times.log
