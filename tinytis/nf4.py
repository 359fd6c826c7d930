"""NF4 weights in the bitsandbytes format, and the Linear layer that runs on them.

The format (bitsandbytes quant_type="nf4", blocksize 64, as transformers saves it):
  - the weight (N, K) is flattened row-major and cut into blocks of 64 values;
  - absmax[b] = max |w| over block b, and each w / absmax[b] becomes the index (0..15) of the
    nearest of the 16 NF4 code values;
  - two indices per byte, the first element in the HIGH nibble: packed = q[0::2] << 4 | q[1::2];
  - double quantization (bitsandbytes' compress_statistics): offset = absmax.mean(), and
    absmax - offset is quantized in blocks of 256 to uint8 indices into the signed 8-bit dynamic
    map, with one fp32 nested_absmax per block of 256:
        absmax[i] = DYNAMIC_CODE[absmax_u8[i]] * nested_absmax[i // 256] + offset
    4.127 bits per weight with it, 4.5 without.
"""
import json
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tinytis.errors import UserError

BLOCK = 64  # weights per absmax
NESTED_BLOCK = 256  # absmax values per nested absmax

NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)


def _dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map: 256 sorted values in [-1, 1].

    For e = 0..6: the 2**e midpoints of linspace(0.1, 1, 2**e + 1), scaled by 10**(e - 6), with
    both signs; plus 0 and 1.
    """
    values = [0.0, 1.0]
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        scaled = 10 ** (e - 6) * ((edges[:-1] + edges[1:]) / 2.0)
        values += scaled.tolist() + (-scaled).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


DYNAMIC_CODE = _dynamic_map()

# the keys transformers writes next to `<name>.weight` for one NF4 Linear
BNB_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state.bitsandbytes__nf4")


@dataclass
class NF4Weight:
    """One NF4-quantized weight of logical shape (N, K), stored as bitsandbytes stores it."""

    packed: torch.Tensor  # uint8 (ceil(N*K/2),): two codes per byte, first element in the high nibble
    absmax: torch.Tensor  # fp32 (n_blocks,), or uint8 (n_blocks,) when double-quantized
    shape: torch.Size  # (N, K)
    dtype: torch.dtype  # dtype of the weight before quantization (bitsandbytes' metadata)
    nested_absmax: torch.Tensor | None = None  # fp32 (ceil(n_blocks / 256),), double quantization only
    offset: torch.Tensor | None = None  # fp32 (), double quantization only

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    def nbytes(self) -> int:
        """Bytes held: packed codes, absmax and, when double-quantized, nested absmax and offset."""
        tensors = [self.packed, self.absmax, self.nested_absmax, self.offset]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def to(self, device) -> "NF4Weight":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return NF4Weight(move(self.packed), move(self.absmax), self.shape, self.dtype, move(self.nested_absmax),
                         move(self.offset))

    @classmethod
    def from_bnb(cls, tensors: dict, name: str = "weight") -> "NF4Weight":
        """Read the tensors transformers + bitsandbytes saved for one weight, keyed by suffix ('' for the weight itself)."""
        state = json.loads(bytes(tensors[".quant_state.bitsandbytes__nf4"].tolist()))
        nested = state.get("nested_blocksize") is not None
        if state.get("quant_type") != "nf4" or state.get("blocksize") != BLOCK or (nested and state["nested_blocksize"] != NESTED_BLOCK):
            raise UserError(f"{name}: quantized as {state.get('quant_type')} with blocksize {state.get('blocksize')}; "
                            f"tinytis reads NF4 with blocksize {BLOCK} (nested {NESTED_BLOCK}) only")
        if not torch.equal(tensors[".quant_map"].float(), NF4_CODE) or (nested and not torch.equal(tensors[".nested_quant_map"].float(), DYNAMIC_CODE)):
            raise UserError(f"{name}: its quant_map is not bitsandbytes' NF4 codebook (or nested map not the dynamic map); the checkpoint is not standard NF4")
        return cls(
            packed=tensors[""].reshape(-1).view(torch.uint8),  # quant_storage may be a wider dtype
            absmax=tensors[".absmax"],
            shape=torch.Size(state["shape"]),
            dtype=getattr(torch, state["dtype"]),
            nested_absmax=tensors[".nested_absmax"].float() if nested else None,
            offset=torch.tensor(float(state["nested_offset"]), dtype=torch.float32) if nested else None,
        )


def _blocks(x: torch.Tensor, size: int) -> torch.Tensor:
    """Flatten and zero-pad to whole blocks: (n,) -> (ceil(n / size), size)."""
    flat = x.reshape(-1)
    pad = -flat.numel() % size
    return (F.pad(flat, (0, pad)) if pad else flat).view(-1, size)


def _midpoints(code: torch.Tensor) -> torch.Tensor:
    return (code[:-1] + code[1:]) / 2


def _quantize_absmax(absmax: torch.Tensor):
    """Double quantization: absmax (n,) fp32 -> (uint8 (n,), nested_absmax fp32 (ceil(n/256),), offset fp32 ()).

    bitsandbytes' CPU encoder (quantize_blockwise) first rounds each normalized value to a grid of
    65536 points spanning [-1, 1], then takes the code nearest to that grid point; we do the same so
    the bytes match. (Its CUDA encoder takes the code nearest to the value itself; the two differ by
    one code step where a value lies within half a grid step, 1.5e-5 of the block scale, of a midpoint.)
    """
    offset = absmax.mean()
    blocks = _blocks(absmax - offset, NESTED_BLOCK)  # (n_nested, 256)
    nested = blocks.abs().amax(dim=1)
    scaled = (blocks * torch.where(nested > 0, 1.0 / nested, 0.0)[:, None]).clamp(-1, 1)
    grid_index = ((scaled + 1.0) * 0.5 * 65535.0 + 0.5).to(torch.int32)
    grid = -1.0 + (2.0 * grid_index.float()) / 65535.0
    q = torch.bucketize(grid, _midpoints(DYNAMIC_CODE)).masked_fill((nested == 0)[:, None], 0)
    return q.to(torch.uint8).view(-1)[: absmax.numel()], nested, offset


def dequantize_absmax(w, first: int = 0, last: int | None = None) -> torch.Tensor:
    """fp32 absmax of blocks first:last (default all) of an NF4Weight (or anything with its fields), undoing double
    quantization."""
    absmax = w.absmax[first:last]
    if w.nested_absmax is None:
        return absmax
    nested = w.nested_absmax[torch.arange(first, first + absmax.numel(), device=absmax.device) // NESTED_BLOCK]
    return DYNAMIC_CODE.to(absmax.device)[absmax.long()] * nested + w.offset


QUANT_CHUNK = 1 << 20  # weights quantized at a time (a multiple of BLOCK): bounds the temporaries to ~15 MB


def quantize(w: torch.Tensor, double_quant: bool = True) -> NF4Weight:
    """Quantize a float tensor to NF4, byte for byte as bitsandbytes.functional.quantize_4bit(quant_type='nf4').
    Chunk by chunk, so w may be a view of a memory-mapped file and its dense copy is never made."""
    flat, packed, absmax = w.reshape(-1), [], []
    for start in range(0, flat.numel(), QUANT_CHUNK):
        chunk = flat[start : start + QUANT_CHUNK]
        blocks = _blocks(chunk.float(), BLOCK)  # (n_blocks, 64), the last block of w zero-padded
        absmax.append(blocks.abs().amax(dim=1))
        scaled = (blocks * (1.0 / absmax[-1].clamp(min=1e-38))[:, None]).clamp(-1, 1)
        n = chunk.numel()
        q = torch.bucketize(scaled, _midpoints(NF4_CODE), out_int32=True).to(torch.uint8).view(-1)[: n + n % 2]
        packed.append(q[0::2] << 4 | q[1::2])
    packed, absmax = torch.cat(packed), torch.cat(absmax)
    if not double_quant:
        return NF4Weight(packed, absmax, w.shape, w.dtype)
    absmax_u8, nested, offset = _quantize_absmax(absmax)
    return NF4Weight(packed, absmax_u8, w.shape, w.dtype, nested, offset)


# the two NF4 values each byte holds, high nibble first: BYTE_VALUES[b] = (NF4_CODE[b >> 4], NF4_CODE[b & 15])
BYTE_VALUES = torch.stack((NF4_CODE.repeat_interleave(16), NF4_CODE.repeat(16)), dim=1)  # (256, 2)


def dequantize_rows(w, start: int, stop: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows start:stop of the dense weight, (stop - start, K) in dtype, decoding only the blocks of 64 that hold them
    (a block may straddle two rows when K is not a multiple of 64)."""
    K = w.shape[1]
    first, last = start * K // BLOCK, -(-stop * K // BLOCK)  # the blocks that hold elements start * K : stop * K
    packed = w.packed[first * BLOCK // 2 : last * BLOCK // 2]
    values = BYTE_VALUES.to(packed.device)[packed.long()].view(-1)  # (2 * bytes,): the last block of w may be short
    scaled = (_blocks(values, BLOCK) * dequantize_absmax(w, first, last)[:, None]).view(-1)
    skip = start * K - first * BLOCK
    return scaled[skip : skip + (stop - start) * K].view(stop - start, K).to(dtype)


def dequantize(w, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """NF4Weight (or anything with its fields) -> dense (N, K) in dtype, as bitsandbytes' dequantize_4bit."""
    return dequantize_rows(w, 0, w.shape[0], dtype)
