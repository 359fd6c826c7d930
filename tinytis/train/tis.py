"""`train.py oracle` and `train.py ert`: the TIS importance head and embedding on the frozen base model.

The oracle stage supervises the head with the attention mass the question and answer put on each context token
(a full-context pass); ERT then trains it end to end: KL(full cache || soft-evicted cache) on the continuation, plus
the alignment term. Only the TIS components get gradients.
"""
import math
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

from tinytis.anchors import Anchors
from tinytis.device import resolve_device
from tinytis.engine import left_pad
from tinytis.ert import ContextKV, alignment_loss, kl_full_evicted, soft_keep_log_mask
from tinytis.importance import COMPONENTS_FILE, TIS
from tinytis.model import Transformer
from tinytis.tasks import Sample, longbench, tis_mix, training
from tinytis.tasks.seeds import EVAL_SEEDS
from tinytis.tokenizer import Tokenizer
from tinytis.train.common import (answer_accuracy, cosine_lr, optimizer_step, save_checkpoint, save_components,
                                  start_or_resume, training_command)
from tinytis.trimkv import GatedContextKV
from tinytis.weights import resolve_model_dir

TIS_FAMILIES = ["recall", "passkey", "varied", "multikey", "narrative", "litm"]
TIS_BUDGETS = (0.05, 0.1, 0.25, 0.5, 0.75)
TIS_TOKENS_PER_STEP = 4096


def context_batch(tok: Tokenizer, samples: list[Sample]):
    """Left-padded contexts and right-padded continuations (question + answer + EOS) that follow them.

    -> ctx_ids, ctx_pos (B, C); cont_ids, cont_pos (B, T); cont_mask (B, T): positions whose next
    token is part of the continuation (the ones the KL is taken over)."""
    ctx_ids, ctx_pos = left_pad([tok.encode(s.context) for s in samples])
    conts = [tok.encode(s.question, bos=False) + tok.encode(s.answer, bos=False, eos=True) for s in samples]
    T = max(len(c) for c in conts)
    cont_ids = torch.full((len(samples), T), tok.eos_id, dtype=torch.long)
    for b, c in enumerate(conts):
        cont_ids[b, : len(c)] = torch.tensor(c)
    cont_pos = ctx_pos[:, -1:] + 1 + torch.arange(T)  # padding after EOS gets real positions; it is never scored
    cont_mask = torch.arange(T)[None] < torch.tensor([len(c) - 1 for c in conts])[:, None]
    return ctx_ids, ctx_pos, cont_ids, cont_pos, cont_mask


def on_device(batch, model):
    """A batch's tensors on the device the model is on."""
    return [t.to(model.norm.weight.device) for t in batch]


def tis_losses(model, tis, batch, budget: float, anchors: Anchors):
    """(alignment, KL(full || evicted)) for one batch; the base model is frozen, only `tis` gets gradients."""
    ctx_ids, ctx_pos, cont_ids, cont_pos, cont_mask = on_device(batch, model)
    cache = ContextKV()
    with torch.no_grad():
        hidden = model.hidden_states(ctx_ids, ctx_pos, cache)
        teacher = model(cont_ids, cont_pos, cache)
        labels = cache.mass
    scores = tis(hidden, ctx_ids)
    align = alignment_loss(scores, labels, ctx_pos, anchors)
    cache.key_bias = tis.attn_hook_lambda * soft_keep_log_mask(scores, ctx_pos, budget, anchors)
    student = model(cont_ids, cont_pos, cache)
    return align, kl_full_evicted(teacher, student, cont_mask)


MONITOR_BUDGETS = (0.05, 0.1, 0.25)


def monitor(model, tis, tok, anchors: Anchors, samples=None) -> dict:
    """The training-time monitor of TIS: on held-out samples (or the samples given: train.py --data's first
    records), answer accuracy and KL(full || evicted) under hard eviction at each of MONITOR_BUDGETS, and one score
    covering both, mean(accuracy + exp(-KL)) / 2 in [0, 1]."""
    rows = {b: evaluate_eviction(model, tok, b, anchors, lambda cache, hidden, ids, pos: tis(hidden, ids),
                                 samples=samples) for b in MONITOR_BUDGETS}
    score = sum(acc + math.exp(-kl) for acc, kl in rows.values()) / (2 * len(rows))
    return {"acc": {b: r[0] for b, r in rows.items()}, "kl": {b: r[1] for b, r in rows.items()}, "score": score}


