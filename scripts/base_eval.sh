#!/usr/bin/env bash
# A base model's own acceptance (docs/results.md, "What the embedded model can do with its full cache"): full
# cache on every task at 512-2,048 tokens, n = 102 per (task, length) (34 per depth), all three prompt families
# (in-distribution, held-out synthetic, real prose); then that it still depends on its cache: streaming and the
# oracle at 25 %, needle in the first half, in-distribution and in real prose; then the induction probe.
#
#   bash scripts/base_eval.sh [MODEL_DIR [RESULTS_PREFIX]]     # default: models/tiny, docs/results/base
set -euo pipefail
cd "$(dirname "$0")/.."
M=${1:-models/tiny}
R=${2:-docs/results/base}
full="--model $M --policies full --budgets 1.0 --n-samples 34 --threads 1"
python eval.py niah      $full --lengths 512,1024,2048 --depths 0,0.5,1 --output ${R}_niah.csv
python eval.py narrative $full --lengths 512,1024,2048 --depths 0,0.5,1 --output ${R}_narrative.csv
python eval.py litm      $full --litm-docs 10,20 --depths 0,0.5,1 --output ${R}_litm.csv
for family in id prose; do
    python eval.py niah --model $M --policies streaming,oracle --budgets 0.25 --lengths 512,1024,2048 \
        --depths 0,0.25,0.5 --n-samples 34 --family $family --threads 1 --output ${R}_cache_dependence_$family.csv
done
python -c "
import sys; from tinytis.model import Transformer; from tinytis.tokenizer import Tokenizer
from tinytis.train.base import induction_accuracy
m, t = Transformer.from_pretrained(sys.argv[1]), Tokenizer.from_dir(sys.argv[1])
print('induction probe (n = 32):', {L: round(induction_accuracy(m, t, L, n=32), 3) for L in (256, 1024)})
" $M | tee ${R}_induction.txt
