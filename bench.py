"""Speed and memory of tinytis, side by side with transformers where it is installed.

    python bench.py speed    prefill and decode tokens/s of tinytis (paged cache, cache manager, a policy at a budget)
                             against transformers on the same weights: the embedded model and a random one
    python bench.py load     a random bf16 checkpoint (--shape mistral-7b-v0.3: 7B, written once to a cache directory)
                             loaded in NF4, 128-token prefill, 8 decoded; peak RSS, beside transformers + bitsandbytes
    python bench.py kernels  NF4 gemv at the Mistral-7B shapes (vs bitsandbytes and dequantize + matmul) and paged
                             decode attention at 4k/16k/32k context: GB/s and fraction of peak bandwidth
    python bench.py ert-step one ERT step (train.py ert) on a frozen NF4 base of a given shape (--shape mistral-7b-v0.3),
                             random weights, 256 context tokens: seconds per step and peak RSS (tinytis/bench/ert_step.py)
    python bench.py overhead what eviction adds to a 4k-token prefill, per policy: recording the attention statistics
                             the policy needs, and scoring + compaction, as fractions of the full-cache prefill time
    python bench.py gpu      the GPU path in one table, written to docs/benchmarks.md: NF4 matmul at the Mistral-7B
                             shapes vs bitsandbytes and bf16, decode tokens/s of a Mistral-7B-shaped model (bf16, NF4) at
                             1k/8k/32k context and budgets 1/0.25/0.1, and transformers' decode (tinytis/bench/gpu.py)
    python bench.py peers    kvpress's presses through transformers against tinytis's policies on the embedded model:
                             same held-out prompts, budgets and query-agnostic setting, one table, a CSV, a plot
                             (run it in the kvpress environment: see the README; tinytis/bench/peers.py)

Every subcommand but peers builds its model from the shape flags (random weights, HF layout in a temporary directory);
speed also runs the embedded model. The benchmarks live in tinytis/bench/, one module each.
"""
from pathlib import Path

import torch

from tinytis.bench import ert_step, gpu, load, peers
from tinytis.bench.common import add_shape_flags
from tinytis.bench.kernels import bench_kernels
from tinytis.bench.overhead import overhead
from tinytis.bench.speed import MODELS, speed
from tinytis.device import add_device_flag, resolve_device
from tinytis.errors import ArgumentParser, comma_list, run_cli


def main():
    p = ArgumentParser(description="Speed and memory of tinytis, side by side with transformers where installed.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("speed", help="prefill and decode tok/s through the paged cache and a policy vs transformers")
    add_shape_flags(s, dtype_flag=False, dim=256, n_layers=4, n_heads=8, n_kv_heads=2, head_dim=32, hidden_dim=768,
                    vocab_size=32768)  # the random model: 19.8M parameters
    s.add_argument("--models", type=comma_list(str), default=list(MODELS), help="embedded (models/tiny) and/or random")
    s.add_argument("--contexts", type=comma_list(int), default=[1024, 2048, 4096], help="prompt tokens")
    s.add_argument("--threads", type=comma_list(int), default=[1, 2])
    s.add_argument("--dtypes", type=comma_list(str), default=["float32", "bfloat16"])
    s.add_argument("--policies", type=comma_list(str), default=["full", "tis", "h2o"])
    s.add_argument("--budgets", type=comma_list(float), default=[1.0, 0.5, 0.25], help="of every policy but full")
    s.add_argument("--new-tokens", type=int, default=64)
    s.add_argument("--reps", type=int, default=5, help="timed runs of each engine after the warm-up; the median is shown")
    s.set_defaults(run=speed)
    s = sub.add_parser("load", help="a random bf16 checkpoint in the hub's sharded layout, loaded in NF4, prefill + decode; "
                                    "peak RSS against the NF4 bytes held, beside transformers + bitsandbytes")
    load.add_flags(s)
    s.set_defaults(run=load.load)
    s = sub.add_parser("kernels", help="NF4 gemv and paged decode attention: GB/s and fraction of peak (reference path on CPU)")
    s.add_argument("--reps", type=int, help="CUDA: milliseconds of timing per case (default 200); CPU: calls after one warm-up (default 1)")
    s.add_argument("--full", action="store_true", help="on CPU too, the 4k/16k/32k contexts (default there: 1k, 4k)")
    s.set_defaults(run=bench_kernels)
    s = sub.add_parser("ert-step", help="seconds and peak RSS of ERT steps on a frozen NF4 base of a given shape")
    ert_step.add_flags(s)
    s.set_defaults(run=ert_step.ert_step)
    s = sub.add_parser("overhead", help="what eviction adds to the prefill of a long prompt, per policy")
    add_shape_flags(s, dim=256, n_layers=4, n_heads=8, n_kv_heads=2, head_dim=32, hidden_dim=768, vocab_size=32768)
    s.add_argument("--prompt-len", type=int, default=4096)
    s.add_argument("--budget", type=float, default=0.5)
    s.add_argument("--policies", nargs="+", default=["snapkv", "streaming", "random", "knorm", "tova", "h2o", "tis"])
    s.add_argument("--reps", type=int, default=3)
    s.add_argument("--threads", type=int, default=torch.get_num_threads())
    s.set_defaults(run=overhead)
    s = sub.add_parser("gpu", help="NF4 matmul, decode tokens/s at 7B shape and transformers' decode: one table")
    s.add_argument("--shape", choices=["7b", "tiny"], default="7b", help="7b: Mistral-7B-v0.3's shapes; tiny: the same on small ones")
    s.add_argument("--output", type=Path, default=Path("docs/benchmarks.md"))
    add_device_flag(s)
    s.set_defaults(run=lambda a: gpu.run(a.shape, resolve_device(a.device), a.output))
    peers.add_parser(sub)
    a = p.parse_args()
    a.run(a)


if __name__ == "__main__":
    run_cli(main)
