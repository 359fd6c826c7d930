"""bench.py gpu: the GPU path in one command and one table, written to docs/benchmarks.md.

  (a) NF4 matmul at Mistral-7B's shapes (W: N x K = out x in) for batch 1, 4, 16: tinytis's kernel against
      bitsandbytes' matmul_4bit (its Linear4bit) and a bf16 torch matmul, after checking tinytis's result against
      the torch reference. GB/s = bytes read and written (the weight as held, x, y) per second; % HBM against the
      device's nominal bandwidth; vs peer, on tinytis's row: bitsandbytes' time / tinytis's.
  (b) decode tokens/s, batch 1, random weights in Mistral-7B-v0.3's shape (no download), bf16 and NF4, at each
      context and budget: the context is prefilled once, compressed to each budget by knorm (no statistics to
      record: prefill through SDPA, decode without attention mass), then decoded greedily.
  (c) the same decode through transformers (+ bitsandbytes for NF4) with its full cache, when installed:
      vs peer = tinytis tokens/s / transformers tokens/s at budget 1.0.

--shape tiny runs the same code on small shapes (the tests run it on CPU). Every figure comes from this run.
"""
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from tinytis import kernels
from tinytis.kernels.nf4_matmul import nf4_matmul_ref
from tinytis import nf4, nf4_linear
from tinytis.config import ModelArgs
from tinytis.engine import SamplingParams, decode, prefill
from tinytis.manager import CacheManager, ManagerConfig
from tinytis.model import Transformer
from tinytis.policies import make_policy

SHAPES = {
    "7b": dict(model=ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, hidden_dim=14336,
                               vocab_size=32768, rope_theta=1e6, max_seq_len=32768 + 64),
               matmuls=[(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)], contexts=[1024, 8192, 32768],
               warm=8, timed=32),
    "tiny": dict(model=ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=256,
                                 vocab_size=512, max_seq_len=512),
                 matmuls=[(128, 128), (64, 128), (256, 128), (128, 256)], contexts=[64, 128, 256], warm=2, timed=8),
}
BATCHES = (1, 4, 16)
BUDGETS = (1.0, 0.25, 0.1)
HBM_TBPS = {"H200": 4.8, "H100 NVL": 3.9, "H100": 3.35, "A100-SXM4-80GB": 2.04, "A100": 1.56, "L40S": 0.86,
            "L4": 0.3, "RTX 4090": 1.01}  # nominal bandwidth by device name, TB/s
COLUMNS = ("part", "case", "engine", "dtype", "batch", "budget", "us/call", "GB/s", "% HBM", "tokens/s", "KV MiB",
           "vs peer")


@dataclass
class Row:
    part: str
    case: str
    engine: str
    dtype: str
    batch: int
    budget: float | None = None
    us: float | None = None
    gbps: float | None = None
    hbm: float | None = None
    tps: float | None = None
    kv_mib: float | None = None
    vs_peer: float | None = None

    def cells(self) -> list[str]:
        fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
        return [self.part, self.case, self.engine, self.dtype, str(self.batch), fmt(self.budget, "g"), fmt(self.us, ".1f"),
                fmt(self.gbps, ".2f"), fmt(self.hbm, ".1%"), fmt(self.tps, ".1f"), fmt(self.kv_mib, ".2f"),
                fmt(self.vs_peer, ".2f") + ("x" if self.vs_peer is not None else "")]


def seconds_per_call(fn, device: torch.device, reps: int | None = None) -> float:
    """Median seconds per call: triton's do_bench on CUDA over reps milliseconds (default 100; L2 flushed between
    calls), wall clock over reps calls on CPU (default 5)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, rep=reps or 100, return_mode="median") / 1e3
    fn()
    times = []
    for _ in range(reps or 5):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def bnb_linear(weight: torch.Tensor, dtype):
    """A bitsandbytes NF4 Linear (double-quantized, as transformers loads one) holding weight (N, K)."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(weight.shape[1], weight.shape[0], bias=False, compute_dtype=dtype,
                              compress_statistics=True, quant_type="nf4", device="meta")  # no throwaway init
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=True).to(weight.device)
    return layer


