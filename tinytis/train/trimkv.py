"""`train.py trimkv`: TRIM-KV retention gates on the frozen base model (004_a96a227dcd42124d.txt).

The continuation attends to the context keys with log alpha (the retention at the compression time) added to its
logits; the gates learn from KL(full || gated) + next-token loss + a capacity loss that holds each head's summed
retention to the memory size.
"""
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from tinytis.anchors import Anchors
from tinytis.ert import kl_full_evicted
from tinytis.tasks import training
from tinytis.train.common import cosine_lr, optimizer_step, save_checkpoint, save_components, start_or_resume
from tinytis.train.tis import (TIS_FAMILIES, TIS_TOKENS_PER_STEP, context_batch, evaluate_eviction, frozen_model_start,
                               on_device)
from tinytis.trimkv import GATES_FILE, GatedContextKV, RetentionGates, capacity_loss, compression_log_alpha

TRIMKV_EVAL_BUDGETS = (0.05, 0.1, 0.25)


def trimkv_losses(model, gates, batch, memory_size: int):
    """(KL(full || gated), next-token loss, capacity loss) for one batch; the base model is frozen, only the gates
    get gradients. The continuation attends to the context keys with log alpha at the compression time added."""
    ctx_ids, ctx_pos, cont_ids, cont_pos, cont_mask = on_device(batch, model)
    cache = GatedContextKV()
    with torch.no_grad():
        model.hidden_states(ctx_ids, ctx_pos, cache)
        teacher = model(cont_ids, cont_pos, cache)
    log_beta = gates.all_log_beta(cache.inputs)  # (L, B, KV, C)
    cache.key_bias = compression_log_alpha(log_beta, ctx_pos)
    student = model(cont_ids, cont_pos, cache)
    target = torch.cat((cont_ids[:, 1:], cont_ids[:, -1:]), dim=1).masked_fill(~cont_mask, -100)
    ntp = F.cross_entropy(student.flatten(0, 1), target.flatten())
    return kl_full_evicted(teacher, student, cont_mask), ntp, capacity_loss(log_beta, ctx_pos, memory_size)


def trimkv_scores(gates):
    """Scores for evaluate_eviction: log alpha at the compression time, (B, L, KV, C)."""
    return lambda cache, hidden, ids, pos: compression_log_alpha(gates.all_log_beta(cache.inputs), pos).transpose(0, 1)


def train_trimkv(args):
    model_dir, run, model, tok, count, command = frozen_model_start(args)
    # the gates start at beta = 1 - 1 / (2 M): a head's retention sums to about twice the memory
    gates = RetentionGates(model.args, args.gate_hidden, bias_init=math.log(2 * args.memory_size - 1), seed=args.seed,
                           meta={"base_model": args.model, "memory_size": args.memory_size,
                                 "buffer_size": args.buffer_size, "command": command}).to(model.norm.weight.device)
    opt = torch.optim.AdamW(gates.parameters(), lr=args.lr, weight_decay=0.0)
    state = {"step": 0, "rng": random.Random(args.seed).getstate(), "log": []}
    ckpt = run / "trimkv.pt"
    state, rng = start_or_resume(ckpt, gates, opt, state, args.resume)
    anchors = Anchors(args.n_sink, args.n_recent)
    bar = tqdm(total=args.steps, initial=state["step"], desc="trimkv")
    last_save = time.time()
    while state["step"] < args.steps:
        length = rng.randint(args.min_len, args.max_len)
        samples = [training.sample(rng, length, count, TIS_FAMILIES) for _ in range(max(1, TIS_TOKENS_PER_STEP // length))]
        for g in opt.param_groups:
            g["lr"] = cosine_lr(state["step"], args.steps, args.lr, warmup=20)
        kl, ntp, cap = trimkv_losses(model, gates, context_batch(tok, samples), args.memory_size)
        loss = kl + ntp + args.lambda_capacity * cap
        optimizer_step(opt, loss)
        state["step"] += 1
        bar.update(1)
        bar.set_postfix(kl=f"{kl.item():.4f}", ntp=f"{ntp.item():.3f}", cap=f"{cap.item():.3f}")
        if state["step"] % args.eval_every == 0 or state["step"] == args.steps:
            accs = {b: evaluate_eviction(model, tok, b, anchors, trimkv_scores(gates))[0] for b in TRIMKV_EVAL_BUDGETS}
            state["log"].append({"step": state["step"], "kl": kl.item(), "ntp": ntp.item(), "capacity": cap.item(), "acc": accs})
            tqdm.write(f"[trimkv {state['step']}] kl {kl.item():.4f} capacity {cap.item():.3f} held-out acc by budget {accs}")
        if time.time() - last_save > args.save_every_s or state["step"] == args.steps:
            save_checkpoint(ckpt, gates, opt, state, rng)
            last_save = time.time()
    bar.close()
    save_components(gates, state, Path(args.out or model_dir / GATES_FILE))
