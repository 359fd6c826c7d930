"""tinytis as a library next to transformers: from a folder outside the checkout, one fresh interpreter loads the
embedded model in tinytis, decodes 4 tokens with TIS at a 25 % budget, then loads the same directory in transformers
(which imports the hub's package named `kernels`). Both run, agree on the prompt's logits, and `kernels` is the hub's
package while tinytis's kernels are tinytis.kernels."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "models" / "tiny"
pytest.importorskip("transformers")

SCRIPT = r'''
import json
import sys
from pathlib import Path

import torch

from tinytis.engine import SamplingParams, answer
from tinytis.model import Transformer
from tinytis.policies import make_policy
from tinytis.tasks import niah
from tinytis.tasks.seeds import EVAL_SEEDS
from tinytis.tokenizer import Tokenizer

tiny = Path(sys.argv[1])
model, tok = Transformer.from_pretrained(tiny), Tokenizer.from_dir(tiny)
sample = niah.make("passkey", EVAL_SEEDS.start, 256, 0.5, lambda s: len(tok.encode(s, bos=False)))
prompt = tok.encode(sample.context + " " + sample.question)  # query-aware: the question ends the compressed context
gen = answer(model, [prompt], None, SamplingParams(max_new_tokens=4), make_policy("tis", tiny, model.args), 0.25)
with torch.no_grad():
    ours = model(torch.tensor([prompt]))[0]

from transformers import AutoModelForCausalLM

hf = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
with torch.no_grad():
    theirs = hf(torch.tensor([prompt])).logits[0]

import kernels
import tinytis
import tinytis.kernels

print(json.dumps({
    "tokens": gen.tokens[0], "kv_bytes_held": gen.stats["kv_bytes_held"], "kv_bytes_full": gen.stats["kv_bytes_full"],
    "max_logit_diff": (ours - theirs).abs().max().item(), "transformers_next": theirs[-1].argmax().item(),
    "tinytis": tinytis.__file__, "tinytis_kernels": tinytis.kernels.__file__, "kernels": kernels.__file__,
    "hub_kernels_api": hasattr(kernels, "get_kernel"),
}))
'''


def test_tinytis_decodes_with_tis_then_transformers_loads_the_same_model_in_one_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(TINY)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(r["tinytis"]).parent == ROOT / "tinytis"  # this checkout, not another installed copy
    assert Path(r["tinytis_kernels"]).parent == ROOT / "tinytis" / "kernels"
    assert not Path(r["kernels"]).is_relative_to(ROOT) and r["hub_kernels_api"]  # the hub's package, not ours
    assert len(r["tokens"]) == 4
    assert 0 < r["kv_bytes_held"] < r["kv_bytes_full"]  # TIS evicted to its budget
    assert r["max_logit_diff"] <= 1e-4
    assert r["tokens"][0] == r["transformers_next"]  # the first token comes from the prompt's full-cache logits
