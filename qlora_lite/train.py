"""The training loop: `qlora-lite train CONFIG.yaml`, in one file, top to bottom.

Memory features and their trade-offs (QLoRA paper §3; see `qlora-lite memory` for the numbers):

* NF4 base with double quantization: ~0.52 bytes per base parameter instead of 2 (bf16);
  each linear's weight is dequantized on the fly in forward and again in backward.
* LoRA adapters: only r*(in+out) parameters per adapted matrix get gradients and AdamW states.
* Gradient checkpointing: keeps only each decoder layer's input and recomputes the rest in
  backward, about a third more compute for a large cut in activation memory (the reentrant kind
  in one process, whose first pass builds no autograd graph; non-reentrant across processes).
* The loss (loss.py): output head and cross-entropy fused and chunked, so the [tokens, vocab]
  logits are never held.
* Paged AdamW (bitsandbytes, CUDA only): optimizer states live in unified memory and are
  evicted to host RAM when the GPU runs short, instead of failing with out-of-memory.

Data-parallel across processes through accelerate (`accelerate launch -m qlora_lite train ...`):
each optimizer step sees the same global batch whatever the process count, and the loss is
normalized by the number of label tokens in that whole global batch, so N processes give the
same update as one process with an N times larger micro-batch.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .data import IGNORE_INDEX
from .errors import UserError



# ----------------------------------------------------------------------------- helpers

def build_optimizer(name: str, params: list, lr: float, weight_decay: float, device: torch.device, log) -> torch.optim.Optimizer:
    """paged_adamw_32bit / paged_adamw_8bit from bitsandbytes on CUDA; on CPU say what runs instead."""
    from .quantize import bnb_available
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if device.type == "cuda" and bnb_available():
        import bitsandbytes as bnb
        cls = bnb.optim.PagedAdamW32bit if name == "paged_adamw_32bit" else bnb.optim.PagedAdamW8bit
        return cls(params, lr=lr, weight_decay=weight_decay)
    if name == "paged_adamw_8bit" and bnb_available():
        import bitsandbytes as bnb
        log(f"optimizer: {name} asked for; paging needs CUDA, so bitsandbytes AdamW8bit runs unpaged on {device.type}")
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    log(f"optimizer: {name} asked for; paging needs CUDA and bitsandbytes, so torch.optim.AdamW "
        f"(32-bit states, same update rule) runs on {device.type}")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def lr_lambda(kind: str, warmup: int, total: int):
    """Linear warmup from 0 over `warmup` steps, then constant / cosine to 0 / linear to 0."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress
    return f


def token_loss_sum(model, batch: dict, fused: bool = True) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over labeled tokens (fp32), and how many there were.

    For the usual architectures (loss.FUSED_MODEL_TYPES, a plain nn.Linear head) the head and
    the loss run fused and chunked (loss.linear_cross_entropy), so no [tokens, vocab] logits, fp32
    upcast or log-softmax is ever held; otherwise, or with fused=False, through the model's logits.
    """
    from .loss import fused_head, head_removed, linear_cross_entropy
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    # the label of position t is the token at t+1; the last position has none
    shift_labels = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).flatten()
    n = int((shift_labels != IGNORE_INDEX).sum())
    head = fused_head(model) if fused else None
    if head is not None:
        owner, name, _ = head
        with head_removed(owner, name) as lm_head:
            hidden = model(**inputs, use_cache=False).logits                 # (B, T, d): the head's input
        return linear_cross_entropy(hidden.flatten(0, 1), lm_head.weight, lm_head.bias, shift_labels), n
    logits = model(**inputs, use_cache=False).logits                      # (B, T, vocab)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), shift_labels,
                                             ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, n


def token_loss_mean(model, batch: dict, fused: bool = True) -> torch.Tensor:
    """token_loss_sum divided by its label-token count: the loss of one batch on its own."""
    s, n = token_loss_sum(model, batch, fused)
    return s / max(n, 1)


@torch.no_grad()
def evaluate_loss(model, eval_ds, collate, batch_size: int, device) -> dict:
    """Token-weighted mean loss over the whole eval set, and its perplexity."""
    from .data import iter_batches
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in iter_batches(eval_ds, batch_size, collate):
        s, n = token_loss_sum(model, {k: v.to(device) for k, v in batch.items()})
        total, count = total + float(s.detach()), count + n
    model.train(was)
    loss = total / max(count, 1)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50))}


class MetricsLog:
    """metrics.jsonl: one JSON object per line, appended and flushed as the run goes."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines the resumed run will write again, so the file reads as one run."""
        if not (self.enabled and self.path.is_file()):
            return
        keep = [l for l in self.path.read_text().splitlines() if l.strip() and json.loads(l).get("step", 0) <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(l + "\n" for l in keep))
        os.replace(tmp, self.path)

    def write(self, **row) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


