"""Adapters on disk in PEFT's layout: adapter_config.json + adapter_model.safetensors.

What qlora_lite writes, ``peft.PeftModel.from_pretrained`` reads, and the reverse: a LoRA adapter
trained with PEFT loads here to train further, merge or export. Options this project does not
implement (DoRA, per-layer rank patterns, trainable biases, ...) are refused with a clear message
rather than silently ignored.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from .errors import UserError
from .lora import add_lora, load_lora_state_dict, lora_layers, lora_state_dict, parse_peft_key

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def peft_config_dict(model: nn.Module, adapter_name: str = "default", base_model_name_or_path: str | None = None) -> dict:
    """An adapter_config.json for the adapter as it is on the model."""
    layers = [(n, m) for n, m in lora_layers(model) if adapter_name in m.hparams]
    if not layers:
        raise UserError(f"the model has no adapter named {adapter_name!r}")
    hp = layers[0][1].hparams[adapter_name]
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": hp["r"],
        "lora_alpha": hp["alpha"],
        "lora_dropout": hp["dropout"],
        "use_rslora": hp["use_rslora"],
        # Exact module paths (anchored regex) rather than suffixes, so PEFT wraps exactly what we did.
        "target_modules": "^(" + "|".join(sorted(n.replace(".", r"\.") for n, _ in layers)) + ")$",
        # GPT-2's Conv1D layers: PEFT must transpose when merging, also when ours were quantized
        "fan_in_fan_out": any(m.fan_in_fan_out or getattr(m.base, "from_conv1d", False) for _, m in layers),
        "bias": "none",
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": False,
        "revision": None,
    }


def _atomic_dir_write(out_dir: Path, write) -> None:
    """Write into a temp folder beside ``out_dir`` and swap it into place."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)   # mkdtemp makes it owner-only; the result should look like any mkdir
    try:
        write(tmp)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_adapter_files(directory: Path, model: nn.Module, adapter_name: str = "default",
                        base_model_name_or_path: str | None = None) -> None:
    """Write the two PEFT files into an existing (temporary) directory."""
    from safetensors.torch import save_file
    directory = Path(directory)
    sd = {k: v.detach().contiguous().cpu() for k, v in lora_state_dict(model, adapter_name).items()}
    save_file(sd, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    cfg = peft_config_dict(model, adapter_name, base_model_name_or_path)
    (directory / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")


def save_adapter(model: nn.Module, out_dir: str | Path, base_model_name_or_path: str | None = None,
                 adapter_name: str = "default") -> Path:
    """Save one adapter in PEFT's layout, atomically (a crash leaves any previous copy intact)."""
    out_dir = Path(out_dir)
    _atomic_dir_write(out_dir, lambda tmp: write_adapter_files(tmp, model, adapter_name, base_model_name_or_path))
    return out_dir


_UNSUPPORTED = {  # key: the value that means "not used"
    "use_dora": False, "layer_replication": None, "rank_pattern": {}, "alpha_pattern": {},
    "modules_to_save": None, "target_parameters": None, "layers_to_transform": None, "layers_pattern": None,
    "megatron_config": None, "loftq_config": {}, "lora_bias": False, "trainable_token_indices": None,
    # PEFT variants whose forward is not h = W0 x + s * B A x (activated LoRA, QA-LoRA pooling, routing, ...)
    "alora_invocation_tokens": None, "use_qalora": False, "arrow_config": None, "monteclora_config": None,
    "kasa_config": None, "use_bdlora": None,
}
# PEFT initialisations that also rewrite the base weights W0: the saved adapter only fits that modified
# base unless PEFT converted it on save (which resets init_lora_weights to true).
_INIT_MODIFIES_BASE = ("pissa", "olora", "corda", "loftq", "lora_ga")


def read_adapter(directory: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config, tensors) of a PEFT-layout adapter, validated; every problem is one UserError line."""
    d = Path(directory)
    cfg_path, w_path = d / CONFIG_NAME, d / WEIGHTS_NAME
    if not d.is_dir():
        raise UserError(f"{d}: no such adapter directory")
    if not cfg_path.is_file():
        raise UserError(f"{d}: not an adapter directory ({CONFIG_NAME} missing)")
    if not w_path.is_file():
        if (d / "adapter_model.bin").is_file():
            raise UserError(f"{d}: adapter_model.bin is a pickle; only {WEIGHTS_NAME} is read (a pickle can run code)")
        raise UserError(f"{d}: {WEIGHTS_NAME} missing")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{cfg_path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{cfg_path}: expected a JSON object, got {type(cfg).__name__}")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not supported (only LORA)")
    for key, unused in _UNSUPPORTED.items():
        val = cfg.get(key, unused)
        if val not in (unused, None, {}, [], False):
            raise UserError(f"{cfg_path}: {key}={val!r} is not supported by qlora_lite")
    if cfg.get("bias", "none") != "none":
        raise UserError(f"{cfg_path}: bias={cfg['bias']!r} is not supported (only 'none')")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_INIT_MODIFIES_BASE):
        raise UserError(f"{cfg_path}: init_lora_weights={init!r} changes the base weights too; save the adapter "
                        f"with PEFT's path_initial_model_for_weight_conversion to get a plain LoRA adapter")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in cfg:
            raise UserError(f"{cfg_path}: missing {key!r}")
    r, alpha = cfg["r"], cfg["lora_alpha"]
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise UserError(f"{cfg_path}: r={r!r}, expected a positive integer")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
        raise UserError(f"{cfg_path}: lora_alpha={alpha!r}, expected a positive number")
    try:
        from safetensors.torch import load_file
        tensors = load_file(str(w_path))
    except Exception as e:
        raise UserError(f"{w_path}: unreadable or truncated safetensors file ({str(e).splitlines()[0][:160]})") from None
    if not tensors:
        raise UserError(f"{w_path}: holds no tensors")
    return cfg, tensors


def adapter_module_paths(tensors: dict[str, torch.Tensor], where: str | Path = "adapter") -> set[str]:
    """Model module paths an adapter's tensors belong to (``base_model.model.`` stripped)."""
    return {parse_peft_key(key, str(where))[0] for key in tensors}


def load_adapter(model: nn.Module, directory: str | Path, adapter_name: str = "default") -> dict:
    """Add the adapter saved in ``directory`` to ``model`` (which holds the same base) and load its weights."""
    cfg, tensors = read_adapter(directory)
    # Wrap exactly the modules the file holds tensors for: target_modules may be suffixes or a regex
    # that PEFT narrowed further (exclude_modules, ...), and the tensors are what was trained.
    paths = sorted(adapter_module_paths(tensors, Path(directory) / WEIGHTS_NAME))
    targets = "^(" + "|".join(re.escape(p) for p in paths) + ")$"
    add_lora(model, r=int(cfg["r"]), alpha=float(cfg["lora_alpha"]), dropout=float(cfg.get("lora_dropout", 0.0)),
             targets=targets, adapter_name=adapter_name, use_rslora=bool(cfg.get("use_rslora", False)))
    load_lora_state_dict(model, tensors, adapter_name)
    return cfg
