"""Training-step benchmark: qlora_lite against the usual peer stack, side by side.

    python benchmarks/bench_train.py                        # CPU: tiny Llama and a 45M Llama (~10 min)
    python benchmarks/bench_train.py --models llama-45m --rounds 5
    python benchmarks/bench_train.py --device cuda --models llama-2-7b --seq-lens 512 2048   # on a GPU

The same model file, random-token batch, sequence length, LoRA rank/alpha/dropout/targets,
gradient checkpointing, optimizer (torch AdamW, lr 2e-4, grad-norm clip 0.3) and number of steps
run through

  ours  qlora_lite: load_model(quantize="nf4") + add_lora + enable_gradient_checkpointing (the
        reentrant kind, as the trainer uses in one process), and the trainer's own loss
        (train.token_loss_mean) and step;
  peer  transformers + PEFT + bitsandbytes: from_pretrained(quantization_config=BitsAndBytesConfig(
        nf4, double quant)), prepare_model_for_kbit_training, get_peft_model, model(labels=...).loss,
        with PEFT's defaults (reentrant checkpointing); peer-nr is the same with
        gradient_checkpointing_kwargs={"use_reentrant": False}.

Plain LoRA (16/32-bit base) and full fine-tuning (transformers alone) are measured for context, and
`ours-unfixed` is our QLoRA step as it was before profiling against the peer (logits +
F.cross_entropy instead of the fused chunked loss, torch's CPU dropout kernel on the LoRA input,
the adapter output as matmul + mul + add instead of one addmm, non-reentrant checkpointing),
to show what the fixes bought together.
Every measurement runs in a fresh process (memory figures must not leak between runs), and the
runs alternate ours, peer, ours, peer ... over `--rounds` rounds, so slow drift of the machine
hits both sides alike; the figures are medians over rounds of each run's median step time.

Per run: median step time and tokens/s over the timed steps; peak memory over those steps
(CPU: the process's peak resident set, reset after warm-up through /proc/self/clear_refs, and
the peak of live tensor bytes from torch's MemTracker over one extra step; CUDA: max allocated
and max reserved). Writes benchmarks/results/train_bench.json and train_bench.png.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"

# name -> (LlamaConfig kwargs | a model directory); batch x seq per model on CPU
MODELS = {
    "tiny": str(ROOT / "assets" / "tiny-base"),
    "llama-45m": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096,
                      tie_word_embeddings=False),
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096,
                       tie_word_embeddings=False),
}
# (impl, method): what each row is
RUNS = [("ours", "qlora"), ("peer", "qlora"), ("ours", "lora"), ("peer", "lora"), ("ours-unfixed", "qlora"),
        ("peer-nr", "qlora"), ("peer", "full")]


# ----------------------------------------------------------------------------- model files
def model_dir(name: str, cache: Path) -> str:
    """A model directory for `name`: the bundled tiny base, or a random-weight Llama built from a
    preset shape (bf16 safetensors, as real checkpoints ship), cached between runs."""
    spec = MODELS[name]
    if isinstance(spec, str):
        return spec
    out = cache / name
    if (out / "config.json").is_file():
        return str(out)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(**spec, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)      # a 7B model initialised in fp32 would need 27 GB
    try:
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):   # random init is fast on a GPU
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    tmp = cache / f".{name}.tmp"
    model.save_pretrained(tmp, max_shard_size="2GB")
    os.replace(tmp, out)
    return str(out)


# ----------------------------------------------------------------------------- one run (child process)
def _peak_rss_reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:    # "5" resets VmHWM (peak RSS) to the current RSS
        f.write("5")


def _vm(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return float(line.split()[1]) * 1024
    return float("nan")


def build(impl: str, method: str, path: str, device: str, dtype, r: int, alpha: float, dropout: float):
    """(model, step_loss_fn) for one side; step_loss_fn(batch) -> mean loss per label token."""
    import torch
    if impl in ("ours", "ours-unfixed"):
        from qlora_lite.lora import add_lora
        from qlora_lite.model import enable_gradient_checkpointing, load_model
        from qlora_lite.train import token_loss_mean
        model, _ = load_model(path, quantize="nf4" if method == "qlora" else None, double_quant=True,
                              compute_dtype=dtype, device=device, load_tokenizer=False)
        add_lora(model, r=r, alpha=alpha, dropout=dropout, targets="all-linear")
        enable_gradient_checkpointing(model, reentrant=impl == "ours")    # as the trainer does in one process
        fused = impl == "ours"
        if impl == "ours-unfixed":
            # what this step did before profiling against the peer: logits + F.cross_entropy, torch's
            # own CPU dropout (per-element Mersenne-twister masks) on the LoRA input, an unfused
            # adapter output and non-reentrant checkpointing
            import types

            from qlora_lite.lora import LoRADropout, LoRALayer
            for m in model.modules():
                if isinstance(m, LoRADropout):
                    m.forward = torch.nn.Dropout.forward.__get__(m)
                elif isinstance(m, LoRALayer):
                    m.forward = types.MethodType(_unfused_lora_forward, m)

        def loss_fn(batch):
            return token_loss_mean(model, batch, fused=fused)
    else:
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig
        kw = dict(dtype=dtype, device_map=device, attn_implementation="sdpa")
        if method == "qlora":
            kw["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype)
        model = AutoModelForCausalLM.from_pretrained(path, **kw)
        if method == "qlora":
            from peft import prepare_model_for_kbit_training
            # PEFT's defaults turn checkpointing on through torch's default, the reentrant kind (plus
            # enable_input_require_grads); peer-nr asks for the non-reentrant kind we use
            kw_gc = {"use_reentrant": False} if impl == "peer-nr" else None
            model = prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs=kw_gc)
        else:
            model.gradient_checkpointing_enable()                # transformers' default: non-reentrant
        if method in ("qlora", "lora"):
            from peft import LoraConfig, get_peft_model
            model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                                     target_modules="all-linear", task_type="CAUSAL_LM"))

        def loss_fn(batch):
            return model(**batch, use_cache=False).loss
    model.train()
    return model, loss_fn


def _unfused_lora_forward(self, x):
    """LoRALayer.forward before the adapter output was fused into one addmm."""
    out = self.base(x)
    name = self.active_adapter
    A, B = self.lora_A[name], self.lora_B[name]
    h = self.lora_dropout[name](x).to(A.dtype) @ A.t()
    return out + ((h @ B.t()) * self.scaling[name]).to(out.dtype)


def child(a) -> dict:
    import torch
    torch.set_num_threads(a.threads) if a.threads else None
    dev = torch.device(a.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    # what each side imports, before any tensor exists: the libraries' own share of the RSS
    import transformers.models.llama.modeling_llama  # noqa: F401
    if a.impl.startswith("ours"):
        import qlora_lite.lora, qlora_lite.model, qlora_lite.train  # noqa: F401,E401
    else:
        import peft  # noqa: F401
    if a.method == "qlora":
        import bitsandbytes  # noqa: F401  (both sides' 4-bit kernels)
    rss_libs = _vm("VmRSS")
    t0 = time.perf_counter()
    model, loss_fn = build(a.impl, a.method, a.path, a.device, dtype, a.r, a.alpha, a.dropout)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4)
    load_s = time.perf_counter() - t0
    vocab = model.config.vocab_size if hasattr(model, "config") else None
    g = torch.Generator().manual_seed(0)
    batches = []
    for i in range(4):
        ids = torch.randint(3, vocab, (a.batch, a.seq), generator=g).to(dev)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})

    def step(i):
        loss = loss_fn(batches[i % len(batches)])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    losses = [step(i) for i in range(a.warmup)]
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    else:
        import gc
        gc.collect()
        _peak_rss_reset()
    times = []
    for i in range(a.steps):
        t = time.perf_counter()
        losses.append(step(a.warmup + i))
        sync()
        times.append(time.perf_counter() - t)
    out = dict(impl=a.impl, method=a.method, load_s=load_s, step_times=times, losses=losses,
               median_step_s=statistics.median(times), tokens_per_s=a.batch * a.seq / statistics.median(times),
               trainable=sum(p.numel() for p in params))
    if dev.type == "cuda":
        out["peak_allocated"] = float(torch.cuda.max_memory_allocated(dev))
        out["peak_reserved"] = float(torch.cuda.max_memory_reserved(dev))
    else:
        out["peak_rss"] = _vm("VmHWM")
        out["rss_libs"] = rss_libs
        out["rss_above_libs"] = out["peak_rss"] - rss_libs
        if a.track:
            from qlora_lite.memory.measure import _phase_tracker
            mt = _phase_tracker()
            mt.track_external(model, opt, *batches[0].values())
            with mt:
                mt.reset_peak()
                mt.reset_mod_stats()
                step(0)
                out["peak_tensor_bytes"] = mt.peak()["total"]
    return out


# ----------------------------------------------------------------------------- orchestration
def run_child(impl, method, path, args, seq) -> dict:
    cmd = [sys.executable, __file__, "--child", "--impl", impl, "--method", method, "--path", path,
           "--device", args.device, "--dtype", args.dtype, "--batch", str(args.batch), "--seq", str(seq),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--r", str(args.r),
           "--alpha", str(args.alpha), "--dropout", str(args.dropout), "--threads", str(args.threads or 0)]
    if not args.track:
        cmd.append("--no-track")
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
    if p.returncode != 0 or not lines:
        raise SystemExit(f"{impl}/{method} failed:\n{p.stderr[-3000:]}")
    return json.loads(lines[-1])


def machine() -> dict:
    """CPU model, cores, GPU and the versions of the libraries a result depends on (those installed)."""
    import importlib.metadata as md

    import torch
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())
    out = dict(cpu=cpu, cores=os.cpu_count(), python=platform.python_version(), torch=torch.__version__)
    for lib in ("transformers", "peft", "bitsandbytes"):
        try:
            out[lib] = md.version(lib)
        except md.PackageNotFoundError:
            pass
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def summarize(rows: list[dict], mem_key: str) -> dict:
    """Median over rounds of each run's median step time and of its memory figures."""
    med = lambda k: statistics.median(r[k] for r in rows)   # noqa: E731
    out = dict(median_step_s=med("median_step_s"), tokens_per_s=med("tokens_per_s"),
               step_s_rounds=[r["median_step_s"] for r in rows], trainable=rows[0]["trainable"],
               final_loss=rows[0]["losses"][-1])
    for k in (mem_key, "peak_tensor_bytes", "peak_reserved", "rss_libs", "rss_above_libs"):
        if k in rows[0]:
            out[k] = med(k)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny", "llama-45m"], choices=list(MODELS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="compute dtype (default fp32 on CPU, bf16 on CUDA)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[256])
    ap.add_argument("--steps", type=int, default=6, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--runs", nargs="+", default=[f"{i}:{m}" for i, m in RUNS],
                    help="impl:method pairs to run (default: all)")
    ap.add_argument("--no-track", dest="track", action="store_false", help="skip the MemTracker step (CPU)")
    ap.add_argument("--out", default=str(RESULTS / "train_bench.json"))
    ap.add_argument("--tables", action="store_true", help="print the README tables from --out and exit")
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "qlora_lite_bench_models"))
    # child mode
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for k in ("--impl", "--method", "--path"):  # impl: ours | ours-unfixed | peer
        ap.add_argument(k, help=argparse.SUPPRESS)
    ap.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.dtype = a.dtype or ("bf16" if a.device.startswith("cuda") else "fp32")
    if a.device.startswith("cuda"):
        a.track = False
    if a.child:
        print(json.dumps(child(a)))
        return 0
    if a.tables:
        if not Path(a.out).is_file():
            ap.error(f"--tables: no results at {a.out}; run the benchmark first")   # one line, exit 2
        print(markdown(json.loads(Path(a.out).read_text())))
        return 0

    from tqdm import tqdm
    cache = Path(a.cache)
    cache.mkdir(parents=True, exist_ok=True)
    runs = [tuple(s.split(":")) for s in a.runs]
    mem_key = "peak_allocated" if a.device.startswith("cuda") else "peak_rss"
    result = dict(machine=machine(), command="python benchmarks/bench_train.py " + " ".join(argv or sys.argv[1:]),
                  settings=dict(device=a.device, dtype=a.dtype, batch=a.batch, r=a.r, alpha=a.alpha,
                                dropout=a.dropout, targets="all-linear", steps=a.steps, warmup=a.warmup,
                                rounds=a.rounds, optimizer="torch AdamW lr 2e-4, clip 0.3",
                                gradient_checkpointing="ours non-reentrant; peer qlora: PEFT default "
                                "(reentrant); peer-nr: non-reentrant; peer lora/full: transformers default "
                                "(non-reentrant)"),
                  cases=[])
    bar = tqdm(total=len(a.models) * len(a.seq_lens) * a.rounds * len(runs), desc="runs", unit="run")
    for name in a.models:
        path = model_dir(name, cache)
        for seq in a.seq_lens:
            per = {f"{i}:{m}": [] for i, m in runs}
            for rnd in range(a.rounds):
                # alternate the order inside each pair from round to round: A B, B A, A B ...
                order = runs if rnd % 2 == 0 else [x for pair in zip(runs[1::2], runs[0::2]) for x in pair] + (
                    runs[-1:] if len(runs) % 2 else [])
                for impl, method in order:
                    bar.set_postfix_str(f"{name} s{seq} {impl}:{method}")
                    per[f"{impl}:{method}"].append(run_child(impl, method, path, a, seq))
                    bar.update(1)
            case = dict(model=name, seq_len=seq, batch=a.batch, rows={k: summarize(v, mem_key) for k, v in per.items()})
            for k_o, o in case["rows"].items():
                for k_p, p in case["rows"].items():
                    if k_o.startswith("ours") and k_p.startswith("peer") and k_o.split(":")[1] == k_p.split(":")[1]:
                        case[f"ratio {k_o} / {k_p}"] = {k: o[k] / p[k] for k in (
                            "median_step_s", mem_key, "rss_above_libs", "peak_tensor_bytes", "peak_reserved")
                            if k in o and k in p}
            result["cases"].append(case)
            tqdm.write(format_case(case, mem_key))
    bar.close()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    plot(result, out.with_suffix(".png"), mem_key)
    print(markdown(result))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def format_case(case: dict, mem_key: str) -> str:
    mib = 2 ** 20
    cols = [("median_step_s", "step s", 1, ".3f"), ("tokens_per_s", "tok/s", 1, ".0f"),
            (mem_key, mem_key.replace("_", " ") + " MiB", mib, ".0f"), ("rss_libs", "libs MiB", mib, ".0f"),
            ("rss_above_libs", "above libs MiB", mib, ".0f"), ("peak_tensor_bytes", "tensors MiB", mib, ".1f"),
            ("peak_reserved", "reserved MiB", mib, ".0f")]
    cols = [c for c in cols if any(c[0] in r for r in case["rows"].values())]
    lines = [f"\n{case['model']}, batch {case['batch']} x {case['seq_len']}",
             f"{'run':<20}" + "".join(f"{c[1]:>16}" for c in cols)]
    for k, r in case["rows"].items():
        lines.append(f"{k:<20}" + "".join(f"{r[c[0]] / c[2]:>16{c[3]}}" if c[0] in r else f"{'-':>16}" for c in cols))
    for k in case:
        if k.startswith("ratio "):
            lines.append(f"{k[6:]}: " + ", ".join(f"{m} {v:.2f}x" for m, v in case[k].items()))
    return "\n".join(lines)


