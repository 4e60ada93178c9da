"""Config loading: every shipped YAML validates, overrides follow YAML rules, every error path names the key."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import yaml

from qlora_lite.config import (
    SECTIONS, Config, config_docs_markdown, config_from_dict, config_keys, config_to_dict, default_config_path,
    describe_config, load_config, parse_override, save_config,
)
from qlora_lite.errors import UserError

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted((REPO / "configs").glob("*.yaml"))
MINIMAL = {"model": {"name_or_path": "org/model"}, "data": {"train_file": "org/dataset"}}


def write(tmp_path: Path, obj, name: str = "cfg.yaml") -> Path:
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else yaml.safe_dump(obj), encoding="utf-8")
    return p


# ----------------------------------------------------------------------------- shipped configs

def test_configs_are_shipped():
    names = {p.name for p in SHIPPED}
    assert {"tiny.yaml", "llama-2-7b-qlora.yaml", "mistral-7b-qlora.yaml", "llama-3-8b-qlora.yaml",
            "qwen2.5-7b-qlora.yaml"} <= names
    assert default_config_path() == REPO / "configs" / "tiny.yaml"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_yaml_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    # The shipped files set only known keys: re-reading the raw YAML through the strict loader again
    # with no overrides gives the same config, and every section present is a real one.
    raw = yaml.safe_load(path.read_text())
    assert set(raw) <= set(SECTIONS)
    assert cfg.quant.bits == 4 and cfg.quant.double_quant
    if path.name != "tiny.yaml":  # 24 GB GPU recipes
        assert 1 <= cfg.train.micro_batch_size <= 4
        assert 512 <= cfg.data.max_seq_len <= 2048
        assert cfg.train.optimizer == "paged_adamw_32bit" and cfg.train.gradient_checkpointing
        assert path.read_text().startswith("#") and "name_or_path" in path.read_text().split("model:")[0]


def test_tiny_config_paths_resolve_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(REPO / "configs" / "tiny.yaml")
    # ../assets/... is relative to configs/, so it lands in the repo whatever the current directory.
    for value in (cfg.model.name_or_path, cfg.data.train_file, cfg.data.eval_file):
        if Path(value).is_absolute():
            assert Path(value).is_relative_to(REPO)
    assert cfg.output.dir == "runs/tiny"  # not existing yet: left relative to the current directory


# ----------------------------------------------------------------------------- defaults and schema

def test_defaults_follow_qlora_py():
    c = Config()
    assert (c.lora.r, c.lora.alpha, c.lora.targets) == (64, 16.0, "all-linear")
    assert (c.train.lr, c.train.max_grad_norm, c.train.weight_decay) == (2e-4, 0.3, 0.0)
    assert (c.train.optimizer, c.train.lr_scheduler, c.train.warmup_ratio) == ("paged_adamw_32bit", "constant", 0.03)
    assert c.train.gradient_checkpointing and (c.train.micro_batch_size, c.train.gradient_accumulation_steps) == (1, 16)
    assert (c.quant.bits, c.quant.quant_type, c.quant.double_quant, c.quant.skip_modules) == (4, "nf4", True, ["lm_head"])
    assert not c.data.train_on_prompt and c.data.on_bad_row == "error"


def test_every_field_has_a_one_line_help_and_is_listed():
    text = describe_config()
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            h = f.metadata.get("help", "")
            assert h and "\n" not in h, f"{section}.{f.name} needs a one-line help"
            assert f"{section}.{f.name}:" in text
    assert len(config_keys()) == sum(len(dataclasses.fields(c)) for c in SECTIONS.values())


def test_docs_config_md_matches_the_dataclasses():
    doc = (REPO / "docs" / "config.md").read_text(encoding="utf-8")
    assert doc == config_docs_markdown(), "regenerate: python -m qlora_lite.config --markdown docs/config.md"


def test_mutable_defaults_are_not_shared():
    a, b = Config(), Config()
    a.quant.skip_modules.append("x")
    assert b.quant.skip_modules == ["lm_head"]


# ----------------------------------------------------------------------------- overrides

def test_overrides_use_yaml_scalar_rules(tmp_path):
    p = write(tmp_path, MINIMAL)
    cfg = load_config(p, ["lora.r=8", "train.lr=1e-4", "quant.bits=null", "lora.targets=[q_proj, v_proj]",
                          "data.packing=true", "train.max_steps=5", "model.revision=main", "lora.alpha=32"])
    assert cfg.lora.r == 8 and cfg.train.lr == 1e-4 and cfg.quant.bits is None
    assert cfg.lora.targets == ["q_proj", "v_proj"] and cfg.data.packing is True
    assert cfg.train.max_steps == 5 and cfg.model.revision == "main"
    assert cfg.lora.alpha == 32.0 and isinstance(cfg.lora.alpha, float)
    assert load_config(p, ["quant.bits=none"]).quant.bits is None
    assert parse_override("train.sample_prompt=a=b") == ("train.sample_prompt", "a=b")
    # Text keys keep the literal string when YAML would read something else or nothing at all.
    assert parse_override("train.sample_prompt=Q: why?") == ("train.sample_prompt", "Q: why?")
    assert parse_override("train.sample_prompt=a: b: c") == ("train.sample_prompt", "a: b: c")
    assert parse_override("model.revision=1234") == ("model.revision", "1234")
    assert parse_override("lora_rank=4") == ("lora.r", 4)


def test_float_keys_accept_yaml11_exponent_strings(tmp_path):
    # PyYAML reads `2e-4` (no dot) as a string; a float key still takes it.
    assert load_config(write(tmp_path, "model: {name_or_path: m}\ndata: {train_file: d}\ntrain: {lr: 2e-4}\n")).train.lr == 2e-4


@pytest.mark.parametrize("override, needle", [
    ("lora.r", "expected KEY=VALUE"),
    ("lora.rank=8", "unknown key lora.rank; did you mean 'r'"),
    ("loar.r=8", "unknown section 'loar'; did you mean 'lora'"),
    ("r=8", "must look like section.key"),
    ("lora.r=eight", "lora.r = 'eight' (str) is not a valid value; expected int"),
    ("lora.r=[1", "value is not valid YAML"),
])
def test_bad_overrides(tmp_path, override, needle):
    with pytest.raises(UserError, match=None) as e:
        load_config(write(tmp_path, MINIMAL), [override])
    assert needle in str(e.value) and "--set" in str(e.value)


def test_aliases_from_other_tools(tmp_path):
    axolotl = {"base_model": "org/m", "load_in_4bit": True, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
               "sequence_len": 1024, "sample_packing": True, "micro_batch_size": 2, "learning_rate": 1e-4,
               "optimizer": "paged_adamw_8bit", "output_dir": "out", "data": {"train_file": "d"}}
    cfg = load_config(write(tmp_path, axolotl))
    assert (cfg.model.name_or_path, cfg.quant.bits, cfg.lora.r, cfg.data.max_seq_len) == ("org/m", 4, 8, 1024)
    assert cfg.data.packing and cfg.train.micro_batch_size == 2 and cfg.train.optimizer == "paged_adamw_8bit"
    factory = {"model_name_or_path": "org/m", "lora_target": "q_proj,v_proj", "cutoff_len": 256, "data": {"train_file": "d"}}
    cfg = load_config(write(tmp_path, factory, "f.yaml"), ["lora_rank=4"])
    assert cfg.lora.targets == ["q_proj", "v_proj"] and cfg.data.max_seq_len == 256 and cfg.lora.r == 4
    assert load_config(write(tmp_path, {**factory, "lora_target": "all"}, "g.yaml")).lora.targets == "all-linear"


# ----------------------------------------------------------------------------- error paths

@pytest.mark.parametrize("patch, needle", [
    ({"lora": {"rank": 8}}, "unknown key lora.rank; did you mean 'r'? valid keys in lora: r, alpha"),
    ({"trian": {"lr": 1}}, "unknown section 'trian'; did you mean 'train'"),
    ({"lora": [1, 2]}, "section 'lora' must be a mapping"),
    ({"lora": {"r": "8"}}, "lora.r = '8' (str) is not a valid value; expected int"),
    ({"lora": {"r": 8.5}}, "expected int"),
    ({"train": {"gradient_checkpointing": "on"}}, "expected bool"),
    ({"train": {"epochs": True}}, "expected int"),
    ({"train": {"optimizer": "sgd"}}, "expected paged_adamw_32bit | paged_adamw_8bit | adamw"),
    ({"lora": {"targets": [1, 2]}}, "expected str | list[str]"),
    ({"lora": {"r": 0}}, "lora.r = 0 is out of range"),
    ({"lora": {"alpha": -1}}, "lora.alpha = -1.0 is out of range"),
    ({"lora": {"dropout": 1.0}}, "0 <= dropout < 1"),
    ({"lora": {"targets": "q_proj("}}, "not a valid regex"),
    ({"lora": {"targets": []}}, "lora.targets"),
    ({"train": {"lr": 0}}, "train.lr = 0.0 is out of range"),
    ({"train": {"max_steps": 0}}, "train.max_steps"),
    ({"train": {"micro_batch_size": 0}}, "train.micro_batch_size"),
    ({"train": {"warmup_ratio": 1.0}}, "train.warmup_ratio"),
    ({"train": {"max_grad_norm": -1}}, "train.max_grad_norm"),
    ({"train": {"keep_last": -1}}, "train.keep_last"),
    ({"data": {"train_file": "d", "max_seq_len": 0}}, "data.max_seq_len = 0 is out of range"),
    ({"data": {"train_file": "d", "eval_size": 2.5}}, "data.eval_size"),
    ({"data": {"train_file": "d", "eval_size": 0.1, "eval_file": "e.jsonl"}}, "conflicts"),
    ({"data": {"train_file": ""}}, "data.train_file is required"),
    ({"model": {"name_or_path": ""}}, "model.name_or_path is required"),
    ({"model": {"name_or_path": "m", "device": "gpu"}}, "model.device"),
    ({"quant": {"bits": 8}}, "quant.bits = 8 is out of range; expected 4 (NF4) or null"),
])
def test_config_errors_name_file_and_key(tmp_path, patch, needle):
    raw = {k: dict(v) for k, v in MINIMAL.items()}
    for section, body in patch.items():
        raw[section] = {**raw.get(section, {}), **body} if isinstance(body, dict) else body
    p = write(tmp_path, raw)
    with pytest.raises(UserError) as e:
        load_config(p)
    msg = str(e.value)
    assert msg.startswith(str(p)) and needle in msg, msg
    assert "\n" not in msg


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="not a file"):
        load_config(tmp_path)


def test_bad_yaml_names_the_line(tmp_path):
    p = write(tmp_path, "model:\n  name_or_path: m\ndata: [unclosed\n")
    with pytest.raises(UserError, match=rf"^{p}:\d+: invalid YAML"):
        load_config(p)
    with pytest.raises(UserError, match="expected a mapping of sections"):
        load_config(write(tmp_path, "- just\n- a list\n", "l.yaml"))


# ----------------------------------------------------------------------------- paths and saving

def test_relative_paths_cwd_first_then_config_dir(tmp_path, monkeypatch):
    cfg_dir = tmp_path / "cfgs"
    cfg_dir.mkdir()
    (cfg_dir / "train.jsonl").write_text("{}\n")
    work = tmp_path / "work"
    work.mkdir()
    p = write(cfg_dir, {"model": {"name_or_path": "org/model"}, "data": {"train_file": "train.jsonl"}})
    monkeypatch.chdir(work)
    assert load_config(p).data.train_file == str(cfg_dir / "train.jsonl")       # found next to the config
    (work / "train.jsonl").write_text("{}\n")
    assert load_config(p).data.train_file == str(work / "train.jsonl")          # the current dir wins
    assert load_config(p).model.name_or_path == "org/model"                     # hub ids are left alone


def test_save_config_round_trips_atomically(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ["lora.targets=[q_proj]", "train.sample_prompt=Hi: there"])
    out = tmp_path / "run" / "config.yaml"
    save_config(cfg, out)
    assert sorted(os.listdir(out.parent)) == ["config.yaml"]  # no temp file left behind
    again = load_config(out)
    assert again == cfg and config_to_dict(again) == config_to_dict(cfg)
    assert list(yaml.safe_load(out.read_text())) == list(SECTIONS)


def test_config_from_dict_without_file():
    cfg = config_from_dict(MINIMAL, ["train.seed=7"])
    assert cfg.train.seed == 7
    with pytest.raises(UserError, match="<config>: unknown key"):
        config_from_dict({**MINIMAL, "train": {"sed": 1}})
