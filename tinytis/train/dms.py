"""`train.py dms`: the DMS retrofit of a base model (003_3710fa004c5d59f2.txt).

Phase 1 zeroes a borrowed query channel and distils the model back to its teacher without it; phase 2 reads the
channel as per-(layer, KV head) eviction logits, samples Gumbel-sigmoid decisions and distils under a one-sided
compression loss whose target ramps up. The result is a model directory with dms_metadata.json.
"""
import json
import math
import random
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from tinytis.dms import DMSConfig, SequenceAttention, attach
from tinytis.ert import kl_full_evicted
from tinytis.errors import UserError
from tinytis.hf_tokenizer import write_hf_tokenizer
from tinytis.model import Transformer
from tinytis.tasks import Sample, fidelity, training
from tinytis.tasks.seeds import EVAL_SEEDS
from tinytis.tokenizer import Tokenizer
from tinytis.train.common import (cosine_lr, encode_sample, optimizer_step, save_checkpoint, start_or_resume,
                                  training_command)
from tinytis.train.tis import TIS_FAMILIES
from tinytis.weights import save_hf

DMS_TOKENS_PER_STEP = 2048


def sequence_batch(tok: Tokenizer, samples: list[Sample]):
    """Whole samples (BOS context question answer EOS), right-padded: ids (B, T); real (B, T): the sample's tokens;
    cont (B, T): the positions whose next token is in the question or answer, what the base model was trained to
    predict (its predictions of the context are untrained): distillation, KL and perplexity are taken there."""
    encoded = [encode_sample(tok, s)[0] for s in samples]
    context = torch.tensor([len(tok.encode(s.context)) for s in samples])[:, None]
    T = max(len(ids) for ids in encoded)
    ids = torch.full((len(samples), T), tok.eos_id, dtype=torch.long)
    for b, e in enumerate(encoded):
        ids[b, : len(e)] = torch.tensor(e)
    length = torch.tensor([len(e) for e in encoded])[:, None]
    t = torch.arange(T)[None]
    return ids, t < length, (t >= context - 1) & (t < length - 1)


