"""Resumable checkpoints, written atomically.

A checkpoint is a folder ``<output.dir>/checkpoint-<step>`` holding

    adapter_config.json, adapter_model.safetensors   the adapter, in PEFT's layout (exportable as is)
    training_state.pt                                optimizer, scheduler, RNG states, data position, step
    config.yaml                                      the resolved training config
    tokenizer files                                  as trained (a data.chat_template override included)

It is written into a hidden temp folder and renamed into place, so a crash mid-save never
leaves a half-written checkpoint that looks complete, and the previous one is untouched. Only
then are checkpoints beyond ``keep_last`` deleted. ``training_state.pt`` holds tensors and
plain Python values only and is read with ``torch.load(weights_only=True)``: opening a
checkpoint cannot execute code.
"""
from __future__ import annotations

import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .adapter import CONFIG_NAME, WEIGHTS_NAME, _atomic_dir_write, read_adapter, write_adapter_files
from .errors import UserError
from .lora import load_lora_state_dict

STATE_NAME = "training_state.pt"
_CKPT_RE = re.compile(r"checkpoint-(\d+)")


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_as_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_checkpoint(run_dir: Path, step: int, *, model, optimizer, scheduler, sampler_state: dict, cfg,
                    base_model: str, tokenizer=None, extra: dict | None = None, keep_last: int = 0) -> Path:
    """Write checkpoint-<step> atomically, then prune to ``keep_last`` (0 keeps all). Returns its path."""
    from .config import save_config

    out = Path(run_dir) / f"checkpoint-{step}"

    def write(tmp: Path) -> None:
        write_adapter_files(tmp, model, "default", base_model)
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "sampler": dict(sampler_state), "rng": rng_state(), "extra": extra or {}},
                   tmp / STATE_NAME)
        save_config(cfg, tmp / "config.yaml")
        if tokenizer is not None:       # with any chat template the run used, for export and serving
            tokenizer.save_pretrained(str(tmp))

    _atomic_dir_write(out, write)
    if keep_last > 0:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return out


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints in ``run_dir``, oldest first (temp folders and partial ones are ignored)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for p in run_dir.iterdir():
        m = _CKPT_RE.fullmatch(p.name)
        if m and p.is_dir() and all((p / f).is_file() for f in (STATE_NAME, CONFIG_NAME, WEIGHTS_NAME)):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def resolve_resume(resume: str, run_dir: Path) -> Path | None:
    """``auto``: the latest complete checkpoint in ``run_dir`` (None if there is none); else a path."""
    if resume == "auto":
        ckpts = list_checkpoints(run_dir)
        return ckpts[-1] if ckpts else None
    p = Path(resume)
    if not p.is_dir():
        raise UserError(f"--resume {resume}: no such checkpoint directory")
    if not (p / STATE_NAME).is_file():
        raise UserError(f"--resume {resume}: {STATE_NAME} missing (an adapter alone cannot resume optimizer, "
                        f"scheduler and data position)")
    return p


@dataclass
class TrainingState:
    step: int
    sampler: dict
    extra: dict


def load_checkpoint(path: Path, *, model, optimizer, scheduler) -> TrainingState:
    """Restore adapter weights, optimizer, scheduler and RNG states; return step and data position."""
    path = Path(path)
    _, tensors = read_adapter(path)
    load_lora_state_dict(model, tensors, "default")
    try:
        state = torch.load(path / STATE_NAME, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path / STATE_NAME}: unreadable training state ({str(e).splitlines()[0][:160]})") from None
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return TrainingState(step=int(state["step"]), sampler=state["sampler"], extra=state.get("extra", {}))
