#!/usr/bin/env bash
# Every table and plot of docs/results.md except the ablation (scripts/ablation.sh) and the kvpress peers (their
# own environment, README): the main grids, the TRIM-KV and DMS rows on the same held-out samples, then the
# tables and plots of all of them together. About two hours on a 2-core CPU; run the lines in parallel to save time.
#
#   bash scripts/results.sh
set -euo pipefail
cd "$(dirname "$0")/.."
R=docs/results
policies=full,random,streaming,h2o,tova,snapkv,knorm,oracle,tis
niah="--lengths 512,1024,2048 --depths 0,0.5,1 --n-samples 12"
litm="--litm-docs 10,20 --depths 0,0.5,1 --n-samples 17"
fidelity="--lengths 512,1024,2048 --n-samples 35"

# the heuristics, the oracle and TIS
budgets="--budgets 0.05,0.1,0.25,0.5,1.0"
python eval.py niah      --policies $policies $budgets $niah --output $R/niah.csv
python eval.py niah      --policies $policies $budgets $niah --setting aware --output $R/niah_aware.csv
python eval.py fidelity  --policies $policies $budgets $fidelity --output $R/fidelity.csv
python eval.py narrative --policies $policies $budgets $niah --output $R/narrative.csv
python eval.py litm      --policies $policies $budgets $litm --output $R/litm.csv
python eval.py multiq    --policies $policies $budgets --lengths 512,1024 --n-samples 4 --threads 1 --output $R/multiq.csv

# the learned peers: TRIM-KV at the same budgets, DMS once (it sets its own compression)
budgets="--budgets 0.05,0.1,0.25,0.5"
python eval.py niah      --policies trimkv $budgets $niah --output $R/trimkv_niah.csv
python eval.py fidelity  --policies trimkv $budgets $fidelity --output $R/trimkv_fidelity.csv
python eval.py narrative --policies trimkv $budgets $niah --output $R/trimkv_narrative.csv
python eval.py litm      --policies trimkv $budgets $litm --output $R/trimkv_litm.csv
python eval.py niah      --policies dms $niah --output $R/dms_niah.csv
python eval.py fidelity  --policies full,dms --lengths 512,1024,2048 --n-samples 8 --output $R/dms_fidelity.csv
python eval.py narrative --policies dms $niah --output $R/dms_narrative.csv
python eval.py litm      --policies dms $litm --output $R/dms_litm.csv

python eval.py --report $R/{niah,niah_aware,fidelity,narrative,litm,multiq}.csv \
    $R/trimkv_{niah,fidelity,narrative,litm}.csv $R/dms_{niah,fidelity,narrative,litm}.csv --plot docs/plots
