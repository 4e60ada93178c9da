"""LoRA adapters (Hu et al. 2021) on linear, 4-bit linear, Conv1D and embedding layers.

    h = W0 x + (alpha / r) * B A x        W0 frozen; A [r, in], B [out, r]; rsLoRA: alpha / sqrt(r)

A is kaiming-uniform(a=sqrt(5)) and B is zero, so the model is unchanged at step 0; for
embeddings it is the reverse (A zero, B normal), as in the reference code. QLoRA is not a
separate class: the wrapped base is simply a ``Linear4bit``.

One ``LoRALayer`` can hold several named adapters over the same frozen base; one of them is
active. ``merge`` folds the active adapter into the weight for zero-latency inference; for a
4-bit base the merged weight is kept dense (dequantized + delta) beside the untouched 4-bit
codes, so ``unmerge`` restores the pre-merge outputs exactly instead of re-quantizing.

State dicts use PEFT's key layout (``base_model.model.<path>.lora_A.weight``), so adapters
move between qlora_lite and PEFT.
"""
from __future__ import annotations

import contextlib
import math
import re
from collections import defaultdict
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import UserError
from .quantize import Linear4bit, is_conv1d, is_linear_like

PEFT_PREFIX = "base_model.model."


# splitmix64 constants (as signed int64): a counter-based hash gives the dropout mask's random bits
_SM_GAMMA, _SM_M1, _SM_M2 = -7046029254386353131, -4658895280553007687, -7723592293110705685


def _shr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return z.bitwise_right_shift(k).bitwise_and_((1 << (64 - k)) - 1)


