"""LoRA invariants on tiny models: init, training touches only adapters, merge/unmerge, switching, Conv1D, biases."""
import math

import pytest
import torch
import torch.nn as nn

import qlora_lite as ql
from qlora_lite.errors import UserError
from qlora_lite.lora import LoRALayer, lora_layers
from qlora_lite.quantize import Linear4bit

X = torch.randint(3, 128, (2, 12))


def _randomize_b(model, name="default", std=0.05):
    for _, m in lora_layers(model):
        if name in m.lora_B:
            nn.init.normal_(m.lora_B[name], std=std)


def _logits(model):
    return model(X).logits


def test_output_equals_base_at_init(tiny_model_dir):
    model, _ = ql.load_model(tiny_model_dir, load_tokenizer=False)
    before = _logits(model)
    ql.add_lora(model, r=4, alpha=8, dropout=0.1)
    model.eval()
    assert torch.equal(_logits(model), before)


def test_init_follows_reference_code():
    lin = LoRALayer(nn.Linear(32, 16))
    lin.add_adapter("a", r=4, alpha=8)
    assert torch.count_nonzero(lin.lora_B["a"]) == 0 and torch.count_nonzero(lin.lora_A["a"]) > 0
    bound = 1 / math.sqrt(32)               # kaiming_uniform(a=sqrt(5)) on fan_in 32
    assert lin.lora_A["a"].abs().max() <= bound
    emb = LoRALayer(nn.Embedding(50, 16))
    emb.add_adapter("a", r=4, alpha=8)
    assert torch.count_nonzero(emb.lora_A["a"]) == 0 and torch.count_nonzero(emb.lora_B["a"]) > 0


def test_lora_formula_and_rslora_scaling():
    torch.manual_seed(0)
    base = nn.Linear(20, 10)
    layer = LoRALayer(base)
    layer.add_adapter("default", r=4, alpha=8)
    nn.init.normal_(layer.lora_B["default"])
    x = torch.randn(3, 20)
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    torch.testing.assert_close(layer(x), base(x) + (8 / 4) * x @ A.t() @ B.t())
    rs = LoRALayer(nn.Linear(20, 10))
    rs.add_adapter("default", r=16, alpha=8, use_rslora=True)
    assert rs.scaling["default"] == pytest.approx(8 / 4)


def test_a_step_changes_only_adapters_and_keeps_4bit_bytes(tiny_llama_dir):
    model, _ = ql.load_model(tiny_llama_dir, load_tokenizer=False)
    ql.add_lora(model, r=4, alpha=8)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in n for n in adapters)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    model(X, labels=X).loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
    opt.step()
    after = model.state_dict()
    for k, v in frozen.items():
        assert torch.equal(after[k], v), k          # 4-bit codes, constants, norms, embeddings untouched
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, adapters[n])]
    assert changed


@pytest.mark.parametrize("quantize", ["nf4", None])
def test_merge_matches_unmerged_and_unmerge_restores(tiny_model_dir, quantize):
    model, _ = ql.load_model(tiny_model_dir, quantize=quantize, load_tokenizer=False)
    ql.add_lora(model, r=4, alpha=8, dropout=0.0)
    _randomize_b(model)
    model.eval()
    with torch.no_grad():
        unmerged = _logits(model)
        ql.merge_lora(model)
        merged = _logits(model)
        ql.merge_lora(model)                           # idempotent
        torch.testing.assert_close(_logits(model), merged)
        ql.unmerge_lora(model)
        restored = _logits(model)
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)
    if quantize:
        assert torch.equal(restored, unmerged)          # the 4-bit codes were never touched
    else:
        torch.testing.assert_close(restored, unmerged, rtol=1e-5, atol=1e-5)


def test_merged_16bit_weight_is_w_plus_scaled_ba():
    torch.manual_seed(0)
    base = nn.Linear(20, 10)
    w0 = base.weight.detach().clone()
    layer = LoRALayer(base)
    layer.add_adapter("default", r=2, alpha=6)
    nn.init.normal_(layer.lora_B["default"])
    layer.merge()
    expect = w0 + 3.0 * layer.lora_B["default"] @ layer.lora_A["default"]
    torch.testing.assert_close(base.weight, expect)


