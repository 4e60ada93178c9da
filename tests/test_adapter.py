"""Adapters move between qlora_lite and PEFT in both directions, and what cannot be honoured is refused.

qlora_lite -> PEFT: an adapter trained here loads with ``peft.PeftModel.from_pretrained`` on the
same base (the bitsandbytes 4-bit base for a QLoRA adapter, the 16-bit base otherwise) and gives
the same logits. PEFT -> qlora_lite: an adapter trained with ``get_peft_model`` loads here, trains
further, merges and exports.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import qlora_lite as ql
from qlora_lite.adapter import CONFIG_NAME, WEIGHTS_NAME, load_adapter, read_adapter, save_adapter
from qlora_lite.cli import main
from qlora_lite.export import export_merged
from qlora_lite.quantize import bnb_available

needs_bnb = pytest.mark.skipif(not bnb_available(), reason="bitsandbytes is not importable here")
X = torch.randint(4, 128, (2, 12), generator=torch.Generator().manual_seed(3))   # (B, T) prompts
PEFT_TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)   # tiny matmuls on a shared 2-core machine: threads only add hand-offs
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=["llama", "gpt2"])
def kind_base(request, tiny_llama_dir, tiny_gpt2_dir):
    return request.param, {"llama": tiny_llama_dir, "gpt2": tiny_gpt2_dir}[request.param]


def _logits(model, x=X) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=x).logits.float()          # (B, T, vocab)


def _train_here(base: str, out: Path, quantize: str | None):
    model, _ = ql.load_model(base, quantize=quantize, compute_dtype="fp32", device="cpu", load_tokenizer=False)
    ql.add_lora(model, r=4, alpha=8, dropout=0.0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        model(input_ids=X, labels=X).loss.backward()
        opt.step()
        opt.zero_grad()
    save_adapter(model, out, base_model_name_or_path=base)
    return model.eval()


def _hf(base: str, four_bit: bool = False):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    if not four_bit:
        return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(base, quantization_config=q, dtype=torch.float32, device_map="cpu")


def _train_with_peft(kind: str, base: str, out: Path, **lora_kw):
    """get_peft_model on the 16-bit HF model, a few SGD steps, save_pretrained: a PEFT user's adapter."""
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=PEFT_TARGETS[kind], task_type="CAUSAL_LM",
                     **lora_kw)
    model = get_peft_model(_hf(base), cfg)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    for _ in range(3):
        model(input_ids=X, labels=X).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(str(out))
    return model.eval()


# ----------------------------------------------------------------------------- qlora_lite -> PEFT

@needs_bnb
def test_qlora_adapter_loads_in_peft_on_the_bnb_4bit_base(kind_base, tmp_path):
    """Same NF4 codes, same LoRA math: PEFT on a bitsandbytes 4-bit model reproduces our logits.

    Not bit for bit: bitsandbytes' CPU kernel rounds ~0.1% of the 8-bit double-quant constants to
    the second-nearest code, where ours always takes the nearest (see test_nf4), a ~1e-4 effect."""
    from peft import PeftModel
    kind, base = kind_base
    ours = _train_here(base, tmp_path / "ad", quantize="nf4")
    theirs = PeftModel.from_pretrained(_hf(base, four_bit=True), str(tmp_path / "ad"))
    assert (_logits(theirs) - _logits(ours)).abs().max().item() <= 5e-4
    with ql.disable_adapters(ours):   # and the adapter is not a no-op
        assert (_logits(theirs) - _logits(ours)).abs().max().item() > 1e-3


def test_qlora_adapter_loads_in_peft_on_the_16bit_base(kind_base, tmp_path):
    from peft import PeftModel
    kind, base = kind_base
    ours = _train_here(base, tmp_path / "ad", quantize=None)
    theirs = PeftModel.from_pretrained(_hf(base), str(tmp_path / "ad"))
    assert torch.allclose(_logits(theirs), _logits(ours), atol=1e-5)
    with theirs.disable_adapter():
        assert (_logits(theirs) - _logits(ours)).abs().max().item() > 1e-3
    merged = theirs.merge_and_unload()          # PEFT's own merge agrees too
    assert torch.allclose(_logits(merged), _logits(ours), atol=1e-5)


