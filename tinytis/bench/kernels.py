"""bench.py kernels: NF4 gemv at the Mistral-7B shapes (vs bitsandbytes and dequantize + matmul) and paged decode
attention at 4k/16k/32k context: GB/s and fraction of peak bandwidth (on CPU: the blockwise NF4 path, the torch
reference attention)."""
import torch
import torch.nn.functional as F

from tinytis import kernels
from tinytis.kernels.nf4_blockwise import nf4_matmul_blockwise
from tinytis.kernels.nf4_matmul import nf4_matmul_ref, nf4_matmul_triton
from tinytis.kernels.paged_attention import paged_decode_attention_ref, paged_decode_attention_triton
from tinytis import nf4
from tinytis.bench.gpu import HBM_TBPS, seconds_per_call

GEMV_SHAPES = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]  # (in, out) of wq/wo, wk/wv, w1/w3, w2


def _copy_tbps(device: torch.device, reps: int) -> float:
    """Achieved bandwidth of a device-to-device copy (read + write), TB/s: the practical peak."""
    n = 2**28 if device.type == "cuda" else 2**24  # bytes
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * n / seconds_per_call(lambda: dst.copy_(src), device, reps) / 1e12


def _fmt(seconds: float, nbytes: int, peak_tbps: float | None, copy_tbps: float) -> str:
    gbps = nbytes / seconds / 1e9
    frac = f"{gbps / 1e3 / peak_tbps:6.1%}" if peak_tbps else "     -"
    return f"{seconds * 1e6:9.1f} {gbps:8.1f} {frac} {gbps / 1e3 / copy_tbps:6.1%}"


def gemv_line(k: int, n: int, ours, bnb, device: torch.device, dtype, reps: int, peak, copy) -> str:
    """One gemv shape's line, (K in, N out): ours, bitsandbytes (None: not installed), dequantize + matmul. Its
    weights are freed when it returns."""
    w_dense = torch.randn(n, k, device=device, dtype=dtype)
    w = nf4.quantize(w_dense)
    x = torch.randn(1, k, device=device, dtype=dtype)
    nbytes = w.nbytes() + (k + n) * x.element_size()
    cells = [_fmt(seconds_per_call(lambda: ours(x, w), device, reps), nbytes, peak, copy)]
    if bnb is not None:
        packed, state = bnb.functional.quantize_4bit(w_dense, quant_type="nf4", compress_statistics=True)
        theirs = seconds_per_call(lambda: bnb.matmul_4bit(x, packed.t(), quant_state=state), device, reps)
        cells.append(_fmt(theirs, nbytes, peak, copy))
    else:
        cells.append(f"{'bitsandbytes not installed':^32}")
    dequantized = seconds_per_call(lambda: torch.matmul(x, nf4.dequantize(w, dtype).T), device, reps)
    cells.append(_fmt(dequantized, nbytes, peak, copy))
    if device.type == "cuda":  # the figures are only worth something if the kernel is right
        err = (nf4_matmul_triton(x, w).float() - nf4_matmul_ref(x, w).float()).abs().max().item()
        cells[0] += f" (max diff vs reference {err:.2e})"
    return f"{f'{k} x {n}':>13} {nbytes / 1e6:6.1f} | " + " | ".join(cells)


def bench_kernels(args):
    """NF4 gemv at the Mistral-7B shapes against bitsandbytes and dequantize + matmul, and paged decode
    attention at 4k/16k/32k context. On CPU the blockwise NF4 path and the torch reference attention run, at fewer
    reps."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    reps = args.reps or (200 if cuda else 1)  # CUDA: milliseconds of do_bench; CPU: calls
    dtype = torch.bfloat16 if cuda else torch.float32
    name = torch.cuda.get_device_name() if cuda else "CPU"
    peak = next((v for k, v in HBM_TBPS.items() if k in name), None) if cuda else None
    copy = _copy_tbps(device, reps)
    path = "Triton kernels" if cuda else "CPU: NF4 through the blockwise path (C gemv), attention through the torch reference"
    print(f"device {name}: {path}; kernels backend {kernels.BACKEND}; activations {str(dtype).removeprefix('torch.')}")
    print(f"peak bandwidth: nominal {f'{peak:.2f} TB/s' if peak else 'unknown'}, measured copy {copy:.3f} TB/s")
    print("columns per method: us per call, GB/s, % of nominal peak, % of measured copy bandwidth")

    try:
        import bitsandbytes as bnb
    except ImportError:
        bnb = None
    ours = ("tinytis triton", lambda x, w: nf4_matmul_triton(x, w)) if cuda else ("tinytis blockwise", nf4_matmul_blockwise)
    print("\nNF4 gemv, batch 1, double-quantized absmax; bytes = codes + absmax + x + y")
    print(f"{'in x out':>13} {'MB':>6} | {ours[0]:^32} | {'bitsandbytes matmul_4bit':^32} | {'dequantize + torch.matmul':^32}")
    for k, n in GEMV_SHAPES:
        print(gemv_line(k, n, ours[1], bnb, device, dtype, reps, peak, copy))

    attn = ("tinytis triton", paged_decode_attention_triton) if cuda else ("tinytis reference", paged_decode_attention_ref)
    B, KV, G, D, page = 1, 8, 4, 128, 16
    contexts = [4096, 16384, 32768] if cuda or args.full else [1024, 4096]
    print(f"\npaged decode attention, one layer: batch {B}, {KV} KV heads x {G} query heads, head_dim {D}, pages of {page}; "
          f"bytes = K + V held")
    print(f"{'context':>8} {'MB':>6} | {attn[0] + ' with mass':^32} | {attn[0] + ' no mass':^32} | {'SDPA, contiguous K/V':^32}")
    for ctx in contexts:
        n_pages = B * KV * ctx // page
        k_pool = torch.randn(n_pages, page, D, device=device, dtype=dtype)
        v_pool = torch.randn_like(k_pool)
        table = torch.randperm(n_pages, device=device).view(B, KV, ctx // page).int()
        lengths = torch.full((B, KV), ctx, device=device, dtype=torch.int32)
        q = torch.randn(B, KV * G, D, device=device, dtype=dtype)
        nbytes = 2 * k_pool.numel() * k_pool.element_size()
        cells = [_fmt(seconds_per_call(lambda: attn[1](q, k_pool, v_pool, table, lengths, D**-0.5, m), device, reps), nbytes,
                      peak, copy) for m in (True, False)]
        k = k_pool.view(B, KV, ctx, D)  # contiguous per head: the dense peer
        v = v_pool.view(B, KV, ctx, D)
        sdpa = lambda: F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)  # noqa: E731
        cells.append(_fmt(seconds_per_call(sdpa, device, reps), nbytes, peak, copy))
        if cuda:
            got = paged_decode_attention_triton(q, k_pool, v_pool, table, lengths, D**-0.5)
            ref = paged_decode_attention_ref(q, k_pool, v_pool, table, lengths, D**-0.5)
            cells[0] += f" (max diff out {(got[0].float() - ref[0].float()).abs().max().item():.2e}," \
                        f" mass {(got[1] - ref[1]).abs().max().item():.2e})"
        print(f"{ctx:>8} {nbytes / 1e6:6.1f} | " + " | ".join(cells))


