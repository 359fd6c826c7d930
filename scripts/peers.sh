#!/usr/bin/env bash
# The kvpress peers on the committed model (models/tiny: the v2 base model and its TIS components): every press and
# tinytis's policies on the same held-out prompts, 1,024 and 2,048 tokens, query-agnostic, both prompt families
# (in-distribution and the held-out family) side by side, n = 102 per (task variant, policy, budget, family): NIAH and
# narrative 17 samples at each of 3 depths x 2 lengths, fidelity 51 per length. Two processes of one thread (NIAH;
# then fidelity and narrative). Not yet run on v2: docs/results_v1.md holds the peers of the first model (one family,
# about 65 minutes on a 2-core CPU; two families take about twice that). Run it in the kvpress environment (README),
# then print the tables:
#
#   bash scripts/peers.sh .venv-kvpress/bin/python
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-.venv-kvpress/bin/python}
R=docs/results P=docs/plots
peers() {  # task, samples per cell
    "$py" bench.py peers --tasks "$1" --lengths 1024,2048 --n-samples "$2" --threads 1 \
        --output "$R/peers_$1.csv" --plot "$P/peers_$1.png"
}
peers niah 17 &
niah=$!
peers fidelity 51
peers narrative 17
wait $niah  # its exit status
python eval.py --report $R/peers_{niah,narrative,fidelity}.csv
