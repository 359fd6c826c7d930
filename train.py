"""Train the embedded tiny model and the learned eviction components, on this machine's CPU.

    python train.py base      # tokenizer + Mistral-architecture model from scratch -> models/tiny
    python train.py oracle    # TIS stage 1: importance head supervised by oracle attention mass
    python train.py [ert]     # TIS stage 3: oracle warm start, then ERT -> models/tiny/tis_components.pt
    python train.py dms       # DMS retrofit of the base model -> models/tiny-dms (a model directory + dms_metadata.json)
    python train.py trimkv    # TRIM-KV retention gates -> models/tiny/trimkv_gates.safetensors
"""
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from tinytis.dms import DMSConfig, SequenceAttention, attach
from tinytis.engine import left_pad
from tinytis.errors import ArgumentParser, UserError, run_cli
from tinytis.ert import ContextKV, alignment_loss, kl_full_evicted, soft_keep_log_mask
from tinytis.importance import COMPONENTS_FILE, TIS
from tinytis.model import Transformer
from tinytis.tasks import Sample, fidelity, training
from tinytis.tasks.seeds import EVAL_SEEDS
from tinytis.tokenizer import Tokenizer
from tinytis.train.base import train_base
from tinytis.train.common import (answer_accuracy, cosine_lr, encode_sample, optimizer_step, save_checkpoint,
                                  save_components, start_or_resume, training_command)
from tinytis.trimkv import GATES_FILE, GatedContextKV, RetentionGates, capacity_loss, compression_log_alpha
from tinytis.weights import save_hf

# ---------------------------------------------------------------------------- TIS (oracle stage and ERT)

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


def tis_losses(model, tis, batch, budget: float, anchors: tuple[int, int]):
    """(alignment, KL(full || evicted)) for one batch; the base model is frozen, only `tis` gets gradients."""
    ctx_ids, ctx_pos, cont_ids, cont_pos, cont_mask = batch
    cache = ContextKV()
    with torch.no_grad():
        hidden = model.hidden_states(ctx_ids, ctx_pos, cache)
        teacher = model(cont_ids, cont_pos, cache)
        labels = cache.mass
    scores = tis(hidden, ctx_ids)
    align = alignment_loss(scores, labels, ctx_pos, *anchors)
    cache.key_bias = tis.attn_hook_lambda * soft_keep_log_mask(scores, ctx_pos, budget, *anchors)
    student = model(cont_ids, cont_pos, cache)
    return align, kl_full_evicted(teacher, student, cont_mask)


def evaluate_tis(model, tis, tok, budget: float, anchors) -> float:
    return evaluate_eviction(model, tok, budget, anchors, lambda cache, hidden, ids, pos: tis(hidden, ids))


@torch.no_grad()
def evaluate_eviction(model, tok, budget: float, anchors, score, n: int = 32, length: int = 1024) -> float:
    """Teacher-forced answer accuracy under hard eviction at `budget` on held-out samples. score(cache, hidden,
    ctx_ids, ctx_pos) -> (B, L, KV, C) scores the context prefilled into cache (a GatedContextKV)."""
    rng = random.Random(EVAL_SEEDS.start + 7)
    count = lambda s: len(tok.encode(s, bos=False))
    hits = []
    for _ in range(0, n, 8):
        samples = [training.sample(rng, length, count, TIS_FAMILIES) for _ in range(8)]
        ctx_ids, ctx_pos, cont_ids, cont_pos, cont_mask = context_batch(tok, samples)
        cache = GatedContextKV()
        hidden = model.hidden_states(ctx_ids, ctx_pos, cache)
        log_m = soft_keep_log_mask(score(cache, hidden, ctx_ids, ctx_pos), ctx_pos, budget, *anchors)
        cache.key_bias = torch.where(log_m > math.log(0.5), 0.0, float("-inf"))
        logits = model(cont_ids, cont_pos, cache)
        answer_start = torch.tensor([len(tok.encode(s.question, bos=False)) - 1 for s in samples])[:, None]
        y = torch.cat((cont_ids[:, 1:], cont_ids[:, -1:]), dim=1).masked_fill(~cont_mask, -100)
        y = y.masked_fill(torch.arange(y.shape[1])[None] < answer_start, -100)
        hits.append(answer_accuracy(logits, y))
    return torch.cat(hits).mean().item()


