"""The 4-bit linear layer against an nn.Linear holding the dequantized weight (fp32 compute)."""
import pytest
import torch
import torch.nn as nn

from conftest import needs_bnb
from qlora_lite.quantize import Linear4bit, quantizable_linears, quantize_model, resolve_backend

BACKENDS = [pytest.param("bnb", marks=needs_bnb), "torch"]


def _reference(q: Linear4bit, bias):
    ref = nn.Linear(q.in_features, q.out_features, bias=bias is not None)
    ref.weight.data = q.dequantize(torch.float32)
    if bias is not None:
        ref.bias.data = bias.detach().clone()
    return ref


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_input_grad_equal_dequantized_linear(backend, double_quant, bias):
    torch.manual_seed(0)
    lin = nn.Linear(130, 72, bias=bias)
    q = Linear4bit.from_linear(lin, backend=backend, double_quant=double_quant, compute_dtype=torch.float32)
    ref = _reference(q, lin.bias)
    x = torch.randn(2, 5, 130, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = q(x), ref(x_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    # frozen: nothing of the layer gets a gradient
    assert all(not p.requires_grad or p.grad is None for p in q.parameters())


@needs_bnb
def test_backends_store_identical_state_and_agree():
    """Whichever backend quantizes, the stored state is the same bytes, so an export can rebuild it exactly."""
    torch.manual_seed(0)
    lin = nn.Linear(1000, 257)
    x = torch.randn(4, 1000)
    for dq in (False, True):
        a = Linear4bit.from_linear(lin, backend="bnb", double_quant=dq)
        b = Linear4bit.from_linear(lin, backend="torch", double_quant=dq)
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
        torch.testing.assert_close(a(x), b(x), rtol=1e-5, atol=1e-5)


def test_quantization_error_is_small_relative_to_weight():
    torch.manual_seed(0)
    lin = nn.Linear(512, 256, bias=False)
    q = Linear4bit.from_linear(lin, backend="torch")
    rel = (q.dequantize() - lin.weight).norm() / lin.weight.norm()
    assert rel < 0.12


def test_storage_is_about_4_127_bits_per_param():
    q = Linear4bit.from_linear(nn.Linear(1024, 1024, bias=False), backend="torch")
    assert q.storage_bytes() * 8 / q.weight_numel == pytest.approx(4.127, abs=2e-3)
    q = Linear4bit.from_linear(nn.Linear(1024, 1024, bias=False), backend="torch", double_quant=False)
    assert q.storage_bytes() * 8 / q.weight_numel == pytest.approx(4.5, abs=1e-3)


def test_dtype_cast_of_model_never_touches_codes_or_constants():
    torch.manual_seed(0)
    q = Linear4bit.from_linear(nn.Linear(64, 64), backend="torch")
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q.to(torch.bfloat16)
    for k in ("qweight", "absmax", "absmax2", "code2", "offset"):
        assert q.state_dict()[k].dtype == before[k].dtype and torch.equal(q.state_dict()[k], before[k])
    assert q.bias.dtype == torch.bfloat16


def test_state_dict_round_trip():
    torch.manual_seed(0)
    a = Linear4bit.from_linear(nn.Linear(96, 40), backend="torch")
    b = Linear4bit(96, 40, bias=True, backend="torch")
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 96)
    assert torch.equal(a(x), b(x))


def test_quantize_model_skips_lm_head_and_freezes(tiny_llama_dir):
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    names = quantizable_linears(m)
    assert "lm_head" not in names and len(names) == 2 * 7
    quantize_model(m, backend="torch")
    assert isinstance(m.model.layers[0].self_attn.q_proj, Linear4bit)
    assert isinstance(m.lm_head, nn.Linear)
    assert not any(p.requires_grad for p in m.parameters())


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError):
        resolve_backend("gptq")
