"""Train the embedded tiny model and the learned eviction components, on this machine's CPU.

    python train.py base      # tokenizer + Mistral-architecture model from scratch -> models/tiny
    python train.py oracle    # TIS stage 1: importance head supervised by oracle attention mass
    python train.py [ert]     # TIS stage 3: oracle warm start, then ERT -> models/tiny/tis_components.pt
    python train.py ert --model DIR_OR_HUB_ID --quant nf4 --data my.jsonl   # TIS for your model, on your data
    python train.py dms       # DMS retrofit of the base model -> models/tiny-dms (a model directory + dms_metadata.json)
    python train.py trimkv    # TRIM-KV retention gates -> models/tiny/trimkv_gates.safetensors
"""
import sys
from pathlib import Path

import torch

from tinytis.device import add_device_flag
from tinytis.errors import ArgumentParser, run_cli
from tinytis.importance import COMPONENTS_FILE
from tinytis.train.base import train_base
from tinytis.train.dms import train_dms
from tinytis.train.tis import train_tis
from tinytis.train.trimkv import train_trimkv
from tinytis.trimkv import GATES_FILE


def frozen_model_stage(sub, name: str, help: str, out_file: str, what: str, steps: int, max_len: int, eval_every: int,
                       lr: float):
    """A stage that trains eviction components on the frozen base model (oracle, ert, trimkv): its common flags."""
    p = sub.add_parser(name, help=help)
    p.add_argument("--model", default="models/tiny", help="frozen base model: a directory or a cached hub id")
    p.add_argument("--quant", choices=["nf4"], help="hold the frozen base in NF4 (gradients reach only the components)")
    add_device_flag(p)
    p.add_argument("--out", default=None, help=f"{what} file to write (default: MODEL/{out_file})")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--min-len", type=int, default=256)
    p.add_argument("--max-len", type=int, default=max_len)
    p.add_argument("--n-sink", type=int, default=4, help="first tokens always kept")
    p.add_argument("--n-recent", type=int, default=16, help="last context tokens always kept")
    p.add_argument("--eval-every", type=int, default=eval_every, help="steps between held-out evaluations")
    return p


def main():
    parser = ArgumentParser(prog="train.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="stage")
    base = sub.add_parser("base", help="train the tokenizer and the tiny base model from scratch")
    base.add_argument("--out", default="models/tiny", help="model directory to write (HF layout)")
    base.add_argument("--eval-every", type=int, default=1000, help="steps between held-out evaluations")
    for name, help in (("oracle", "TIS stage 1: supervise the importance head with oracle labels"),
                       ("ert", "TIS stage 3: oracle warm start, then KL(full || evicted) + alignment")):
        p = frozen_model_stage(sub, name, help, COMPONENTS_FILE, "components", steps=400, max_len=2048, eval_every=100,
                               lr=1e-3)  # 3e-3 collapsed beyond ~400 ERT steps (docs/results.md)
        p.add_argument("--shared-score", action="store_true",
                       help="one score per token shared by every layer and KV head (default: one per layer and KV head)")
        p.add_argument("--data", type=Path, help="train on your own data: a JSONL file in LongBench's schema (context, "
                                                 "input, answers); contexts past --max-len are truncated from the middle")
        if name == "ert":
            p.add_argument("--oracle-steps", type=int, default=200, help="alignment-only warm-start steps first")
            p.add_argument("--lambda-align", type=float, default=0.1, help="weight of the alignment term")
    dms = sub.add_parser("dms", help="DMS retrofit: borrowed-channel zeroing, then Gumbel-sigmoid eviction decisions "
                                     "trained by distillation from the base model + a one-sided compression loss")
    dms.add_argument("--model", default="models/tiny", help="base model directory (the teacher)")
    dms.add_argument("--out", default="models/tiny-dms", help="DMS model directory to write")
    dms.add_argument("--window", type=int, default=32, help="delayed-eviction window in tokens")
    dms.add_argument("--alpha-scale", type=float, default=100.0)
    dms.add_argument("--alpha-offset", type=float, default=5.0)
    dms.add_argument("--target-cr", type=float, default=2.5, help="compression ratio the target ramps to")
    dms.add_argument("--ramp", type=float, default=0.5, help="share of the DMS steps over which the target ramps up")
    dms.add_argument("--tau", type=float, default=0.1, help="Gumbel-sigmoid temperature")
    dms.add_argument("--compression-weight", type=float, default=1.0)
    dms.add_argument("--zero-steps", type=int, default=20, help="phase 1: distil with the borrowed channel zeroed")
    dms.add_argument("--steps", type=int, default=80, help="phase 2: DMS steps")
    dms.add_argument("--lr", type=float, default=3e-4)
    dms.add_argument("--min-len", type=int, default=256)
    dms.add_argument("--max-len", type=int, default=512)
    dms.add_argument("--eval-every", type=int, default=70, help="steps between held-out gate evaluations")
    p = frozen_model_stage(sub, "trimkv", "TRIM-KV: retention gates on the frozen model, distillation + capacity loss",
                           GATES_FILE, "gates", steps=120, max_len=1024, eval_every=50, lr=3e-3)
    p.add_argument("--memory-size", type=int, default=128, help="M: the tokens' worth of retention a head may hold")
    p.add_argument("--buffer-size", type=int, default=32, help="recorded for decoding: evict when a head holds M + this")
    p.add_argument("--lambda-capacity", type=float, default=1.0, help="weight of the capacity loss")
    p.add_argument("--gate-hidden", type=int, default=64, help="hidden units of each layer's gate MLP")
    for p in sub.choices.values():
        p.add_argument("--run-dir", default="runs", help="where checkpoints for --resume live")
        p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --run-dir")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--save-every-s", type=float, default=180, help="seconds between checkpoints")
        p.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(sys.argv[1:] or ["ert"])
    if args.stage is None:
        parser.error("name a stage first: base, oracle, ert, dms or trimkv")
    torch.set_num_threads(args.threads)
    {"base": train_base, "oracle": train_tis, "ert": train_tis, "dms": train_dms, "trimkv": train_trimkv}[args.stage](args)


if __name__ == "__main__":
    run_cli(main)