class StopSignal:
    """SIGINT / SIGTERM set a flag; the loop saves a checkpoint at the next step boundary and exits."""

    def __init__(self):
        self.received: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:            # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.received is not None:     # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


@dataclass
class TrainResult:
    """What a run did; `train()` returns it and the CLI prints it."""

    output_dir: Path
    final_checkpoint: Path | None
    steps: int
    losses: list[float] = field(default_factory=list)       # per optimizer step, mean loss per label token
    before: dict = field(default_factory=dict)              # eval metrics before training
    after: dict = field(default_factory=dict)               # eval metrics at the end
    interrupted: bool = False


# ----------------------------------------------------------------------------- the run

def train(cfg, resume: str | None = None, *, progress: bool = True, stop_after: int | None = None) -> TrainResult:
    """Run one fine-tune from a validated Config. ``stop_after`` ends the loop early as if interrupted
    (after saving a checkpoint): it is how the tests simulate a crash between two steps."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from .checkpoint import load_checkpoint, resolve_resume, save_checkpoint
    from .config import save_config
    from .data import BatchSampler, build_datasets, eval_examples, make_collator
    from .lora import add_lora, disable_adapters, trainable_summary
    from .memory.measure import peak_memory_snapshot
    from .model import enable_gradient_checkpointing, load_model
    from .tasks import exact_match, generate_answers

    t, d, mc, q, lc, oc = cfg.train, cfg.data, cfg.model, cfg.quant, cfg.lora, cfg.output
    if lc.modules_to_save:
        raise UserError("lora.modules_to_save is not supported yet: remove it (train LoRA on those modules instead, "
                        "e.g. lora.targets: [..., embed_tokens])")

    # -- processes and devices ----------------------------------------------------------------
    cpu = mc.device == "cpu" or (mc.device == "auto" and not torch.cuda.is_available())
    if mc.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"model.device = {mc.device}, but no CUDA device is available")
    if mc.device.startswith("cuda:"):
        torch.cuda.set_device(int(mc.device.split(":")[1]))
    acc = Accelerator(cpu=cpu)
    device, world, rank = acc.device, acc.num_processes, acc.process_index
    main = acc.is_main_process
    log = (lambda msg: tqdm.write(msg)) if main else (lambda msg: None)
    set_seed(t.seed)

    # -- run directory ------------------------------------------------------------------------
    run_dir = Path(oc.dir)
    resume_from = resolve_resume(resume, run_dir) if resume else None
    if resume == "auto" and resume_from is None:
        log(f"--resume auto: no checkpoint in {run_dir}, starting from scratch")
    if resume_from is None and run_dir.is_dir() and any(run_dir.iterdir()):
        if not oc.overwrite:
            raise UserError(f"output.dir {run_dir} is not empty: use --resume auto to continue it, "
                            f"--set output.overwrite=true to replace it, or another output.dir")
        foreign = [p.name for p in run_dir.iterdir() if not _is_run_artifact(p.name)]
        if foreign:   # overwrite replaces an earlier run, never a folder of other files
            raise UserError(f"output.dir {run_dir} holds files that are not from a training run "
                            f"({', '.join(sorted(foreign)[:3])}); choose another output.dir")
        if main:
            shutil.rmtree(run_dir)
    acc.wait_for_everyone()
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")

    # -- model: NF4 base (or 16-bit for plain LoRA), LoRA adapters, checkpointing ----------------
    model, tok = load_model(mc.name_or_path, quantize="nf4" if q.bits == 4 else None, double_quant=q.double_quant,
                            compute_dtype=mc.compute_dtype, backend=q.backend, skip_modules=q.skip_modules,
                            device=device, trust_remote_code=mc.trust_remote_code,
                            attn_implementation=mc.attn_implementation, revision=mc.revision)
    add_lora(model, r=lc.r, alpha=lc.alpha, dropout=lc.dropout, targets=lc.targets, use_rslora=lc.use_rslora)
    if t.gradient_checkpointing:   # one process: the faster reentrant kind (no graph for the first pass)
        enable_gradient_checkpointing(model, reentrant=world == 1)
    model.train()
    log(trainable_summary(model))

    # -- data ---------------------------------------------------------------------------------
    if d.chat_template:       # the template the data is rendered with travels with the checkpoints
        from .data import resolve_chat_template
        tok.chat_template = resolve_chat_template(d)
    train_ds, eval_ds, stats = build_datasets(d, tok, t.seed)
    log(f"data: {stats.summary()}")
    collate = make_collator(tok)
    global_micro = t.micro_batch_size * world                       # sequences per micro-step, all processes
    # several processes: drop a last partial global batch, so no process is left without examples
    sampler = BatchSampler(len(train_ds), global_micro, t.seed, drop_last=world > 1)
    steps_per_epoch = max(1, len(sampler) // t.gradient_accumulation_steps)
    total_steps = t.max_steps or steps_per_epoch * t.epochs
    em_pairs = eval_examples(d, t.seed, tok) if t.exact_match_eval and main else []

    # -- optimizer and schedule ---------------------------------------------------------------
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(t.optimizer, params, t.lr, t.weight_decay, device, log)
    warmup = int(round(t.warmup_ratio * total_steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t.lr_scheduler, warmup, total_steps))
    model, opt = acc.prepare(model, opt)
    inner = acc.unwrap_model(model)

    step = 0
    metrics = MetricsLog(run_dir / "metrics.jsonl", main)
    if resume_from is not None:
        st = load_checkpoint(resume_from, model=inner, optimizer=opt, scheduler=sched)
        sampler.load_state_dict(st.sampler)
        step = st.step
        metrics.truncate_after(step)
        log(f"resumed from {resume_from} at step {step}")

    def evaluate(tag: str) -> dict:
        out = evaluate_loss(model, eval_ds, collate, t.micro_batch_size, device) if eval_ds is not None else {}
        if em_pairs:
            preds = generate_answers(inner, tok, [p for p, _ in em_pairs], max_new_tokens=t.max_new_tokens)
            out["exact_match"] = exact_match(preds, [a for _, a in em_pairs])
            out["sample"] = {"prompt": em_pairs[0][0], "prediction": preds[0], "reference": em_pairs[0][1]}
        if t.sample_prompt and main:
            out["sample_prompt_completion"] = generate_answers(inner, tok, [t.sample_prompt],
                                                               max_new_tokens=t.max_new_tokens)[0]
        if out:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in out.items() if isinstance(v, float))
            log(f"eval ({tag}, step {step}): {shown}")
            metrics.write(step=step, event="eval", tag=tag, **out)
        return out

    result = TrainResult(output_dir=run_dir, final_checkpoint=None, steps=step)
    if step == 0 and (eval_ds is not None or em_pairs):
        with disable_adapters(inner):
            result.before = evaluate("base model, before fine-tuning")

    def checkpoint() -> Path | None:
        path = None
        if main:
            path = save_checkpoint(run_dir, step, model=inner, optimizer=opt, scheduler=sched,
                                   sampler_state=sampler.state_dict(), cfg=cfg, base_model=mc.name_or_path,
                                   tokenizer=tok, keep_last=t.keep_last)
        acc.wait_for_everyone()
        return path

    # -- the loop -----------------------------------------------------------------------------
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=not (progress and main),
               dynamic_ncols=True)
    last_ckpt = None
    t_last, tokens_since = time.perf_counter(), 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with StopSignal() as stop:
            while step < total_steps:
                # One optimizer step = gradient_accumulation_steps micro-steps of the global batch.
                micro = [collate([train_ds[i] for i in sampler.next_batch()[rank::world]])
                         for _ in range(t.gradient_accumulation_steps)]
                # Normalize by the label tokens of the whole global batch (all micro-steps, all processes),
                # so the update does not depend on how the batch is split; DDP averages over processes,
                # hence the factor `world`.
                n_local = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)
                n_global = int(acc.reduce(torch.tensor(n_local, device=device), reduction="sum")) if world > 1 else n_local
                step_loss = 0.0
                for i, batch in enumerate(micro):
                    batch = {k: v.to(device) for k, v in batch.items()}
                    sync = acc.no_sync(model) if i < len(micro) - 1 and world > 1 else nullcontext()
                    with sync:
                        loss_sum, _ = token_loss_sum(model, batch)
                        acc.backward(loss_sum * world / max(n_global, 1))
                    step_loss += float(loss_sum.detach())
                    tokens_since += int(batch["input_ids"].numel())
                if world > 1:
                    step_loss = float(acc.reduce(torch.tensor(step_loss, device=device), reduction="sum"))
                step_loss /= max(n_global, 1)

                if not math.isfinite(step_loss):
                    opt.zero_grad(set_to_none=True)
                    where = f"last good checkpoint: {last_ckpt}" if last_ckpt else "no checkpoint saved yet"
                    if t.nan_policy == "stop":
                        raise FloatingPointError(f"loss is {step_loss} at step {step + 1}; stopping ({where}). "
                                                 f"Lower train.lr, check the data, or set train.nan_policy=skip")
                    log(f"step {step + 1}: loss {step_loss}, step skipped (train.nan_policy=skip)")
                    metrics.write(step=step + 1, event="skipped", loss=str(step_loss))
                    step += 1
                    bar.update(1)
                    continue

                grad_norm = acc.clip_grad_norm_(params, t.max_grad_norm) if t.max_grad_norm > 0 else None
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                result.losses.append(step_loss)

                # -- logging, eval, checkpoints --------------------------------------------------
                now = time.perf_counter()
                tok_s = tokens_since * world / max(now - t_last, 1e-9)
                # the same allocator figures `qlora-lite memory --measure` reports, for comparison
                mem = peak_memory_snapshot(device)
                peak = mem.get("peak_allocated_gib", mem.get("peak_rss_gib"))   # GPU allocator / CPU peak RSS
                bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}", tok_s=f"{tok_s:.0f}",
                                peak=f"{peak:.2f}GB")
                bar.update(1)
                if step % max(t.log_every, 1) == 0 or step == total_steps:
                    metrics.write(step=step, loss=step_loss, lr=sched.get_last_lr()[0],
                                  grad_norm=None if grad_norm is None else float(grad_norm), tokens_per_s=tok_s,
                                  peak_memory_gb=peak, epoch=sampler.epoch,
                                  **{f"mem_{k}": v for k, v in mem.items() if k != "device"})
                    t_last, tokens_since = now, 0
                if t.eval_every and step % t.eval_every == 0 and step < total_steps:
                    evaluate("periodic")
                if t.save_every and step % t.save_every == 0 and step < total_steps:
                    last_ckpt = checkpoint()
                if stop.received is not None or (stop_after is not None and step >= stop_after):
                    last_ckpt = checkpoint()
                    log(f"stopped at step {step}; checkpoint saved to {last_ckpt}. "
                        f"Continue with: qlora-lite train ... --resume auto")
                    result.interrupted, result.steps, result.final_checkpoint = True, step, last_ckpt
                    return result
    except torch.cuda.OutOfMemoryError:
        raise UserError(_oom_message(cfg)) from None
    finally:
        bar.close()

    result.after = evaluate("after fine-tuning")
    result.final_checkpoint = checkpoint()
    result.steps = step
    return result


def _is_run_artifact(name: str) -> bool:
    """What a run writes into output.dir: config.yaml, metrics.jsonl, checkpoints and their temp folders."""
    return name in ("config.yaml", "metrics.jsonl", "metrics.jsonl.tmp") or name.lstrip(".").startswith("checkpoint-")


def _oom_message(cfg) -> str:
    """What the memory profiler expects for this config, and the knobs that lower it."""
    try:
        from .memory.cli import estimate_for_train_config
        est = estimate_for_train_config(cfg)
        expected = f"the memory profiler estimates a peak of {est.peak / 2**30:.1f} GiB for this config; "
    except Exception:
        expected = ""
    return (f"CUDA out of memory: {expected}lower train.micro_batch_size (raise gradient_accumulation_steps to keep "
            f"the batch), data.max_seq_len or lora.r, keep train.gradient_checkpointing=true and quant.bits=4, "
            f"use train.optimizer=paged_adamw_8bit. See `qlora-lite memory CONFIG.yaml --gpu-gb N`.")


# ----------------------------------------------------------------------------- CLI

def _report(res: TrainResult) -> str:
    lines = []
    if res.before or res.after:
        keys = [k for k in ("eval_loss", "eval_ppl", "exact_match") if k in res.before or k in res.after]
        lines.append(f"{'':<14}{'before':>12}{'after':>12}")
        for k in keys:
            b, a = res.before.get(k), res.after.get(k)
            fmt = (lambda v: "-" if v is None else (f"{100 * v:.1f}%" if k == "exact_match" else f"{v:.4f}"))
            lines.append(f"{k:<14}{fmt(b):>12}{fmt(a):>12}")
        s = res.after.get("sample")
        if s:
            shown = [l for l in s["prompt"].strip().splitlines() if l.strip() and not l.startswith(("Below", "###"))]
            lines.append(f"sample prompt   : {' / '.join(shown)}")
            lines.append(f"model answer    : {s['prediction']!r}  (reference {s['reference']!r})")
    if res.final_checkpoint:
        lines.append(f"adapter: {res.final_checkpoint}  (export: qlora-lite export {res.final_checkpoint} --out merged/)")
    return "\n".join(lines)


def cli_train(args) -> int:
    from .config import describe_config, load_config
    if args.list_keys:
        print(describe_config())
        return 0
    cfg = load_config(args.config, args.overrides)
    try:
        res = train(cfg, resume=args.resume)
    except FloatingPointError as e:
        print(f"qlora-lite train: {e}", file=sys.stderr)
        return 1
    if res.interrupted:
        return 130
    print(_report(res))
    return 0