@torch.no_grad()
def evaluate_eviction(model, tok, budget: float, anchors: Anchors, score, n: int = 32, length: int = 1024,
                      samples=None):
    """(teacher-forced answer accuracy, KL(full || evicted) per continuation token) under hard eviction at `budget`
    on n held-out samples of `length` tokens (or on the samples given). score(cache, hidden, ctx_ids, ctx_pos) ->
    (B, L, KV, C) scores the context prefilled into cache (a GatedContextKV)."""
    rng = random.Random(EVAL_SEEDS.start + 7)
    count = lambda s: len(tok.encode(s, bos=False))
    hits, kls = [], []
    for i in range(0, n if samples is None else len(samples), 8):
        batch = ([training.sample(rng, length, count, TIS_FAMILIES, seeds=EVAL_SEEDS) for _ in range(8)] if samples is None
                 else samples[i : i + 8])
        ctx_ids, ctx_pos, cont_ids, cont_pos, cont_mask = on_device(context_batch(tok, batch), model)
        cache = GatedContextKV()
        hidden = model.hidden_states(ctx_ids, ctx_pos, cache)
        full = model(cont_ids, cont_pos, cache)
        log_m = soft_keep_log_mask(score(cache, hidden, ctx_ids, ctx_pos), ctx_pos, budget, anchors)
        cache.key_bias = torch.where(log_m > math.log(0.5), 0.0, float("-inf"))
        logits = model(cont_ids, cont_pos, cache)
        answer_start = torch.tensor([len(tok.encode(s.question, bos=False)) - 1 for s in batch])[:, None]
        y = torch.cat((cont_ids[:, 1:], cont_ids[:, -1:]), dim=1).masked_fill(~cont_mask, -100)
        y = y.masked_fill(torch.arange(y.shape[1], device=y.device)[None] < answer_start.to(y.device), -100)
        hits.append(answer_accuracy(logits, y))
        kls.append(kl_full_evicted(full, logits, cont_mask).item())
    return torch.cat(hits).mean().item(), sum(kls) / len(kls)


def frozen_model_start(args):
    """The start of a stage on the frozen base model (oracle, ert, trimkv): makes the run directory, seeds torch, loads
    the model (a directory or a cached hub id; --quant nf4: its block Linears in NF4) on --device.
    -> model_dir, run, model (no gradients), tok, count (tokens of a text), command (what reproduces the run)"""
    model_dir, run = resolve_model_dir(args.model), Path(args.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    device = resolve_device(getattr(args, "device", "cpu"))
    model = Transformer.from_pretrained(model_dir, quant=getattr(args, "quant", None)).requires_grad_(False).to(device)
    tok = Tokenizer.from_dir(model_dir)
    tok.require_bos_eos()
    torch.manual_seed(args.seed)
    return model_dir, run, model, tok, lambda s: len(tok.encode(s, bos=False)), training_command(args)


def train_tis(args):
    model_dir, run, model, tok, count, command = frozen_model_start(args)
    records = longbench.read(args.data, tok, args.max_len) if getattr(args, "data", None) else None
    anchors = Anchors(args.n_sink, args.n_recent)
    tis = TIS(model.args, meta={"base_model": args.model, "anchors": {"n_sink": args.n_sink, "n_recent": args.n_recent},
                                "budgets": list(TIS_BUDGETS), "stage": args.stage, "command": command},
              per_head=not args.shared_score).to(model.norm.weight.device)
    opt = torch.optim.AdamW(tis.parameters(), lr=args.lr, weight_decay=0.0)
    oracle_steps = args.steps if args.stage == "oracle" else args.oracle_steps
    total = args.steps if args.stage == "oracle" else args.oracle_steps + args.steps
    state = {"step": 0, "rng": random.Random(args.seed).getstate(), "log": []}
    ckpt = run / f"tis_{args.stage}.pt"
    state, rng = start_or_resume(ckpt, tis, opt, state, args.resume)
    bar = tqdm(total=total, initial=state["step"], desc=args.stage)
    last_save = time.time()
    while state["step"] < total:
        if records:  # your own data: whole records, as many as a step's tokens hold at --max-len
            samples = rng.choices(records, k=max(1, TIS_TOKENS_PER_STEP // args.max_len))
        else:
            length = rng.randint(args.min_len, args.max_len)
            samples = [tis_mix.sample(rng, length, count) for _ in range(max(1, TIS_TOKENS_PER_STEP // length))]
        budget = rng.choice(TIS_BUDGETS)
        for g in opt.param_groups:
            g["lr"] = cosine_lr(state["step"], total, args.lr, warmup=20)
        align, kl = tis_losses(model, tis, context_batch(tok, samples), budget, anchors)
        oracle_phase = state["step"] < oracle_steps
        loss = align if oracle_phase else kl + args.lambda_align * align
        optimizer_step(opt, loss)
        state["step"] += 1
        bar.update(1)
        bar.set_postfix(phase="oracle" if oracle_phase else "ert", b=budget, align=f"{align.item():.3f}", kl=f"{kl.item():.4f}")
        if state["step"] % args.eval_every == 0 or state["step"] == total:
            held_out = monitor(model, tis, tok, anchors, records[:32] if records else None)
            state["log"].append({"step": state["step"], "align": align.item(), "kl": kl.item(), "monitor": held_out})
            tqdm.write(f"[{args.stage} {state['step']}] align {align.item():.3f} kl {kl.item():.4f} held-out {held_out}")
        if time.time() - last_save > args.save_every_s or state["step"] == total:
            save_checkpoint(ckpt, tis, opt, state, rng)
            last_save = time.time()
    bar.close()
    save_components(tis, state, Path(args.out or model_dir / COMPONENTS_FILE))