def frozen_model_start(args):
    """The start of a stage on the frozen base model (oracle, ert, trimkv): makes the run directory, seeds torch.
    -> model_dir, run, model (no gradients), tok, count (tokens of a text), command (what reproduces the run)"""
    model_dir, run = Path(args.model), Path(args.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    model = Transformer.from_pretrained(model_dir).requires_grad_(False)
    tok = Tokenizer.from_dir(model_dir)
    torch.manual_seed(args.seed)
    return model_dir, run, model, tok, lambda s: len(tok.encode(s, bos=False)), training_command(args)


def train_tis(args):
    model_dir, run, model, tok, count, command = frozen_model_start(args)
    anchors = (args.n_sink, args.n_recent)
    tis = TIS(model.args, meta={"base_model": str(model_dir), "anchors": {"n_sink": args.n_sink, "n_recent": args.n_recent},
                                "budgets": list(TIS_BUDGETS), "stage": args.stage, "command": command},
              per_head=not args.shared_score)
    opt = torch.optim.AdamW(tis.parameters(), lr=args.lr, weight_decay=0.0)
    oracle_steps = args.steps if args.stage == "oracle" else args.oracle_steps
    total = args.steps if args.stage == "oracle" else args.oracle_steps + args.steps
    state = {"step": 0, "rng": random.Random(args.seed).getstate(), "log": []}
    ckpt = run / f"tis_{args.stage}.pt"
    state, rng = start_or_resume(ckpt, tis, opt, state, args.resume)
    bar = tqdm(total=total, initial=state["step"], desc=args.stage)
    last_save = time.time()
    while state["step"] < total:
        length = rng.randint(args.min_len, args.max_len)
        samples = [training.sample(rng, length, count, TIS_FAMILIES) for _ in range(max(1, TIS_TOKENS_PER_STEP // length))]
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
            accs = {b: evaluate_tis(model, tis, tok, b, anchors) for b in (0.05, 0.1, 0.25)}
            state["log"].append({"step": state["step"], "align": align.item(), "kl": kl.item(), "acc": accs})
            tqdm.write(f"[{args.stage} {state['step']}] align {align.item():.3f} kl {kl.item():.4f} held-out acc by budget {accs}")
        if time.time() - last_save > args.save_every_s or state["step"] == total:
            save_checkpoint(ckpt, tis, opt, state, rng)
            last_save = time.time()
    bar.close()
    save_components(tis, state, Path(args.out or model_dir / COMPONENTS_FILE))


# ---------------------------------------------------------------------------- DMS retrofit

DMS_TOKENS_PER_STEP = 2048
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


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
    for name in TOKENIZER_FILES:
        shutil.copy(base_dir / name, out / name)
    config.extra["gate"] = gate
    config.save(out, student.args)
    (out / "training_log.json").write_text(json.dumps(state["log"], indent=1) + "\n")


# ---------------------------------------------------------------------------- TRIM-KV retention gates

TRIMKV_EVAL_BUDGETS = (0.05, 0.1, 0.25)


def trimkv_losses(model, gates, batch, memory_size: int):
    """(KL(full || gated), next-token loss, capacity loss) for one batch; the base model is frozen, only the gates
    get gradients. The continuation attends to the context keys with log alpha at the compression time added."""
    ctx_ids, ctx_pos, cont_ids, cont_pos, cont_mask = batch
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
                           meta={"base_model": str(model_dir), "memory_size": args.memory_size,
                                 "buffer_size": args.buffer_size, "command": command})
    opt = torch.optim.AdamW(gates.parameters(), lr=args.lr, weight_decay=0.0)
    state = {"step": 0, "rng": random.Random(args.seed).getstate(), "log": []}
    ckpt = run / "trimkv.pt"
    state, rng = start_or_resume(ckpt, gates, opt, state, args.resume)
    anchors = (args.n_sink, args.n_recent)
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
            accs = {b: evaluate_eviction(model, tok, b, anchors, trimkv_scores(gates)) for b in TRIMKV_EVAL_BUDGETS}
            state["log"].append({"step": state["step"], "kl": kl.item(), "ntp": ntp.item(), "capacity": cap.item(), "acc": accs})
            tqdm.write(f"[trimkv {state['step']}] kl {kl.item():.4f} capacity {cap.item():.3f} held-out acc by budget {accs}")
        if time.time() - last_save > args.save_every_s or state["step"] == args.steps:
            save_checkpoint(ckpt, gates, opt, state, rng)
            last_save = time.time()
    bar.close()
    save_components(gates, state, Path(args.out or model_dir / GATES_FILE))


def frozen_model_stage(sub, name: str, help: str, out_file: str, what: str, steps: int, max_len: int, eval_every: int):
    """A stage that trains eviction components on the frozen base model (oracle, ert, trimkv): its common flags."""
    p = sub.add_parser(name, help=help)
    p.add_argument("--model", default="models/tiny", help="frozen base model directory")
    p.add_argument("--out", default=None, help=f"{what} file to write (default: MODEL/{out_file})")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--lr", type=float, default=3e-3)
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
        p = frozen_model_stage(sub, name, help, COMPONENTS_FILE, "components", steps=400, max_len=2048, eval_every=100)
        p.add_argument("--shared-score", action="store_true",
                       help="one score per token shared by every layer and KV head (default: one per layer and KV head)")
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
                           GATES_FILE, "gates", steps=120, max_len=1024, eval_every=50)
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
