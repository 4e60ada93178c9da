"""The training loop on a tiny model on CPU: loss goes down, resume equals an uninterrupted run,
checkpoints survive crashes, two data-parallel processes equal one, NaN and bad input stop cleanly."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qlora_lite.checkpoint import list_checkpoints
from qlora_lite.cli import main
from qlora_lite.config import load_config
from qlora_lite.errors import UserError
from qlora_lite.train import train

ROOT = Path(__file__).resolve().parent.parent
TINY_BASE = ROOT / "assets" / "tiny-base"
if not TINY_BASE.is_dir() and os.environ.get("QLORA_LITE_TINY_BASE"):
    TINY_BASE = Path(os.environ["QLORA_LITE_TINY_BASE"])


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory):
    """A 2-layer, 64-wide random Llama with the bundled tokenizer: fast enough for many short runs."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    if not (TINY_BASE / "tokenizer.json").is_file():
        pytest.skip("assets/tiny-base is not built")
    tok = AutoTokenizer.from_pretrained(TINY_BASE)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=256, bos_token_id=tok.bos_token_id,
                                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    d = tmp_path_factory.mktemp("small-model")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    rows = [{"instruction": "Add.", "input": f"{a} + {b}", "output": str(a + b)} for a in range(8) for b in range(8)]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:56]))
    (d / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[56:]))
    return d


def make_cfg(model_dir, data_dir, out, *extra):
    overrides = [f"model.name_or_path={model_dir}", f"data.train_file={data_dir / 'train.jsonl'}",
                 f"data.eval_file={data_dir / 'eval.jsonl'}", f"output.dir={out}", "data.max_seq_len=160",
                 "train.max_steps=6", "train.micro_batch_size=4", "train.gradient_accumulation_steps=2",
                 "train.lr=5e-3", "train.eval_every=0", "train.save_every=0", "train.log_every=1",
                 "train.exact_match_eval=false", "lora.r=4", "lora.alpha=8", "lora.dropout=0.1",
                 "train.warmup_ratio=0", "train.lr_scheduler=cosine", *extra]
    return load_config(ROOT / "configs" / "tiny.yaml", overrides)


