"""4-bit NormalFloat (NF4) quantization with double quantization, in plain PyTorch.

This is the reference implementation of the math in the QLoRA paper (Dettmers et al. 2023, §3):

* the NF4 code book: 16 quantiles of N(0, 1), asymmetric around an exact zero, scaled to [-1, 1];
* blockwise quantization: every block of 64 values is divided by its absolute maximum and each
  value is mapped to the nearest code; two 4-bit codes are packed per byte, first value in the
  high nibble;
* double quantization: the fp32 absmax constants (one per 64 values) are themselves quantized
  to 8 bits in blocks of 256 after subtracting their mean, with the signed dynamic 8-bit code.

Everything here is a pure function on tensors plus one frozen dataclass. The byte layout is the
same as bitsandbytes' (``quantize_4bit(quant_type="nf4", blocksize=64)``), which the tests check,
so a state made here can be handed to bitsandbytes' kernels and vice versa.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

NF4_BLOCKSIZE = 64       # values per absmax constant (paper: 64)
DQ_BLOCKSIZE = 256       # absmax constants per second-level constant (paper: 256)

# bitsandbytes builds its table with this offset: the quantiles are taken between
# 1 - offset and offset rather than at 0 and 1, where the normal quantile is infinite.
_NF4_OFFSET = 0.9677083
_NF4_ZERO_INDEX = 7      # position of the exact 0.0 in the sorted code book


@lru_cache(maxsize=None)
def _nf4_code_book_cpu() -> torch.Tensor:
    from scipy.stats import norm

    # 8 positive and 7 negative quantiles, so that 0 is represented exactly and the
    # 16 codes are used in full (paper §3: "asymmetric", with an exact zero).
    # (the probabilities are fp32, as bitsandbytes makes them: the table then matches its bits exactly)
    pos = norm.ppf(torch.linspace(_NF4_OFFSET, 0.5, 9).numpy()[:-1]).tolist()
    neg = (-norm.ppf(torch.linspace(_NF4_OFFSET, 0.5, 8).numpy()[:-1])).tolist()
    values = torch.tensor(sorted(pos + [0.0] + neg), dtype=torch.float64)
    return (values / values.abs().max()).float()


def nf4_code_book(device: torch.device | str | None = None) -> torch.Tensor:
    """The 16 NF4 values, sorted ascending, fp32, from -1.0 to 1.0 with an exact 0 at index 7."""
    return _nf4_code_book_cpu().to(device or "cpu")


@lru_cache(maxsize=None)
def _dynamic_code_cpu() -> torch.Tensor:
    # Signed dynamic 8-bit code (Dettmers et al. 2022, "8-bit optimizers"): each code is
    # sign * 10^-e * fraction; e (7 exponent levels) is written in unary, so small magnitudes
    # get few fraction bits and large ones many. 1 sign bit + up to 7 bits shared by exponent
    # and fraction; the linear fractions are bin centres of linspace(0.1, 1).
    values: list[float] = []
    exponent_levels = 7
    for i in range(exponent_levels):
        n_fraction = 2 ** i + 1
        edges = torch.linspace(0.1, 1.0, n_fraction, dtype=torch.float32)
        centres = ((edges[:-1] + edges[1:]) / 2).tolist()
        scale = 10.0 ** (-(exponent_levels - 1) + i)
        values += [scale * c for c in centres] + [-scale * c for c in centres]
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


def dynamic_code(device: torch.device | str | None = None) -> torch.Tensor:
    """The 256-value signed dynamic 8-bit code used to double-quantize the absmax constants."""
    return _dynamic_code_cpu().to(device or "cpu")


def _nearest_code(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest value of a sorted ``code`` for each element of ``x`` (ties go up)."""
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(x, midpoints)


