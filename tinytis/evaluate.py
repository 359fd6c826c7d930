"""Runs evaluation grids: task x policy x budget x setting on held-out samples (tinytis.grid), scored into rows
(tinytis.results).

Each cell's samples run under one (policy, budget, setting). Query-agnostic: the context is compressed, then the
question is asked. Query-aware: the question is the end of the compressed context. The full cache is always a row
(policy full, budget 1.0). In multiq, several questions follow one context and the cache holds its budget while the
answers are decoded.
"""
import time
from dataclasses import replace

import torch
from tqdm import tqdm

from tinytis import shard
from tinytis.engine import SamplingParams, decode, prefill
from tinytis.grid import cells, make_samples, runs
from tinytis.manager import CacheManager, ManagerConfig
from tinytis.model import Transformer
from tinytis.policies import Needs, Policy, make_policy
from tinytis.results import Row, git_commit
from tinytis.tasks import Sample, multiq, narrative

MAX_NEW_TOKENS = 16


def score_answer(task: str, prediction: str, sample: Sample) -> dict:
    """LongBench's qa_f1 and exact match (the best over a record's answers) for narrative and your own data."""
    if task in ("narrative", "longbench"):
        refs = getattr(sample, "answers", None) or (sample.answer,)
        return {"f1": max(narrative.qa_f1(prediction, r) for r in refs),
                "em": max(float(narrative.normalize_answer(prediction) == narrative.normalize_answer(r)) for r in refs)}
    return {"em": float(prediction.strip() == sample.answer.strip())}


class Probe(Policy):
    """Prefills a cache recording what a group of policies needs, without evicting; the group then compresses forks."""

    evicts = False

    def __init__(self, needs):
        self.needs = needs


