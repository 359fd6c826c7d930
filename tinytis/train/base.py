"""`train.py base`: the tokenizer and the embedded Mistral-architecture model, from scratch, on this machine's CPU.

The text is the synthetic task language and real English prose from the Python standard library's training split
(tinytis.tasks.prose): as filler around the facts, as the copy task's filler, and as plain language-model text.
The curriculum first teaches induction alone (the copy task: find a span by its content and continue it), then
mixes in the keyed look-up tasks at growing lengths, and ends with a low-learning-rate anneal at the longest ones.
Every stage ends with a held-out evaluation per task family (the real-prose family on the evaluation split among
them) and an induction probe.
"""
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
import torch
import torch.nn.functional as F
from tqdm import tqdm

from tinytis.config import ModelArgs
from tinytis.hf_tokenizer import write_hf_tokenizer
from tinytis.model import Transformer
from tinytis.tasks import litm, narrative, niah, prose, prose_family, training
from tinytis.tasks.seeds import EVAL_SEEDS
from tinytis.tokenizer import Tokenizer
from tinytis.train.common import (answer_accuracy, cosine_lr, encode_sample, make_batch, optimizer_step,
                                  save_checkpoint, start_or_resume)
from tinytis.weights import save_hf

TINY = ModelArgs(dim=192, n_layers=4, n_heads=6, n_kv_heads=2, head_dim=32, hidden_dim=768, vocab_size=4096,
                 norm_eps=1e-5, rope_theta=1e4, max_seq_len=2176, tie_embeddings=True)
TOKENS_PER_STEP = 4096
# held-out accuracy per stage: the in-distribution families, and the real-prose family's passkey and multikey
EVAL_FAMILIES = ("passkey", "varied", "multikey", "narrative", "litm", "prose_passkey", "prose_multikey")


@dataclass
class Stage:
    name: str
    lengths: tuple[int, ...]  # each step draws one of them
    steps: int  # the most steps; a stage with until_loss ends earlier once the loss is below it
    lr: float
    mix: dict  # family -> share of the samples
    until_loss: float | None = None


BASE_STAGES = [
    # the copy task alone first, in the synthetic filler and in prose: it forms the induction heads everything else
    # is built on
    Stage("copy", (64,), 1500, 1e-3, {"copy": 1}, until_loss=1.5),
    # "prose": a keyed task written into training prose; "lm": plain prose, the loss on every token
    Stage("short", (128, 256), 250, 1e-3,
          {"copy": .20, "lm": .15, "recall": .10, "passkey": .15, "multikey": .10, "narrative": .05, "prose": .25}),
    Stage("medium", (256, 512, 1024), 200, 1e-3,
          {"copy": .10, "lm": .10, "recall": .05, "passkey": .15, "multikey": .15, "narrative": .10, "prose": .35}),
    Stage("long", (512, 1024, 2048), 150, 1e-3,
          {"copy": .10, "lm": .05, "recall": .05, "passkey": .10, "multikey": .15, "narrative": .10, "litm": .05,
           "prose": .40}),
    # issue 14's lesson: at a 5 % copy share induction fades, so the anneal keeps 15 %
    Stage("anneal", (1024, 2048), 80, 3e-4,
          {"copy": .15, "lm": .05, "passkey": .10, "multikey": .15, "narrative": .10, "litm": .10, "prose": .35}),
]


def draw(rng: random.Random, length: int, tok: Tokenizer, mix: dict) -> tuple[list[int], int]:
    """One training example (ids, where the answer starts) of about `length` tokens, its family drawn from mix."""
    family = rng.choices(list(mix), list(mix.values()))[0]
    if family == "copy":
        return training.copy(rng, length, tok, in_prose=rng.random() < 0.5)
    if family == "lm":
        return training.language(rng, length, tok)
    count = lambda s: len(tok.encode(s, bos=False))
    return encode_sample(tok, training.sample(rng, length, count, {family: 1}))


# ---------------------------------------------------------------------------- held-out evaluation

@torch.no_grad()
def induction_accuracy(model, tok: Tokenizer, length: int, n: int = 32, depth: float = 0.5) -> float:
    """Teacher-forced token accuracy on tokens 2..n of a random-id span repeated at the end, the span's first
    occurrence placed at `depth` of the context (held-out seeds)."""
    rng = random.Random(EVAL_SEEDS.start + length)
    hits = total = 0
    for _ in range(n):
        x, y = make_batch([training.copy(rng, length, tok, depth)])
        scored = y != -100
        hits += (model(x).argmax(-1)[scored] == y[scored]).sum().item()
        total += scored.sum().item()
    return hits / total


def held_out_sample(family: str, seed: int, length: int, count):
    """A sample of an evaluation seed: an in-distribution family (tasks.niah, narrative, litm) or, for prose_<variant>,
    the real-prose family."""
    depth = random.Random(seed).random()
    if family.startswith("prose_"):
        return prose_family.FAMILY.niah(family.removeprefix("prose_"), seed, length, depth, count)
    if family == "narrative":
        return narrative.make(seed, length, depth, count)
    if family == "litm":
        n_docs = litm.docs_for(length)
        return litm.make(seed, n_docs, random.Random(seed).randrange(n_docs))
    return niah.make(family, seed, length, depth, count)