def keep_mask(shape, p: float) -> torch.Tensor:
    """Bernoulli(1 - p) bool mask from a splitmix64 hash of (one seed drawn from torch's generator,
    element index); 16 random bits per element, so p is realised to within 1/65536.

    On CPU, torch draws dropout masks one element at a time from its Mersenne twister (~5 ms for a
    512 x 1376 activation on 2 cores, 16% of a 45M-parameter QLoRA step); this vectorized hash
    takes a third of that. The seed comes from the default generator, so torch.manual_seed fixes the
    masks and activation checkpointing, which restores the RNG state, recomputes the same ones.
    """
    n = math.prod(shape)
    seed = int(torch.empty((), dtype=torch.int64).random_(-(2 ** 63), None))
    z = torch.arange((n + 3) // 4, dtype=torch.int64).mul_(_SM_GAMMA).add_(seed)
    z = z.bitwise_xor_(_shr(z, 30)).mul_(_SM_M1)
    z = z.bitwise_xor_(_shr(z, 27)).mul_(_SM_M2)
    z = z.bitwise_xor_(_shr(z, 31))
    return z.view(torch.int16)[:n].view(shape) >= round(p * 65536) - 32768


class LoRADropout(nn.Dropout):
    """nn.Dropout on the LoRA input path; on CPU with masks from `keep_mask` (much faster there),
    elsewhere torch's own kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, True)
        return (x * keep_mask(x.shape, self.p)).mul_(1.0 / (1.0 - self.p))


class LoRALayer(nn.Module):
    """Wraps ``base`` (nn.Linear, Linear4bit, Conv1D or nn.Embedding) with named LoRA adapters."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.is_embedding = isinstance(base, nn.Embedding)
        self.fan_in_fan_out = is_conv1d(base)   # Conv1D stores W as [in, out]
        if self.is_embedding:
            self.in_features, self.out_features = base.num_embeddings, base.embedding_dim
        elif isinstance(base, Linear4bit) or isinstance(base, nn.Linear):
            self.in_features, self.out_features = base.in_features, base.out_features
        else:  # Conv1D: weight [nx, nf]
            self.in_features, self.out_features = base.weight.shape
        self.lora_A = nn.ParameterDict()     # name -> [r, in]  (embedding: [r, num_embeddings])
        self.lora_B = nn.ParameterDict()     # name -> [out, r] (embedding: [dim, r])
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.hparams: dict[str, dict] = {}   # name -> r, alpha, dropout, use_rslora
        self.active_adapter: str | None = None
        self.disabled = False
        self.merged_adapter: str | None = None
        self.merged_weight: torch.Tensor | None = None  # dense merged weight of a 4-bit base
        self._premerge_weight: nn.Parameter | None = None  # an embedding's weight before merging

    # -- adapters ----------------------------------------------------------------------------
    def add_adapter(self, name: str, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                    dtype: torch.dtype | None = None) -> None:
        device = self._base_device()
        dtype = dtype or self._base_dtype()
        A = torch.empty(r, self.in_features, device=device, dtype=torch.float32)
        B = torch.empty(self.out_features, r, device=device, dtype=torch.float32)
        if self.is_embedding:
            nn.init.zeros_(A)
            nn.init.normal_(B)
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            nn.init.zeros_(B)
        self.lora_A[name] = nn.Parameter(A.to(dtype))
        self.lora_B[name] = nn.Parameter(B.to(dtype))
        self.lora_dropout[name] = LoRADropout(dropout) if dropout > 0 and not self.is_embedding else nn.Identity()
        self.scaling[name] = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.hparams[name] = dict(r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora)
        if self.active_adapter is None:
            self.active_adapter = name

    def _base_device(self) -> torch.device:
        t = self.base.qweight if isinstance(self.base, Linear4bit) else self.base.weight
        return t.device

    def _base_dtype(self) -> torch.dtype:
        return self.base.compute_dtype if isinstance(self.base, Linear4bit) else self.base.weight.dtype

    def delta_weight(self, name: str | None = None) -> torch.Tensor:
        """(alpha/r) * B @ A in the base's [out, in] orientation (embedding: [num_embeddings, dim])."""
        name = name or self.active_adapter
        A, B = self.lora_A[name].float(), self.lora_B[name].float()
        delta = (B @ A) * self.scaling[name]                    # [out, in]
        return delta.t() if self.is_embedding else delta

    # -- merge --------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> None:
        if self.merged_adapter is not None or self.active_adapter is None:
            return
        name = self.active_adapter
        if isinstance(self.base, Linear4bit):
            self.merged_weight = (self.base.dequantize(torch.float32) + self.delta_weight(name)).to(self.base.compute_dtype)
        elif self.is_embedding:
            # Input embeddings are often tied to lm_head: merge into a new tensor (untying it while
            # merged) and keep the original to put back, so lm_head never changes.
            w = self.base.weight
            self._premerge_weight = w
            self.base.weight = nn.Parameter((w.float() + self.delta_weight(name)).to(w.dtype), requires_grad=False)
        else:
            w = self.base.weight
            delta = self.delta_weight(name)
            w.data = (w.data.float() + (delta.t() if self.fan_in_fan_out else delta)).to(w.dtype)
        self.merged_adapter = name

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged_adapter is None:
            return
        if isinstance(self.base, Linear4bit):
            self.merged_weight = None               # the 4-bit codes were never touched
        elif self.is_embedding:
            self.base.weight = self._premerge_weight   # the original (possibly tied) tensor, exactly
            self._premerge_weight = None
        else:
            w = self.base.weight
            delta = self.delta_weight(self.merged_adapter)
            w.data = (w.data.float() - (delta.t() if self.fan_in_fan_out else delta)).to(w.dtype)
        self.merged_adapter = None

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged_weight is not None:
            b = self.base
            out = F.linear(x.to(b.compute_dtype), self.merged_weight, b.bias).to(x.dtype)
        else:
            out = self.base(x)
        name = self.active_adapter
        if self.disabled and self.merged_adapter is not None:
            raise RuntimeError("adapters are merged: unmerge before disabling them")
        if name is None or self.disabled or self.merged_adapter is not None:
            return out
        A, B = self.lora_A[name], self.lora_B[name]
        if self.is_embedding:
            h = F.embedding(x, A.t(), padding_idx=self.base.padding_idx)      # (..., r)
        else:
            h = self.lora_dropout[name](x).to(A.dtype) @ A.t()               # (..., r)
        if h.dtype == out.dtype:
            # out + scaling * (h @ B.T) in one BLAS call: no [tokens, out] temporaries for the product
            # and its scaled copy (same saved tensors for backward as the unfused expression)
            return torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), B.t(),
                               alpha=self.scaling[name]).view(out.shape)
        return out + ((h @ B.t()) * self.scaling[name]).to(out.dtype)        # (..., out)

    def extra_repr(self) -> str:
        return f"adapters={list(self.lora_A.keys())}, active={self.active_adapter}, merged={self.merged_adapter}"