def matmul_rows(shapes, device, dtype, peak_tbps) -> list[Row]:
    """NF4 matmul rows of every (N, K) weight shape at every batch, against bitsandbytes (where installed) and a
    dense torch matmul."""
    try:
        import bitsandbytes  # noqa: F401
        with_bitsandbytes = True
    except ImportError:
        with_bitsandbytes = False
    return [row for n, k in shapes for row in shape_matmul_rows(n, k, device, dtype, peak_tbps, with_bitsandbytes)]


def shape_matmul_rows(n: int, k: int, device, dtype, peak_tbps, with_bitsandbytes: bool) -> list[Row]:
    """The rows of one weight shape (N, K); its weights, one per engine, are freed when it returns."""
    engine = f"tinytis ({'triton' if kernels.use_triton(torch.empty(0, device=device)) else 'torch'})"
    dense = torch.randn(n, k, device=device, dtype=dtype) * 0.02
    w = nf4.quantize(dense)
    peers = {"torch matmul": (lambda x: F.linear(x, dense), dense.numel() * dense.element_size())}
    if with_bitsandbytes:
        peers = {"bitsandbytes": (bnb_linear(dense, dtype), w.nbytes())} | peers
    rows = []
    for batch in BATCHES:
        x = torch.randn(batch, k, device=device, dtype=dtype)
        ref = nf4_matmul_ref(x, w).float()
        if (kernels.nf4_matmul(x, w).float() - ref).abs().max() > 2**-6 * ref.abs().max():  # test_kernels' bf16 bound
            raise RuntimeError(f"NF4 matmul {n}x{k} batch {batch} disagrees with its reference; no figures")
        io = (batch * (k + n)) * x.element_size()
        ours = seconds_per_call(lambda: kernels.nf4_matmul(x, w), device)
        timed = [(name, seconds_per_call(lambda: fn(x), device), nbytes) for name, (fn, nbytes) in peers.items()]
        first_peer = timed[0][1]
        for name, s, nbytes in [(engine, ours, w.nbytes())] + timed:
            gbps = (nbytes + io) / s / 1e9
            rows.append(Row("nf4 matmul", f"{n}x{k}", name, "bf16 weights" if name == "torch matmul" else "nf4",
                            batch, us=s * 1e6, gbps=gbps, hbm=gbps / 1e3 / peak_tbps if peak_tbps else None,
                            vs_peer=first_peer / s if name == engine else None))
    return rows


def random_model(args: ModelArgs, dtype, device, quant: bool) -> Transformer:
    """Mistral-shaped random weights made on the device (norms 1, the rest N(0, 0.02)); quant: blocks in NF4."""
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0, 0.02)
    return (nf4_linear.quantize_model(model) if quant else model).eval()


def timed_decode(model, state, warm: int, timed: int) -> tuple[float, int]:
    """(tokens/s over the last `timed` steps after `warm` (Triton compiles on first use), KV bytes held at the end)
    of a greedy decode of state."""
    stamps = []
    gen = decode(model, state, None, SamplingParams(warm + timed + 1),
                 on_token=lambda b, t: stamps.append(time.perf_counter()))  # each after the step's read of its token
    return timed / (stamps[-1] - stamps[warm]), gen.kv_bytes