# ----------------------------------------------------------------------------- PEFT -> qlora_lite

def test_peft_adapter_loads_trains_merges_and_exports(kind_base, tmp_path, capsys):
    kind, base = kind_base
    peft_model = _train_with_peft(kind, base, tmp_path / "ad")
    want = _logits(peft_model)

    # loads on the 16-bit base it was trained on and gives the same outputs
    model, _ = ql.load_model(base, quantize=None, compute_dtype="fp32", device="cpu", load_tokenizer=False)
    cfg = load_adapter(model, tmp_path / "ad")
    assert cfg["peft_type"] == "LORA"
    assert torch.allclose(_logits(model), want, atol=1e-5)

    # merges: the merged model computes the same thing, unmerge restores
    ql.merge_lora(model)
    assert torch.allclose(_logits(model), want, atol=1e-5)
    ql.unmerge_lora(model)

    # trains further: only the adapter moves, and the loss goes down
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and len(trainable) == 2 * sum(1 for _ in ql.lora.lora_layers(model))
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    losses = []
    for _ in range(3):
        loss = model(input_ids=X, labels=X).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)

    # exports (it was trained on the 16-bit base: --base-quant none), and the export reproduces PEFT's model
    out = tmp_path / "merged"
    assert main(["export", str(tmp_path / "ad"), "--out", str(out), "--dtype", "fp32", "--base-quant", "none"]) == 0
    assert "16-bit base + adapter" in capsys.readouterr().out
    from transformers import AutoModelForCausalLM
    exported = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert torch.allclose(_logits(exported), want, atol=1e-5)


def test_peft_adapter_continues_on_an_nf4_base_and_exports(tiny_llama_dir, tmp_path):
    """A PEFT adapter moved onto a 4-bit base (e.g. to keep training cheaply) merges into the dequantized weights."""
    _train_with_peft("llama", tiny_llama_dir, tmp_path / "ad")
    model, _ = ql.load_model(tiny_llama_dir, quantize="nf4", compute_dtype="fp32", device="cpu", load_tokenizer=False)
    load_adapter(model, tmp_path / "ad")
    report = export_merged(tmp_path / "ad", tmp_path / "m", dtype="fp32", progress=False)
    assert report.verified and report.merge_base == "nf4-dequantized"
    from transformers import AutoModelForCausalLM
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), dtype=torch.float32)
    assert torch.allclose(_logits(exported), _logits(model), atol=1e-5)


def test_peft_exclude_modules_loads_exactly_the_saved_modules(tiny_llama_dir, tmp_path):
    """Modules are taken from the tensors, not re-derived from target_modules (which PEFT may have narrowed)."""
    peft_model = _train_with_peft("llama", tiny_llama_dir, tmp_path / "ad", exclude_modules=["model.layers.0.self_attn.q_proj"])
    cfg = json.loads((tmp_path / "ad" / CONFIG_NAME).read_text())
    assert cfg["exclude_modules"]
    model, _ = ql.load_model(tiny_llama_dir, quantize=None, compute_dtype="fp32", device="cpu", load_tokenizer=False)
    load_adapter(model, tmp_path / "ad")
    names = {n for n, _ in ql.lora.lora_layers(model)}
    assert "model.layers.0.self_attn.q_proj" not in names and "model.layers.1.self_attn.q_proj" in names
    assert torch.allclose(_logits(model), _logits(peft_model), atol=1e-5)


# ----------------------------------------------------------------------------- refusals and bad files

