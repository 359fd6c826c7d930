"""`bench.py ert-step`: seconds and peak memory of ERT steps on a frozen NF4 base of a given shape (random weights).

The base is built in this process, tensor by tensor: each block Linear's random weight is quantized to NF4 as it is
drawn (tinytis.nf4_linear.load_linear), so a 7B-shaped base never holds more than one dense weight. A step is what
`train.py ert` runs (tinytis/train/tis.py): tis_losses (pass 1 over context + continuation without gradients, pass 2
over the continuation with the soft eviction mask), then loss = KL + lambda_align x alignment, backward into the TIS
components and one AdamW step. Token ids are random; the figures depend on the shapes only.

Peak memory is the process's VmHWM, restarted from the resident set once the base is built, so the peak of the steps
is reported beside the resident set that the base and the components account for.
"""
import json
import random
import time
from pathlib import Path

import torch

from tinytis import nf4_linear
from tinytis.anchors import Anchors
from tinytis.bench.common import add_shape_flags, describe, model_args
from tinytis.bench.load import SHAPES, peak_rss, random_tensor, rss
from tinytis.importance import TIS
from tinytis.model import Transformer
from tinytis.train.common import optimizer_step
from tinytis.train.tis import TIS_BUDGETS, tis_losses

LAMBDA_ALIGN = 0.1  # train.py ert's default


def random_nf4_model(args, dtype: torch.dtype, seed: int = 0) -> Transformer:
    """A Transformer of this shape with random weights (norms 1, the rest N(0, 0.02)), block Linears in NF4."""
    with torch.device("meta"):
        model = Transformer(args)
    quantized = nf4_linear.block_linear_names(model)
    for name, p in list(model.named_parameters()):
        tensor = random_tensor(name, p.shape, dtype, seed)
        if name in quantized:
            nf4_linear.load_linear(model, name, tensor, dtype)
        else:
            model.load_state_dict({name: tensor}, strict=False, assign=True)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.eval().requires_grad_(False)


def random_batch(vocab_size: int, batch: int, context: int, continuation: int, seed: int = 0):
    """(ctx_ids, ctx_pos, cont_ids, cont_pos, cont_mask) as tinytis.train.tis.context_batch returns them: contexts of
    `context` random ids, continuations of `continuation`, the KL taken at every continuation position but the last."""
    g = torch.Generator().manual_seed(seed)
    ctx_ids = torch.randint(3, vocab_size, (batch, context), generator=g)
    cont_ids = torch.randint(3, vocab_size, (batch, continuation), generator=g)
    ctx_pos = torch.arange(context).expand(batch, context)
    cont_pos = context + torch.arange(continuation).expand(batch, continuation)
    cont_mask = (torch.arange(continuation) < continuation - 1).expand(batch, continuation)
    return ctx_ids, ctx_pos, cont_ids, cont_pos, cont_mask


def add_flags(p):
    p.add_argument("--shape", choices=list(SHAPES), help="a real model's shape (default: the shape flags)")
    add_shape_flags(p, dim=256, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=32, hidden_dim=896, vocab_size=1024)
    p.add_argument("--context", type=int, default=256, help="context tokens per sample")
    p.add_argument("--continuation", type=int, default=32, help="question + answer tokens per sample")
    p.add_argument("--batch", type=int, default=1,
                   help="samples per step (train.py ert: 4096 tokens' worth, 16 at 256)")
    p.add_argument("--steps", type=int, default=3, help="timed steps; the first includes one-time costs")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())


def ert_step(a):
    torch.set_num_threads(a.threads)
    args = SHAPES[a.shape] if a.shape else model_args(a)
    dtype = getattr(torch, a.dtype)
    print(describe(args, f"random, block Linears in NF4, the rest {a.dtype}"))
    t0 = time.perf_counter()
    model = random_nf4_model(args, dtype)
    tis = TIS(args)
    opt = torch.optim.AdamW(tis.parameters(), lr=1e-4, weight_decay=0.0)
    built = {"build_s": time.perf_counter() - t0, "base_bytes": nf4_linear.weight_bytes(model),
             "tis_params": sum(p.numel() for p in tis.parameters()), "rss_built": rss(), "peak_rss_build": peak_rss()}
    print(f"built in {built['build_s']:.0f} s: base {built['base_bytes'] / 2**30:.2f} GiB held, "
          f"TIS {built['tis_params'] / 1e6:.1f}M fp32 params, RSS {built['rss_built'] / 2**30:.2f} GiB")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM restarts from the resident set
    batch, anchors, rng = random_batch(args.vocab_size, a.batch, a.context, a.continuation), Anchors(), random.Random(0)
    seconds = []
    for step in range(a.steps):
        t0 = time.perf_counter()
        align, kl = tis_losses(model, tis, batch, rng.choice(TIS_BUDGETS), anchors)
        optimizer_step(opt, kl + LAMBDA_ALIGN * align)
        seconds.append(time.perf_counter() - t0)
        print(f"step {step + 1}: {seconds[-1]:.2f} s, kl {kl.item():.4f}, peak RSS so far {peak_rss() / 2**30:.2f} GiB")
    result = built | {"seconds_per_step": seconds, "peak_rss_steps": peak_rss(), "batch": a.batch, "context": a.context,
                      "continuation": a.continuation, "dtype": a.dtype, "threads": a.threads}
    print(f"ERT step, batch {a.batch} x ({a.context} context + {a.continuation} continuation) tokens, {a.dtype}, "
          f"{a.threads} threads: {min(seconds):.2f} s per step (fastest of {a.steps}), "
          f"peak RSS {result['peak_rss_steps'] / 2**30:.2f} GiB")
    print("json: " + json.dumps(result))
