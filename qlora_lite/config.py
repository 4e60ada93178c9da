"""Typed training config: dataclasses, YAML loading, `--set key=value` overrides, validation.

One YAML file maps onto `Config` section by section (model, quant, lora, data, train, output).
Every field carries a one-line `help` so `qlora-lite train --list-keys` and docs/config.md are
generated from this file and never drift from it. Defaults follow the QLoRA paper's qlora.py
(r 64, alpha 16, lr 2e-4, max_grad_norm 0.3, paged_adamw_32bit, constant schedule, warmup 0.03,
gradient checkpointing, NF4 + double quantization).

Loading is strict, because a typo that silently falls back to a default wastes a GPU-day:
unknown keys, wrong types and out-of-range values all raise UserError naming the file, the key,
the value and what was expected.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import sys
import tempfile
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from .errors import UserError


def _f(default: Any, help: str, *, path: bool = False) -> Any:
    """A dataclass field with a one-line description; mutable defaults are copied per instance."""
    meta = {"help": help, "path": path}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


# ----------------------------------------------------------------------------- sections

@dataclass
class ModelConfig:
    """Which base model to load and how to compute with it."""

    name_or_path: str = _f("", "Hugging Face model id or local model directory (config.json + weights + tokenizer)", path=True)
    revision: Optional[str] = _f(None, "hub revision (branch, tag or commit) to load; null = default branch")
    trust_remote_code: bool = _f(False, "allow custom modeling code shipped with the model (runs code from the model repo)")
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = _f(
        "auto", "dtype for matmuls and LoRA weights; auto = bf16 on GPUs that support it, else fp16 on GPU, fp32 on CPU")
    attn_implementation: str = _f("sdpa", "attention kernel passed to transformers: sdpa, eager or flash_attention_2")
    device: str = _f("auto", "device to train on: auto (cuda if available, else cpu), cpu, cuda, cuda:N")


@dataclass
class QuantConfig:
    """How the frozen base weights are stored."""

    bits: Optional[int] = _f(4, "4 = NF4 base (QLoRA); null = keep the base in compute_dtype (plain LoRA)")
    quant_type: Literal["nf4"] = _f("nf4", "4-bit data type; NF4 (normal float) is the QLoRA type")
    double_quant: bool = _f(True, "quantize the per-block absmax constants again (8-bit, blocks of 256): 4.127 instead of 4.5 bits/param")
    backend: Literal["auto", "bnb", "torch"] = _f(
        "auto", "4-bit kernels: bnb (bitsandbytes), torch (pure PyTorch reference), auto = bnb when importable")
    skip_modules: list[str] = _f(["lm_head"], "module names kept un-quantized (matched as a name suffix)")


@dataclass
class LoraConfig:
    """Where the trainable low-rank adapters go and how big they are."""

    r: int = _f(64, "LoRA rank (the paper's qlora.py default 64; 8-16 is usually enough)")
    alpha: float = _f(16.0, "LoRA scaling numerator: delta W = (alpha / r) * B @ A (alpha / sqrt(r) with use_rslora)")
    dropout: float = _f(0.05, "dropout on the LoRA input path, 0 <= p < 1 (qlora.py uses 0.1 for 7B-13B, 0.05 above)")
    targets: Union[str, list[str]] = _f(
        "all-linear", "modules to adapt: all-linear (every linear but lm_head), a list of name suffixes "
                           "([q_proj, v_proj]), or a regex matched against whole module names")
    use_rslora: bool = _f(False, "rank-stabilized LoRA: scale by alpha / sqrt(r) instead of alpha / r")
    modules_to_save: list[str] = _f([], "modules trained in full and saved with the adapter (e.g. lm_head, embed_tokens)")


@dataclass
class DataConfig:
    """Where the examples come from and how they become token batches."""

    train_file: str = _f("", "training data: a local .jsonl/.json/.csv/.parquet file, or a hub dataset name "
                             "(tried only when no such local path exists)", path=True)
    train_split: str = _f("train", "split to read when train_file is a hub dataset")
    eval_file: Optional[str] = _f(None, "evaluation data file (same formats as train_file); null = see eval_split/eval_size", path=True)
    eval_split: Optional[str] = _f(None, "hub split used for evaluation when train_file is a hub dataset (e.g. test)")
    eval_size: float = _f(0.0, "held out of the training rows for evaluation when no eval_file/eval_split is set: "
                               "a fraction (0 < x < 1) or a row count (>= 1); 0 = no evaluation")
    format: Literal["alpaca", "chat", "text"] = _f(
        "alpaca", "row format: alpaca (instruction/input/output), chat (messages), text (one text field)")
    text_field: str = _f("text", "column holding the text for format=text")
    messages_field: str = _f("messages", "column holding the list of {role, content} messages for format=chat")
    chat_template: Optional[str] = _f(
        None, "Jinja chat template (inline, or a path to a .jinja file) used instead of the tokenizer's own")
    max_seq_len: int = _f(512, "tokens per example; longer examples are truncated and counted")
    train_on_prompt: bool = _f(False, "also compute the loss on prompt tokens (default: loss on response tokens only)")
    packing: bool = _f(False, "pack several examples into each max_seq_len block (labels stay masked per example)")
    on_bad_row: Literal["error", "skip"] = _f(
        "error", "a malformed row stops loading with file:line (error) or is skipped and counted (skip)")
    num_eval_samples: int = _f(32, "eval rows generated and scored by exact match when train.exact_match_eval is on; 0 = all")


@dataclass
class TrainConfig:
    """The optimisation loop."""

    seed: int = _f(42, "seed for LoRA init, data order, dropout and the held-out split")
    max_steps: Optional[int] = _f(None, "optimizer steps to run; null = run `epochs` full passes over the data")
    epochs: int = _f(1, "passes over the training data when max_steps is null")
    micro_batch_size: int = _f(1, "sequences per forward/backward pass")
    gradient_accumulation_steps: int = _f(16, "micro-batches per optimizer step (effective batch = micro_batch_size x this)")
    lr: float = _f(2e-4, "peak learning rate (qlora.py: 2e-4 up to 13B, 1e-4 for 33B/65B)")
    weight_decay: float = _f(0.0, "AdamW weight decay on the LoRA weights")
    optimizer: Literal["paged_adamw_32bit", "paged_adamw_8bit", "adamw"] = _f(
        "paged_adamw_32bit", "optimizer: bitsandbytes paged AdamW with 32-bit or 8-bit states, or torch AdamW")
    lr_scheduler: Literal["constant", "cosine", "linear"] = _f(
        "constant", "learning-rate schedule after warmup (qlora.py: constant)")
    warmup_ratio: float = _f(0.03, "fraction of the total steps spent warming the learning rate up linearly from 0")
    max_grad_norm: float = _f(0.3, "clip the global gradient norm to this; 0 = no clipping")
    gradient_checkpointing: bool = _f(True, "recompute layer activations in backward instead of storing them")
    eval_every: int = _f(200, "evaluate every N optimizer steps (and at the end); 0 = only at the end")
    log_every: int = _f(10, "write a metrics line every N optimizer steps")
    save_every: int = _f(250, "write a resumable checkpoint every N optimizer steps (and at the end); 0 = only at the end")
    keep_last: int = _f(3, "checkpoints kept on disk (older ones are deleted); 0 = keep all")
    nan_policy: Literal["stop", "skip"] = _f(
        "stop", "on a non-finite loss or gradient: stop with an error, or skip that optimizer step and count it")
    exact_match_eval: bool = _f(False, "at each eval also generate answers for data.num_eval_samples rows and report exact match")
    max_new_tokens: int = _f(64, "tokens generated per prompt for exact-match evaluation and the sample prompt")
    sample_prompt: Optional[str] = _f(None, "prompt completed greedily at each eval and logged, to watch training (alpaca: an "
                                        "instruction put in the template; chat: a user message; text: raw text); null = none")


@dataclass
class OutputConfig:
    """Where the run writes its checkpoints, metrics and final adapter."""

    dir: str = _f("runs/default", "run directory: checkpoints, metrics.jsonl, config.yaml, final adapter")
    overwrite: bool = _f(False, "allow starting a new run in a non-empty output dir (its old checkpoints are deleted)")


@dataclass
class Config:
    """A whole training run."""

    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "base model"})
    quant: QuantConfig = field(default_factory=QuantConfig, metadata={"help": "base weight quantization"})
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"help": "LoRA adapters"})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "training and evaluation data"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "optimisation loop"})
    output: OutputConfig = field(default_factory=OutputConfig, metadata={"help": "run directory"})


# Section name -> dataclass, in file order.
SECTIONS: dict[str, type] = {"model": ModelConfig, "quant": QuantConfig, "lora": LoraConfig,
                             "data": DataConfig, "train": TrainConfig, "output": OutputConfig}

# Flat keys people bring from axolotl / LLaMA-Factory / qlora.py configs, mapped onto ours.
# A value transform handles keys whose meaning differs (load_in_4bit: true -> quant.bits: 4).
ALIASES: dict[str, tuple[str, Any]] = {
    "base_model": ("model.name_or_path", None),
    "model_name_or_path": ("model.name_or_path", None),
    "load_in_4bit": ("quant.bits", lambda v: 4 if v is True else (None if v is False else v)),
    "quantization_bit": ("quant.bits", None),
    "lora_r": ("lora.r", None),
    "lora_rank": ("lora.r", None),
    "lora_alpha": ("lora.alpha", None),
    "lora_dropout": ("lora.dropout", None),
    "lora_target_modules": ("lora.targets", None),
    # LLaMA-Factory writes `lora_target: all` or `lora_target: q_proj,v_proj`.
    "lora_target": ("lora.targets", lambda v: "all-linear" if v == "all" else
                    [s.strip() for s in v.split(",")] if isinstance(v, str) and "," in v else v),
    "sequence_len": ("data.max_seq_len", None),
    "cutoff_len": ("data.max_seq_len", None),
    "sample_packing": ("data.packing", None),
    "micro_batch_size": ("train.micro_batch_size", None),
    "per_device_train_batch_size": ("train.micro_batch_size", None),
    "gradient_accumulation_steps": ("train.gradient_accumulation_steps", None),
    "learning_rate": ("train.lr", None),
    "num_epochs": ("train.epochs", None),
    "num_train_epochs": ("train.epochs", None),
    "optimizer": ("train.optimizer", None),
    "optim": ("train.optimizer", None),
    "lr_scheduler_type": ("train.lr_scheduler", None),
    "output_dir": ("output.dir", None),
}


def default_config_path() -> Path:
    """The bundled tiny config that `qlora-lite train` runs when given no config file."""
    return Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"


# ----------------------------------------------------------------------------- type checks

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) if not isinstance(a, str) else a for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        names = [_type_name(a) for a in args if a is not type(None)]
        return " | ".join(names) + (" | null" if type(None) in args else "")
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return f"list[{_type_name(inner)}]"
    return {bool: "bool", int: "int", float: "float", str: "str"}.get(tp, getattr(tp, "__name__", str(tp)))


_NO = object()  # sentinel: value does not fit the type


def _coerce(value: Any, tp: Any) -> Any:
    """Return `value` as type `tp`, or _NO. YAML already typed the scalar; only safe widenings happen
    (int -> float, a lone string -> [string] is NOT done: a list key wants a list)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        return value if value in typing.get_args(tp) and type(value) in {type(a) for a in typing.get_args(tp)} else _NO
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args
                             and str not in args):
            return None if type(None) in args else _NO
        for a in args:
            if a is type(None):
                continue
            out = _coerce(value, a)
            if out is not _NO:
                return out
        return _NO
    if origin is list:
        if not isinstance(value, list):
            return _NO
        (inner,) = typing.get_args(tp) or (Any,)
        out = [_coerce(v, inner) for v in value]
        return _NO if any(o is _NO for o in out) else out
    if tp is bool:
        return value if isinstance(value, bool) else _NO
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _NO
    if tp is float:
        if isinstance(value, bool):
            return _NO
        if isinstance(value, (int, float)):
            return float(value)
        # YAML 1.1 reads "2e-4" (no dot) as a string; accept numeric strings for float keys.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                return _NO
        return _NO
    if tp is str:
        return value if isinstance(value, str) else _NO
    return _NO


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, globalns=vars(sys.modules[__name__]), include_extras=False)