def test_adapter_switching_and_disabling(tiny_llama_dir):
    model, _ = ql.load_model(tiny_llama_dir, load_tokenizer=False)
    base = _logits(model)
    ql.add_lora(model, r=4, alpha=8, dropout=0.0, adapter_name="a")
    _randomize_b(model, "a")
    ql.add_lora(model, r=2, alpha=4, dropout=0.0, targets=["q_proj", "v_proj"], adapter_name="b")
    _randomize_b(model, "b")
    assert ql.adapter_names(model) == ["a", "b"]
    with torch.no_grad():
        out_b = _logits(model)                          # the last added is active
        ql.set_adapter(model, "a")
        out_a = _logits(model)
        with ql.disable_adapters(model):
            torch.testing.assert_close(_logits(model), base)
    assert not torch.allclose(out_a, out_b)
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"a"}
    with pytest.raises(UserError, match="no adapter named 'c'"):
        ql.set_adapter(model, "c")


def test_gpt2_conv1d_merge_uses_fan_in_fan_out(tiny_gpt2_dir):
    model, _ = ql.load_model(tiny_gpt2_dir, quantize=None, load_tokenizer=False)
    ql.add_lora(model, r=4, alpha=8, dropout=0.0, targets=["c_attn", "c_fc"])
    layer = model.transformer.h[0].attn.c_attn
    assert layer.fan_in_fan_out and type(layer.base).__name__ == "Conv1D"
    _randomize_b(model)
    model.eval()
    with torch.no_grad():
        before = _logits(model)
        ql.merge_lora(model)
        torch.testing.assert_close(_logits(model), before, rtol=1e-4, atol=1e-4)


def test_gpt2_quantized_conv1d_equals_dequantized_reference(tiny_gpt2_dir):
    from transformers import AutoModelForCausalLM
    q, _ = ql.load_model(tiny_gpt2_dir, load_tokenizer=False)
    ref = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()
    for name, m in q.named_modules():
        if isinstance(m, Linear4bit):
            ref.get_submodule(name).weight.data = m.dequantize(torch.float32).t().contiguous()  # Conv1D: [in, out]
    with torch.no_grad():
        torch.testing.assert_close(_logits(q), _logits(ref), rtol=1e-5, atol=1e-5)


def test_qwen2_biases_are_kept_and_frozen(tiny_qwen2_dir):
    from transformers import AutoModelForCausalLM
    q, _ = ql.load_model(tiny_qwen2_dir, load_tokenizer=False)
    orig = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir)
    qp = q.model.layers[0].self_attn.q_proj
    assert isinstance(qp, Linear4bit) and qp.bias is not None
    assert torch.equal(qp.bias, orig.model.layers[0].self_attn.q_proj.bias)
    ql.add_lora(q, r=4, alpha=8)
    assert not q.model.layers[0].self_attn.q_proj.base.bias.requires_grad


def test_embedding_lora(tiny_llama_dir):
    model, _ = ql.load_model(tiny_llama_dir, load_tokenizer=False)
    ql.add_lora(model, r=4, alpha=8, targets=["embed_tokens"])
    emb = model.model.embed_tokens
    assert isinstance(emb, LoRALayer) and emb.is_embedding
    model.eval()
    base = _logits(model)
    nn.init.normal_(emb.lora_A["default"])
    with torch.no_grad():
        changed = _logits(model)
        ql.merge_lora(model)
        torch.testing.assert_close(_logits(model), changed, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(base, changed)


def test_merging_a_tied_embedding_leaves_lm_head_alone(tiny_gpt2_dir):
    model, _ = ql.load_model(tiny_gpt2_dir, quantize=None, load_tokenizer=False)
    lm_head = model.lm_head.weight.detach().clone()
    ql.add_lora(model, r=4, alpha=8, dropout=0.0, targets=["wte"])
    nn.init.normal_(model.transformer.wte.lora_A["default"])
    model.eval()
    with torch.no_grad():
        unmerged = _logits(model)
        ql.merge_lora(model)
        torch.testing.assert_close(_logits(model), unmerged, rtol=1e-4, atol=1e-4)
        assert torch.equal(model.lm_head.weight, lm_head)
        ql.unmerge_lora(model)
        assert torch.equal(_logits(model), unmerged)
    assert model.lm_head.weight is model.transformer.wte.base.weight     # tied again


def test_targets_regex_and_suffix_list(tiny_llama_dir):
    model, _ = ql.load_model(tiny_llama_dir, load_tokenizer=False)
    ql.add_lora(model, r=2, alpha=4, targets=r".*layers\.1\.self_attn\.(q|v)_proj")
    assert [n for n, _ in lora_layers(model)] == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    model, _ = ql.load_model(tiny_llama_dir, load_tokenizer=False)
    ql.add_lora(model, r=2, alpha=4, targets=["o_proj", "down_proj"])
    assert len(lora_layers(model)) == 4
    assert not isinstance(model.lm_head, LoRALayer)


@pytest.mark.parametrize("kwargs,match", [
    (dict(targets=["query_key_value"]), r"match no module; candidates: .*q_proj"),
    (dict(targets="nothing.*"), "match no module"),
    (dict(targets="(["), "not a valid regular expression"),
    (dict(r=0), "r must be a positive integer"),
    (dict(alpha=-1), "alpha must be a positive number"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
])
def test_bad_lora_arguments_name_the_problem(tiny_llama_dir, kwargs, match):
    model, _ = ql.load_model(tiny_llama_dir, load_tokenizer=False)
    with pytest.raises(UserError, match=match):
        ql.add_lora(model, **{"r": 4, "alpha": 8, **kwargs})


def test_model_without_linear_layers_is_refused():
    model = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4))
    with pytest.raises(UserError, match="no linear layers"):
        ql.add_lora(model, r=2, alpha=4)