def _blockwise_absmax(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Absolute maximum of each block of ``blocksize`` values; the last block may be short."""
    n = flat.numel()
    full = n - n % blocksize
    absmax = flat[:full].view(-1, blocksize).abs().amax(dim=1)
    if full < n:
        absmax = torch.cat([absmax, flat[full:].abs().amax().unsqueeze(0)])
    return absmax


def _expand_blocks(per_block: torch.Tensor, n: int, blocksize: int) -> torch.Tensor:
    """Repeat one value per block so it lines up with the ``n`` flat values."""
    return per_block.repeat_interleave(blocksize)[:n]


@dataclass(frozen=True)
class NF4State:
    """Everything needed to rebuild a tensor quantized to NF4.

    Without double quantization ``absmax`` holds one fp32 constant per block. With it,
    ``absmax`` holds uint8 indices into ``code2`` and the constant of block i is
    ``code2[absmax[i]] * absmax2[i // blocksize2] + offset``.
    """

    packed: torch.Tensor            # uint8 [ceil(n / 2)]: two 4-bit codes per byte, high nibble first
    absmax: torch.Tensor            # fp32 [n_blocks], or uint8 [n_blocks] with double quantization
    shape: tuple[int, ...]          # shape of the original tensor
    dtype: torch.dtype              # dtype of the original tensor (what dequantize returns by default)
    blocksize: int = NF4_BLOCKSIZE
    absmax2: torch.Tensor | None = None   # fp32 [ceil(n_blocks / blocksize2)] second-level constants
    code2: torch.Tensor | None = None     # fp32 [256] dynamic code for the quantized absmax
    offset: float = 0.0                   # mean subtracted from absmax before its quantization
    blocksize2: int = DQ_BLOCKSIZE

    @property
    def double_quant(self) -> bool:
        return self.absmax2 is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def nbytes(self) -> int:
        """Bytes of storage, every constant included (the code books are shared, not counted)."""
        total = self.packed.numel() + self.absmax.numel() * self.absmax.element_size()
        if self.absmax2 is not None:
            total += self.absmax2.numel() * 4 + 4  # + the fp32 offset
        return total


def quantize_nf4(
    w: torch.Tensor, blocksize: int = NF4_BLOCKSIZE, double_quant: bool = True, blocksize2: int = DQ_BLOCKSIZE
) -> NF4State:
    """Quantize any tensor (fp32, fp16 or bf16, any size) to NF4, blockwise over its flat values."""
    if not w.is_floating_point():
        raise TypeError(f"quantize_nf4 needs a floating-point tensor, got {w.dtype}")
    flat = w.detach().reshape(-1).float()
    n = flat.numel()
    absmax = _blockwise_absmax(flat, blocksize)                         # [n_blocks]
    # An all-zero block has absmax 0: divide by a tiny number instead, every value maps to code 0.0.
    scale = _expand_blocks(1.0 / absmax.clamp(min=1e-38), n, blocksize)  # [n]
    normalized = (flat * scale).clamp(-1, 1)
    q = _nearest_code(normalized, nf4_code_book(w.device)).to(torch.uint8)  # [n], values 0..15
    if n % 2:
        q = torch.cat([q, q.new_full((1,), _NF4_ZERO_INDEX)])           # pad the last low nibble with code 0.0
    packed = (q[0::2] << 4) | q[1::2]                                   # [ceil(n / 2)]
    state = NF4State(packed=packed, absmax=absmax, shape=tuple(w.shape), dtype=w.dtype, blocksize=blocksize)
    return double_quantize(state, blocksize2) if double_quant else state


def double_quantize(state: NF4State, blocksize2: int = DQ_BLOCKSIZE) -> NF4State:
    """Quantize a state's fp32 absmax constants to 8 bits (mean removed, blocks of ``blocksize2``)."""
    if state.double_quant:
        return state
    absmax = state.absmax.float()
    offset = absmax.mean()
    centred = absmax - offset
    absmax2 = _blockwise_absmax(centred, blocksize2)                    # [n_blocks2]
    scale = _expand_blocks(1.0 / absmax2.clamp(min=1e-38), centred.numel(), blocksize2)
    code2 = dynamic_code(absmax.device)
    q_absmax = _nearest_code((centred * scale).clamp(-1, 1), code2).to(torch.uint8)
    return NF4State(
        packed=state.packed, absmax=q_absmax, shape=state.shape, dtype=state.dtype, blocksize=state.blocksize,
        absmax2=absmax2, code2=code2, offset=float(offset), blocksize2=blocksize2,
    )


def absmax_fp32(state: NF4State) -> torch.Tensor:
    """The per-block constants as fp32, undoing double quantization when there is one."""
    if not state.double_quant:
        return state.absmax
    n_blocks = state.absmax.numel()
    second = _expand_blocks(state.absmax2, n_blocks, state.blocksize2)
    return state.code2[state.absmax.long()] * second + state.offset


def dequantize_nf4(state: NF4State, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rebuild the tensor: code[nibble] * absmax[block], computed in fp32, returned in ``dtype``."""
    n = state.numel
    codes = torch.stack([state.packed >> 4, state.packed & 0x0F], dim=1).reshape(-1)[:n]  # [n]
    values = nf4_code_book(state.packed.device)[codes.long()]
    values = values * _expand_blocks(absmax_fp32(state), n, state.blocksize)
    return values.reshape(state.shape).to(dtype or state.dtype)


def bits_per_param(double_quant: bool = True, blocksize: int = NF4_BLOCKSIZE, blocksize2: int = DQ_BLOCKSIZE) -> float:
    """Storage cost of NF4 in bits per parameter (paper §3: 4.5 without, ~4.127 with double quant)."""
    if not double_quant:
        return 4 + 32 / blocksize
    return 4 + 8 / blocksize + 32 / (blocksize * blocksize2)


def state_bits_per_param(state: NF4State) -> float:
    """Actual bits per parameter of one quantized tensor, padding and offsets included."""
    return 8 * state.nbytes() / state.numel