# -- injection --------------------------------------------------------------------------------
def _output_embedding(model: nn.Module):
    return model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    out_emb = _output_embedding(model)
    cands = []
    for name, mod in model.named_modules():
        if isinstance(mod, LoRALayer):
            cands.append((name, mod))
        elif (is_linear_like(mod) or isinstance(mod, nn.Embedding)) and not isinstance(
                _parent(model, name), LoRALayer):
            cands.append((name, mod))
    return [(n, m) for n, m in cands if m is not out_emb and getattr(m, "base", None) is not out_emb]


def _parent(model: nn.Module, name: str) -> nn.Module | None:
    parent_name = name.rpartition(".")[0]
    if not name:
        return None
    return model.get_submodule(parent_name) if parent_name else model


def _is_linear_target(mod: nn.Module) -> bool:
    base = mod.base if isinstance(mod, LoRALayer) else mod
    return is_linear_like(base)


def select_targets(model: nn.Module, targets: str | Sequence[str]) -> list[str]:
    """Module names that ``targets`` picks: "all-linear", a regex (full match), or a list of name suffixes."""
    cands = _candidates(model)
    if isinstance(targets, str) and targets == "all-linear":
        chosen = [n for n, m in cands if _is_linear_target(m)]
        if not chosen:
            raise UserError("the model has no linear layers to adapt (targets: all-linear)")
        return chosen
    if isinstance(targets, str):
        try:
            rx = re.compile(targets)
        except re.error as e:
            raise UserError(f"lora targets: {targets!r} is not a valid regular expression ({e})") from None
        chosen = [n for n, _ in cands if rx.fullmatch(n)]
    else:
        targets = list(targets)
        if not targets:
            raise UserError("lora targets: the list is empty (use 'all-linear' or name modules, e.g. [q_proj, v_proj])")
        chosen = [n for n, _ in cands if any(n == t or n.endswith("." + t) for t in targets)]
        missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n, _ in cands)]
        if missing and chosen:
            raise UserError(f"lora targets {missing} match no module; candidates: {', '.join(_suffixes(cands))}")
    if not chosen:
        raise UserError(f"lora targets {targets!r} match no module; candidates: {', '.join(_suffixes(cands))}")
    return chosen


def _suffixes(cands) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n, _ in cands})


def _check_hparams(r, alpha, dropout) -> None:
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise UserError(f"lora r must be a positive integer, got {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
        raise UserError(f"lora alpha must be a positive number, got {alpha!r}")
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout < 1:
        raise UserError(f"lora dropout must be in [0, 1), got {dropout!r}")


def add_lora(model: nn.Module, r: int = 16, alpha: float = 32, dropout: float = 0.05,
             targets: str | Sequence[str] = "all-linear", adapter_name: str = "default",
             use_rslora: bool = False, dtype: torch.dtype | None = None) -> nn.Module:
    """Wrap the target modules with LoRA and make ``adapter_name`` the active, trainable adapter.

    Call again with another ``adapter_name`` to put a second adapter on the same frozen base.
    ``dtype`` defaults to the base's compute dtype (bf16 on GPU, fp32 on CPU).
    """
    _check_hparams(r, alpha, dropout)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in select_targets(model, targets):
        mod = model.get_submodule(name)
        if not isinstance(mod, LoRALayer):
            wrapped = LoRALayer(mod)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, wrapped)
            mod = wrapped
        if adapter_name in mod.lora_A:
            raise UserError(f"adapter {adapter_name!r} already exists on {name}")
        mod.add_adapter(adapter_name, r, alpha, dropout, use_rslora, dtype)
        mod.train(model.training)   # new dropout modules follow the model's train/eval mode
    set_adapter(model, adapter_name)
    return model


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALayer)]


def adapter_names(model: nn.Module) -> list[str]:
    names: list[str] = []
    for _, m in lora_layers(model):
        names += [k for k in m.lora_A.keys() if k not in names]
    return names


