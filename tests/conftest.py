"""Shared test setup.

Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. triton.jit decides
interpreted or compiled when a kernel module is imported, so TRITON_INTERPRET is set here,
before any test module imports tinytis (whose model imports the kernels).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
