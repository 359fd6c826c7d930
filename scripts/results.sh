#!/usr/bin/env bash
# Every policy table and plot of docs/results.md on the committed models (v2 base model, its TIS components,
# TRIM-KV gates and DMS retrofit): query-agnostic, 1,024 and 2,048 tokens, budgets 5-50 %, both prompt families
# (in-distribution and the held-out family) side by side. Two processes of one thread, about 40 minutes on a 2-core
# CPU; then the tables and plots.
#
#   bash scripts/results.sh
set -euo pipefail
cd "$(dirname "$0")/.."
R=docs/results
grid="--policies full,random,streaming,h2o,tova,snapkv,knorm,oracle,tis,trimkv,dms --budgets 0.05,0.1,0.25,0.5
      --lengths 1024,2048 --depths 0,0.5,1 --threads 1"
python eval.py niah      $grid --n-samples 6 --output $R/niah.csv &
python eval.py narrative $grid --n-samples 6 --output $R/narrative.csv
python eval.py litm      $grid --litm-docs 10,20 --n-samples 6 --output $R/litm.csv
python eval.py fidelity  $grid --n-samples 12 --output $R/fidelity.csv
wait
python eval.py --report $R/{niah,narrative,litm,fidelity}.csv --plot docs/plots