@torch.no_grad()
def family_accuracy(model, tok: Tokenizer, family: str, length: int, n: int = 12) -> float:
    """Teacher-forced exact answer accuracy on held-out samples (evaluation seeds) of one family at one length."""
    seeds = range(EVAL_SEEDS.start + length * n, EVAL_SEEDS.start + (length + 1) * n)
    count = lambda s: len(tok.encode(s, bos=False))
    accs = []
    for i in range(0, n, 4):
        x, y = make_batch([encode_sample(tok, held_out_sample(family, s, length, count)) for s in seeds[i : i + 4]])
        accs.append(answer_accuracy(model(x), y))
    return torch.cat(accs).mean().item()


def evaluate_stage(model, tok: Tokenizer, stage: Stage) -> dict:
    length = max(stage.lengths)
    # the families the stage trains, and varied beside passkey (the same needle in other filler)
    families = [f for f in EVAL_FAMILIES if f.removeprefix("prose_") in stage.mix or
                (f == "varied" and "passkey" in stage.mix) or (f.startswith("prose_") and "prose" in stage.mix)]
    result = {f"{f}@{length}": family_accuracy(model, tok, f, length) for f in families}
    result.update({f"induction@{L}": induction_accuracy(model, tok, L, n=8) for L in (256, 1024)})
    return result


# ---------------------------------------------------------------------------- tokenizer

def train_tokenizer(out: Path, vocab_size: int, seed: int):
    """A BPE sentencepiece model on the training mix (synthetic samples and every training-split prose paragraph):
    digits one token each, byte fallback for any text."""
    rng = random.Random(seed)
    words = lambda s: int(len(s.split()) * 1.3)  # no tokenizer yet: estimate tokens from words
    corpus = out / "tokenizer_corpus.txt"
    with open(corpus, "w") as f:
        for _ in range(1000):
            s = training.sample(rng, rng.choice((64, 256, 512)), words, list(training.WEIGHTS))
            f.write("\n".join((s.context, s.question, s.answer)) + "\n")
        f.writelines(p + "\n" for doc in prose.split("train") for p in doc)
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(out / "tokenizer"), vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
        num_threads=2, minloglevel=2, max_sentence_length=1 << 16,
    )
    corpus.unlink()
    (out / "tokenizer.vocab").unlink()


# ---------------------------------------------------------------------------- the run

def train_base(args):
    out, run = Path(args.out), Path(args.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    run.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    if not (out / "tokenizer.model").exists():
        train_tokenizer(out, TINY.vocab_size, args.seed)
    write_hf_tokenizer(out, TINY.max_seq_len)
    tok = Tokenizer(out / "tokenizer.model")

    model = Transformer(TINY)
    model.init_weights(args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    state = {"stage": 0, "step": 0, "rng": random.Random(args.seed).getstate(), "log": [], "loss_ema": None}
    ckpt = run / "base.pt"
    state, rng = start_or_resume(ckpt, model, opt, state, args.resume)
    total = sum(s.steps for s in BASE_STAGES)
    bar = tqdm(total=total, initial=sum(s.steps for s in BASE_STAGES[: state["stage"]]) + state["step"], desc="base")
    last_save = time.time()
    while state["stage"] < len(BASE_STAGES):
        stage = BASE_STAGES[state["stage"]]
        gate_passed = stage.until_loss and state["loss_ema"] is not None and state["loss_ema"] < stage.until_loss
        if state["step"] >= stage.steps or gate_passed:
            accs = evaluate_stage(model, tok, stage)
            state["log"].append({"stage": stage.name, "step": state["step"], "loss": state["loss_ema"], "acc": accs,
                                 "end": True})
            tqdm.write(f"[{stage.name} done at {state['step']}] loss {state['loss_ema']:.3f} held-out {accs}")
            bar.update(stage.steps - state["step"])
            state["stage"], state["step"], state["loss_ema"] = state["stage"] + 1, 0, None
            continue
        length = rng.choice(stage.lengths)
        x, y = make_batch([draw(rng, length, tok, stage.mix) for _ in range(max(1, TOKENS_PER_STEP // length))])
        for g in opt.param_groups:
            g["lr"] = cosine_lr(state["step"], stage.steps, stage.lr, warmup=50)
        logits = model(x)
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1))
        optimizer_step(opt, loss)
        ema = state["loss_ema"]
        state["loss_ema"] = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        state["step"] += 1
        bar.update(1)
        bar.set_postfix(stage=stage.name, len=length, loss=f"{state['loss_ema']:.3f}")
        if state["step"] % args.eval_every == 0 and state["step"] < stage.steps:  # a stage's end is evaluated anyway
            accs = evaluate_stage(model, tok, stage)
            state["log"].append({"stage": stage.name, "step": state["step"], "loss": state["loss_ema"], "acc": accs})
            tqdm.write(f"[{stage.name} {state['step']}] loss {state['loss_ema']:.3f} held-out {accs}")
        if time.time() - last_save > args.save_every_s:
            save_checkpoint(ckpt, model, opt, state, rng)
            save_hf(model.state_dict(), out, TINY)
            last_save = time.time()
    bar.close()
    save_checkpoint(ckpt, model, opt, state, rng)
    save_hf(model.state_dict(), out, TINY)
    (out / "training_log.json").write_text(json.dumps(state["log"], indent=1) + "\n")
    print(f"saved {out}")
