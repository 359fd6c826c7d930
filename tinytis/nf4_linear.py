"""The Linear layer that runs on NF4 weights, its autograd Function, and the helpers that put it into a model.

The format itself (tables, NF4Weight, quantize, dequantize) is tinytis.nf4; the matmul is tinytis.kernels.nf4_matmul.
"""
import torch
import torch.nn as nn

from tinytis import kernels
from tinytis.nf4 import NF4Weight, quantize


class NF4Matmul(torch.autograd.Function):
    """y = x @ W.T for a frozen NF4 weight, whose backward keeps only the 4-bit weight.

    F.linear(x, dequantize(W)) would make autograd keep the dequantized W for grad_input (4 bytes a weight in fp32,
    8 times the NF4 bytes); here backward dequantizes W again, a chunk of rows at a time
    (kernels.nf4_matmul_grad_input). The weight gets no gradient: it is a buffer, not a parameter.
    """

    @staticmethod
    def forward(ctx, x, packed, absmax, nested_absmax, offset, shape, weight_dtype):
        weight = NF4Weight(packed, absmax, shape, weight_dtype, nested_absmax, offset)
        ctx.save_for_backward(packed, absmax, nested_absmax, offset)
        ctx.shape, ctx.weight_dtype = shape, weight_dtype
        return kernels.nf4_matmul(x, weight)

    @staticmethod
    def backward(ctx, grad):
        packed, absmax, nested_absmax, offset = ctx.saved_tensors
        weight = NF4Weight(packed, absmax, ctx.shape, ctx.weight_dtype, nested_absmax, offset)
        return kernels.nf4_matmul_grad_input(grad, weight), None, None, None, None, None, None


class Linear4bit(nn.Module):
    """A bias-free Linear whose weight is held in NF4: y = x @ W.T, computed by kernels.nf4_matmul (through NF4Matmul,
    so a backward to x keeps no dense weight).

    The buffers are the NF4Weight fields, so .to(device) moves them and `weight` returns them as one.
    """

    def __init__(self, weight: NF4Weight):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight_dtype = weight.dtype
        self.register_buffer("packed", weight.packed)
        self.register_buffer("absmax", weight.absmax)
        self.register_buffer("nested_absmax", weight.nested_absmax)
        self.register_buffer("offset", weight.offset)

    @property
    def weight(self) -> NF4Weight:
        return NF4Weight(self.packed, self.absmax, torch.Size((self.out_features, self.in_features)),
                         self.weight_dtype, self.nested_absmax, self.offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return NF4Matmul.apply(x, self.packed, self.absmax, self.nested_absmax, self.offset,
                               torch.Size((self.out_features, self.in_features)), self.weight_dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, double_quant={self.nested_absmax is not None}"


def block_linear_names(model: nn.Module) -> set[str]:
    """Names of the weights that NF4 quantizes: every nn.Linear inside the blocks (not embedding, lm_head, norms)."""
    return {f"layers.{name}.weight" for name, m in model.layers.named_modules() if isinstance(m, nn.Linear)}


def load_linear(model: nn.Module, name: str, tensor, dtype: torch.dtype, double_quant: bool = True):
    """Put weight `name` into the model as a Linear4bit: an NF4Weight as it is, a dense tensor quantized (from dtype)."""
    weight = tensor if isinstance(tensor, NF4Weight) else quantize(tensor.to(dtype), double_quant)
    model.set_submodule(name.removesuffix(".weight"), Linear4bit(weight))


def quantize_model(model: nn.Module, double_quant: bool = True) -> nn.Module:
    """Replace the Linear layers of the blocks of a loaded model by NF4 Linear4bit layers, in place."""
    for name in block_linear_names(model):
        weight = model.get_submodule(name.removesuffix(".weight")).weight.detach()
        load_linear(model, name, weight, weight.dtype, double_quant)
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as held: parameters (tied ones once) plus the NF4 buffers."""
    params = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    nf4 = sum(m.weight.nbytes() for m in model.modules() if isinstance(m, Linear4bit))
    return sum(params.values()) + nf4
