"""The QLoRA paper's central claim in miniature: a 4-bit NF4 base with LoRA adapters fine-tunes as
well as LoRA on a 16/32-bit base and as full fine-tuning.

    python benchmarks/bench_quality.py                 # 4 methods x 3 seeds on the bundled task (~25 min, 2 cores)
    python benchmarks/bench_quality.py --seeds 0 --steps 30 --eval-rows 16   # a quick look

From the bundled tiny pretrained base (assets/tiny-base) every method trains on the bundled
alpaca-format task (data/tiny) with configs/tiny.yaml's data, batch, schedule and step budget:

  full        every weight trainable, fp32 (lr --full-lr, 10x below LoRA's, as usual for full tuning)
  lora        LoRA r16 on all linears of the fp32 base
  qlora       LoRA r16 on an NF4 base with double quantization (the product's default)
  qlora-nodq  LoRA r16 on an NF4 base, absmax constants kept in fp32

One loop serves all four (the trainer's own loss, sampler, warmup + cosine schedule, clipping and
AdamW), so the model setup is the only difference. After training: eval loss over the whole eval
file and exact match of greedy answers on every eval row (--eval-rows to limit). Writes
benchmarks/results/quality_bench.json and quality_bench.png.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
RESULTS = ROOT / "benchmarks" / "results"
METHODS = ("full", "lora", "qlora", "qlora-nodq")


def run_one(method: str, seed: int, cfg, steps: int, full_lr: float, eval_rows: int) -> dict:
    import torch
    from accelerate.utils import set_seed

    from qlora_lite.data import BatchSampler, build_datasets, eval_examples, make_collator
    from qlora_lite.lora import add_lora
    from qlora_lite.model import enable_gradient_checkpointing, load_model
    from qlora_lite.tasks import exact_match, generate_answers
    from qlora_lite.train import evaluate_loss, lr_lambda, token_loss_sum

    t, d, lc = cfg.train, cfg.data, cfg.lora
    set_seed(seed)
    quant = "nf4" if method.startswith("qlora") else None
    model, tok = load_model(cfg.model.name_or_path, quantize=quant, double_quant=method != "qlora-nodq",
                            compute_dtype="fp32", device="cpu")
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        lr = full_lr
    else:
        add_lora(model, r=lc.r, alpha=lc.alpha, dropout=lc.dropout, targets=lc.targets)
        lr = t.lr
    enable_gradient_checkpointing(model, reentrant=True)      # as the trainer does in one process
    model.train()
    train_ds, eval_ds, _ = build_datasets(d, tok, seed)
    collate = make_collator(tok)
    sampler = BatchSampler(len(train_ds), t.micro_batch_size, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=t.weight_decay)
    warmup = int(round(t.warmup_ratio * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t.lr_scheduler, warmup, steps))
    t0 = time.perf_counter()
    losses = []
    for _ in range(steps):
        micro = [collate([train_ds[i] for i in sampler.next_batch()]) for _ in range(t.gradient_accumulation_steps)]
        n_all = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
        total = 0.0
        for b in micro:
            s, _ = token_loss_sum(model, b)
            (s / max(n_all, 1)).backward()
            total += float(s.detach())
        torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total / max(n_all, 1))
    train_s = time.perf_counter() - t0
    ev = evaluate_loss(model, eval_ds, collate, t.micro_batch_size, "cpu")
    pairs = eval_examples(d, seed, tok, limit=eval_rows)
    preds = generate_answers(model, tok, [p for p, _ in pairs], max_new_tokens=t.max_new_tokens)
    return dict(method=method, seed=seed, lr=lr, steps=steps, trainable=sum(p.numel() for p in params),
                final_train_loss=statistics.mean(losses[-10:]), eval_loss=ev["eval_loss"],
                exact_match=exact_match(preds, [a for _, a in pairs]), eval_rows=len(pairs), train_s=train_s,
                losses=losses)


def summarize(runs: list[dict]) -> dict:
    out = {}
    for m in METHODS:
        rs = [r for r in runs if r["method"] == m]
        if not rs:
            continue
        row = {}
        for k in ("eval_loss", "exact_match", "final_train_loss"):
            v = [r[k] for r in rs]
            row[k] = dict(mean=statistics.mean(v), std=statistics.stdev(v) if len(v) > 1 else 0.0,
                          min=min(v), max=max(v), values=v)
        row["trainable"] = rs[0]["trainable"]
        out[m] = row
    return out


def verdict(summary: dict) -> list[str]:
    """QLoRA against LoRA: is the gap of the means inside the seed-to-seed spread?"""
    lines = []
    if "lora" not in summary:
        return lines
    lo = summary["lora"]
    for m in ("qlora", "qlora-nodq", "full"):
        if m not in summary:
            continue
        for k in ("eval_loss", "exact_match"):
            gap = summary[m][k]["mean"] - lo[k]["mean"]
            spread = max(lo[k]["std"], summary[m][k]["std"])
            inside = abs(gap) <= max(spread, 1e-12)
            lines.append(f"{m} vs lora, {k}: gap {gap:+.4f}, seed std {spread:.4f} -> "
                         f"{'within the seed spread' if inside else 'OUTSIDE the seed spread'}")
    return lines


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    summ = result["summary"]
    ms = [m for m in METHODS if m in summ]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, k, label in ((axes[0], "eval_loss", "eval loss (lower is better)"),
                         (axes[1], "exact_match", "exact match (higher is better)")):
        for i, m in enumerate(ms):
            vals = summ[m][k]["values"]
            vals = [100 * v for v in vals] if k == "exact_match" else vals
            color = "tab:blue" if m.startswith("qlora") else "tab:gray"
            ax.scatter([i] * len(vals), vals, color=color, zorder=3)
            ax.hlines(statistics.mean(vals), i - 0.3, i + 0.3, color=color, lw=2, label="mean" if i == 0 else None)
        ax.set_xticks(range(len(ms)), ms)
        ax.set_xlim(-0.6, len(ms) - 0.4)
        ax.set_title(label + (" %" if k == "exact_match" else ""), fontsize=9)
        ax.legend(fontsize=8)
    for r in result["runs"]:
        axes[2].plot(r["losses"], lw=0.7, color={"full": "tab:gray", "lora": "tab:green", "qlora": "tab:blue",
                                                  "qlora-nodq": "tab:orange"}[r["method"]],
                     label=r["method"] if r["seed"] == result["seeds"][0] else None)
    axes[2].set_yscale("log")
    axes[2].set_title("train loss per step (all seeds)", fontsize=9)
    axes[2].legend(fontsize=8)
    fig.suptitle("tiny base on the bundled task: full fine-tuning vs LoRA vs QLoRA (points are seeds)", fontsize=10)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def absmax_noise_control(cfg, steps: int, full_lr: float, eval_rows: int, seed: int, noise_seeds, std: float) -> list:
    """A control for the double-quantization gap: the fp32-absmax (no double quant) base with its
    absmax constants multiplied by (1 + std * N(0, 1)), std = the relative error double quantization
    puts on them, trained with `seed`; one run per noise seed. If these runs move as far from the
    unperturbed one as double quantization does, the gap is the model's sensitivity to any change of
    its base, not an effect of double quantization."""
    import functools

    import torch

    import qlora_lite.model as qm
    from qlora_lite.quantize import Linear4bit
    load = qm.load_model
    out = []
    try:
        for ns in noise_seeds:
            def perturbed(*a, _ns=ns, **k):
                model, tok = load(*a, **k)
                g = torch.Generator().manual_seed(1000 + _ns)
                for mod in model.modules():
                    if isinstance(mod, Linear4bit):
                        mod.absmax.mul_(1 + std * torch.randn(mod.absmax.shape, generator=g))
                        mod._bnb_state = None
                return model, tok
            qm.load_model = functools.wraps(load)(perturbed)
            r = run_one("qlora-nodq", seed, cfg, steps, full_lr, eval_rows)
            out.append(dict(noise_seed=ns, seed=seed, std=std, eval_loss=r["eval_loss"], exact_match=r["exact_match"]))
    finally:
        qm.load_model = load
    return out


def dq_absmax_error(path: str) -> float:
    """Relative error (std) that double quantization puts on the absmax constants of `path`'s base."""
    import torch

    from qlora_lite.model import load_model
    from qlora_lite.quantize import Linear4bit
    a, _ = load_model(path, quantize="nf4", double_quant=False, compute_dtype="fp32", load_tokenizer=False)
    b, _ = load_model(path, quantize="nf4", double_quant=True, compute_dtype="fp32", load_tokenizer=False)
    errs = []
    for x, y in zip((m for m in a.modules() if isinstance(m, Linear4bit)), (m for m in b.modules() if isinstance(m, Linear4bit))):
        am = y.code2[y.absmax.long()] * y.absmax2[torch.arange(y.absmax.numel()) // 256] + float(y.offset)
        errs.append((am - x.absmax) / x.absmax)
    return float(torch.cat(errs).std())


def markdown(result: dict) -> str:
    out = ["| method | trainable params | eval loss (mean ± std) | exact match % (mean ± std) | per seed: eval loss / exact match % |",
           "|---|---|---|---|---|"]
    for m, row in result["summary"].items():
        el, em = row["eval_loss"], row["exact_match"]
        per = ", ".join(f"{a:.3f} / {100 * b:.1f}" for a, b in zip(el["values"], em["values"]))
        out.append(f"| {m} | {row['trainable']:,} | {el['mean']:.4f} ± {el['std']:.4f} | "
                   f"{100 * em['mean']:.1f} ± {100 * em['std']:.1f} | {per} |")
    text = "\n".join(out) + "\n\n" + "\n".join(f"- {v}" for v in result["verdict"])
    c = result.get("control")
    if c:
        text += (f"\n\nControl (`{c['command']}`): double quantization's relative error on the absmax constants "
                 f"has std {100 * c['dq_absmax_rel_err_std']:.2f}%; the fp32-absmax base with that much random noise "
                 f"on its constants, seed {c['runs'][0]['seed']}: " + ", ".join(
                     f"eval loss {r['eval_loss']:.3f} / exact match {100 * r['exact_match']:.1f}%" for r in c["runs"]))
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the config's max_steps)")
    ap.add_argument("--full-lr", type=float, default=2e-4)
    ap.add_argument("--eval-rows", type=int, default=0, help="eval rows scored by exact match (0 = all)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "quality_bench.json"))
    ap.add_argument("--tables", action="store_true", help="print the README table from --out and exit")
    ap.add_argument("--control", type=int, nargs="*", metavar="NOISE_SEED",
                    help="only run the absmax-noise control (qlora-nodq, first --seeds seed, one run per noise "
                         "seed, default 0 1 2) and add it to --out")
    a = ap.parse_args(argv)
    if (a.tables or a.control is not None) and not Path(a.out).is_file():
        ap.error(f"--tables/--control: no results at {a.out}; run the benchmark first")   # one line, exit 2
    if a.tables:
        print(markdown(json.loads(Path(a.out).read_text())))
        return 0

    import torch
    from tqdm import tqdm

    from qlora_lite.config import load_config
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = load_config(a.config, [])
    steps = a.steps or cfg.train.max_steps
    if a.control is not None:
        out = Path(a.out)
        result = json.loads(out.read_text())
        std = dq_absmax_error(cfg.model.name_or_path)
        runs = absmax_noise_control(cfg, steps, a.full_lr, a.eval_rows, a.seeds[0], a.control or [0, 1, 2], std)
        result["control"] = dict(command="python benchmarks/bench_quality.py " + " ".join(argv or sys.argv[1:]),
                                 dq_absmax_rel_err_std=std, runs=runs)
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, out)
        print(json.dumps(result["control"], indent=2))
        return 0
    runs = []
    jobs = [(s, m) for s in a.seeds for m in a.methods]          # seed-major: a partial run still compares
    for seed, m in tqdm(jobs, desc="runs", unit="run"):
        r = run_one(m, seed, cfg, steps, a.full_lr, a.eval_rows)
        tqdm.write(f"{m:<11} seed {seed}: eval loss {r['eval_loss']:.4f}, exact match {100 * r['exact_match']:.1f}%"
                   f" ({r['train_s']:.0f} s)")
        runs.append(r)
    from bench_train import machine
    result = dict(command="python benchmarks/bench_quality.py " + " ".join(argv or sys.argv[1:]),
                  machine=machine(),
                  settings=dict(config=os.path.relpath(a.config, ROOT), steps=steps, lora_lr=cfg.train.lr,
                                full_lr=a.full_lr, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                                micro_batch=cfg.train.micro_batch_size, schedule=cfg.train.lr_scheduler,
                                eval_rows=a.eval_rows),
                  seeds=a.seeds, runs=runs)
    result["summary"] = summarize(runs)
    result["verdict"] = verdict(result["summary"])
    print(markdown(result))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    from qlora_lite.errors import UserError
    try:
        sys.exit(main())
    except UserError as e:          # bad config path, key or value: one line, exit 2
        print(f"{Path(__file__).name}: {e}", file=sys.stderr)
        sys.exit(2)
