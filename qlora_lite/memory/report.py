"""Present estimates: a terminal table (methods side by side), a fits/does-not-fit verdict with the
largest batch and sequence length that fit, an optional sweep, JSON, and a stacked-bar PNG."""
from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

from .estimate import CATEGORIES, GiB, MiB, MemoryEstimate, Settings, _estimate
from .arch import ModelFacts

METHOD_LABEL = {"full": "full", "full-mixed": "full (mixed)", "lora": "LoRA", "qlora": "QLoRA"}


def _unit(max_bytes: float) -> tuple[float, str]:
    return (GiB, "GiB") if max_bytes >= GiB else (MiB, "MiB")


def _num(x: float, div: float) -> str:
    v = x / div
    return f"{v:,.2f}" if v < 100 else f"{v:,.1f}"


_SHORT_PHASE = {"backward (loss)": "bwd (loss)", "backward (top layer)": "bwd (top)",
                "backward (bottom layer)": "bwd (bottom)", "optimizer step": "optim step"}


def human_params(n: float) -> str:
    for div, s in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{s}"
    return str(int(n))


# ------------------------------------------------------------------------------ verdict
def _peak_with(f: ModelFacts, st: Settings, **kw) -> float:
    return _estimate(f, replace(st, **kw)).peak_bytes


def largest_fitting(f: ModelFacts, st: Settings, budget: float, field: str, upper: int) -> int:
    """Largest value of `field` (batch_size or seq_len) whose peak fits `budget` bytes; 0 if none."""
    if _peak_with(f, st, **{field: 1}) > budget:
        return 0
    lo, hi = 1, 2
    while hi <= upper and _peak_with(f, st, **{field: hi}) <= budget:
        lo, hi = hi, hi * 2
    hi = min(hi, upper + 1)
    while hi - lo > 1:  # peak grows with batch and length: bisect
        mid = (lo + hi) // 2
        if _peak_with(f, st, **{field: mid}) <= budget:
            lo = mid
        else:
            hi = mid
    return lo


def verdict(f: ModelFacts, est: MemoryEstimate, gpu_gb: float) -> dict:
    """Fits or not in `gpu_gb` GiB, and the largest batch / sequence length that fit."""
    st = Settings(**est.settings)
    budget = gpu_gb * GiB
    max_pos = int(f.config.get("max_position_embeddings") or f.config.get("n_positions") or 131072)
    out = {
        "gpu_gib": gpu_gb,
        "model_max_seq_len": max_pos,
        "fits": est.peak_bytes <= budget,
        "headroom_gib": (budget - est.peak_bytes) / GiB,
        "max_batch_size": largest_fitting(f, st, budget, "batch_size", 4096),
        "max_seq_len": largest_fitting(f, st, budget, "seq_len", max_pos),
    }
    if est.pageable_bytes:
        out["fits_with_paging"] = est.peak_bytes - est.pageable_bytes <= budget
    return out


# ------------------------------------------------------------------------------ table
def format_table(f: ModelFacts, ests: dict[str, MemoryEstimate], *, measured: dict | None = None,
                 verdicts: dict | None = None, measured_label: str = "measured") -> str:
    """Rows = categories at each method's peak phase; columns = methods."""
    methods = list(ests)
    div, unit = _unit(max(e.peak_bytes for e in ests.values()))
    w0, w = 26, 14
    st = ests[methods[0]].settings
    lines = [
        f"{f.name}: {f.architecture}, {f.num_layers} layers, hidden {f.hidden_size}, vocab {f.vocab_size:,}; "
        f"{human_params(f.total_params)} params = {human_params(f.linear_params)} in linear layers (quantizable) + "
        f"{human_params(f.embedding_params)} embeddings + "
        + (f"{human_params(f.lm_head_params)} lm_head + " if f.lm_head_params else "lm_head tied + ")
        + f"{human_params(f.norm_params + f.linear_bias_params + f.other_params)} norms/biases/other",
        f"batch {st['batch_size']} x seq {st['seq_len']}, LoRA r={st['lora_r']} on {st['lora_targets']}, "
        f"{st['dtype']}, {st['optimizer']}, checkpointing {'on' if st['grad_ckpt'] else 'off'}, "
        f"attention {st['attn_impl']}{', padded batches (attention mask)' if st.get('padded') else ''}",
        "",
        f"{unit:<{w0}}" + "".join(f"{METHOD_LABEL.get(m, m):>{w}}" for m in methods),
        "-" * (w0 + w * len(methods)),
    ]
    for cat in CATEGORIES:
        vals = [ests[m].categories.get(cat, 0.0) for m in methods]
        if not any(vals):
            continue
        lines.append(f"{cat:<{w0}}" + "".join(f"{_num(v, div) if v else '-':>{w}}" for v in vals))
    lines.append("-" * (w0 + w * len(methods)))
    lines.append(f"{'peak':<{w0}}" + "".join(f"{_num(ests[m].peak_bytes, div):>{w}}" for m in methods))
    lines.append(f"{'  at phase':<{w0}}" + "".join(f"{_SHORT_PHASE.get(ests[m].peak_phase, ests[m].peak_phase):>{w}}"
                                                  for m in methods))
    if any(e.pageable_bytes for e in ests.values()):
        lines.append(f"{'  pageable to host RAM':<{w0}}" + "".join(
            f"{_num(ests[m].pageable_bytes, div) if ests[m].pageable_bytes else '-':>{w}}" for m in methods))
    if measured:
        lines.append(f"{measured_label + ' peak':<{w0}}" + "".join(
            f"{(_num(measured[m]['peak_bytes'], div) if m in measured else '-'):>{w}}" for m in methods))
        lines.append(f"{'  estimate / ' + measured_label:<{w0}}" + "".join(
            f"{(format(ests[m].tensor_peak_bytes / measured[m]['peak_bytes'], '.3f') if m in measured else '-'):>{w}}"
            for m in methods))
    lines.append(f"{'trainable params':<{w0}}" + "".join(f"{human_params(ests[m].trainable_params):>{w}}"
                                                         for m in methods))
    lines.append(f"{'  share':<{w0}}" + "".join(f"{ests[m].trainable_share:>{w}.2%}" for m in methods))
    lines.append(f"{'activations no ckpt/ckpt':<{w0}}" + "".join(
        f"{_num(ests[m].activations_no_ckpt, div) + '/' + _num(ests[m].activations_ckpt, div):>{w}}" for m in methods))
    if verdicts:
        gb = next(iter(verdicts.values()))["gpu_gib"]
        lines.append("")
        lines.append(f"verdict for a {gb:g} GiB GPU:")
        for m in methods:
            v = verdicts[m]
            word = "fits" if v["fits"] else "does NOT fit"
            extra = ""
            if not v["fits"] and v.get("fits_with_paging"):
                extra = " (fits if the paged optimizer evicts its states to host RAM)"
            lines.append(f"  {METHOD_LABEL.get(m, m):<13} {word:<13} peak {ests[m].peak_bytes / GiB:6.2f} GiB, "
                         f"headroom {v['headroom_gib']:+7.2f} GiB; largest batch at seq {st['seq_len']}: "
                         f"{v['max_batch_size'] or 'none'}, largest seq at batch {st['batch_size']}: "
                         f"{v['max_seq_len'] or 'none'}"
                         f"{' (the model maximum)' if v['max_seq_len'] == v['model_max_seq_len'] else ''}{extra}")
    per = next((e.lora_params_per_matrix for e in ests.values() if e.lora_params_per_matrix), None)
    if per:
        lines.append("")
        def share(key: str, n: int) -> str:  # key "q_proj 4096x4096": n / (d * k)
            d, k = (int(x) for x in key.rsplit(" ", 1)[1].split("x"))
            return f"{n / (d * k):.2%}"
        lines.append("LoRA params per adapted matrix, r * (d + k) and its share of d * k: " +
                     ", ".join(f"{k}: {v:,} ({share(k, v)})" for k, v in per.items()))
    notes = sorted({n for e in ests.values() for n in e.notes})
    if notes:
        lines.append("")
        lines += [f"note: {n}" for n in notes]
    return "\n".join(lines)


