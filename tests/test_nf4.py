"""NF4 math against bitsandbytes (the reference implementation) and against the paper's numbers."""
import math

import pytest
import torch

from conftest import needs_bnb
from qlora_lite.nf4 import (absmax_fp32, bits_per_param, dequantize_nf4, dynamic_code, nf4_code_book, quantize_nf4,
                            state_bits_per_param)

PAPER_TABLE = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
               -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
               0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
               0.7229568362236023, 1.0]
SHAPES = [(128, 64), (100, 70), (3, 5), (1, 1), (257,), (33, 64, 3), (4096,)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def test_code_book_shape_and_properties():
    code = nf4_code_book()
    assert code.shape == (16,) and code.dtype == torch.float32
    assert torch.all(code[1:] > code[:-1])                        # sorted, distinct
    assert code[0] == -1.0 and code[-1] == 1.0 and code[7] == 0.0  # normalized, exact zero
    assert (code > 0).sum() == 8 and (code < 0).sum() == 7         # asymmetric: 8 positive, 7 negative
    assert torch.allclose(code, torch.tensor(PAPER_TABLE), atol=1e-7, rtol=0)


@needs_bnb
def test_code_books_equal_bitsandbytes():
    import bitsandbytes.functional as F
    assert (nf4_code_book() - F.get_4bit_type("nf4", device="cpu")).abs().max() <= 1e-6
    assert torch.equal(nf4_code_book(), F.get_4bit_type("nf4", device="cpu"))   # bit for bit, in fact
    assert (dynamic_code() - F.create_dynamic_map(signed=True)).abs().max() <= 1e-7


@needs_bnb
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_bytes_and_absmax_equal_bitsandbytes(shape, dtype):
    import bitsandbytes.functional as F
    torch.manual_seed(sum(shape))
    w = torch.randn(shape, dtype=dtype) * 0.05
    packed, qs = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    ours = quantize_nf4(w, double_quant=False)
    assert torch.equal(ours.packed, packed.reshape(-1))
    assert torch.equal(ours.absmax, qs.absmax)
    # our dequantization of the same state equals bitsandbytes'
    assert torch.equal(dequantize_nf4(ours).reshape(-1), F.dequantize_4bit(packed, qs).reshape(-1))


@needs_bnb
@pytest.mark.parametrize("shape", [(128, 64), (300, 257), (1000, 257)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_double_quant_constants_match_bitsandbytes(shape, dtype):
    """Same offset, same second-level absmax, same 8-bit codes for the constants.

    bitsandbytes' CPU 8-bit kernel does not always pick the nearest code when two codes are
    almost equally near (its binary search works in reduced precision); ours is exactly the
    nearest. So: equal almost everywhere, and where not, ours is never farther from the value.
    """
    import bitsandbytes.functional as F
    torch.manual_seed(1)
    w = torch.randn(shape, dtype=dtype)
    packed, qs = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    ours = quantize_nf4(w, double_quant=True)
    assert torch.equal(ours.packed, packed.reshape(-1))
    assert ours.offset == pytest.approx(float(qs.offset), abs=1e-7)
    assert torch.equal(ours.absmax2, qs.state2.absmax)
    diff = ours.absmax != qs.absmax
    assert diff.float().mean() <= 0.01
    plain = quantize_nf4(w, double_quant=False).absmax
    target = (plain - ours.offset) / ours.absmax2.repeat_interleave(256)[: plain.numel()].clamp(min=1e-38)
    code = dynamic_code()
    ours_err = (code[ours.absmax.long()] - target).abs()
    bnb_err = (code[qs.absmax.long()] - target).abs()
    assert torch.all(ours_err[diff] <= bnb_err[diff] + 1e-7)
    # dequantizing bitsandbytes' own double-quantized state with our code: identical
    from qlora_lite.nf4 import NF4State
    theirs = NF4State(packed=packed.reshape(-1), absmax=qs.absmax, shape=tuple(w.shape), dtype=dtype,
                      absmax2=qs.state2.absmax, code2=qs.state2.code, offset=float(qs.offset))
    assert torch.equal(dequantize_nf4(theirs).reshape(-1), F.dequantize_4bit(packed, qs).reshape(-1))


@needs_bnb
def test_double_quant_of_a_single_block_reconstructs_the_same_constant():
    """One block: absmax - mean is 0, so any 8-bit code rebuilds the constant; both give the same value."""
    import bitsandbytes.functional as F
    w = torch.randn(3, 5)
    packed, qs = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    ours = quantize_nf4(w)
    assert torch.equal(dequantize_nf4(ours).reshape(-1), F.dequantize_4bit(packed, qs).reshape(-1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_error_bounds(dtype):
    torch.manual_seed(0)
    w = torch.randn(256, 192, dtype=dtype)
    for dq in (False, True):
        st = quantize_nf4(w, double_quant=dq)
        back = dequantize_nf4(st)
        assert back.dtype == dtype and back.shape == w.shape
        err = (back.float() - w.float()).abs()
        # each value is at most half the widest code gap (0.1609 = 1.0 - 0.7230 ... scaled) from the original
        scale = absmax_fp32(st).repeat_interleave(64)[: w.numel()].view_as(w)
        max_half_gap = ((nf4_code_book()[1:] - nf4_code_book()[:-1]).max() / 2).item()
        assert torch.all(err <= scale * max_half_gap * 1.02 + 1e-2 * (dtype != torch.float32))
        # relative RMS error of 4-bit normal-float on Gaussian weights is about 10%
        rel = (err.pow(2).mean().sqrt() / w.float().pow(2).mean().sqrt()).item()
        assert 0.05 < rel < 0.12


def test_block_absmax_is_exactly_reconstructed():
    """The largest value of every block maps to code +-1 and comes back exactly (without double quant)."""
    torch.manual_seed(0)
    w = torch.randn(10, 64)
    st = quantize_nf4(w, double_quant=False)
    back = dequantize_nf4(st)
    idx = w.abs().argmax(dim=1)
    assert torch.equal(back[torch.arange(10), idx], w[torch.arange(10), idx])


def test_zeros_and_odd_sizes():
    st = quantize_nf4(torch.zeros(3, 7))
    assert torch.equal(dequantize_nf4(st), torch.zeros(3, 7))
    st = quantize_nf4(torch.randn(1, 65))       # 65 values: a short last block, an odd last byte
    assert st.packed.numel() == 33 and st.absmax.numel() == 2
    assert dequantize_nf4(st).shape == (1, 65)


def test_non_float_input_is_refused():
    with pytest.raises(TypeError):
        quantize_nf4(torch.ones(4, dtype=torch.int32))


def test_bits_per_param_matches_paper():
    assert bits_per_param(double_quant=False) == 4.5
    assert bits_per_param(double_quant=True) == pytest.approx(4.127, abs=5e-4)
    # and what a real tensor costs, padding included, approaches those numbers
    w = torch.randn(4096, 1024)
    assert state_bits_per_param(quantize_nf4(w, double_quant=False)) == pytest.approx(4.5, abs=1e-3)
    assert state_bits_per_param(quantize_nf4(w, double_quant=True)) == pytest.approx(4.127, abs=1e-3)
    assert 0.5159 == pytest.approx(bits_per_param(True) / 8, abs=1e-4)   # REFERENCE: bytes/param
    assert math.isclose(bits_per_param(False) / 8, 0.5625)
