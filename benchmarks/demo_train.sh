#!/bin/sh
# Trains the shipped demo model from scratch, as it was trained (docs/demo-model.md): the autoencoder in
# three parts, then the UNet + text tower side by side with a decoder-only fine-tune of the autoencoder
# (two single-thread processes), then the fine-tuned decoder goes into the shipped checkpoint.
# Run from the repository root; logs and intermediate weights go to checkpoints/demo/train/.
set -e
mkdir -p checkpoints/demo/train
start=$(date +%s)
python=${PYTHON:-.venv/bin/python}
log=checkpoints/demo/train
for config in demo-autoencoder demo-autoencoder-2 demo-autoencoder-3; do
    $python -m ldm.training --config configs/demo/$config.yaml > $log/$config.log 2>&1
    echo "$config done after $(( $(date +%s) - start )) s" >> $log/times.log
done
$python -m ldm.training --config configs/demo/demo-diffusion.yaml > $log/demo-diffusion.log 2>&1 &
$python -m ldm.training --config configs/demo/demo-autoencoder-4.yaml > $log/demo-autoencoder-4.log 2>&1 &
wait
$python -c "from ldm.training import merge_first_stage as m; m('checkpoints/demo/demo.safetensors', \
'$log/demo-autoencoder-decoder.safetensors', 'checkpoints/demo/demo.safetensors')"
echo "all done after $(( $(date +%s) - start )) s" >> $log/times.log