def sweep(f: ModelFacts, st: Settings, ranks=(8, 16, 32, 64, 128), seq_lens=(256, 512, 1024, 2048, 4096)) -> dict:
    """Peak GiB over LoRA rank x sequence length for one method."""
    return {"method": st.method, "ranks": list(ranks), "seq_lens": list(seq_lens),
            "peak_gib": [[_estimate(f, replace(st, lora_r=r, seq_len=s)).peak_bytes / GiB for s in seq_lens]
                         for r in ranks]}


def format_sweep(sw: dict) -> str:
    w = 9
    lines = [f"{METHOD_LABEL.get(sw['method'], sw['method'])} peak GiB, LoRA rank (rows) x sequence length (columns)",
             f"{'r':>6}" + "".join(f"{s:>{w}}" for s in sw["seq_lens"])]
    for r, row in zip(sw["ranks"], sw["peak_gib"]):
        lines.append(f"{r:>6}" + "".join(f"{v:>{w}.2f}" for v in row))
    return "\n".join(lines)


# ------------------------------------------------------------------------------ files
def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_json(path, payload: dict) -> None:
    _atomic_write(Path(path), (json.dumps(payload, indent=2, default=str) + "\n").encode())


def write_plot(ests: dict[str, MemoryEstimate], path, *, gpu_gb: float | None = None, title: str = "",
               measured: dict | None = None) -> None:
    """Stacked bars: one per method, categories at the peak phase, GiB; budget line; measured dots."""
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(ests)
    fig, ax = plt.subplots(figsize=(4.2 + 1.5 * len(methods), 5))
    bottoms = [0.0] * len(methods)
    cmap = plt.get_cmap("tab10")
    for i, cat in enumerate(CATEGORIES):
        vals = [ests[m].categories.get(cat, 0.0) / GiB for m in methods]
        if not any(vals):
            continue
        ax.bar(range(len(methods)), vals, bottom=bottoms, label=cat, color=cmap(i % 10), width=0.6)
        bottoms = [b + v for b, v in zip(bottoms, vals)]
    for j, m in enumerate(methods):
        ax.text(j, bottoms[j], f"{ests[m].peak_bytes / GiB:.1f}", ha="center", va="bottom", fontsize=9)
    if measured:
        xs = [j for j, m in enumerate(methods) if m in measured]
        ax.scatter(xs, [measured[methods[j]]["peak_bytes"] / GiB for j in xs], marker="D", color="black",
                   zorder=5, label="measured / simulated peak (tensors only)")
    if gpu_gb:
        ax.axhline(gpu_gb, color="red", linestyle="--", linewidth=1)
        ax.text(-0.45, gpu_gb, f"{gpu_gb:g} GiB GPU", color="red", ha="left", va="bottom", fontsize=8)
    ax.set_xticks(range(len(methods)), [METHOD_LABEL.get(m, m) for m in methods])
    ax.set_ylabel("GiB at the peak phase")
    ax.set_title(title or "training memory by category")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    _atomic_write(Path(path), buf.getvalue())