def _suggest(key: str, valid: list[str], section: str = "") -> str:
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    # Names known from other tools (lora.rank -> lora_rank -> lora.r) beat spelling distance.
    for alias in (f"{section}_{key}", key):
        target = ALIASES.get(alias, ("", None))[0]
        if target.startswith(section + ".") and target.split(".")[1] not in close:
            close.insert(0, target.split(".")[1])
    return f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""


# ----------------------------------------------------------------------------- building

def _apply(cfg: Config, dotted: str, value: Any, where: str) -> None:
    """Set cfg.<section>.<key> = value after checking the key exists and the type fits."""
    parts = dotted.split(".")
    if len(parts) != 2:
        raise UserError(f"{where}: key {dotted!r} must look like section.key (sections: {', '.join(SECTIONS)})")
    section, key = parts
    if section not in SECTIONS:
        raise UserError(f"{where}: unknown section {section!r}; {_suggest(section, list(SECTIONS))}"
                        f"valid sections: {', '.join(SECTIONS)}")
    sec_obj = getattr(cfg, section)
    hints = _hints(type(sec_obj))
    if key not in hints:
        valid = list(hints)
        raise UserError(f"{where}: unknown key {section}.{key}; {_suggest(key, valid, section)}"
                        f"valid keys in {section}: {', '.join(valid)}")
    tp = hints[key]
    out = _coerce(value, tp)
    if out is _NO:
        raise UserError(f"{where}: {section}.{key} = {value!r} ({type(value).__name__}) is not a valid value; "
                        f"expected {_type_name(tp)}")
    setattr(sec_obj, key, out)


