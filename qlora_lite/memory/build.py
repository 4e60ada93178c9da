"""Turn a transformers causal LM into the model one training method trains (for measure/simulate).

full: every parameter trainable. lora: base frozen, adapters on the target linears. qlora: every
linear but lm_head becomes the project's Linear4bit (plain uint8 buffers + a bitsandbytes
QuantState, so it also runs on fake tensors), then adapters, with the project's add_lora.
"""
from __future__ import annotations

import re

import torch
import torch.nn as nn

from .estimate import Settings


def _targets_match(name: str, targets) -> bool:
    short = name.rsplit(".", 1)[-1]
    if targets in ("all-linear", "all", None):
        return True
    if isinstance(targets, str):
        return re.search(targets, short) is not None
    return short in set(targets)


def _linears(model: nn.Module):
    head = model.get_output_embeddings()
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and mod is not head:
            yield name, mod


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


class StateAdamW(torch.optim.Optimizer):
    """AdamW whose moments live in a chosen dtype, updated in place (simulation stand-in for
    bitsandbytes' 32-bit optimizers, which keep fp32 states for 16-bit parameters and cannot run
    on fake tensors). Memory, not numerics, is the point: the update math is plain AdamW."""

    CHUNK = 1 << 24  # elements updated at a time

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, state_dtype=torch.float32):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.state_dtype = state_dtype

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            b1, b2 = g["betas"]
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["exp_avg"] = torch.zeros_like(p, dtype=self.state_dtype)
                    st["exp_avg_sq"] = torch.zeros_like(p, dtype=self.state_dtype)
                # in chunks, so the temporaries stay small as in bitsandbytes' fused kernel
                chunks = zip(*(t.view(-1).split(self.CHUNK) for t in (p, p.grad, st["exp_avg"], st["exp_avg_sq"])))
                for pc, gc, m, v in chunks:
                    gc = gc.to(self.state_dtype)
                    m.lerp_(gc, 1 - b1)
                    v.mul_(b2).addcmul_(gc, gc, value=1 - b2)
                    pc.add_((m / v.sqrt().add_(g["eps"])).to(pc.dtype), alpha=-g["lr"])
        return None


def prepare_for_method(model: nn.Module, st: Settings, *, compute_dtype=None, fake: bool = False,
                       backend: str = "auto") -> nn.Module:
    """Freeze / quantize / add adapters in place as `st.method` asks; enable checkpointing.

    fake=True: the model lives on fake tensors; 4-bit layers are empty shells of the right size
    (quantizing needs real values). Otherwise the weights are really NF4-quantized.
    """
    from ..lora import add_lora
    from ..quantize import Linear4bit, quantizable_linears, quantize_model, set_submodule

    cdt = compute_dtype or next(model.parameters()).dtype
    adt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[st.adapter_dtype] \
        if st.adapter_dtype else cdt
    if st.method.startswith("full"):
        model.requires_grad_(True)
    else:
        model.requires_grad_(False)
        if st.method == "qlora":
            if fake:
                for name in quantizable_linears(model):
                    lin = model.get_submodule(name)
                    k, d = lin.weight.shape[::-1] if not isinstance(lin, nn.Linear) else (lin.in_features,
                                                                                           lin.out_features)
                    if not isinstance(lin, nn.Linear):  # GPT-2 Conv1D keeps weight as [in, out]
                        k, d = lin.weight.shape
                    set_submodule(model, name, Linear4bit(k, d, lin.bias is not None,
                                                          compute_dtype=cdt, backend="bnb",
                                                          double_quant=st.double_quant))
            else:
                quantize_model(model, double_quant=st.double_quant, backend=backend, compute_dtype=cdt)
        targets = st.lora_targets if isinstance(st.lora_targets, str) else list(st.lora_targets)
        add_lora(model, r=st.lora_r, alpha=2.0 * st.lora_r, dropout=st.lora_dropout, targets=targets, dtype=adt)
    if st.grad_ckpt:
        import warnings
        with warnings.catch_warnings():  # transformers 5 renames it activation_checkpointing_enable
            warnings.simplefilter("ignore", FutureWarning)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    return model
