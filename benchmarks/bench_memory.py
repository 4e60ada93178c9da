"""Memory profiler benchmark: estimate vs fake-tensor simulation vs published figures.

    python benchmarks/bench_memory.py                 # everything (~10-20 min on 2 CPU cores)
    python benchmarks/bench_memory.py --only published  # just the published-figure table (seconds)

Writes benchmarks/results/memory_bench.json and memory_llama-2-7b.png; benchmarks/README.md
("Memory profiler") holds the tables made from them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qlora_lite.memory.arch import build_meta_model, hf_config, model_facts  # noqa: E402
from qlora_lite.memory.estimate import GiB, NF4_BYTES_DQ, Settings, estimate_memory  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _write(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


# (model, settings): the first six are the headline comparison (seq 512, batch 1, checkpointing);
# the rest stress other parts of the count: long sequences without checkpointing, mixed
# precision, eager attention, 8-bit states with dropout, a sliding-window GQA model.
SIM_CASES = [(m, dict(method=meth, seq_len=512, batch_size=1)) for m in ("llama-2-7b", "llama-3-8b")
             for meth in ("full", "lora", "qlora")] + [
    ("llama-2-7b", dict(method="qlora", seq_len=2048, batch_size=2, grad_ckpt=False)),
    ("llama-2-7b", dict(method="qlora", seq_len=2048, batch_size=2)),
    ("llama-2-7b", dict(method="full-mixed", seq_len=512, batch_size=1)),
    ("llama-2-7b", dict(method="full", seq_len=1024, batch_size=2, grad_ckpt=False)),
    ("llama-2-7b", dict(method="lora", seq_len=1024, batch_size=1, grad_ckpt=False, attn_impl="eager")),
    ("llama-3-8b", dict(method="qlora", seq_len=1024, batch_size=4, optimizer="paged_adamw_8bit", lora_dropout=0.1)),
    ("mistral-7b", dict(method="qlora", seq_len=2048, batch_size=1, grad_ckpt=False)),
]


def simulation_rows(cases=SIM_CASES, out=None):
    """Estimate vs simulation with the same settings both ways (bf16, LoRA r16 on all linears,
    paged AdamW 32-bit, checkpointing and no dropout unless the case says otherwise); the
    estimate without CUDA context and allocator slack, since the tracker sees tensors only."""
    from qlora_lite.memory.simulate import simulate
    rows = []
    for m, kw in cases:
        st = Settings(**{**dict(lora_r=16, grad_ckpt=True, dtype="bf16", optimizer="paged_adamw_32bit",
                                device="cpu", lora_dropout=0.0), **kw})
        est = estimate_memory(m, **{k: v for k, v in st.__dict__.items()})
        t = time.time()
        sim = simulate(m, st, steps=1)
        extra = ", ".join(f"{k}={v}" for k, v in kw.items() if k not in ("method", "seq_len", "batch_size", "grad_ckpt"))
        row = dict(model=m, method=st.method, seq_len=st.seq_len, batch_size=st.batch_size, lora_r=st.lora_r,
                   grad_ckpt=st.grad_ckpt, extra=extra,
                   estimate_gib=est.tensor_peak_bytes / GiB, estimate_phase=est.peak_phase,
                   simulate_gib=sim.peak_bytes / GiB, simulate_phase=sim.peak_phase,
                   ratio=est.tensor_peak_bytes / sim.peak_bytes, seconds=time.time() - t,
                   simulate_phases={k: {c: v / GiB for c, v in d.items()} for k, d in sim.phases.items()},
                   estimate_phases={k: {c: v / GiB for c, v in d.items() if v} for k, d in est.phases.items()})
        print(f"{m:12s} {st.method:10s} s{st.seq_len} b{st.batch_size} ckpt={st.grad_ckpt!s:5s} {extra:30s} "
              f"estimate {row['estimate_gib']:7.2f} GiB ({est.peak_phase})  simulate {row['simulate_gib']:7.2f} GiB "
              f"({sim.peak_phase})  ratio {row['ratio']:.3f}  [{row['seconds']:.0f}s]", flush=True)
        rows.append(row)
        if out is not None:
            out["simulation"] = rows
            _write(RESULTS / "memory_bench.json", out)
    return rows


def published_rows():
    """Our estimate under each publication's settings, beside its figure."""
    rows = []
    f7 = model_facts("llama-2-7b")  # LLaMA-1 7B has the same shapes (vocab 32000, 32 x 4096, 11008)

    # QLoRA paper §2: LLaMA-7B 4-bit base 5,048 MB.
    nf4_linear = f7.linear_params * NF4_BYTES_DQ
    rest16 = (f7.total_params - f7.linear_params) * 2
    rows.append(dict(source="QLoRA paper §2", what="LLaMA-7B 4-bit base weights", published="5,048 MB",
                     published_bytes=5048e6, estimate_bytes=nf4_linear + rest16,
                     settings="NF4 + double quant linears, bf16 embeddings/lm_head/norms"))
    rest32 = (f7.total_params - f7.linear_params) * 4
    rows.append(dict(source="QLoRA paper §2", what="same, embeddings/lm_head/norms in fp32 (as qlora.py casts them)",
                     published="5,048 MB", published_bytes=5048e6, estimate_bytes=nf4_linear + rest32,
                     settings="NF4 + DQ linears, fp32 non-linear weights"))

    # QLoRA paper: LoRA input gradients 567 MB without checkpointing, 18 MB per sequence with it.
    # With checkpointing a layer keeps its input: L * s * h * 2 bytes; 18 MB <=> s ~ 69 tokens.
    s = round(18e6 / (f7.num_layers * f7.hidden_size * 2))
    e_no = estimate_memory(f7, method="qlora", seq_len=s, batch_size=1, lora_r=16, grad_ckpt=False, device="cpu",
                           lora_targets="all-linear", lora_dropout=0.1)
    ck_layers = f7.num_layers * s * f7.hidden_size * 2
    rows.append(dict(source="QLoRA paper §2", what=f"activations with checkpointing (layer inputs), s={s}",
                     published="18 MB", published_bytes=18e6, estimate_bytes=ck_layers,
                     settings=f"batch 1, seq {s} (the length at which L*s*h*2 = 18 MB), bf16"))
    rows.append(dict(source="QLoRA paper §2", what=f"activations without checkpointing, s={s}",
                     published="567 MB", published_bytes=567e6, estimate_bytes=e_no.activations_no_ckpt,
                     settings=f"batch 1, seq {s}, LoRA r16 all linears, dropout 0.1, sdpa"))
    e_eager = estimate_memory(f7, method="qlora", seq_len=s, batch_size=1, lora_r=16, grad_ckpt=False, device="cpu",
                              lora_dropout=0.1, attn_impl="eager")
    rows.append(dict(source="QLoRA paper §2", what="same, eager attention (2023 transformers)",
                     published="567 MB", published_bytes=567e6, estimate_bytes=e_eager.activations_no_ckpt,
                     settings=f"batch 1, seq {s}, eager attention"))

    # torchtune Llama-2-7B (rank 8, batch 2, activation checkpointing): QLoRA 9.29 GB, LoRA 15.57 GB
    # peak reserved. torchtune keeps LoRA weights in bf16 and uses torch AdamW (bf16 states).
    for meth, pub in (("qlora", 9.29e9), ("lora", 15.57e9)):
        for s in (512, 1024, 2048):
            e = estimate_memory(f7, method=meth, seq_len=s, batch_size=2, lora_r=8, grad_ckpt=True,
                                optimizer="adamw_torch", dtype="bf16", device="cuda", cuda_context_mib=0.0)
            rows.append(dict(source="torchtune", what=f"Llama-2-7B {meth.upper()} peak reserved, seq {s}",
                             published=f"{pub / 1e9:.2f} GB", published_bytes=pub, estimate_bytes=e.peak_bytes,
                             settings=f"r8 all linears, batch 2, checkpointing, bf16 adapters, torch AdamW, "
                                      f"seq {s}, +5% allocator slack, no CUDA context"))

    # accelerate estimate-memory: full fine-tuning with Adam, from the meta model's size.
    from accelerate.commands.estimate import calculate_maximum_sizes, estimate_training_usage
    for name in ("llama-2-7b", "llama-3-8b"):
        meta = build_meta_model(hf_config(name))
        total_fp32, _ = calculate_maximum_sizes(meta)
        for prec, ours in (("float32", None), ("bfloat16", "full-mixed")):
            usage = estimate_training_usage(total_fp32, prec)
            acc = sum(v for k, v in usage.items() if k != "step") if prec != "float32" else usage["step"]
            if ours is None:
                # fp32 weights + fp32 grads + fp32 AdamW states: our "full" with fp32 compute
                e = estimate_memory(name, method="full", seq_len=1, batch_size=1, dtype="fp32",
                                    optimizer="adamw_32bit", device="cpu")
            else:
                e = estimate_memory(name, method=ours, seq_len=1, batch_size=1, optimizer="adamw_32bit", device="cpu")
            rows.append(dict(source="accelerate estimate-memory", what=f"{name} full fine-tuning, {prec}",
                             published=f"{acc / GiB:.2f} GiB", published_bytes=acc, estimate_bytes=e.tensor_peak_bytes,
                             settings="batch 1, seq 1 (accelerate ignores activations), AdamW, no context"))
    for r in rows:
        r["ratio"] = r["estimate_bytes"] / r["published_bytes"]
        print(f"{r['source']:26s} {r['what'][:60]:60s} published {r['published']:>10s}  "
              f"estimate {r['estimate_bytes'] / 1e9:7.2f} GB  ratio {r['ratio']:.2f}")
    return rows