def markdown(result: dict) -> str:
    """The README's tables: one per case, then the ratios."""
    mib = 2 ** 20
    cuda = result["settings"]["device"].startswith("cuda")
    out = []
    for case in result["cases"]:
        out.append(f"**{case['model']}, batch {case['batch']} x {case['seq_len']} tokens**\n")
        if cuda:
            out.append("| run | step (s) | tokens/s | peak allocated (MiB) | peak reserved (MiB) |\n|---|---|---|---|---|")
            for k, r in case["rows"].items():
                out.append(f"| {k} | {r['median_step_s']:.3f} | {r['tokens_per_s']:.0f} | "
                           f"{r['peak_allocated'] / mib:.0f} | {r['peak_reserved'] / mib:.0f} |")
        else:
            out.append("| run | step (s) | tokens/s | peak RSS (MiB) | of which libraries | peak RSS above libraries | "
                       "peak live tensors (MiB) |\n|---|---|---|---|---|---|---|")
            for k, r in case["rows"].items():
                out.append(f"| {k} | {r['median_step_s']:.3f} | {r['tokens_per_s']:.0f} | {r['peak_rss'] / mib:.0f} | "
                           f"{r['rss_libs'] / mib:.0f} | {r['rss_above_libs'] / mib:.0f} | "
                           f"{r['peak_tensor_bytes'] / mib:.1f} |")
        out.append("")
        ratios = [(k[6:], v) for k, v in case.items() if k.startswith("ratio ")]
        if ratios:
            keys = list(ratios[0][1])
            out.append("| ratio | " + " | ".join(k.replace("_", " ") for k in keys) + " |")
            out.append("|---|" + "---|" * len(keys))
            for name, v in ratios:
                out.append(f"| {name} | " + " | ".join(f"{v[k]:.2f}x" if k in v else "-" for k in keys) + " |")
            out.append("")
    return "\n".join(out)


