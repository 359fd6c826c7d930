"""The C kernels of nf4_cpu.c: compiled at first use with the system C compiler, called through ctypes.

The shared library is cached under ~/.cache/tinytis/kernels (TINYTIS_CACHE moves it), named by a hash of the source,
the flags and the CPU's features (it is built with -march=native, so a home directory shared by different machines
gets one library per kind of CPU). Without a compiler (or TINYTIS_NF4_C=0) library() is None and
kernels.nf4_blockwise runs its torch path instead. Both functions need K % 64 == 0 and CPU tensors.
"""
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from tinytis import nf4

SOURCE = Path(__file__).with_name("nf4_cpu.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-shared", "-fPIC"]
MAX_M = 8  # nf4_gemv's MAX_M
ROUND_TO = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # the weights' rounding, as x's dtype


class Weight(ctypes.Structure):
    """nf4_weight of nf4_cpu.c: pointers into an NF4Weight's tensors and the code tables."""
    _fields_ = [("packed", ctypes.c_void_p), ("absmax", ctypes.c_void_p), ("nested_absmax", ctypes.c_void_p),
                ("offset", ctypes.c_float), ("byte_values", ctypes.c_void_p), ("dynamic_code", ctypes.c_void_p),
                ("k", ctypes.c_int64)]


def cache_dir() -> Path:
    return Path(os.environ.get("TINYTIS_CACHE", Path.home() / ".cache" / "tinytis")) / "kernels"


def cpu_features() -> str:
    """The machine and its CPU's feature flags (Linux: /proc/cpuinfo), what -march=native compiles for."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    return platform.machine() + next((line for line in lines if line.startswith("flags")), "")


def build(out_dir: Path) -> Path:
    """Compile nf4_cpu.c into out_dir (once per source, flags and kind of CPU) -> the library's path."""
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + cpu_features().encode()).hexdigest()[:16]
    lib = out_dir / f"nf4_cpu-{digest}.so"
    if not lib.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, suffix=".so", delete=False) as tmp:
            pass
        try:
            subprocess.run([os.environ.get("CC", "cc"), *FLAGS, str(SOURCE), "-o", tmp.name], check=True,
                           capture_output=True, text=True)
            os.replace(tmp.name, lib)  # atomic: concurrent builders each write their own file
        finally:
            Path(tmp.name).unlink(missing_ok=True)
    return lib


@functools.cache
def library():
    """The loaded kernels, or None (no compiler, the build failed, or TINYTIS_NF4_C=0)."""
    if os.environ.get("TINYTIS_NF4_C") == "0" or shutil.which(os.environ.get("CC", "cc")) is None:
        return None
    try:
        lib = ctypes.CDLL(str(build(cache_dir())))
    except (OSError, subprocess.CalledProcessError) as e:
        warnings.warn(f"tinytis: the CPU NF4 kernels did not build ({getattr(e, 'stderr', e)}); using the torch path")
        return None
    weight, i64, c_int, ptr = ctypes.POINTER(Weight), ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    lib.nf4_dequantize_rows.argtypes = [weight, i64, i64, c_int, ptr, c_int]
    lib.nf4_gemv.argtypes = [weight, i64, ptr, i64, c_int, ptr, c_int]
    lib.nf4_dequantize_rows.restype = lib.nf4_gemv.restype = None
    return lib


_TABLES = (nf4.BYTE_VALUES.contiguous(), nf4.DYNAMIC_CODE.contiguous())


def _weight(w) -> Weight:
    """The C view of an NF4Weight (its tensors must stay alive while the C call runs)."""
    assert w.shape[1] % 64 == 0 and w.packed.is_contiguous() and w.absmax.is_contiguous()
    byte_values, dynamic_code = _TABLES
    double = w.nested_absmax is not None
    return Weight(w.packed.data_ptr(), w.absmax.data_ptr(), w.nested_absmax.data_ptr() if double else None,
                  float(w.offset) if double else 0.0, byte_values.data_ptr(), dynamic_code.data_ptr(), w.shape[1])


def dequantize_rows_into(w, start: int, out: torch.Tensor, dtype: torch.dtype):
    """out (R, K) fp32 <- rows start:start + R of dequantize(w, dtype), as fp32 (dtype only rounds the values)."""
    assert out.dtype == torch.float32 and out.is_contiguous()
    library().nf4_dequantize_rows(_weight(w), start, start + out.shape[0], ROUND_TO[dtype], out.data_ptr(),
                                  torch.get_num_threads())


def gemv(x: torch.Tensor, w, dtype: torch.dtype) -> torch.Tensor:
    """x (M, K) fp32, M <= MAX_M -> x @ dequantize(w, dtype).T as (M, N) fp32, accumulated in fp32."""
    assert x.dtype == torch.float32 and x.is_contiguous() and x.shape[0] <= MAX_M
    y = torch.empty(x.shape[0], w.shape[0])
    library().nf4_gemv(_weight(w), w.shape[0], x.data_ptr(), x.shape[0], ROUND_TO[dtype], y.data_ptr(),
                       torch.get_num_threads())
    return y