class Evaluator:
    """Runs the grid. Each batch of a cell is prefilled once per group of policies with the same needs (the oracle,
    H2O, TOVA and SnapKV record different statistics; the rest record none) and model; every (policy, budget) of the
    group then compresses its own fork of that cache and answers from it. Same result as one prefill per run, less
    work. policy_models: the model directory a policy runs on instead of model_dir (dms: the DMS model); fidelity
    is always measured against the full cache of the evaluated model."""

    def __init__(self, model, tokenizer, model_dir, batch_size: int = 16, seed: int = 0, policy_models=None, data=None):
        self.model, self.tok, self.batch_size, self.seed = model, tokenizer, batch_size, seed
        self.data = data or {}  # CellKey -> samples given (eval.py longbench --data), not generated
        self.model_dir, self.policy_models = model_dir, policy_models or {}
        self.count = lambda s: len(tokenizer.encode(s, bos=False))
        self.commit = git_commit()
        self.timing = []  # (task, policy, budget, setting, prompt tokens, prefill s, total s, peak kv bytes)

    def run(self, tasks, policies, budgets, settings, lengths, depths, litm_docs, n: int,
            rank: int = 0, world: int = 1, families=("id",)) -> list[Row] | None:
        """The grid's rows. Under torchrun this rank runs every world-th cell; rank 0 returns all rows (and
        self.timing) in single-process order, the other ranks None."""
        device = self.model.tok_embeddings.weight.device
        models = {p: Transformer.from_pretrained(self.policy_models[p], device=device) if p in self.policy_models
                  else self.model for p in policies}
        instances = {p: make_policy(p, self.policy_models.get(p, self.model_dir), models[p].args, device)
                     for p in policies}
        groups = {}
        for p, b in runs(policies, budgets, [p for p in policies if not instances[p].budgeted]):
            groups.setdefault((instances[p].needs, self.policy_models.get(p)), []).append((p, b))
        jobs = [(c, s) for t in tasks for c in (cells(t, lengths, depths, litm_docs, families) if t != "longbench" else self.data)
                for s in settings]
        rows, timing = {}, {}  # job index -> its rows, its timings
        for j in tqdm(range(rank, len(jobs), world), desc="eval", unit="cell", disable=rank != 0):
            cell, setting = jobs[j]
            samples = self.data[cell] if cell in self.data else make_samples(cell, n, self.seed, self.count)
            scores = {}  # (policy, budget) -> {metric: [values]}, [kv held, kv full]
            start = len(self.timing)
            for i in range(0, len(samples), self.batch_size):
                batch = self.encode(samples[i : i + self.batch_size], setting)
                full_logits = self.full_logits(*batch) if cell.task == "fidelity" else None
                for (needs, _), group in groups.items():
                    model = models[group[0][0]]
                    self.run_group(cell.task, batch, setting, needs, [(p, instances[p], b) for p, b in group], scores,
                                   model, full_logits)
            timing[j] = self.timing[start:]
            rows[j] = [Row(cell.task, cell.variant, cell.family, policy, budget, setting, cell.length, cell.depth, m, len(v),
                           sum(v) / len(v), held, full, self.seed, self.commit)
                       for (policy, budget), (metrics, held, full) in scores.items() for m, v in metrics.items()]
        self.timing = shard.merge(timing, rank, world)
        return shard.merge(rows, rank, world)

    def encode(self, batch: list[Sample], setting):
        """(samples, contexts, questions or None, continuations): what is compressed and what follows it."""
        enc = lambda s: self.tok.encode(s, bos=False)
        contexts = [self.tok.encode(s.context) for s in batch]
        questions = [enc(s.question) for s in batch]
        answers = [self.tok.encode(s.answer, bos=False, eos=True) for s in batch]
        conts = [q + a for q, a in zip(questions, answers)]  # what follows the compressed context
        if setting == "aware":
            contexts, questions, conts = [c + q for c, q in zip(contexts, questions)], None, answers
        return batch, contexts, questions, conts

    @torch.inference_mode()
    def full_logits(self, batch, contexts, questions, conts):
        """The evaluated model's logits over the continuations with its full cache: the fidelity reference."""
        state = prefill(self.model, contexts, CacheManager(self.model.args, Probe(Needs()), ManagerConfig(1.0)))
        return self.continue_logits(self.model, state, conts)

    @torch.inference_mode()
    def run_group(self, task, encoded, setting, needs, group, scores, model, full_logits):
        batch, contexts, questions, conts = encoded
        manager = CacheManager(model.args, Probe(needs), ManagerConfig(1.0))
        base = prefill(model, contexts, manager, references=conts)
        for name, policy, budget in group:
            t0 = time.perf_counter()
            state = base.fork()
            state.manager.compress(state.cache, policy, budget, decode_budget=budget if task == "multiq" else None)
            state = replace(state, stats=state.manager.stats(state.cache))
            if task == "fidelity":
                metrics, stats = fidelity_metrics(full_logits, self.continue_logits(model, state.fork(), conts), conts), state.stats
            elif task == "multiq":
                predictions, stats = self.converse(model, state, batch, questions)
                metrics = {"em": [multiq.score(p, s) for p, s in zip(predictions, batch)]}
            else:
                gen = decode(model, state, questions, SamplingParams(MAX_NEW_TOKENS), self.tok.eos_id)
                metrics, stats = {}, gen.stats
                for s, tokens in zip(batch, gen.tokens):
                    for k, v in score_answer(task, self.tok.decode(tokens), s).items():
                        metrics.setdefault(k, []).append(v)
            state.free()
            self.timing.append((task, name, budget, setting, sum(len(c) for c in contexts), base.prefill_s,
                                time.perf_counter() - t0 + base.prefill_s, stats.get("peak_kv_bytes", 0)))
            entry = scores.setdefault((name, budget), ({}, 0, 0))
            for k, v in metrics.items():
                entry[0].setdefault(k, []).extend(v)
            scores[(name, budget)] = (entry[0], entry[1] + stats["kv_bytes_held"], entry[2] + stats["kv_bytes_full"])
        base.free()

    def converse(self, model, state, batch: list[Sample], first_questions):
        """Ask each sample's questions in turn from its cache, the model's answers left in it between them.
        first_questions: the ids of the first (None when it ends the compressed context). Returns each sample's
        answers, in order, and the statistics of the last one (the pool's peak covers them all)."""
        n_follow_ups = len(batch[0].follow_ups)
        turns = [first_questions] + [[self.tok.encode(s.follow_ups[j][0], bos=False) for s in batch]
                                     for j in range(n_follow_ups)]
        predictions = [[] for _ in batch]
        for questions in turns:
            gen = decode(model, state, questions, SamplingParams(MAX_NEW_TOKENS), self.tok.eos_id)
            for prediction, tokens in zip(predictions, gen.tokens):
                prediction.append(self.tok.decode(tokens))
            next_pos = state.manager.last_pos + 1  # (B,) after the answer just fed (EOS is not)
            state = replace(state, next_pos=next_pos[:, None].to(state.next_pos.device))
        return predictions, gen.stats

    def continue_logits(self, model, state, conts) -> list[torch.Tensor]:
        """Teacher-forced logits over each continuation, at the positions that predict its next token.
        The continuation goes into state's cache, so state is used up (pass a fork); its pages are freed."""
        T = max(len(c) for c in conts)
        device = state.next_pos.device
        ids = torch.tensor([c + [self.tok.eos_id] * (T - len(c)) for c in conts], device=device)
        positions = state.next_pos + torch.arange(T, device=device)[None]
        logits = model(ids, positions, state.cache)
        state.free()
        return [logits[b, : len(c) - 1] for b, c in enumerate(conts)]


def fidelity_metrics(full: list, evicted: list, conts) -> dict:
    """Per sample: KL(full || evicted) per token, top-1 agreement, and the relative perplexity change
    ppl(evicted) / ppl(full) - 1 of the continuation's tokens."""
    metrics = {"kl": [], "top1": [], "ppl_delta": []}
    for f, e, cont in zip(full, evicted, conts):
        target = torch.tensor(cont[1:], device=f.device)[:, None]
        log_p, log_q = torch.log_softmax(f, -1), torch.log_softmax(e, -1)
        metrics["kl"].append((log_p.exp() * (log_p - log_q)).sum(-1).mean().item())
        metrics["top1"].append((f.argmax(-1) == e.argmax(-1)).float().mean().item())
        ppl = lambda lp: (-lp.gather(-1, target).mean()).exp()
        metrics["ppl_delta"].append((ppl(log_q) / ppl(log_p) - 1).item())
    return metrics