def _flatten(raw: dict, where: str) -> list[tuple[str, Any]]:
    """YAML mapping -> [(section.key, value)], resolving aliases; rejects non-mapping sections."""
    items: list[tuple[str, Any]] = []
    for name, body in raw.items():
        if not isinstance(name, str):
            raise UserError(f"{where}: top-level key {name!r} must be a string section name ({', '.join(SECTIONS)})")
        if name in SECTIONS:
            if body is None:
                continue  # an empty section keeps its defaults
            if not isinstance(body, dict):
                raise UserError(f"{where}: section {name!r} must be a mapping of keys, got {type(body).__name__} {body!r}")
            for k, v in body.items():
                items.append((f"{name}.{k}", v))
        elif name in ALIASES:
            target, transform = ALIASES[name]
            items.append((target, transform(body) if transform else body))
        else:
            raise UserError(f"{where}: unknown section {name!r}; {_suggest(name, list(SECTIONS) + list(ALIASES))}"
                            f"valid sections: {', '.join(SECTIONS)}")
    return items


def parse_override(text: str) -> tuple[str, Any]:
    """'lora.r=32' -> ('lora.r', 32). The value follows YAML scalar rules (true, null, 1e-4, [a, b]).

    For keys that take text, a value YAML reads as something else ("Q: why?" is a mapping, 1234 an
    int) or cannot read at all is kept as the literal string, so prompts and revisions need no quoting.
    """
    if "=" not in text:
        raise UserError(f"--set {text!r}: expected KEY=VALUE, e.g. --set lora.r=32")
    key, _, raw = text.partition("=")
    key = key.strip()
    if key in ALIASES:
        key, transform = ALIASES[key]
    else:
        transform = None
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        if _takes_str(key):
            return key, raw
        raise UserError(f"--set {text!r}: value is not valid YAML ({str(e).splitlines()[0]})") from None
    if transform is not None:
        value = transform(value)
    if _takes_str(key) and raw.strip() and not isinstance(value, (str, list)) and value is not None:
        tp = _hints(SECTIONS[key.split(".")[0]])[key.split(".")[1]]
        if _coerce(value, tp) is _NO:
            return key, raw
    return key, value