def borrow_query_channel(model: Transformer, config: DMSConfig):
    """Phase 1 of the retrofit: zero the wq rows of the borrowed channel (first query head of each GQA group), so the
    eviction logits start at -alpha_offset (keep everything), and make the model a DMS one (the channel is zeroed in
    attention too). Distillation then teaches the model to do without the channel."""
    a = model.args
    rows = torch.arange(0, a.n_heads, a.n_heads // a.n_kv_heads) * a.head_dim + config.borrowed_query_channel % a.head_dim
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.wq.weight[rows] = 0
    attach(model, config)


def eviction_fraction(alpha: list, mask) -> torch.Tensor:
    """Mean eviction probability (or decision) over layers, KV heads and the sample's tokens; alpha: L x (B, KV, T)."""
    return (torch.stack(alpha) * mask[None, :, None, :]).sum() / (mask.sum() * len(alpha) * alpha[0].shape[1])


@torch.no_grad()
def dms_gate(teacher, student, tok, lengths=(512, 1024, 2048), n: int = 8) -> dict:
    """The DMS gate on held-out fidelity samples, strict (hard) mask over whole sequences: perplexity change and
    KL(base || DMS) per token of the continuation (question and answer), eviction rate (decisions 'evict' over every
    layer, KV head and token), and the effective compression after the last token (tokens / tokens held per head)."""
    count = lambda s: len(tok.encode(s, bos=False))
    nll_base = nll_dms = kl = evicted = decided = tokens = held = 0.0
    for length in lengths:
        for i in range(n):
            ids, _, mask = sequence_batch(tok, [fidelity.make(EVAL_SEEDS.start + 1000 * length + i, length, count)])
            attention = SequenceAttention(student.dms)
            log_p = torch.log_softmax(teacher(ids), -1)[mask]
            log_q = torch.log_softmax(student(ids, cache=attention), -1)[mask]
            target = ids[:, 1:][mask[:, :-1]][:, None]
            nll_base += -log_p.gather(-1, target).sum().item()
            nll_dms += -log_q.gather(-1, target).sum().item()
            kl += (log_p.exp() * (log_p - log_q)).sum().item()
            evict = torch.stack(attention.alpha)[:, 0, :, :-1].bool()  # (L, KV, T - 1): the last token is undecided
            T = ids.shape[1]
            evicted, decided = evicted + evict.sum().item(), decided + evict.numel()
            far = T - torch.arange(T - 1) > student.dms.window_size  # the next query no longer sees evicted ones
            held += (T - (evict & far).sum((-1)).float().mean().item()) / T
            tokens += mask.sum().item()
    n_seq = n * len(lengths)
    return {"ppl_delta": math.exp((nll_dms - nll_base) / tokens) - 1, "kl": kl / tokens,
            "eviction_rate": evicted / decided, "compression": 1 / (held / n_seq), "n": n_seq}


def train_dms(args):
    base_dir, out, run = Path(args.model), Path(args.out), Path(args.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    teacher = Transformer.from_pretrained(base_dir).requires_grad_(False)
    if teacher.dms is not None:
        raise UserError(f"{base_dir} is already a DMS model; retrofit a base model")
    student = Transformer.from_pretrained(base_dir).train()
    tok = Tokenizer.from_dir(base_dir)
    count = lambda s: len(tok.encode(s, bos=False))
    torch.manual_seed(args.seed)
    command = training_command(args)
    config = DMSConfig(args.window, args.alpha_scale, args.alpha_offset, -1, args.target_cr,
                       {"base_model": str(base_dir), "command": command})
    borrow_query_channel(student, config)
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    total = args.zero_steps + args.steps
    state = {"step": 0, "rng": random.Random(args.seed).getstate(), "log": []}
    ckpt = run / "dms.pt"
    state, rng = start_or_resume(ckpt, student, opt, state, args.resume)
    bar = tqdm(total=total, initial=state["step"], desc="dms")
    last_save = time.time()
    while state["step"] < total:
        step = state["step"]
        length = rng.randint(args.min_len, args.max_len)
        ids, real, cont = sequence_batch(tok, [training.sample(rng, length, count, TIS_FAMILIES)
                                               for _ in range(max(1, DMS_TOKENS_PER_STEP // length))])
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, total, args.lr, warmup=20)
        with torch.no_grad():
            teacher_logits = teacher(ids)
        if step < args.zero_steps:  # phase 1: the channel is zeroed, nothing is evicted
            phase, target, attention = "zero", 0.0, None
            loss = kl = kl_full_evicted(teacher_logits, student(ids), cont)
            frac = torch.zeros(())
        else:  # phase 2: Gumbel-sigmoid decisions, compression target ramped from 1x to target_cr
            ramp = min(1.0, (step - args.zero_steps + 1) / max(1, round(args.ramp * args.steps)))
            phase, target = "dms", 1 - 1 / (1 + (args.target_cr - 1) * ramp)
            attention = SequenceAttention(config, args.tau, torch.Generator().manual_seed(rng.randrange(2**62)))
            kl = kl_full_evicted(teacher_logits, student(ids, cache=attention), cont)
            frac = eviction_fraction(attention.alpha, real)
            loss = kl + args.compression_weight * F.relu(target - frac)  # one-sided: no reward beyond the target
        optimizer_step(opt, loss)
        state["step"] += 1
        bar.update(1)
        bar.set_postfix(phase=phase, kl=f"{kl.item():.4f}", evict=f"{frac.item():.3f}", target=f"{target:.3f}")
        if state["step"] % args.eval_every == 0 or state["step"] == total:
            student.eval()
            gate = dms_gate(teacher, student, tok, n=2)
            student.train()
            state["log"].append({"step": state["step"], "phase": phase, "kl_train": kl.item(), "evict_train": frac.item(),
                                 "target": target, "gate": gate})
            tqdm.write(f"[dms {state['step']}] {phase} kl {kl.item():.4f} evict {frac.item():.3f} (target {target:.3f}) "
                       f"held-out gate {gate}")
        if time.time() - last_save > args.save_every_s or state["step"] == total:
            save_checkpoint(ckpt, student, opt, state, rng)
            last_save = time.time()
    bar.close()
    student.eval()
    gate = dms_gate(teacher, student, tok)
    print(f"held-out gate (strict mask, {gate['n']} fidelity samples): {gate}")
    save_hf(student.state_dict(), out, student.args)
    shutil.copy(base_dir / "tokenizer.model", out / "tokenizer.model")
    write_hf_tokenizer(out, student.args.max_seq_len)  # tokenizer.json and the configs transformers reads
    config.extra["gate"] = gate
    config.save(out, student.args)
    (out / "training_log.json").write_text(json.dumps(state["log"], indent=1) + "\n")