def test_trainable_summary_counts(tiny_llama_dir):
    model, _ = ql.load_model(tiny_llama_dir, load_tokenizer=False)
    ql.add_lora(model, r=4, alpha=8)
    text = ql.trainable_summary(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # q_proj: 64 -> 64, r=4: 4 * (64 + 64) = 512 per layer, 2 layers
    assert "q_proj" in text and "nf4" in text
    assert trainable == 2 * 4 * ((64 + 64) + (64 + 32) * 2 + (64 + 64) + (64 + 128) * 3)
    assert text.startswith(f"trainable {trainable / 1e3:.1f}K of ")


# -- dropout on the LoRA input path --------------------------------------------------------------
def test_lora_dropout_is_an_unbiased_bernoulli_mask_with_a_matching_gradient():
    from qlora_lite.lora import LoRADropout, keep_mask
    torch.manual_seed(0)
    masks = torch.stack([keep_mask((500, 400), 0.1) for _ in range(4)]).float()
    assert abs(masks.mean().item() - 0.9) < 2e-3                      # 800k draws: std 3.4e-4
    flat = masks.view(4, -1)
    assert torch.corrcoef(flat)[0, 1:].abs().max() < 0.01             # fresh masks per call
    assert torch.corrcoef(torch.stack([flat[0, :-1], flat[0, 1:]]))[0, 1].abs() < 0.01   # neighbours independent
    d = LoRADropout(0.25)
    x = torch.randn(64, 33, requires_grad=True)
    y = d(x)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / 0.75)
    (g,) = torch.autograd.grad(y.sum(), [x])
    torch.testing.assert_close(g, kept.float() / 0.75)
    torch.manual_seed(5)
    a = d(x)
    torch.manual_seed(5)
    torch.testing.assert_close(d(x), a)                               # seeded: reproducible
    d.eval()
    assert d(x) is x


def test_checkpointed_lora_with_dropout_gets_the_same_gradients_as_without(tiny_llama_dir):
    """Checkpointing recomputes each layer; the recompute must draw the same dropout masks."""
    from qlora_lite.model import enable_gradient_checkpointing, load_model
    grads = []
    for ckpt in (False, "non-reentrant", "reentrant"):
        model, _ = load_model(tiny_llama_dir, quantize="nf4", backend="torch", compute_dtype="fp32",
                              load_tokenizer=False)
        torch.manual_seed(0)
        ql.add_lora(model, r=4, alpha=8, dropout=0.3, targets="all-linear")
        for p in model.parameters():
            if p.requires_grad:
                p.data.normal_(0, 0.05)
        if ckpt:
            enable_gradient_checkpointing(model, reentrant=ckpt == "reentrant")
        model.train()
        ids = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(1))
        torch.manual_seed(123)
        model(input_ids=ids, labels=ids).loss.backward()     # reentrant checkpointing supports backward() only
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    assert all(g is not None for g in grads[2])
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