def plot(result: dict, path: Path, mem_key: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cases = result["cases"]
    fig, axes = plt.subplots(len(cases), 2, figsize=(11, 3.2 * len(cases)), squeeze=False)
    for ax_row, case in zip(axes, cases):
        names = list(case["rows"])
        colors = ["lightsteelblue" if n.startswith("ours-unfixed") else "tab:blue" if n.startswith("ours")
                  else "silver" if n.startswith("peer-nr") else "tab:gray" for n in names]
        ax_row[0].barh(names, [case["rows"][n]["median_step_s"] for n in names], color=colors)
        ax_row[0].set_xlabel("median step time (s)")
        ax_row[1].barh(names, [case["rows"][n][mem_key] / 2 ** 20 for n in names], color=colors)
        ax_row[1].set_xlabel(("peak RSS" if mem_key == "peak_rss" else "peak allocated") + " (MiB)")
        for ax in ax_row:
            ax.invert_yaxis()
            ax.set_title(f"{case['model']}, {case['batch']} x {case['seq_len']} tokens", fontsize=9)
    fig.suptitle(f"training step, ours vs transformers+PEFT+bitsandbytes ({result['settings']['device']}, "
                 f"{result['settings']['dtype']})", fontsize=10)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


if __name__ == "__main__":
    from qlora_lite.errors import UserError
    try:
        sys.exit(main())
    except UserError as e:          # bad config path, key or value: one line, exit 2
        print(f"{Path(__file__).name}: {e}", file=sys.stderr)
        sys.exit(2)
