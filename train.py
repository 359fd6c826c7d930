"""Train the embedded tiny model and the learned eviction components, on this machine's CPU.

    python train.py base      # tokenizer + Mistral-architecture model from scratch -> models/tiny
"""
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import sentencepiece as spm
import torch
import torch.nn.functional as F
from tqdm import tqdm

from tinytis.config import ModelArgs
from tinytis.errors import ArgumentParser, UserError, run_cli
from tinytis.model import Transformer
from tinytis.tasks import Sample, training
from tinytis.tasks.seeds import EVAL_SEEDS
from tinytis.tokenizer import Tokenizer
from tinytis.weights import save_hf

TINY = ModelArgs(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=512, vocab_size=1024,
                 norm_eps=1e-5, rope_theta=1e4, max_seq_len=2176, tie_embeddings=True)


# ---------------------------------------------------------------------------- data

def encode_sample(tok: Tokenizer, s: Sample) -> tuple[list[int], int]:
    """ids = BOS context question answer EOS, and where the answer starts (the loss covers answer + EOS)."""
    prefix = tok.encode(s.context) + tok.encode(s.question, bos=False)
    return prefix + tok.encode(s.answer, bos=False, eos=True), len(prefix)


def make_batch(tok: Tokenizer, samples: list[Sample]):
    """Right-padded ids (B, T) and next-token targets (B, T) with -100 outside the answers."""
    encoded = [encode_sample(tok, s) for s in samples]
    T = max(len(ids) for ids, _ in encoded) - 1
    x = torch.zeros(len(samples), T, dtype=torch.long)
    y = torch.full((len(samples), T), -100, dtype=torch.long)
    for b, (ids, start) in enumerate(encoded):
        ids = torch.tensor(ids)
        x[b, : len(ids) - 1] = ids[:-1]
        y[b, start - 1 : len(ids) - 1] = ids[start:]
    return x, y


def answer_accuracy(logits, y) -> torch.Tensor:
    """Per sample: 1 when every answer token (and EOS) is the argmax, teacher-forced."""
    wrong = (logits.argmax(-1) != y) & (y != -100)
    return (~wrong.any(-1)).float()


# ---------------------------------------------------------------------------- tokenizer

def train_tokenizer(out: Path, vocab_size: int, seed: int):
    """A BPE sentencepiece model on the training mix: digits one token each, byte fallback for any text."""
    rng = random.Random(seed)
    words = lambda s: int(len(s.split()) * 1.3)  # no tokenizer yet: estimate tokens from words
    corpus = out / "tokenizer_corpus.txt"
    with open(corpus, "w") as f:
        for _ in range(3000):
            s = training.sample(rng, rng.choice((64, 256, 512)), words)
            f.write("\n".join((s.context, s.question, s.answer)) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(out / "tokenizer"), vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
        num_threads=2, minloglevel=2, max_sentence_length=1 << 16,
    )
    corpus.unlink()
    (out / "tokenizer.vocab").unlink()


def write_hf_tokenizer_files(out: Path):
    """The files transformers' AutoTokenizer needs beside tokenizer.model (tests use it as an oracle)."""
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "add_bos_token": True, "add_eos_token": False, "legacy": False, "model_max_length": TINY.max_seq_len}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


# ---------------------------------------------------------------------------- checkpoints

def save_atomic(obj, path: Path):
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def cosine_lr(step: int, total: int, lr: float, warmup: int, final_ratio: float = 0.1) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return lr * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


# ---------------------------------------------------------------------------- base model

@dataclass
class Stage:
    name: str
    min_len: int
    max_len: int
    steps: int  # the most steps; a stage with until_loss ends earlier once the loss is below it
    lr: float
    families: list = field(default_factory=list)  # empty: the whole training mix
    until_loss: float | None = None


BASE_STAGES = [
    # the copy task alone first: it forms the induction heads everything else is built on
    Stage("copy", 64, 64, 1500, 1e-3, ["copy"], until_loss=1.5),
    Stage("short", 128, 256, 400, 1e-3),
    Stage("medium", 256, 1024, 700, 1e-3),
    Stage("long", 512, 2048, 1000, 1e-3),
    Stage("anneal", 1024, 2048, 600, 3e-4),
]
TOKENS_PER_STEP = 4096