def _takes_str(dotted: str) -> bool:
    """Does section.key accept free text (str, or str | null, or str | list)?"""
    section, _, key = dotted.partition(".")
    cls = SECTIONS.get(section)
    if cls is None or key not in _hints(cls):
        return False
    tp = _hints(cls)[key]
    return tp is str or (typing.get_origin(tp) in (Union, types.UnionType) and str in typing.get_args(tp))


def _resolve_path(value: str, config_dir: Optional[Path]) -> str:
    """Relative paths resolve against the current directory first, then the config file's directory.
    Paths found nowhere are left as written (a hub id, or an output dir not created yet)."""
    p = Path(value).expanduser()
    if p.is_absolute():
        return str(p)
    if p.exists():
        return str(p.resolve())
    if config_dir is not None and (config_dir / p).exists():
        return str((config_dir / p).resolve())
    return value


def _resolve_paths(cfg: Config, config_dir: Optional[Path]) -> None:
    for section in SECTIONS:
        sec = getattr(cfg, section)
        for f in dataclasses.fields(sec):
            v = getattr(sec, f.name)
            if f.metadata.get("path") and isinstance(v, str) and v:
                setattr(sec, f.name, _resolve_path(v, config_dir))
    tmpl = cfg.data.chat_template
    if tmpl and "{" not in tmpl:  # a path to a template file rather than an inline template
        cfg.data.chat_template = _resolve_path(tmpl, config_dir)


