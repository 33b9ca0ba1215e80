#!/usr/bin/env bash
# CPU smoke sweep (the README's `make demo`): JPS against DomainBed's ERM on
# the embedded RotatedMNIST digits, leave-one-domain-out, 1 trial, default
# hyperparameters, then DomainBed's collect_results.
#
# JPS runs on "jps-vit-mini", a 4-block CLIP-architecture ViT with RANDOM
# weights at 28 px, because pretrained CLIP weights cannot be downloaded on
# an offline machine. Its accuracies are therefore near chance after so few
# steps and tell nothing about the method. sweeps/paper_protocol.sh is the
# real run (ViT-B/16 with OpenAI weights on a GPU cluster).
#
# Settings (environment variables):
#   PYTHON      interpreter with jps-domainbed and the patched DomainBed
#   DATA_DIR    DomainBed data folder holding MNIST/raw/ (default: data)
#   OUTPUT_DIR  sweep folder (default: demo_output/sweep)
#   STEPS       training steps per job (default: 50)
set -euo pipefail

PYTHON=${PYTHON:-python}
DATA_DIR=${DATA_DIR:-data}
OUTPUT_DIR=${OUTPUT_DIR:-demo_output/sweep}
STEPS=${STEPS:-50}
export JPS_OFFLINE=1
# DomainBed's sweep starts every job as `python -m ...`: put $PYTHON's folder first.
PATH="$(cd "$(dirname "$(command -v "$PYTHON")")" && pwd):$PATH"
export PATH

HPARAMS='{"clip_model": "jps-vit-mini", "clip_pretrained": "none", "clip_image_size": 28,
          "head_init": "random", "batch_size": 16,
          "jps_k": 500, "jps_rho": 0.1, "jps_selection_batches": 4}'
SWEEP_ARGS=(--datasets RotatedMNIST --algorithms JPS ERM --data_dir "$DATA_DIR"
            --n_hparams 1 --n_trials 1)

"$PYTHON" -m jps_domainbed.preflight "${SWEEP_ARGS[@]}" --steps "$STEPS" --hparams "$HPARAMS"

"$PYTHON" -m domainbed.scripts.sweep launch "${SWEEP_ARGS[@]}" \
    --output_dir "$OUTPUT_DIR" --command_launcher local --single_test_envs \
    --steps "$STEPS" --hparams "$HPARAMS" --skip_confirmation

"$PYTHON" -m domainbed.scripts.collect_results --input_dir "$OUTPUT_DIR"