def evaluate_base(model, tok, length: int, n: int = 24) -> float:
    """Teacher-forced answer accuracy on held-out samples of the whole mix at one length."""
    rng = random.Random(EVAL_SEEDS.start + length)
    count = lambda s: len(tok.encode(s, bos=False))
    accs = []
    with torch.no_grad():
        for i in range(0, n, 4):
            x, y = make_batch(tok, [training.sample(rng, length, count) for _ in range(4)])
            accs.append(answer_accuracy(model(x), y))
    return torch.cat(accs).mean().item()


def train_base(args):
    out, run = Path(args.out), Path(args.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    run.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    if not (out / "tokenizer.model").exists():
        train_tokenizer(out, TINY.vocab_size, args.seed)
    write_hf_tokenizer_files(out)
    tok = Tokenizer(out / "tokenizer.model")
    count = lambda s: len(tok.encode(s, bos=False))

    model = Transformer(TINY)
    model.init_weights(args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    state = {"stage": 0, "step": 0, "rng": random.Random(args.seed).getstate(), "log": []}
    ckpt = run / "base.pt"
    if args.resume:
        if not ckpt.exists():
            raise UserError(f"--resume: no checkpoint at {ckpt}; start without --resume")
        saved = torch.load(ckpt, weights_only=False)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        state = saved["state"]
    rng = random.Random()
    rng.setstate(state["rng"])
    total = sum(s.steps for s in BASE_STAGES)
    bar = tqdm(total=total, initial=sum(s.steps for s in BASE_STAGES[: state["stage"]]) + state["step"], desc="base")
    last_save, loss_ema = time.time(), None
    while state["stage"] < len(BASE_STAGES):
        stage = BASE_STAGES[state["stage"]]
        if state["step"] >= stage.steps or (stage.until_loss and loss_ema is not None and loss_ema < stage.until_loss):
            bar.update(stage.steps - state["step"])
            state["stage"], state["step"], loss_ema = state["stage"] + 1, 0, None
            continue
        length = rng.randint(stage.min_len, stage.max_len)
        batch = [training.sample(rng, length, count, stage.families) for _ in range(max(1, TOKENS_PER_STEP // length))]
        x, y = make_batch(tok, batch)
        for g in opt.param_groups:
            g["lr"] = cosine_lr(state["step"], stage.steps, stage.lr, warmup=50)
        logits = model(x)
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
        state["step"] += 1
        bar.update(1)
        bar.set_postfix(stage=stage.name, len=length, loss=f"{loss_ema:.3f}")
        if state["step"] % args.eval_every == 0:
            accs = {L: evaluate_base(model, tok, L) for L in (256, 1024, 2048) if L <= stage.max_len * 2}
            state["log"].append({"stage": stage.name, "step": state["step"], "loss": loss_ema, "acc": accs})
            tqdm.write(f"[{stage.name} {state['step']}] loss {loss_ema:.3f} held-out answer acc {accs}")
        if time.time() - last_save > args.save_every_s:
            state["rng"] = rng.getstate()
            save_atomic({"model": model.state_dict(), "opt": opt.state_dict(), "state": state}, ckpt)
            save_hf(model.state_dict(), out, TINY)
            last_save = time.time()
    bar.close()
    state["rng"] = rng.getstate()
    save_atomic({"model": model.state_dict(), "opt": opt.state_dict(), "state": state}, ckpt)
    save_hf(model.state_dict(), out, TINY)
    (out / "training_log.json").write_text(json.dumps(state["log"], indent=1) + "\n")
    print(f"saved {out}")


def main():
    parser = ArgumentParser(prog="train.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="stage", required=True)
    base = sub.add_parser("base", help="train the tokenizer and the tiny base model from scratch")
    base.add_argument("--out", default="models/tiny", help="model directory to write (HF layout)")
    base.add_argument("--run-dir", default="runs", help="where checkpoints for --resume live")
    base.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --run-dir")
    base.add_argument("--seed", type=int, default=0)
    base.add_argument("--eval-every", type=int, default=400, help="steps between held-out evaluations")
    base.add_argument("--save-every-s", type=float, default=180, help="seconds between checkpoints")
    base.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    {"base": train_base}[args.stage](args)


if __name__ == "__main__":
    run_cli(main)
