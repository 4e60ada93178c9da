"""Where a training step spends its time: torch.profiler over a few steps of one side of bench_train.

    python benchmarks/profile_step.py --impl ours --model llama-45m
    python benchmarks/profile_step.py --impl peer --model llama-45m --sort self_cpu_time_total --rows 30

Prints the operator table (self time, calls) after warm-up steps; --trace writes a Chrome trace.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_train import MODELS, build, model_dir  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impl", choices=["ours", "ours-unfixed", "peer"], default="ours")
    ap.add_argument("--method", choices=["qlora", "lora", "full"], default="qlora")
    ap.add_argument("--model", choices=list(MODELS), default="llama-45m")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--sort", default="self_cpu_time_total")
    ap.add_argument("--trace", default=None, help="write a Chrome trace here")
    a = ap.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile
    path = model_dir(a.model, Path(tempfile.gettempdir()) / "qlora_lite_bench_models")
    model, loss_fn = build(a.impl, a.method, path, "cpu", torch.float32, 16, 32.0, 0.05)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4)
    ids = torch.randint(3, model.config.vocab_size, (a.batch, a.seq), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    def step():
        loss = loss_fn(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(a.steps):
            step()
    print(prof.key_averages().table(sort_by=a.sort, row_limit=a.rows))
    if a.trace:
        prof.export_chrome_trace(a.trace)
    return 0


if __name__ == "__main__":
    sys.exit(main())
