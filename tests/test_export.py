"""`qlora-lite export`: merged models reload with transformers and reproduce the adapter model; writes are safe.

Each tiny base gets a real (if short) QLoRA run: NF4 base, LoRA on every linear, 3 AdamW steps, so
the adapter is non-zero and has seen the NF4 rounding. The exports are compared with the adapter
model in memory, independently of the exporter's own built-in verification.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import qlora_lite as ql
import qlora_lite.export as E
from qlora_lite.adapter import WEIGHTS_NAME, save_adapter
from qlora_lite.cli import main
from qlora_lite.lora import lora_layers
from qlora_lite.quantize import is_conv1d

# logits of the reloaded export vs the in-memory NF4 + adapter model (tiny models' logits are O(1))
LOGIT_TOL = {"fp32": 1e-5, "fp16": 2e-3, "bf16": 1e-2}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny matmuls on a shared 2-core machine run ~4x faster without thread hand-offs.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _add_tokenizer(model_dir: Path) -> None:
    """A small word-level tokenizer, so the export's tokenizer files are exercised too."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = ["<pad>", "<s>", "</s>", "<unk>"] + "the capital of france is def fibonacci ( n ) : below an instruction".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.save_pretrained(str(model_dir))


def _train_qlora(base: str, out: Path, steps: int = 3, quantize: str | None = "nf4"):
    """load_model + add_lora + a few AdamW steps + save_adapter; returns the trained model (eval mode)."""
    model, _ = ql.load_model(base, quantize=quantize, compute_dtype="fp32", device="cpu", load_tokenizer=False)
    ql.add_lora(model, r=4, alpha=8, dropout=0.0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randint(4, 128, (2, 16), generator=g)          # (B, T)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    save_adapter(model, out, base_model_name_or_path=base)
    return model


@pytest.fixture(scope="module")
def llama_run(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("export-llama")
    base = root / "base"
    shutil.copytree(tiny_llama_dir, base)
    _add_tokenizer(base)
    model = _train_qlora(str(base), root / "adapter")
    return str(base), root / "adapter", model


@pytest.fixture(scope="module")
def gpt2_run(tiny_gpt2_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("export-gpt2")
    model = _train_qlora(tiny_gpt2_dir, root / "adapter")
    return tiny_gpt2_dir, root / "adapter", model


@pytest.fixture(params=["llama", "gpt2"])
def run(request, llama_run, gpt2_run):
    return {"llama": llama_run, "gpt2": gpt2_run}[request.param]


PROMPTS = torch.randint(4, 128, (2, 12), generator=torch.Generator().manual_seed(1))   # (B, T)


def _logits(model, x=PROMPTS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits.float()                # (B, T, vocab)


def _reload(out) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()


def _error_line(err: str) -> str:
    """The CLI's one error line (progress bars also write to stderr); fails unless there is exactly one."""
    lines = [l for l in err.splitlines() if l.startswith("qlora-lite export:")]
    assert len(lines) == 1, err
    return lines[0]


def _stray(parent: Path, name: str) -> list[str]:
    """Leftover temp/old folders of an export called ``name``."""
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def _read_all(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    sd = {}
    for f in sorted(out.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd


# ----------------------------------------------------------------------------- the merge itself

@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_export_reloads_and_matches_adapter_model(run, dtype, tmp_path, capsys):
    base, adapter, model = run
    out = tmp_path / "merged"
    rc = main(["export", str(adapter), "--out", str(out), "--dtype", dtype, "--max-shard-size", "100KB"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "nf4-dequantized" in printed and "export vs NF4 base + adapter" in printed

    # An ordinary sharded HF model: index, every shard it names, config without quantization, generation config.
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(shards)
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert cfg["dtype"] == {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[dtype]
    assert (out / "generation_config.json").is_file()
    meta = json.loads((out / E.METADATA_NAME).read_text())
    assert meta["merge_base"] == "nf4-dequantized" and meta["dtype"] == dtype and meta["verified"]
    assert meta["source_checkpoint"] == str(adapter.resolve())
    from safetensors import safe_open
    with safe_open(str(out / sorted(shards)[0]), framework="pt") as f:
        assert f.metadata()["qlora_lite.merge_base"] == "nf4-dequantized"
        assert all(f.get_tensor(k).dtype == E.EXPORT_DTYPES[dtype] for k in f.keys() if f.get_tensor(k).is_floating_point())

    # Reloaded by transformers alone, it reproduces the NF4 base + adapter model it came from.
    diff = (_logits(_reload(out)) - _logits(model)).abs().max().item()
    assert diff < LOGIT_TOL[dtype], f"{dtype}: max |dlogit| {diff:.3e}"
    assert diff < 0.05 * (_logits(model) - _logits_without_adapter(model)).abs().max().item()


def _logits_without_adapter(model) -> torch.Tensor:
    with ql.disable_adapters(model):
        return _logits(model)


def test_merged_weight_is_dequantized_nf4_plus_delta(run, tmp_path):
    """Re-quantizing the base reproduces the codes the adapter was trained against, bit for bit."""
    base, adapter, model = run
    out = tmp_path / "m"
    E.export_merged(adapter, out, dtype="fp32", verify=False, progress=False)
    sd = _read_all(out)
    hf = _reload(out)
    layers = lora_layers(model)
    assert layers
    for name, layer in layers:
        want = layer.base.dequantize(torch.float32) + layer.delta_weight()          # [out, in]
        got = sd[f"{name}.weight"]
        got = got.t() if is_conv1d(hf.get_submodule(name)) else got                 # Conv1D stores [in, out]
        assert torch.equal(got, want), name


@pytest.mark.parametrize("backend,double_quant", [("torch", True), ("bnb", False)])
def test_export_requantizes_with_the_training_settings(llama_run, tmp_path, backend, double_quant):
    """The checkpoint's config.yaml (as the trainer writes it) is honoured: the merge equals
    load_model(backend=..., double_quant=...)'s dequantized weights + delta, bit for bit.

    The backend matters: the 4-bit codes of the two are identical, but bitsandbytes' 8-bit codes for
    the double-quantized constants break near-ties differently in a few blocks (tests/test_nf4.py).
    """
    from qlora_lite.adapter import load_adapter
    from qlora_lite.config import Config, save_config
    from qlora_lite.quantize import bnb_available
    if backend == "bnb" and not bnb_available():
        pytest.skip("bitsandbytes is not importable here")
    base, adapter, _ = llama_run
    ck = tmp_path / "ck"
    shutil.copytree(adapter, ck)
    cfg = Config()
    cfg.model.name_or_path = base
    cfg.quant.backend, cfg.quant.double_quant = backend, double_quant
    save_config(cfg, ck / "config.yaml")
    report = E.export_merged(ck, tmp_path / "t", dtype="fp32", verify=False, progress=False)
    assert report.quant["source"] == "config.yaml"
    assert (report.quant["backend"], report.quant["double_quant"]) == (backend, double_quant)
    model, _ = ql.load_model(base, quantize="nf4", backend=backend, double_quant=double_quant, compute_dtype="fp32",
                             device="cpu", load_tokenizer=False)
    load_adapter(model, ck)
    sd = _read_all(tmp_path / "t")
    for name, layer in lora_layers(model):
        assert torch.equal(sd[f"{name}.weight"], layer.base.dequantize(torch.float32) + layer.delta_weight()), name


def test_base_16bit_merge_is_farther_from_the_adapter_model(llama_run, tmp_path):
    base, adapter, model = llama_run
    nf4 = E.export_merged(adapter, tmp_path / "nf4", dtype="fp32", progress=False)
    w16 = E.export_merged(adapter, tmp_path / "w16", dtype="fp32", base_16bit=base, progress=False)
    assert nf4.merge_base == "nf4-dequantized" and w16.merge_base == "16bit"
    assert json.loads((tmp_path / "w16" / E.METADATA_NAME).read_text())["merge_base"] == "16bit"
    # The 16-bit merge matches the 16-bit base + adapter exactly, and differs from what was trained
    # by the NF4 quantization error the adapter never saw: much more than the NF4-base merge does.
    assert w16.vs_16bit_adapter_model.max_abs < 1e-4
    assert w16.vs_adapter_model.max_abs > 20 * nf4.vs_adapter_model.max_abs
    assert w16.vs_adapter_model.mean_abs > 20 * nf4.vs_adapter_model.mean_abs
    # and its weights are W16 + delta
    from safetensors.torch import load_file
    w = load_file(str(Path(base) / "model.safetensors"))
    sd = _read_all(tmp_path / "w16")
    for name, layer in lora_layers(model):
        assert torch.allclose(sd[f"{name}.weight"], w[f"{name}.weight"].float() + layer.delta_weight(), atol=1e-6)


def test_tokenizer_files_travel_with_the_export(llama_run, tmp_path):
    from transformers import AutoTokenizer
    base, adapter, _ = llama_run
    E.export_merged(adapter, tmp_path / "m", dtype="bf16", verify=False, progress=False)
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "m"))
    assert tok("the capital of france")["input_ids"] == AutoTokenizer.from_pretrained(base)("the capital of france")["input_ids"]


def test_adapter_trained_on_16bit_base_exports_from_config_yaml(tiny_llama_dir, tmp_path):
    """config.yaml `quant.bits: null` (plain LoRA) merges into the 16-bit weights and verifies against them."""
    ck = tmp_path / "ck"
    _train_qlora(tiny_llama_dir, ck, quantize=None)
    (ck / "config.yaml").write_text(f"model:\n  name_or_path: {tiny_llama_dir}\nquant:\n  bits: null\n")
    report = E.export_merged(ck, tmp_path / "m", dtype="fp32", progress=False)
    assert report.merge_base == "16bit" and report.quant["quantized"] is False and report.quant["source"] == "config.yaml"
    assert report.verified and report.vs_16bit_adapter_model.max_abs < 1e-4 and report.vs_adapter_model is None


def test_verification_catches_a_wrong_merge(llama_run, tmp_path, monkeypatch, capsys):
    base, adapter, _ = llama_run
    real = E.LoraDelta.delta
    monkeypatch.setattr(E.LoraDelta, "delta", lambda self, transpose: 3 * real(self, transpose))
    out = tmp_path / "m"
    rc = main(["export", str(adapter), "--out", str(out), "--dtype", "bf16"])
    err = _error_line(capsys.readouterr().err)
    assert rc == 1 and "verification failed" in err
    assert not out.exists() and _stray(tmp_path, "m") == []


# ----------------------------------------------------------------------------- safe writes and bad input

def test_refuses_to_overwrite_without_flag(llama_run, tmp_path, capsys):
    _, adapter, _ = llama_run
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc = main(["export", str(adapter), "--out", str(out)])
    err = _error_line(capsys.readouterr().err)
    assert rc == 2 and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "mine"
    # --overwrite still refuses a non-empty folder that is not a model
    assert main(["export", str(adapter), "--out", str(out), "--overwrite"]) == 2
    assert (out / "keep.txt").read_text() == "mine"
    # and never replaces the base model it reads
    assert main(["export", str(adapter), "--out", llama_run[0], "--overwrite"]) == 2
    assert "reads from" in capsys.readouterr().err


def _fail_on_shard(monkeypatch, n: int, exc: BaseException):
    """Make the n-th shard write die half way (a partial file is left behind, as a full disk would)."""
    real, calls = E.write_safetensors, {"n": 0}

    def write_safetensors(path, tensors, metadata=None):
        calls["n"] += 1
        if calls["n"] == n:
            Path(path).write_bytes(b"\0" * 100)
            raise exc
        return real(path, tensors, metadata)
    monkeypatch.setattr(E, "write_safetensors", write_safetensors)
    return calls


def test_interrupted_export_leaves_nothing(llama_run, tmp_path, monkeypatch, capsys):
    _, adapter, _ = llama_run
    out = tmp_path / "m"
    _fail_on_shard(monkeypatch, 2, OSError(28, "No space left on device"))
    rc = main(["export", str(adapter), "--out", str(out), "--max-shard-size", "100KB"])
    err = _error_line(capsys.readouterr().err)
    assert rc == 1 and "No space left on device" in err
    assert not out.exists() and _stray(tmp_path, "m") == []
    # a Ctrl-C in the middle cleans up too
    _fail_on_shard(monkeypatch, 2, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        E.export_merged(adapter, out, max_shard_size="100KB", progress=False)
    assert not out.exists() and _stray(tmp_path, "m") == []


def test_overwrite_keeps_the_old_export_until_the_new_one_is_complete(llama_run, tmp_path, monkeypatch):
    _, adapter, _ = llama_run
    out = tmp_path / "m"
    E.export_merged(adapter, out, dtype="fp32", verify=False, progress=False)
    old_meta = (out / E.METADATA_NAME).read_text()
    old_files = sorted(p.name for p in out.iterdir())

    # A failure while writing the 2nd shard of the new export: the old one is untouched.
    with monkeypatch.context() as m:
        _fail_on_shard(m, 2, OSError(28, "No space left on device"))
        with pytest.raises(OSError):
            E.export_merged(adapter, out, dtype="bf16", max_shard_size="100KB", overwrite=True, progress=False)
    assert (out / E.METADATA_NAME).read_text() == old_meta and sorted(p.name for p in out.iterdir()) == old_files
    assert _stray(tmp_path, "m") == []

    # A successful overwrite: the old export is still there while the new one is verified, then replaced.
    seen = {}
    real_verify = E._verify

    def spy(report, tmp, *a, **k):
        seen["old_meta_during_verify"] = (out / E.METADATA_NAME).read_text()
        return real_verify(report, tmp, *a, **k)
    monkeypatch.setattr(E, "_verify", spy)
    E.export_merged(adapter, out, dtype="bf16", max_shard_size="100KB", overwrite=True, progress=False)
    assert seen["old_meta_during_verify"] == old_meta
    assert json.loads((out / E.METADATA_NAME).read_text())["dtype"] == "bf16"
    assert (out / "model.safetensors.index.json").is_file() and not (out / "model.safetensors").exists()
    assert _stray(tmp_path, "m") == []


def test_truncated_adapter_is_one_line_exit_2(llama_run, tmp_path, capsys):
    _, adapter, _ = llama_run
    ck = tmp_path / "ck"
    shutil.copytree(adapter, ck)
    data = (ck / WEIGHTS_NAME).read_bytes()
    (ck / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    rc = main(["export", str(ck), "--out", str(tmp_path / "m")])
    err = _error_line(capsys.readouterr().err)
    assert rc == 2 and WEIGHTS_NAME in err and "truncated" in err
    assert not (tmp_path / "m").exists()


def test_adapter_for_another_base_is_refused(llama_run, gpt2_run, tmp_path, capsys):
    _, adapter, _ = llama_run
    rc = main(["export", str(adapter), "--out", str(tmp_path / "m"), "--base", gpt2_run[0]])
    err = _error_line(capsys.readouterr().err)
    assert rc == 2 and "wrong base model" in err


def test_export_dirs_have_ordinary_permissions(llama_run, tmp_path):
    _, adapter, _ = llama_run
    E.export_merged(adapter, tmp_path / "m", verify=False, progress=False)
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "m").stat().st_mode & 0o777 == 0o777 & ~umask


def test_streamed_safetensors_match_the_library(tmp_path):
    """Our tensor-by-tensor writer produces files safetensors reads back exactly, every dtype the export writes."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=g), "b": torch.randn(7, generator=g).to(torch.bfloat16),
               "c": torch.randn(2, 2, 2, generator=g).half(), "d": torch.arange(5), "e": torch.tensor(1.5),
               "f": torch.ones(0, 4), "g": torch.randn(4, 6, generator=g).t()}          # non-contiguous
    E.write_safetensors(tmp_path / "x.safetensors", tensors, {"k": "v"})
    back = load_file(str(tmp_path / "x.safetensors"))
    assert back.keys() == tensors.keys()
    assert all(back[k].dtype == t.dtype and torch.equal(back[k], t) for k, t in tensors.items())
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        assert f.metadata() == {"k": "v"}


@pytest.mark.parametrize("text,size", [("2GB", 2 * 10**9), ("500MB", 5 * 10**8), ("64KiB", 65536), ("1234", 1234),
                                       ("1.5GiB", int(1.5 * 2**30))])
def test_parse_size(text, size):
    assert E.parse_size(text) == size


@pytest.mark.parametrize("text", ["", "2 XB", "-1GB", "0"])
def test_parse_size_rejects(text):
    with pytest.raises(ql.UserError):
        E.parse_size(text)


def test_lora_on_a_tied_input_embedding_exports_untied(gpt2_run, tmp_path):
    """GPT-2 ties lm_head to wte; an adapter on wte changes the input side only, so the export unties them."""
    base, _, _ = gpt2_run
    model, _ = ql.load_model(base, quantize="nf4", compute_dtype="fp32", device="cpu", load_tokenizer=False)
    ql.add_lora(model, r=4, alpha=8, dropout=0.0, targets=["wte", "c_attn"])
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B["default"].normal_(std=0.05)
            layer.lora_A["default"].normal_(std=0.05)
    save_adapter(model, tmp_path / "ad", base_model_name_or_path=base)
    report = E.export_merged(tmp_path / "ad", tmp_path / "m", dtype="fp32", progress=False)
    assert report.untied == ["lm_head.weight", "transformer.wte.weight"] and report.verified
    assert json.loads((tmp_path / "m" / "config.json").read_text())["tie_word_embeddings"] is False
    sd = _read_all(tmp_path / "m")
    assert not torch.equal(sd["lm_head.weight"], sd["transformer.wte.weight"])
    assert (_logits(_reload(tmp_path / "m")) - _logits(model)).abs().max().item() < LOGIT_TOL["fp32"]
