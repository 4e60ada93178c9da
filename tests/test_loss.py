"""The fused, chunked head + cross-entropy against the plain nn.Linear + F.cross_entropy path."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qlora_lite.data import IGNORE_INDEX
from qlora_lite.loss import fused_head, linear_cross_entropy


def _reference(h, w, b, y):
    return F.cross_entropy(F.linear(h, w, b).float(), y, ignore_index=IGNORE_INDEX, reduction="sum")


@pytest.mark.parametrize("chunk_bytes", [4 * 50 * 3, 4 * 50 * 7, 2 ** 25])   # 3 rows, 7 rows, one chunk
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_linear_then_cross_entropy_with_gradients(chunk_bytes, with_bias):
    g = torch.Generator().manual_seed(0)
    rows, d, vocab = 23, 16, 50
    h = torch.randn(rows, d, generator=g, requires_grad=True)
    w = torch.randn(vocab, d, generator=g, requires_grad=True)
    b = torch.randn(vocab, generator=g, requires_grad=True) if with_bias else None
    y = torch.randint(0, vocab, (rows,), generator=g)
    y[[0, 5, 22]] = IGNORE_INDEX
    ref = _reference(h, w, b, y)
    ref_grads = torch.autograd.grad(2.5 * ref, [t for t in (h, w, b) if t is not None])
    out = linear_cross_entropy(h, w, b, y, chunk_bytes=chunk_bytes)
    grads = torch.autograd.grad(2.5 * out, [t for t in (h, w, b) if t is not None])   # a scaled loss, as in training
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert grads[0][[0, 5, 22]].abs().max() == 0      # ignored rows get no gradient


def test_frozen_head_gets_no_gradient_and_bf16_matches_the_unfused_numerics():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(9, 8, generator=g).bfloat16().requires_grad_()
    w = torch.randn(40, 8, generator=g).bfloat16()                     # frozen, as in (Q)LoRA
    y = torch.randint(0, 40, (9,), generator=g)
    out = linear_cross_entropy(h, w, None, y, chunk_bytes=4 * 40 * 4)
    ref = _reference(h, w, None, y)
    (gh,) = torch.autograd.grad(out, [h])
    (rh,) = torch.autograd.grad(ref, [h])
    assert out.dtype == torch.float32 and gh.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(gh.float(), rh.float(), rtol=2e-2, atol=1e-2)


def test_no_grad_computes_the_loss_only():
    h, w = torch.randn(5, 4, requires_grad=True), torch.randn(11, 4)
    y = torch.tensor([1, 2, IGNORE_INDEX, 4, 5])
    with torch.no_grad():
        out = linear_cross_entropy(h, w, None, y)
    assert not out.requires_grad
    torch.testing.assert_close(out, _reference(h.detach(), w, None, y))


def _batch(vocab, rows=2, seq=12):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, vocab, (rows, seq), generator=g)
    labels = ids.clone()
    labels[0, :4] = IGNORE_INDEX                      # a prompt without loss
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0                                  # padding at the end of row 1
    labels[1, -3:] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_trainer_loss_fused_equals_logits_path_and_the_models_own_loss(tiny_llama_dir):
    from qlora_lite.lora import add_lora
    from qlora_lite.model import load_model
    from qlora_lite.train import token_loss_sum
    model, _ = load_model(tiny_llama_dir, quantize="nf4", backend="torch", compute_dtype="fp32", load_tokenizer=False)
    add_lora(model, r=4, alpha=8, dropout=0.0, targets="all-linear")
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.05)                   # B = 0 at init would hide the adapters' gradients
    assert fused_head(model) is not None
    batch = _batch(model.config.vocab_size)
    lora = [p for p in model.parameters() if p.requires_grad]
    fused, n = token_loss_sum(model, batch)
    g_fused = torch.autograd.grad(fused, lora)
    plain, n2 = token_loss_sum(model, batch, fused=False)
    g_plain = torch.autograd.grad(plain, lora)
    assert n == n2 == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-4)
    for a, b in zip(g_fused, g_plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    hf = model(**batch).loss                          # transformers' own mean over label tokens
    torch.testing.assert_close(fused / n, hf, rtol=1e-5, atol=1e-5)
    assert type(model.lm_head).__name__ == "Linear"   # the head is back in place


def test_unknown_or_custom_heads_fall_back_to_logits(tiny_gpt2_dir, tiny_llama_dir):
    from qlora_lite.lora import add_lora
    from qlora_lite.model import load_model
    from qlora_lite.train import token_loss_sum
    gpt2, _ = load_model(tiny_gpt2_dir, quantize=None, compute_dtype="fp32", load_tokenizer=False)
    assert fused_head(gpt2) is None                   # not on the list of plain-head architectures
    llama, _ = load_model(tiny_llama_dir, quantize=None, compute_dtype="fp32", load_tokenizer=False)
    add_lora(llama, r=2, targets="all-linear")
    assert fused_head(llama) is not None
    llama.config.logit_scale = 0.5                    # a head the fused loss does not reproduce
    assert fused_head(llama) is None
    del llama.config.logit_scale
    llama.lm_head = torch.nn.Sequential(llama.lm_head)   # not a plain nn.Linear
    assert fused_head(llama) is None
    batch = _batch(llama.config.vocab_size)
    s, n = token_loss_sum(llama, batch)
    torch.testing.assert_close(s / n, llama(**batch).loss, rtol=1e-5, atol=1e-5)
