"""What every training stage shares: batches of encoded samples, checkpoints that resume exactly, one optimizer
step, the learning-rate schedule and the command line that reproduces a run."""
import math
import os
import random
from pathlib import Path

import torch

from tinytis.errors import UserError
from tinytis.tasks import Sample
from tinytis.tokenizer import Tokenizer


# ---------------------------------------------------------------------------- data

def encode_sample(tok: Tokenizer, s: Sample) -> tuple[list[int], int]:
    """ids = BOS context question answer EOS, and where the answer starts (the loss covers answer + EOS)."""
    prefix = tok.encode(s.context) + tok.encode(s.question, bos=False)
    return prefix + tok.encode(s.answer, bos=False, eos=True), len(prefix)


def make_batch(encoded: list[tuple[list[int], int]]):
    """Right-padded ids (B, T) and next-token targets (B, T) with -100 outside the answers, from (ids, answer start)
    pairs (encode_sample's, or the copy task's)."""
    T = max(len(ids) for ids, _ in encoded) - 1
    x = torch.zeros(len(encoded), T, dtype=torch.long)
    y = torch.full((len(encoded), T), -100, dtype=torch.long)
    for b, (ids, start) in enumerate(encoded):
        ids = torch.tensor(ids)
        x[b, : len(ids) - 1] = ids[:-1]
        y[b, start - 1 : len(ids) - 1] = ids[start:]
    return x, y


def answer_accuracy(logits, y) -> torch.Tensor:
    """Per sample: 1 when every answer token (and EOS) is the argmax, teacher-forced."""
    wrong = (logits.argmax(-1) != y) & (y != -100)
    return (~wrong.any(-1)).float()


# ---------------------------------------------------------------------------- checkpoints

def save_atomic(obj, path: Path):
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def start_or_resume(ckpt: Path, module, opt, state: dict, resume: bool):
    """The training state to start from: `state`, or with --resume the checkpoint's, with module and optimizer
    restored in place. Returns (state, the data RNG)."""
    if resume:
        if not ckpt.exists():
            raise UserError(f"--resume: no checkpoint at {ckpt}; start without --resume")
        saved = torch.load(ckpt, weights_only=False)
        module.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        state = saved["state"]
    rng = random.Random()
    rng.setstate(state["rng"])
    return state, rng


def save_checkpoint(ckpt: Path, module, opt, state: dict, rng: random.Random):
    state["rng"] = rng.getstate()
    save_atomic({"model": module.state_dict(), "opt": opt.state_dict(), "state": state}, ckpt)


def training_command(args) -> str:
    """The train.py command line that reproduces a run, recorded in what it saves (--resume and --threads left out)."""
    flags = [(f"--{k.replace('_', '-')}", v) for k, v in sorted(vars(args).items()) if k not in ("stage", "resume", "threads")]
    return " ".join(["python train.py", args.stage] + [f if v is True else f"{f} {v}" for f, v in flags if v is not False])


def save_components(components, state: dict, out: Path):
    """Write trained eviction components (TIS, TRIM-KV gates) with their training log in their metadata."""
    components.meta["log"] = state["log"]
    components.save(out)
    print(f"saved {out}")


# ---------------------------------------------------------------------------- optimisation

def optimizer_step(opt, loss):
    """One step of opt on loss, the gradient of everything it trains clipped to norm 1."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for group in opt.param_groups for p in group["params"]], 1.0)
    opt.step()


def cosine_lr(step: int, total: int, lr: float, warmup: int, final_ratio: float = 0.1) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return lr * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * t)))