@pytest.fixture(scope="module")
def peft_adapter(tiny_llama_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("peft") / "ad"
    _train_with_peft("llama", tiny_llama_dir, d)
    return d


def _with_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / CONFIG_NAME).read_text())
    cfg.update(changes)
    (dst / CONFIG_NAME).write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("key,value", [
    ("use_dora", True), ("rank_pattern", {"q_proj": 8}), ("alpha_pattern", {"q_proj": 16}),
    ("modules_to_save", ["lm_head"]), ("bias", "lora_only"), ("peft_type", "IA3"), ("layers_to_transform", [0]),
    ("init_lora_weights", "pissa"), ("alora_invocation_tokens", [5, 6]), ("use_qalora", True), ("lora_bias", True),
    ("layer_replication", [[0, 2]]), ("trainable_token_indices", [1, 2]),
])
def test_unsupported_peft_options_are_refused(peft_adapter, tmp_path, capsys, key, value):
    d = _with_config(peft_adapter, tmp_path / "ad", **{key: value})
    with pytest.raises(ql.UserError, match=key):
        read_adapter(d)
    rc = main(["export", str(d), "--out", str(tmp_path / "m")])
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("qlora-lite export:")]
    assert rc == 2 and len(err) == 1 and key in err[0] and CONFIG_NAME in err[0]
    assert not (tmp_path / "m").exists()


def test_a_real_dora_adapter_is_refused(tiny_llama_dir, tmp_path):
    _train_with_peft("llama", tiny_llama_dir, tmp_path / "ad", use_dora=True)
    with pytest.raises(ql.UserError, match="use_dora"):
        read_adapter(tmp_path / "ad")


@pytest.mark.parametrize("damage,message", [
    ("pickle", "pickle"), ("bad_json", "not valid JSON"), ("list_json", "JSON object"), ("r_zero", "positive integer"),
    ("no_config", "adapter_config.json missing"), ("truncated", "truncated"), ("foreign_tensor", "not a LoRA"),
])
def test_damaged_adapter_dirs_give_one_clear_error(peft_adapter, tmp_path, damage, message):
    d = tmp_path / "ad"
    shutil.copytree(peft_adapter, d)
    if damage == "pickle":
        (d / WEIGHTS_NAME).rename(d / "adapter_model.bin")
    elif damage == "bad_json":
        (d / CONFIG_NAME).write_text("{\"r\": 4,")
    elif damage == "list_json":
        (d / CONFIG_NAME).write_text("[1, 2]")
    elif damage == "r_zero":
        _with_config(peft_adapter, tmp_path / "r0", r=0)
        d = tmp_path / "r0"
    elif damage == "no_config":
        (d / CONFIG_NAME).unlink()
    elif damage == "truncated":
        data = (d / WEIGHTS_NAME).read_bytes()
        (d / WEIGHTS_NAME).write_bytes(data[: len(data) - 100])
    elif damage == "foreign_tensor":
        from safetensors.torch import load_file, save_file
        sd = load_file(str(d / WEIGHTS_NAME))
        sd["base_model.model.model.norm.weight"] = torch.ones(64)
        save_file(sd, str(d / WEIGHTS_NAME))
    model, _ = ql.load_model(str(json.loads((peft_adapter / CONFIG_NAME).read_text())["base_model_name_or_path"]),
                             quantize=None, compute_dtype="fp32", device="cpu", load_tokenizer=False)
    with pytest.raises(ql.UserError, match=message) as e:
        load_adapter(model, d)
    assert "\n" not in str(e.value)


def test_save_adapter_round_trip_and_permissions(tiny_llama_dir, tmp_path):
    ours = _train_here(tiny_llama_dir, tmp_path / "ad", quantize="nf4")
    cfg, tensors = read_adapter(tmp_path / "ad")
    assert cfg["base_model_name_or_path"] == tiny_llama_dir and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert all(k.startswith("base_model.model.") for k in tensors)
    again, _ = ql.load_model(tiny_llama_dir, quantize="nf4", compute_dtype="fp32", device="cpu", load_tokenizer=False)
    load_adapter(again, tmp_path / "ad")
    assert torch.equal(_logits(again), _logits(ours))
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "ad").stat().st_mode & 0o777 == 0o777 & ~umask
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
