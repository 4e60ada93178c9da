"""Loading and quantizing HF checkpoints; compute dtype; gradient checkpointing on a frozen 4-bit base."""
import json
import warnings

import pytest
import torch

import qlora_lite as ql
from qlora_lite.errors import UserError
from qlora_lite.quantize import Linear4bit


def test_loader_quantizes_every_linear_but_lm_head(tiny_model_dir):
    model, _ = ql.load_model(tiny_model_dir, load_tokenizer=False)
    linears = [n for n, m in model.named_modules() if isinstance(m, Linear4bit)]
    assert linears and not any("lm_head" in n for n in linears)
    assert not any(p.requires_grad for p in model.parameters())
    assert not any(p.is_meta for p in model.parameters()) and not any(b.is_meta for b in model.buffers())
    assert all(p.dtype == torch.float32 for p in model.parameters())    # CPU: fp32 compute, never bf16 silently


def test_loader_output_equals_quantize_model_on_the_loaded_16bit_model(tiny_llama_dir):
    """Quantizing while reading the file gives the same model as loading it whole and quantizing after."""
    from transformers import AutoModelForCausalLM
    streamed, _ = ql.load_model(tiny_llama_dir, load_tokenizer=False, backend="torch")
    whole = ql.quantize_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), backend="torch")
    x = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        assert torch.equal(streamed(x).logits, whole(x).logits)


def test_skip_modules_and_no_quantization(tiny_llama_dir):
    model, _ = ql.load_model(tiny_llama_dir, skip_modules=["lm_head", "down_proj"], load_tokenizer=False)
    assert not isinstance(model.model.layers[0].mlp.down_proj, Linear4bit)
    assert isinstance(model.model.layers[0].mlp.up_proj, Linear4bit)
    plain, _ = ql.load_model(tiny_llama_dir, quantize=None, load_tokenizer=False)
    assert not any(isinstance(m, Linear4bit) for m in plain.modules())


def test_tied_embeddings_stay_tied(tiny_gpt2_dir):
    model, _ = ql.load_model(tiny_gpt2_dir, load_tokenizer=False)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_compute_dtype_auto():
    assert ql.resolve_compute_dtype("auto", "cpu") == torch.float32
    with pytest.warns(UserWarning):
        assert ql.resolve_compute_dtype("fp16", "cpu") == torch.float16  # asked for: allowed, with a warning
    with pytest.raises(UserError, match="compute dtype"):
        ql.resolve_compute_dtype("int3", "cpu")
    if torch.cuda.is_available():
        want = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        assert ql.resolve_compute_dtype("auto", "cuda") == want


def test_bf16_on_cpu_warns():
    with pytest.warns(UserWarning, match="slower"):
        ql.resolve_compute_dtype("bf16", "cpu")


def test_bad_paths_are_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="no such model directory"):
        ql.load_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a model directory"):
        ql.load_model(str(tmp_path / "empty"))
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UserError, match="no model weights"):
        ql.load_model(str(tmp_path / "noweights"))
    (tmp_path / "vit").mkdir()
    (tmp_path / "vit" / "config.json").write_text(json.dumps({"model_type": "vit"}))
    (tmp_path / "vit" / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="not a causal language model"):
        ql.load_model(str(tmp_path / "vit"))


def test_corrupt_weight_file_is_one_clear_error(tiny_llama_dir, tmp_path):
    import shutil
    d = tmp_path / "corrupt"
    shutil.copytree(tiny_llama_dir, d)
    (d / "model.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(UserError, match="unreadable or truncated"):
        ql.load_model(str(d), load_tokenizer=False)


def test_truncated_checkpoint_is_reported(tiny_llama_dir, tmp_path):
    import shutil
    from safetensors.torch import load_file, save_file
    d = tmp_path / "partial"
    shutil.copytree(tiny_llama_dir, d)
    sd = load_file(str(d / "model.safetensors"))
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match="lacks 1 weights.*up_proj"):
        ql.load_model(str(d), load_tokenizer=False)


def test_qlora_with_gradient_checkpointing_trains_without_warnings(tiny_llama_dir):
    """Frozen 4-bit base + adapters + non-reentrant checkpointing: no 'does not require grad', loss goes down."""
    torch.manual_seed(0)
    model, _ = ql.load_model(tiny_llama_dir, load_tokenizer=False)
    ql.add_lora(model, r=8, alpha=16, dropout=0.0)
    ql.enable_gradient_checkpointing(model)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    batch = torch.randint(3, 128, (4, 24))
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")             # any warning (checkpointing, use_cache, ...) fails the test
        for _ in range(8):
            loss = model(batch, labels=batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


def test_checkpointed_and_plain_gradients_agree(tiny_llama_dir):
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model, _ = ql.load_model(tiny_llama_dir, load_tokenizer=False)
        ql.add_lora(model, r=4, alpha=8, dropout=0.0)
        for _, m in ql.lora.lora_layers(model):
            torch.nn.init.normal_(m.lora_B["default"], std=0.02)
        if ckpt:
            ql.enable_gradient_checkpointing(model)
        model.train()
        x = torch.randint(3, 128, (2, 16))
        model(x, labels=x).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
