#!/bin/sh
# Trains the shipped demo model from scratch, as it was trained (docs/demo-model.md): the autoencoder
# (15 minutes, one thread), the UNet + text tower on its latents (40 minutes, two threads, the learning rate
# annealed over the last quarter), then the same continued for 45 minutes (a fresh warm-up and anneal).
# Run from the repository root; logs, intermediate weights and the training states go to checkpoints/demo/train/.
# Cut off (Ctrl-C, a reboot, a lost session)? Run it again: each stage resumes from its last training state
# (written every 100 steps beside its checkpoint), and a finished stage says so and is skipped.
set -e
mkdir -p checkpoints/demo/train
start=$(date +%s)
sd=${SD:-.venv/bin/sd}
log=checkpoints/demo/train
$sd train --config configs/demo/demo-autoencoder.yaml --resume >> $log/demo-autoencoder.log 2>&1
echo "demo-autoencoder done after $(( $(date +%s) - start )) s" >> $log/times.log
$sd train --config configs/demo/demo-diffusion.yaml --output $log/demo-40min.safetensors --resume \
  >> $log/demo-diffusion.log 2>&1
echo "demo-diffusion (40 min) done after $(( $(date +%s) - start )) s" >> $log/times.log
$sd train --config configs/demo/demo-diffusion.yaml --init-from $log/demo-40min.safetensors --max-minutes 45 \
  --log $log/demo-diffusion-continued-loss.csv --resume >> $log/demo-diffusion-continued.log 2>&1
echo "all done after $(( $(date +%s) - start )) s" >> $log/times.log