def config_from_dict(raw: dict, overrides: list[str] = (), *, where: str = "<config>",
                     config_dir: Optional[Path] = None) -> Config:
    """Build and validate a Config from a parsed YAML mapping plus `section.key=value` overrides."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected a mapping of sections ({', '.join(SECTIONS)}), got {type(raw).__name__}")
    cfg = Config()
    for dotted, value in _flatten(raw, where):
        _apply(cfg, dotted, value, where)
    for text in overrides:
        key, value = parse_override(text)
        _apply(cfg, key, value, f"--set {text}")
    _resolve_paths(cfg, config_dir)
    validate_config(cfg, where)
    return cfg


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (None = the bundled configs/tiny.yaml), apply overrides, validate."""
    path = Path(path) if path is not None else default_config_path()
    if not path.is_file():
        raise UserError(f"{path}: config file not found" if not path.exists() else f"{path}: not a file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f":{mark.line + 1}" if mark is not None else ""
        msg = " ".join(str(getattr(e, "problem", None) or e).split())
        raise UserError(f"{path}{at}: invalid YAML ({msg})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file") from None
    return config_from_dict(raw, overrides, where=str(path), config_dir=path.resolve().parent)


# ----------------------------------------------------------------------------- validation

def validate_config(cfg: Config, where: str = "<config>") -> None:
    """Range and consistency checks that types alone cannot express."""

    def bad(key: str, value: Any, expected: str) -> UserError:
        return UserError(f"{where}: {key} = {value!r} is out of range; expected {expected}")

    m, q, lo, d, t = cfg.model, cfg.quant, cfg.lora, cfg.data, cfg.train
    if not m.name_or_path:
        raise UserError(f"{where}: model.name_or_path is required (a hub id or a local model directory)")
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", m.device):
        raise bad("model.device", m.device, "auto, cpu, cuda or cuda:N")
    if q.bits not in (4, None):
        raise bad("quant.bits", q.bits, "4 (NF4) or null (no quantization)")
    if lo.r <= 0:
        raise bad("lora.r", lo.r, "an integer > 0")
    if not (lo.alpha > 0 and math.isfinite(lo.alpha)):
        raise bad("lora.alpha", lo.alpha, "a number > 0")
    if not 0 <= lo.dropout < 1:
        raise bad("lora.dropout", lo.dropout, "0 <= dropout < 1")
    if isinstance(lo.targets, list):
        if not lo.targets or not all(lo.targets):
            raise bad("lora.targets", lo.targets, "a non-empty list of module name suffixes")
    elif lo.targets != "all-linear":
        if not lo.targets:
            raise bad("lora.targets", lo.targets, "all-linear, a list of names or a regex")
        try:
            re.compile(lo.targets)
        except re.error as e:
            raise UserError(f"{where}: lora.targets = {lo.targets!r} is not a valid regex ({e})") from None
    if not d.train_file:
        raise UserError(f"{where}: data.train_file is required (a local data file or a hub dataset name)")
    if d.max_seq_len <= 0:
        raise bad("data.max_seq_len", d.max_seq_len, "an integer > 0")
    if not (d.eval_size >= 0 and math.isfinite(d.eval_size)) or (d.eval_size >= 1 and d.eval_size != int(d.eval_size)):
        raise bad("data.eval_size", d.eval_size, "0, a fraction 0 < x < 1, or a whole row count >= 1")
    if d.eval_size and (d.eval_file or d.eval_split):
        raise UserError(f"{where}: data.eval_size = {d.eval_size} conflicts with data.eval_file/eval_split; set one of them")
    if d.num_eval_samples < 0:
        raise bad("data.num_eval_samples", d.num_eval_samples, "an integer >= 0")
    if d.format == "text" and d.train_on_prompt:
        pass  # text has no prompt: every token is trained anyway
    if t.max_steps is not None and t.max_steps <= 0:
        raise bad("train.max_steps", t.max_steps, "an integer > 0, or null to train by epochs")
    for key in ("epochs", "micro_batch_size", "gradient_accumulation_steps", "log_every", "max_new_tokens"):
        if getattr(t, key) < 1:
            raise bad(f"train.{key}", getattr(t, key), "an integer >= 1")
    for key in ("eval_every", "save_every", "keep_last"):
        if getattr(t, key) < 0:
            raise bad(f"train.{key}", getattr(t, key), "an integer >= 0")
    if not (t.lr > 0 and math.isfinite(t.lr)):
        raise bad("train.lr", t.lr, "a number > 0")
    if not t.weight_decay >= 0:
        raise bad("train.weight_decay", t.weight_decay, "a number >= 0")
    if not 0 <= t.warmup_ratio < 1:
        raise bad("train.warmup_ratio", t.warmup_ratio, "0 <= warmup_ratio < 1")
    if not t.max_grad_norm >= 0:
        raise bad("train.max_grad_norm", t.max_grad_norm, "a number >= 0 (0 = no clipping)")
    if not cfg.output.dir:
        raise UserError(f"{where}: output.dir is required")


# ----------------------------------------------------------------------------- saving / describing

def config_to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """Plain nested dict (YAML/JSON-safe) of every field, sections in declaration order."""
    return {name: dataclasses.asdict(getattr(cfg, name)) for name in SECTIONS}


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically (temp file next to the target, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False, allow_unicode=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _fmt_default(v: Any) -> str:
    return "null" if v is None else yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()


def config_keys() -> list[tuple[str, str, str, str]]:
    """[(section.key, type, default, help)] for every field, in declaration order."""
    rows = []
    for section, cls in SECTIONS.items():
        hints = _hints(cls)
        defaults = cls()
        for f in dataclasses.fields(cls):
            rows.append((f"{section}.{f.name}", _type_name(hints[f.name]),
                         _fmt_default(getattr(defaults, f.name)), f.metadata["help"]))
    return rows


def describe_config() -> str:
    """Every config key with its type, default and one-line description (`qlora-lite train --list-keys`)."""
    rows = config_keys()
    lines = []
    for section, cls in SECTIONS.items():
        lines.append(f"{section}:  # {(cls.__doc__ or '').strip()}")
        for key, tp, default, help in rows:
            if key.startswith(section + "."):
                lines.append(f"  {key}: {tp} = {default}")
                lines.append(f"      {help}")
        lines.append("")
    lines.append("aliases (top-level keys or --set names, mapped onto the keys above):")
    lines += [f"  {a} -> {t}" for a, (t, _) in ALIASES.items()]
    return "\n".join(lines)


_DATA_FORMATS_DOC = """## Data formats

`data.train_file` / `data.eval_file` take `.jsonl` (one JSON object per line), `.json` (an array of
objects), `.csv` (header row; every cell is text) or `.parquet`, a local dataset directory, or a hub
dataset name such as `tatsu-lab/alpaca` (tried only when no local path of that name exists; the
split comes from `data.train_split` / `data.eval_split`).

| format | row | prompt (no loss) | response (loss) |
|---|---|---|---|
| `alpaca` | `{"instruction": ..., "input": ... (optional), "output": ...}` | the Stanford Alpaca template around instruction and input | output + EOS |
| `chat` | `{"messages": [{"role": "system"/"user"/"assistant"/"tool", "content": ...}, ...]}` | everything the chat template renders outside assistant turns | each assistant turn, with the template's end-of-turn marker (EOS appended if the template has none) |
| `text` | `{"text": ...}` | none | every token + EOS |

- BOS is added when the tokenizer's own encoding adds one (never twice when a chat template writes it).
- `data.train_on_prompt: true` puts the loss on prompt tokens as well.
- Examples longer than `data.max_seq_len` are cut at the end and counted; an example whose prompt
  alone fills the window has nothing to learn and is dropped (and counted).
- A malformed row (bad JSON, missing or empty field, wrong type) stops loading with `file:line`
  (`file:row N` for parquet and hub data); `data.on_bad_row: skip` skips and counts such rows
  instead. An empty dataset, or one where every row was skipped, is an error.
- Evaluation rows come from `data.eval_file`, else the hub split `data.eval_split`, else
  `data.eval_size` rows held out of the training data by a permutation seeded with `train.seed`.
- `data.packing: true` places whole examples, in order, into blocks of at most `max_seq_len`
  tokens. Labels stay masked per example, each example's first token is never a target, and
  position ids restart at 0 for each example; batches then carry no attention mask, so
  transformers builds a block-diagonal causal mask from the position ids and each example attends
  only to itself, exactly as if unpacked. Evaluation data is never packed.
- Batches are right-padded with the tokenizer's pad token (EOS when it has none); padding is
  masked out of attention and loss. The training order is a shuffle seeded by
  (`train.seed`, epoch), so a resumed run continues with exactly the batches it would have seen.
"""


def config_docs_markdown() -> str:
    """docs/config.md, generated from the dataclasses (tests check the file matches this)."""
    out = ["# Config reference", "",
           "<!-- Generated by `python -m qlora_lite.config --markdown docs/config.md`; do not edit by hand. -->", "",
           "A training run is one YAML file with the sections below (see `configs/` for examples).",
           "Any key can be overridden on the command line: `qlora-lite train cfg.yaml --set lora.r=32 "
           "--set train.lr=1e-4`; values follow YAML rules (`true`, `null`, `[q_proj, v_proj]`).",
           "Unknown keys, wrong types and out-of-range values are rejected with the file and key.",
           "Relative paths resolve against the current directory first, then the config file's directory.",
           "`qlora-lite train --list-keys` prints this table in the terminal.", ""]
    rows = config_keys()
    for section, cls in SECTIONS.items():
        out += [f"## `{section}`", "", (cls.__doc__ or "").strip(), "",
                "| key | type | default | description |", "|---|---|---|---|"]
        for key, tp, default, help in rows:
            if key.startswith(section + "."):
                out.append(f"| `{key}` | {tp.replace('|', chr(92) + '|')} | `{default}` | {help} |")
        out.append("")
    out += _DATA_FORMATS_DOC.splitlines() + [""]
    out += ["## Aliases", "",
            "Flat keys from axolotl, LLaMA-Factory and qlora.py configs are accepted at the top level "
            "(and in `--set`) and mapped onto the keys above:", "",
            "| alias | key |", "|---|---|"]
    out += [f"| `{a}` | `{t}` |" for a, (t, _) in ALIASES.items()]
    out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """`python -m qlora_lite.config [--markdown [PATH]]`: print or write the key reference."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--markdown"]:
        text = config_docs_markdown()
        if len(argv) > 1:
            target = Path(argv[1])
            tmp = target.with_name(f".{target.name}.tmp")
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, target)
        else:
            print(text, end="")
    else:
        print(describe_config())
    return 0


if __name__ == "__main__":
    sys.exit(main())
