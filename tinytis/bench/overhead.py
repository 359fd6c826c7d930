"""bench.py overhead: what eviction adds to the prefill of a long prompt, per policy: recording the attention
statistics the policy needs, and scoring + compaction, as fractions of the full-cache prefill time."""
import time

import torch

from tinytis.bench.common import describe, model_args
from tinytis.engine import prefill
from tinytis.importance import TIS
from tinytis.manager import CacheManager, ManagerConfig
from tinytis.model import Transformer
from tinytis.policies import TISPolicy, make_policy


class TimedManager(CacheManager):
    """The CacheManager, counting the CPU seconds of its evictions (scoring + compaction)."""

    evict_cpu = 0.0

    def evict(self, cache, budget):
        t0 = time.process_time()
        super().evict(cache, budget)
        self.evict_cpu += time.process_time() - t0


def overhead(a):
    """Prefill one random prompt with each policy at the budget; the cheapest of --reps runs of each, interleaved.
    Times are CPU seconds of this process, so other load on the machine does not count."""
    torch.set_num_threads(a.threads)
    args = model_args(a)
    model = Transformer(args)
    model.init_weights(0)
    model = model.to(getattr(torch, a.dtype)).eval()
    prompt = torch.randint(0, args.vocab_size, (a.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    policies = ["full", *a.policies]
    best = {}  # policy -> (prefill CPU s without eviction, eviction CPU s) of its cheapest run
    for _ in range(a.reps):
        for name in policies:
            policy = TISPolicy(TIS(args)) if name == "tis" else make_policy(name)  # an untrained head costs the same
            manager = TimedManager(args, policy, ManagerConfig(a.budget))
            t0 = time.process_time()
            prefill(model, [prompt], manager)
            run = (time.process_time() - t0 - manager.evict_cpu, manager.evict_cpu)
            if name not in best or sum(run) < sum(best[name]):
                best[name] = run
    base = best["full"][0]
    print(describe(args, a.dtype) + f"; prompt {a.prompt_len} tokens, budget {a.budget}, {a.threads} threads, best of {a.reps}")
    print(f"full-cache prefill {base:.3f} CPU s")
    print(f"{'policy':>10} | {'prefill s':>9} | {'recording':>9} | {'score+compact':>13} | {'of prefill':>10} | total")
    for name in a.policies:
        forward, evict = best[name]
        print(f"{name:>10} | {forward:9.3f} | {(forward - base) / base:+9.1%} | {evict * 1e3:10.1f} ms | {evict / base:10.2%} | "
              f"{(forward + evict - base) / base:+.1%}")