@torch.inference_mode()
def tinytis_decode_rows(args: ModelArgs, contexts, warm, timed, device, dtype, quant: bool) -> tuple[list[Row], dict]:
    """Decode rows of one model (bf16 or NF4) at every context and budget, and the Triton launches of one step."""
    model = random_model(args, dtype, device, quant)
    policy = make_policy("knorm")
    label = "nf4" if quant else str(dtype).removeprefix("torch.")
    engine = f"tinytis ({'triton' if kernels.use_triton(model.output.weight) else 'torch'})"
    rows, per_step = [], {}
    for ctx in contexts:
        prompt = torch.randint(3, args.vocab_size, (ctx,), generator=torch.Generator().manual_seed(ctx)).tolist()
        base = prefill(model, [prompt], CacheManager(args, policy, ManagerConfig(1.0)))
        ctx_rows = []
        for budget in sorted(BUDGETS):  # the full cache last: it is decoded in place
            state = base if budget == 1.0 else base.fork()
            if budget < 1.0:
                state.manager.compress(state.cache, policy, budget)
            before = kernels.CALLS.copy()
            tps, kv = timed_decode(model, state, warm, timed)
            per_step = {k: v // (warm + timed) for k, v in (kernels.CALLS - before).items()}
            ctx_rows.append(Row("decode", f"ctx {ctx}", engine, label, 1, budget, tps=tps, kv_mib=kv / 2**20))
            state.free()
        rows += ctx_rows[::-1]
    del model
    return rows, per_step


def hf_decode_tps(args: ModelArgs, contexts, warm, timed, device, dtype, quant: bool) -> dict:
    """transformers (+ bitsandbytes NF4) greedy decode tokens/s by case ("ctx N"), timed as timed_decode."""
    from transformers import AutoModelForCausalLM, MistralConfig

    config = MistralConfig(hidden_size=args.dim, intermediate_size=args.hidden_dim, num_hidden_layers=args.n_layers,
                           num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads, head_dim=args.head_dim,
                           vocab_size=args.vocab_size, rope_theta=args.rope_theta, max_position_embeddings=args.max_seq_len,
                           sliding_window=None, tie_word_embeddings=False)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    if quant:
        for layer in model.model.layers:
            for parent in (layer.self_attn, layer.mlp):
                for name, child in list(parent.named_children()):
                    if isinstance(child, torch.nn.Linear):
                        setattr(parent, name, bnb_linear(child.weight.data, dtype))
    tps = {}
    with torch.inference_mode():
        for ctx in contexts:
            ids = torch.randint(3, args.vocab_size, (1, ctx), generator=torch.Generator().manual_seed(ctx)).to(device)
            out = model(ids, use_cache=True, logits_to_keep=1)
            stamps = []
            for _ in range(warm + timed + 1):
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                nxt.tolist()  # read the token, as tinytis's loop does
                stamps.append(time.perf_counter())
                out = model(nxt, cache=out.cache, use_cache=True)
            tps[f"ctx {ctx}"] = timed / (stamps[-1] - stamps[warm])
            del out
    del model
    return tps


def run(shape: str, device: torch.device, output: Path) -> str:
    """Run every part; print the table and write it, with the device and the kernel launches, to output."""
    spec = SHAPES[shape]
    a = spec["model"]
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32  # CPU matmul and decode in bf16 are not what a GPU runs
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    peak = next((v for k, v in HBM_TBPS.items() if k in name), None) if cuda else None
    torch.manual_seed(0)
    t0 = time.perf_counter()
    rows = matmul_rows(spec["matmuls"], device, dtype, peak)
    launches = {}
    for quant in (False, True):
        steps = spec["contexts"], spec["warm"], spec["timed"]
        decode_rows, launches[quant] = tinytis_decode_rows(a, *steps, device, dtype, quant)
        try:
            import transformers  # noqa: F401

            peer = hf_decode_tps(a, *steps, device, dtype, quant)
        except ImportError:
            peer = {}
        for row in decode_rows:
            if row.budget == 1.0 and row.case in peer:
                row.vs_peer = row.tps / peer[row.case]
        rows += decode_rows + [Row("decode", case, "transformers" + (" + bitsandbytes" if quant else ""),
                                   decode_rows[0].dtype, 1, 1.0, tps=tps) for case, tps in peer.items()]
        if cuda:
            torch.cuda.empty_cache()
    table = "\n".join(["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)] +
                      ["| " + " | ".join(r.cells()) + " |" for r in rows])
    launch_lines = [f"- {'NF4' if q else str(dtype).removeprefix('torch.')}: " +
                    (", ".join(f"{k} {v}" for k, v in sorted(c.items())) or "none (torch path)") for q, c in launches.items()]
    text = "\n".join([
        "# Benchmarks: the GPU path", "",
        f"`python bench.py gpu --shape {shape}` on {name} (kernels backend {kernels.BACKEND}, nominal bandwidth "
        f"{f'{peak} TB/s' if peak else 'unknown'}), {time.perf_counter() - t0:.0f} s in all. "
        f"Model: dim {a.dim}, {a.n_layers} layers, {a.n_heads} heads ({a.n_kv_heads} KV) of {a.head_dim}, hidden "
        f"{a.hidden_dim}, vocab {a.vocab_size}, random weights; activations {str(dtype).removeprefix('torch.')}.", "",
        table, "",
        "Triton launches per decode step (kernels.CALLS):", *launch_lines, "",
    ])
    print(text)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    return text
