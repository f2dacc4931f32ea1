#!/usr/bin/env bash
# The embedded benchmark's published results (README, docs/embedded_results.*):
# accuracy and evidence recall vs keep (1.0, 0.5, 0.25, 0.1) for every scorer of
# +experiment=ablate_scorer (random, uniform, fastv, v15, v2, pdrop at layer 2; dart at
# layer 1; divprune, visionzip, cdpruner, vispruner before the LLM), on the shapes test
# split, then the report.
#   scripts/embedded_results.sh [extra overrides, e.g. limit=200]
# 44 runs of the embedded model (11 scorers x 4 keeps), 500 questions each, in batches of 8
# (every prediction, kept token and recall is batch 1's - tests/test_batching.py - while the
# latencies become batch shares, which the report says). On 2 CPU cores shared with four
# other jobs (load 7-12), with threads=1, the 44 runs took about 70 min (2026-11-29); at batch 1
# the same machine needed ~4 min per run.
set -euo pipefail
cd "$(dirname "$0")/.."
sweep="outputs/multirun/embedded_results"
rm -rf "$sweep"
python -m sparsevlm_exp -m +experiment=ablate_scorer logger=none viz.n=0 batch_size=8 "hydra.sweep.dir=$sweep" "$@"
python -m sparsevlm_exp.report "$sweep" --out docs/embedded_results
echo "table and plots in docs/embedded_results/"