def read_metrics(run_dir):
    return [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_loss_goes_down_and_run_dir_is_complete(small_model_dir, data_files, tmp_path):
    cfg = make_cfg(small_model_dir, data_files, tmp_path / "run", "train.max_steps=12")
    res = train(cfg, progress=False)
    assert res.steps == 12 and len(res.losses) == 12
    assert sum(res.losses[-3:]) / 3 < sum(res.losses[:3]) / 3 - 0.3
    assert res.after["eval_loss"] < res.before["eval_loss"]
    ckpt = res.final_checkpoint
    for f in ("adapter_config.json", "adapter_model.safetensors", "training_state.pt", "config.yaml"):
        assert (ckpt / f).is_file()
    assert (tmp_path / "run" / "config.yaml").is_file()
    rows = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert all(k in rows[0] for k in ("lr", "grad_norm", "tokens_per_s", "peak_memory_gb"))
    # the resolved config saved with the run loads back as the same config
    assert load_config(ckpt / "config.yaml") == cfg


def test_resumed_run_equals_uninterrupted_run(small_model_dir, data_files, tmp_path):
    full = train(make_cfg(small_model_dir, data_files, tmp_path / "a"), progress=False)
    cfg = make_cfg(small_model_dir, data_files, tmp_path / "b")
    part = train(cfg, progress=False, stop_after=3)          # as if killed after step 3
    assert part.interrupted and part.steps == 3
    rest = train(cfg, resume="auto", progress=False)
    assert rest.steps == 6
    torch.testing.assert_close(torch.tensor(part.losses + rest.losses), torch.tensor(full.losses), rtol=0, atol=1e-6)
    from safetensors.torch import load_file
    a = load_file(full.final_checkpoint / "adapter_model.safetensors")
    b = load_file(rest.final_checkpoint / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # metrics.jsonl reads as one run: every step once
    assert [r["step"] for r in read_metrics(tmp_path / "b") if "loss" in r] == list(range(1, 7))


def test_crash_during_checkpoint_save_keeps_the_previous_one(small_model_dir, data_files, tmp_path, monkeypatch):
    import qlora_lite.checkpoint as ck
    cfg = make_cfg(small_model_dir, data_files, tmp_path / "run", "train.save_every=2", "train.keep_last=2")
    real_save = torch.save
    calls = {"n": 0}

    def flaky_save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:                      # the second checkpoint dies mid-write
            Path(f).write_bytes(b"partial")
            raise OSError("disk full")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ck.torch, "save", flaky_save)
    with pytest.raises(OSError, match="disk full"):
        train(cfg, progress=False)
    monkeypatch.setattr(ck.torch, "save", real_save)
    run = tmp_path / "run"
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-2"]
    assert not [p for p in run.iterdir() if p.name.startswith(".")]   # no temp folder left behind
    res = train(cfg, resume="auto", progress=False)                    # and it resumes from there
    assert res.steps == 6
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-4", "checkpoint-6"]   # keep_last=2


def test_existing_output_dir_is_not_clobbered(small_model_dir, data_files, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(UserError, match="not empty"):
        train(make_cfg(small_model_dir, data_files, out, "output.overwrite=false"), progress=False)
    with pytest.raises(UserError, match="not from a training run.*precious.txt"):      # not even with overwrite
        train(make_cfg(small_model_dir, data_files, out, "output.overwrite=true"), progress=False)
    assert (out / "precious.txt").read_text() == "keep me"
    # an earlier run's folder is replaced with overwrite
    (out / "precious.txt").unlink()
    train(make_cfg(small_model_dir, data_files, out, "train.max_steps=1"), progress=False)
    res = train(make_cfg(small_model_dir, data_files, out, "train.max_steps=2", "output.overwrite=true"), progress=False)
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"] and res.steps == 2


def test_nan_loss_stops_naming_the_step(small_model_dir, data_files, tmp_path, capsys):
    cfg_path = tmp_path / "nan.yaml"
    shutil.copy(ROOT / "configs" / "tiny.yaml", cfg_path)
    args = ["train", str(ROOT / "configs" / "tiny.yaml"),
            "--set", f"model.name_or_path={small_model_dir}", "--set", f"data.train_file={data_files / 'train.jsonl'}",
            "--set", f"data.eval_file={data_files / 'eval.jsonl'}", "--set", f"output.dir={tmp_path / 'run'}",
            "--set", "train.max_steps=3", "--set", "train.lr=1e30", "--set", "train.max_grad_norm=0",
            "--set", "train.exact_match_eval=false", "--set", "train.micro_batch_size=2",
            "--set", "train.gradient_accumulation_steps=1"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "at step 2" in err and "no checkpoint saved yet" in err


def test_bad_config_is_exit_2_one_line(tmp_path, capsys):
    assert main(["train", str(ROOT / "configs" / "tiny.yaml"), "--set", "lora.rank=4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lora.rank" in err[0]
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2


def test_resume_from_adapter_only_dir_is_refused(small_model_dir, data_files, tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(UserError, match="training_state.pt missing"):
        train(make_cfg(small_model_dir, data_files, tmp_path / "run"), resume=str(tmp_path / "adapter"),
              progress=False)


@pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process test runs on Linux")
def test_two_processes_equal_one_process_with_the_same_global_batch(small_model_dir, data_files, tmp_path):
    common = [f"model.name_or_path={small_model_dir}", f"data.train_file={data_files / 'train.jsonl'}",
              f"data.eval_file={data_files / 'eval.jsonl'}", "data.max_seq_len=160", "train.max_steps=3",
              "train.gradient_accumulation_steps=2", "train.lr=5e-3", "train.eval_every=0", "train.save_every=0",
              "train.exact_match_eval=false", "lora.r=4", "lora.alpha=8", "lora.dropout=0", "model.device=cpu"]

    def run(nproc, mb, out):
        sets = [a for kv in common + [f"train.micro_batch_size={mb}", f"output.dir={out}"] for a in ("--set", kv)]
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                    "--master_port", str(29500 + nproc + os.getpid() % 1000)] if nproc > 1 else [sys.executable]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        p = subprocess.run(launcher + ["-m", "qlora_lite", "train", str(ROOT / "configs" / "tiny.yaml"), *sets],
                           capture_output=True, text=True, env=env, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        from safetensors.torch import load_file
        return load_file(str(list_checkpoints(out)[-1] / "adapter_model.safetensors"))

    one = run(1, 4, tmp_path / "one")
    two = run(2, 2, tmp_path / "two")
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(one[k], two[k], rtol=1e-4, atol=1e-5)


def test_sigint_and_sigterm_are_turned_into_a_clean_stop():
    import signal
    from qlora_lite.train import StopSignal
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for sig in (signal.SIGINT, signal.SIGTERM):
        with StopSignal() as stop:
            os.kill(os.getpid(), sig)
            assert stop.received == sig          # no KeyboardInterrupt: the loop saves, then exits
        with StopSignal() as stop:
            os.kill(os.getpid(), sig)
            with pytest.raises(KeyboardInterrupt):   # a second signal stops at once
                os.kill(os.getpid(), sig)
    # handlers restored (whatever they were: a shell's background job starts with SIGINT ignored)
    assert {s: signal.getsignal(s) for s in before} == before