def set_adapter(model: nn.Module, name: str) -> None:
    """Make ``name`` the active adapter everywhere; only its parameters require grad."""
    layers = lora_layers(model)
    if not any(name in m.lora_A for _, m in layers):
        raise UserError(f"no adapter named {name!r}; known: {adapter_names(model)}")
    for _, m in layers:
        if m.merged_adapter is not None and m.merged_adapter != name:
            raise RuntimeError("unmerge before switching adapters")
        m.active_adapter = name if name in m.lora_A else None
        for k in m.lora_A.keys():
            m.lora_A[k].requires_grad_(k == name)
            m.lora_B[k].requires_grad_(k == name)


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Run the plain base model inside the block (e.g. for a before-fine-tuning evaluation)."""
    layers = [m for _, m in lora_layers(model)]
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m in layers:
            m.disabled = False


def merge_lora(model: nn.Module) -> nn.Module:
    for _, m in lora_layers(model):
        m.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    for _, m in lora_layers(model):
        m.unmerge()
    return model


# -- state dicts in PEFT's layout --------------------------------------------------------------
def lora_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's keys (``...q_proj.lora_A.weight``, ``...embed.lora_embedding_A``)."""
    sd = {}
    for name, m in lora_layers(model):
        if adapter_name not in m.lora_A:
            continue
        if m.is_embedding:
            sd[f"{PEFT_PREFIX}{name}.lora_embedding_A"] = m.lora_A[adapter_name].detach()
            sd[f"{PEFT_PREFIX}{name}.lora_embedding_B"] = m.lora_B[adapter_name].detach()
        else:
            sd[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A[adapter_name].detach()
            sd[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B[adapter_name].detach()
    if not sd:
        raise UserError(f"the model has no adapter named {adapter_name!r}")
    return sd


_PEFT_KEY = re.compile(r"(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight|(.+)\.(lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?")


def parse_peft_key(key: str, where: str = "adapter") -> tuple[str, str]:
    """``base_model.model.<path>.lora_A.weight`` -> (path, "lora_A"); embeddings give "lora_embedding_A/B"."""
    k = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
    m = _PEFT_KEY.fullmatch(k)
    if not m:
        raise UserError(f"{where}: tensor {key!r} is not a LoRA A/B weight")
    return (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))


def load_lora_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], adapter_name: str = "default") -> None:
    """Copy PEFT-layout tensors into an adapter already added with ``add_lora`` (shapes must agree)."""
    layers = dict(lora_layers(model))
    seen = set()
    for key, t in sd.items():
        path, which = parse_peft_key(key)
        which = "lora_A" if which.endswith("A") else "lora_B"
        layer = layers.get(path)
        if layer is None or adapter_name not in layer.lora_A:
            raise UserError(f"adapter tensor {key!r} has no matching LoRA module in the model")
        param = getattr(layer, which)[adapter_name]
        if tuple(param.shape) != tuple(t.shape):
            raise UserError(f"adapter tensor {key!r} has shape {tuple(t.shape)}, the model expects {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(t.to(param.dtype))
        seen.add((path, which))
    expected = {(n, w) for n, l in layers.items() if adapter_name in l.lora_A for w in ("lora_A", "lora_B")}
    if expected - seen:
        missing = sorted(expected - seen)[:3]
        raise UserError(f"adapter is missing {len(expected - seen)} tensors, e.g. {missing}")


# -- summary ------------------------------------------------------------------------------------
def _human(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}" if unit == "B" else f"{n / div:.1f}{unit}"
    return str(int(n))


def stored_params(module: nn.Module) -> int:
    """Parameters the model represents: a 4-bit linear counts its in*out weights, not its packed bytes."""
    total = 0
    for m in module.modules():
        if isinstance(m, Linear4bit):
            total += m.weight_numel
        total += sum(p.numel() for p in m.parameters(recurse=False))
    return total


def trainable_summary(model: nn.Module) -> str:
    """One headline ("trainable 40.0M of 3.54B stored params (1.1%)") and a per-module-type table."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = stored_params(model)
    rows: dict[str, list] = defaultdict(lambda: [0, 0, 0, set()])  # count, base params, lora params, storage
    for name, m in lora_layers(model):
        kind = name.rsplit(".", 1)[-1]
        row = rows[kind]
        row[0] += 1
        row[1] += stored_params(m.base)
        row[2] += sum(p.numel() for p in m.parameters() if p.requires_grad)
        b = m.base
        row[3].add("nf4" if isinstance(b, Linear4bit) else str(b.weight.dtype).replace("torch.", ""))
    lines = [f"trainable {_human(trainable)} of {_human(total)} stored params ({100 * trainable / max(total, 1):.2f}%)"]
    if rows:
        head = f"{'module':<16}{'count':>7}{'base params':>14}{'storage':>10}{'LoRA params':>14}"
        lines += [head, "-" * len(head)]
        for kind, (count, base, lora, storage) in sorted(rows.items()):
            lines.append(f"{kind:<16}{count:>7}{_human(base):>14}{'/'.join(sorted(storage)):>10}{_human(lora):>14}")
    return "\n".join(lines)