def markdown_tables(out: dict) -> str:
    """The README tables, from the results JSON."""
    lines = ["| model | method | seq x batch | ckpt | other | estimate GiB (phase) | simulated GiB (phase) | est / sim |",
             "|---|---|---|---|---|---|---|---|"]
    for r in out.get("simulation", []):
        lines.append(f"| {r['model']} | {r['method']} | {r['seq_len']} x {r['batch_size']} | "
                     f"{'on' if r.get('grad_ckpt', True) else 'off'} | {r.get('extra', '')} | "
                     f"{r['estimate_gib']:.2f} ({r['estimate_phase']}) | "
                     f"{r['simulate_gib']:.2f} ({r['simulate_phase']}) | {r['ratio']:.3f} |")
    lines += ["", "| source | figure | published | our estimate | est / published | settings |", "|---|---|---|---|---|---|"]
    for r in out.get("published", []):
        lines.append(f"| {r['source']} | {r['what']} | {r['published']} | {r['estimate_bytes'] / 1e9:.2f} GB "
                     f"({r['estimate_bytes'] / GiB:.2f} GiB) | {r['ratio']:.2f} | {r['settings']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["published", "simulation"], default=None)
    ap.add_argument("--tables", action="store_true", help="print the README tables from the saved results and exit")
    a = ap.parse_args(argv)
    if a.tables:
        print(markdown_tables(json.loads((RESULTS / "memory_bench.json").read_text())))
        return 0
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "memory_bench.json"
    out = json.loads(path.read_text()) if path.exists() else {}
    if a.only in (None, "published"):
        out["published"] = published_rows()
        _write(path, out)
    if a.only in (None, "simulation"):
        simulation_rows(out=out)
    from qlora_lite.memory.report import write_plot
    ests = {m: estimate_memory("llama-2-7b", method=m, seq_len=512, batch_size=1, lora_r=16)
            for m in ("full", "full-mixed", "lora", "qlora")}
    write_plot(ests, RESULTS / "memory_llama-2-7b.png", gpu_gb=24.0, title="Llama-2-7B, seq 512, batch 1, r16")
    sims = {r["method"]: {"peak_bytes": r["simulate_gib"] * GiB} for r in out.get("simulation", [])
            if r["model"] == "llama-2-7b" and r["seq_len"] == 2048 and r.get("grad_ckpt")}
    ests = {m: estimate_memory("llama-2-7b", method=m, seq_len=2048, batch_size=2, lora_r=16, lora_dropout=0.0)
            for m in ("lora", "qlora")}
    write_plot(ests, RESULTS / "memory_llama-2-7b-adapters.png", gpu_gb=24.0, measured=sims,
               title="Llama-2-7B adapters, seq 2048, batch 2, r16")
    return 0


if __name__ == "__main__":
    sys.exit(main())
