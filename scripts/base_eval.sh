#!/usr/bin/env bash
# The embedded model's own acceptance (docs/results.md, "What the embedded model can do with its full cache"): full
# cache on every task at 512-2,048 tokens, n = 102 per (task, length) (34 per depth), both prompt families; then
# that it still depends on its cache: streaming and the oracle at 25 %, needle in the first half. About 25 minutes
# on one core.
#
#   bash scripts/base_eval.sh
set -euo pipefail
cd "$(dirname "$0")/.."
R=docs/results
full="--policies full --budgets 1.0 --n-samples 34 --threads 1"
python eval.py niah      $full --lengths 512,1024,2048 --depths 0,0.5,1 --output $R/base_niah.csv
python eval.py narrative $full --lengths 512,1024,2048 --depths 0,0.5,1 --output $R/base_narrative.csv
python eval.py litm      $full --litm-docs 10,20 --depths 0,0.5,1 --output $R/base_litm.csv
python eval.py niah --policies streaming,oracle --budgets 0.25 --lengths 512,1024,2048 --depths 0,0.25,0.5 \
    --n-samples 34 --family id --threads 1 --output $R/base_cache_dependence.csv
