"""Measure the memory of real training steps on this device, in the estimate's categories.

On CUDA the peaks come from torch.cuda memory statistics (allocated, with reserved beside it);
on CPU from torch's live-tensor tracker (MemTracker), which sees every tensor storage an op
creates and sorts it into parameters, buffers, gradients, activations, temporaries and optimizer
states. The same code runs the fake-tensor simulation (simulate.py) with a 7B model and no memory.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn


PHASES = ("load", "forward", "backward", "optimizer step")

# MemTracker's reference types -> our categories
_MT_CATEGORY = {
    "Parameter": "weights",
    "Buffer": "weights",
    "Gradient": "gradients",
    "Optstate": "optimizer states",
    "Activation": "activations",
    "Temp": "transient",
    "Other": "inputs",
}


@dataclass
class Measurement:
    """Peak bytes per phase (and per category at that phase's peak) of a few real steps."""

    device: str  # where it ran, e.g. "cpu" or "cuda:0 (NVIDIA H100)"
    method: str  # full | full-mixed | lora | qlora
    steps: int  # steps run; peaks are taken over all of them (states exist from step 2 on)
    phases: dict = field(default_factory=dict)  # phase -> {"total": bytes, category: bytes}
    peak_phase: str = ""  # phase with the largest total
    peak_bytes: float = 0.0  # its total
    reserved_bytes: float = 0.0  # CUDA only: peak reserved by the caching allocator
    seconds: float = 0.0  # wall time of the steps

    def to_dict(self) -> dict:
        from dataclasses import asdict
        return asdict(self)


def peak_memory_snapshot(device: torch.device | str | None = None, reset: bool = False) -> dict:
    """Peak memory since the last reset, for the trainer's logs: {"peak_allocated_gib", ...}.

    CUDA: allocator statistics. CPU: this process's resident set size now and at its peak; no
    per-tensor peak is available there without a tracker.
    """
    dev = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    out = {"device": str(dev)}
    if dev.type == "cuda":
        out["peak_allocated_gib"] = torch.cuda.max_memory_allocated(dev) / 2 ** 30
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved(dev) / 2 ** 30
        out["allocated_gib"] = torch.cuda.memory_allocated(dev) / 2 ** 30
        if reset:
            torch.cuda.reset_peak_memory_stats(dev)
    else:
        import resource

        import psutil
        out["rss_gib"] = psutil.Process().memory_info().rss / 2 ** 30
        out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20   # KiB on Linux
    return out


# ------------------------------------------------------------------------------ the step
def _phase_tracker():
    """A MemTracker whose running peak can be reset between phases."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from torch.distributed._tools.mem_tracker import _MemRefType

    class PhaseTracker(MemTracker):
        def _update_peak_stats(self, peak_state) -> None:
            # only the global peak: MemTracker's per-module peaks cost a scan of every module on
            # every op, which dominates a 7B simulation
            for dev, dev_snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < dev_snap["Total"]:
                    self._peak_mem[dev] = dev_snap["Total"]
                    self._peak_mem_snap[dev] = dict(dev_snap)

        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            # MemTracker hooks every parameter's grad and fails on frozen ones (LoRA/QLoRA bases):
            # hook only the trainable ones.
            out = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
            if install_grad_hooks:
                def on_grad(g):
                    self._update_and_maybe_create_winfos(g, _MemRefType.GRAD)
                for p in module.parameters():
                    if p.requires_grad and self._param_to_grad_hook_handles.get(p, None) is None:
                        self._param_to_grad_hook_handles[p] = (
                            p.register_hook(on_grad),
                            p.register_post_accumulate_grad_hook(lambda q: on_grad(q.grad)))
            return out

        def reset_peak(self) -> None:
            # MemTracker keeps the running peak in these two fields; start a new phase from "now"
            self._peak_mem = {}
            self._peak_mem_snap = {}
            self._update_peak_stats(None)

        def peak(self) -> dict:
            snap = self.get_tracker_snapshot("peak")
            # the tracker's devices are CPU or fake-CPU; there is one
            d = next(iter(snap.values()), {})
            out = {"total": float(d.get("Total", 0))}
            for k, v in d.items():
                k = getattr(k, "value", k)
                if k in _MT_CATEGORY:
                    cat = _MT_CATEGORY[k]
                    out[cat] = out.get(cat, 0.0) + float(v)
            return out

    return PhaseTracker()


def make_batch(vocab_size: int, batch_size: int, seq_len: int, device="cpu", padded: bool = False) -> dict:
    """Random token ids as inputs and labels; padded: the first row ends in padding (an attention
    mask with zeros, labels -100 there), as a padding collator would send."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=g).to(device)
    batch = {"input_ids": ids, "labels": ids.clone()}
    if padded:
        mask = torch.ones_like(ids)
        mask[0, seq_len - max(1, seq_len // 4):] = 0
        batch["attention_mask"] = mask
        batch["labels"][mask == 0] = -100
    return batch


def make_optimizer(params, name: str, lr: float = 1e-4):
    """The optimizer a Settings names, over `params` (torch AdamW on CPU for the 32-bit kinds
    when bitsandbytes' CPU optimizers are unwanted is decided by the caller)."""
    params = [p for p in params if p.requires_grad]
    if name in ("adamw", "adamw_torch"):
        return torch.optim.AdamW(params, lr=lr)
    import bitsandbytes as bnb
    cls = {"adamw_32bit": bnb.optim.AdamW32bit, "adamw_8bit": bnb.optim.AdamW8bit,
           "paged_adamw_32bit": bnb.optim.PagedAdamW32bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[name]
    return cls(params, lr=lr)


def _one_step(model, optimizer, batch, autocast_dtype=None, on_phase=None, loss_fn=None) -> None:
    """forward (loss) -> backward -> optimizer step; on_phase(name) after each phase. The loss is
    transformers' own (model(**batch).loss), or loss_fn(model, batch) (the trainer's fused loss)."""
    dev_type = next(iter(batch.values())).device.type
    ctx = torch.autocast(dev_type, dtype=autocast_dtype) if autocast_dtype is not None else _nullcontext()
    with ctx:
        out = loss_fn(model, batch) if loss_fn is not None else model(**batch)
    loss = out if loss_fn is not None else out.loss
    if on_phase:
        on_phase("forward")
    loss.backward()
    if on_phase:
        on_phase("backward")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    del out, loss
    if on_phase:
        on_phase("optimizer step")


@torch.no_grad()
def prime_optimizer(optimizer) -> None:
    """Create the optimizer states with one step on zero gradients (no forward/backward needed),
    so the tracked step is a steady-state one: states exist from the previous step."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def run_tracked_steps(model: nn.Module, optimizer, batch: dict, steps: int = 1, *, warmup: int = 0,
                      autocast_dtype=None, progress: bool = False, loss_fn=None) -> dict:
    """Prime the optimizer's states and run `warmup` untracked steps, then `steps` steps under the
    live-tensor tracker; peak per phase over the tracked steps.

    Returns phase -> {"total": bytes, category: bytes}. The model, optimizer and batch may be
    real (CPU) or fake tensors (simulation): the tracker counts storages either way.
    """
    it = range(warmup + steps)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="steps", unit="step", leave=False)
    it = iter(it)
    prime_optimizer(optimizer)
    for _ in range(warmup):
        next(it)
        _one_step(model, optimizer, batch, autocast_dtype, loss_fn=loss_fn)
    mt = _phase_tracker()
    mt.track_external(model, optimizer, *batch.values())
    peaks: dict[str, dict] = {}

    def record(name: str) -> None:
        p = mt.peak()
        if p["total"] >= peaks.get(name, {"total": -1})["total"]:
            peaks[name] = p
        mt.reset_peak()

    with mt:
        mt.reset_peak()
        record("load")
        for _ in it:
            mt.reset_mod_stats()  # MemTracker refuses a module's second forward otherwise
            _one_step(model, optimizer, batch, autocast_dtype, on_phase=record, loss_fn=loss_fn)
    return peaks


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def run_cuda_steps(model, optimizer, batch, steps: int = 1, autocast_dtype=None, loss_fn=None) -> tuple[dict, float]:
    """The same phases on CUDA from the caching allocator's statistics: peak allocated per phase
    over `steps` steady-state steps (optimizer states primed first), and the peak reserved."""
    dev = next(model.parameters()).device
    prime_optimizer(optimizer)
    torch.cuda.synchronize(dev)
    peaks = {"load": {"total": float(torch.cuda.memory_allocated(dev))}}
    torch.cuda.reset_peak_memory_stats(dev)

    def record(name: str) -> None:
        torch.cuda.synchronize(dev)
        tot = float(torch.cuda.max_memory_allocated(dev))
        if tot >= peaks.get(name, {"total": -1.0})["total"]:
            peaks[name] = {"total": tot}
        reserved[0] = max(reserved[0], float(torch.cuda.max_memory_reserved(dev)))
        torch.cuda.reset_peak_memory_stats(dev)

    reserved = [0.0]
    for _ in range(steps):
        _one_step(model, optimizer, batch, autocast_dtype, on_phase=record, loss_fn=loss_fn)
    return peaks, reserved[0]


def split_static(model, optimizer) -> dict:
    """Bytes of weights / adapters / grads / optimizer states held by the model and optimizer now."""
    seen, out = set(), {"weights": 0.0, "LoRA adapters": 0.0, "optimizer states": 0.0}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        key = "LoRA adapters" if "lora_" in name else "weights"
        out[key] += t.numel() * t.element_size()
    for st in optimizer.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                out["optimizer states"] += v.numel() * v.element_size()
    return out
