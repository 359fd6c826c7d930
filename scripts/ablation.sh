#!/usr/bin/env bash
# The TIS ablation on the committed base model (models/tiny, v2): the default recipe (`python train.py`: 200 oracle
# steps, then 400 ERT steps at lr 1e-3 on the broader mix of tinytis/tasks/tis_mix.py, anchors 4 sinks + 16 recent
# within a quarter of each budget, per-(layer, KV head) scores) retrained with one change per variant, then every
# variant evaluated in one grid beside the committed components, both prompt families side by side. Not yet run on
# v2: docs/results_v1.md holds the ablation of the first model (about 40 minutes of training there).
#
#   bash scripts/ablation.sh            # six trainings + the grid; components -> runs/ablation
set -euo pipefail
cd "$(dirname "$0")/.."
out=runs/ablation
mkdir -p "$out"

variant() {  # name, then the train.py arguments; skipped when its components exist
    local name=$1; shift
    [ -f "$out/$name.pt" ] || python train.py "$@" --run-dir "$out/$name" --out "$out/$name.pt"
}
variant no_anchors   ert --n-sink 0 --n-recent 0
variant no_alignment ert --lambda-align 0
variant oracle_only  oracle --steps 600
variant ert_only     ert --oracle-steps 0 --steps 600
variant random_init  ert --oracle-steps 0 --steps 0
variant shared_score ert --shared-score

policies=full,snapkv,tis
for name in no_anchors no_alignment oracle_only ert_only random_init shared_score; do
    policies="$policies,tis=$out/$name.pt"
done
grid="--policies $policies --budgets 0.05,0.1,0.25,0.5 --lengths 512,1024,2048"
python eval.py niah     $grid --depths 0,0.5,1 --n-samples 12 --output docs/results/ablation_niah.csv
python eval.py fidelity $grid --n-samples 35 --output docs/results/ablation_fidelity.csv
python eval.py --report docs/results/ablation_{niah,fidelity}.csv --plot docs/plots/ablation
