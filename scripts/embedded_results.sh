#!/usr/bin/env bash
# The embedded benchmark's published results (README, docs/embedded_results.*):
# accuracy and evidence recall vs keep (1.0, 0.5, 0.25, 0.1) for every scorer of
# +experiment=ablate_scorer (random, uniform, fastv, v15, v2, pdrop at layer 2; dart at
# layer 1; divprune, visionzip, cdpruner, vispruner before the LLM), on the shapes test
# split, then the report.
#   scripts/embedded_results.sh [extra overrides, e.g. limit=200]
# 44 runs of the embedded model (11 scorers x 4 keeps), 500 questions each; on 2 CPU cores
# each takes a few minutes on an idle machine (one run of 50 questions, scorer=cdpruner
# keep=0.25, took 5 min 39 s wall / 71 s CPU with the cores shared by 5 other jobs).
set -euo pipefail
cd "$(dirname "$0")/.."
sweep="outputs/multirun/embedded_results"
rm -rf "$sweep"
python -m sparsevlm_exp -m +experiment=ablate_scorer logger=none viz.n=0 "hydra.sweep.dir=$sweep" "$@"
python -m sparsevlm_exp.report "$sweep" --out docs/embedded_results
echo "table and plots in docs/embedded_results/"
