#!/usr/bin/env bash
# Paper-protocol sweep: JPS against same-backbone ERM (CLIP ViT-B/16, OpenAI
# weights) on PACS, VLCS, OfficeHome, TerraIncognita and DomainNet,
# leave-one-domain-out, with DomainBed's stock sweep.
#
# Protocol:
#   - one test domain per job (--single_test_envs), every domain in turn;
#   - N_TRIALS=3 trials (data splits and seeds) per setting;
#   - N_HPARAMS=5 hyperparameter settings: seed 0 is the registry default
#     and seeds 1-4 are random draws from jps_domainbed/hparams.py; model
#     selection is DomainBed's training-domain validation;
#   - 5001 steps for PACS, VLCS, OfficeHome and TerraIncognita and 15001
#     for DomainNet, the step counts of the SWAD and MIRO code bases that
#     the published ERM, SWAD and MIRO rows come from (N_STEPS in
#     domainbed/datasets/datasets.py of khanrc/swad and kakaobrain/miro).
#     DomainNet's 586k images need the longer run to see each example
#     about as often as the smaller datasets do.
#
# Job count: (4 + 4 + 4 + 4 + 6) domains x 3 trials x 5 hparams x 2
# algorithms = 660 jobs. Each runs `python -m domainbed.scripts.train`;
# relaunching skips jobs that have a `done` file.
#
# Settings (environment variables):
#   PYTHON       interpreter with jps-domainbed and the patched DomainBed
#   DATA_DIR     DomainBed data folder (python -m domainbed.scripts.download)
#   OUTPUT_DIR   sweep folder (default: sweeps_output/paper_protocol)
#   LAUNCHER     DomainBed command launcher (default: slurm; see docs/slurm.md)
#   ALGORITHMS   default: "JPS CLIP_ERM"; add CLIP_LinearProbe for the floor
#   DATASETS     default: all five
#   N_HPARAMS, N_TRIALS
#   DRY_RUN=1    print the job list with DomainBed's dummy launcher; reads
#                no data and starts nothing
set -euo pipefail

PYTHON=${PYTHON:-python}
DATA_DIR=${DATA_DIR:-/path/to/domainbed/data}
OUTPUT_DIR=${OUTPUT_DIR:-sweeps_output/paper_protocol}
LAUNCHER=${LAUNCHER:-slurm}
ALGORITHMS=${ALGORITHMS:-JPS CLIP_ERM}
DATASETS=${DATASETS:-PACS VLCS OfficeHome TerraIncognita DomainNet}
N_HPARAMS=${N_HPARAMS:-5}
N_TRIALS=${N_TRIALS:-3}
DRY_RUN=${DRY_RUN:-0}

steps_for() {
    case "$1" in
        DomainNet) echo 15001 ;;
        *) echo 5001 ;;
    esac
}

if [ "$DRY_RUN" = "1" ]; then
    LAUNCHER=dummy
fi

for dataset in $DATASETS; do
    # shellcheck disable=SC2206
    sweep_args=(--datasets "$dataset" --algorithms $ALGORITHMS --data_dir "$DATA_DIR"
                --n_hparams "$N_HPARAMS" --n_trials "$N_TRIALS")
    if [ "$DRY_RUN" != "1" ]; then
        "$PYTHON" -m jps_domainbed.preflight "${sweep_args[@]}" --steps "$(steps_for "$dataset")"
    fi
    "$PYTHON" -m domainbed.scripts.sweep launch "${sweep_args[@]}" \
        --output_dir "$OUTPUT_DIR" --command_launcher "$LAUNCHER" \
        --single_test_envs --steps "$(steps_for "$dataset")" --skip_confirmation
done

if [ "$DRY_RUN" != "1" ]; then
    echo "Collect the results with:"
    echo "  $PYTHON -m domainbed.scripts.collect_results --input_dir $OUTPUT_DIR"
    echo "  $PYTHON -m jps_domainbed.report --input_dir $OUTPUT_DIR --output_dir $OUTPUT_DIR/report"
fi
