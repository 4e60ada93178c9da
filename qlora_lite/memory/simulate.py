"""Simulate a training step on fake tensors: a 7B step on a laptop, no GPU, no weights, no memory.

The model is the real transformers module tree built under FakeTensorMode (tensors carry shape,
dtype and device but no storage), prepared exactly as training prepares it (the project's
Linear4bit with plain uint8 buffers, add_lora, non-reentrant checkpointing). One forward,
backward and optimizer step run under torch's MemTracker, which adds up the storages every op
creates and frees, by category. bitsandbytes' matmul_4bit has fake kernels, so the 4-bit path,
including its transient dequantized weight, is simulated too.
"""
from __future__ import annotations

import time
import warnings

import torch

from .build import StateAdamW, prepare_for_method
from .estimate import Settings
from .measure import Measurement, run_tracked_steps

_TORCH_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _optimizer(params, st: Settings, dtype):
    params = [p for p in params if p.requires_grad]
    if st.optimizer in ("adamw", "adamw_torch"):
        return torch.optim.AdamW(params, lr=1e-4, foreach=bool(st.foreach_optimizer))
    # bitsandbytes optimizers cannot run on fake tensors: same state sizes, in-place update
    state_dtype = torch.uint8 if st.optimizer.endswith("8bit") else torch.float32
    return StateAdamW(params, state_dtype=state_dtype)


def simulate(model_spec, st: Settings, *, steps: int = 1, progress: bool = False) -> Measurement:
    """Run `steps` fake training steps of `model_spec` (preset / config path / dict) with settings `st`."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    import transformers

    from ..nf4 import dynamic_code
    from .arch import hf_config

    cfg = hf_config(model_spec)
    cfg._attn_implementation = "sdpa" if st.attn_impl == "flash_attention_2" else st.attn_impl
    dtype = torch.float32 if st.method == "full-mixed" else _TORCH_DTYPE[st.dtype]
    dynamic_code()  # computed (and cached) on real tensors: it reads values
    t0 = time.time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with FakeTensorMode(allow_non_fake_inputs=True):
            model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
            prepare_for_method(model, st, compute_dtype=dtype, fake=True)
            opt = _optimizer(model.parameters(), st, dtype)
            ids = torch.zeros(st.batch_size, st.seq_len, dtype=torch.long)
            batch = {"input_ids": ids, "labels": ids}
            if st.padded:  # a mask transformers cannot skip (its values are unknown to fake tensors)
                batch["attention_mask"] = torch.ones_like(ids)
            autocast = _TORCH_DTYPE[st.dtype] if st.method == "full-mixed" else None
            peaks = run_tracked_steps(model, opt, batch, steps=steps, autocast_dtype=autocast, progress=progress)
    peak_phase = max(peaks, key=lambda k: peaks[k]["total"])
    return Measurement(device="fake (FakeTensorMode + MemTracker)", method=st.method, steps=steps, phases=peaks,
                       peak_phase=peak_phase, peak_bytes=peaks[peak_phase]["total"], seconds=time.time() - t0)
