"""`qlora-lite memory`: will it fit, and with which settings? Estimate, simulate or measure."""
from __future__ import annotations

import re
import sys
from dataclasses import replace
from pathlib import Path

from ..errors import UserError
from .arch import ModelFacts, model_facts, preset_names
from .estimate import METHODS, MemoryEstimate, Settings, _estimate

DEFAULT_METHODS = ("full", "full-mixed", "lora", "qlora")
_OPTIMIZER_NAMES = {"adamw": "adamw_torch"}  # config.py names -> estimate names


# ------------------------------------------------------------------------------ model + settings
def preset_for_name(name: str) -> str | None:
    """Map a hub id like 'meta-llama/Llama-2-7b-hf' to a bundled preset ('llama-2-7b'), if one fits."""
    base = name.rstrip("/").rsplit("/", 1)[-1].lower()
    hits = [p for p in preset_names() if re.search(rf"(^|[-_]){re.escape(p)}($|[-_.])", base)]
    return max(hits, key=len) if hits else None


def model_spec_for(name_or_path: str, where: str) -> str:
    """A model dir / config.json path as is; a hub id through its preset; otherwise an error."""
    p = Path(name_or_path)
    if p.is_dir() or p.is_file():
        return str(p)
    preset = preset_for_name(name_or_path)
    if preset:
        return preset
    raise UserError(f"{where}: model {name_or_path!r} is not a local directory and matches no bundled preset "
                    f"({', '.join(preset_names())}); point model.name_or_path at a local copy or pass a config.json")


def settings_from_config(cfg, device: str = "cuda") -> tuple[str, str, Settings]:
    """(model spec, method, Settings) of a training Config."""
    spec = model_spec_for(cfg.model.name_or_path, "model.name_or_path")
    method = "qlora" if cfg.quant.bits == 4 else "lora"
    dtype = {"auto": "fp32" if device == "cpu" else "bf16"}.get(cfg.model.compute_dtype, cfg.model.compute_dtype)
    targets = cfg.lora.targets if isinstance(cfg.lora.targets, str) else tuple(cfg.lora.targets)
    st = Settings(method=method, seq_len=cfg.data.max_seq_len, batch_size=cfg.train.micro_batch_size,
                  lora_r=cfg.lora.r, lora_targets=targets, lora_dropout=cfg.lora.dropout,
                  optimizer=_OPTIMIZER_NAMES.get(cfg.train.optimizer, cfg.train.optimizer),
                  grad_ckpt=cfg.train.gradient_checkpointing, attn_impl=cfg.model.attn_implementation,
                  dtype=dtype, double_quant=cfg.quant.double_quant, device=device,
                  padded=not cfg.data.packing,  # the padding collator sends an attention mask
                  fused_loss=_trainer_fuses_loss(spec))
    return spec, method, st


def _trainer_fuses_loss(spec) -> bool:
    """Whether the trainer runs this architecture's head and loss fused (qlora_lite.loss)."""
    from ..loss import architecture_fuses
    try:
        facts = model_facts(spec)
    except Exception:      # resolving the model again reports the problem
        return False
    return architecture_fuses(facts.model_type, facts.config.get)


def estimate_for_train_config(cfg) -> MemoryEstimate:
    """One call for the trainer (e.g. on CUDA out-of-memory): the estimate of this run's method."""
    spec, method, st = settings_from_config(cfg)
    return _estimate(model_facts(spec), st.validate())


def _is_local_model(spec: str) -> bool:
    p = Path(spec)
    d = p if p.is_dir() else p.parent
    return p.exists() and (any(d.glob("*.safetensors")) or any(d.glob("*.bin")))


# ------------------------------------------------------------------------------ measure
def measure_method(model_dir: str, st: Settings, steps: int = 1, progress: bool = True):
    """Load the local model as `st.method` trains it and run `steps` real steps; Measurement."""
    import time

    import torch

    from ..model import load_model
    from .build import prepare_for_method
    from .measure import Measurement, make_batch, make_optimizer, run_cuda_steps, run_tracked_steps, split_static

    device = "cuda" if st.device == "cuda" else "cpu"
    mixed = st.method == "full-mixed"  # fp32 weights, bf16/fp16 autocast
    model, _ = load_model(model_dir, quantize="nf4" if st.method == "qlora" else None,
                          double_quant=st.double_quant, compute_dtype="fp32" if mixed else st.dtype, device=device,
                          attn_implementation=st.attn_impl, load_tokenizer=False)
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(st.dtype) if mixed else None
    # already quantized by the loader: prepare only freezes / adds adapters / checkpointing
    prepare_for_method(model, replace(st, method="lora" if st.method == "qlora" else st.method))
    # bitsandbytes pages only CUDA memory; on CPU the paged optimizers are the plain ones (same states)
    opt = make_optimizer(model.parameters(), st.optimizer.replace("paged_", "") if device == "cpu" else st.optimizer)
    batch = make_batch(model.config.vocab_size, st.batch_size, st.seq_len, device, padded=st.padded)
    loss_fn = None
    if st.fused_loss and st.method in ("lora", "qlora"):   # the trainer's loss: fused head + cross-entropy
        from ..train import token_loss_mean as loss_fn
    t0 = time.time()
    reserved = 0.0
    if device == "cuda":
        peaks, reserved = run_cuda_steps(model, opt, batch, steps=steps + 1, autocast_dtype=autocast,
                                         loss_fn=loss_fn)
        # the allocator knows totals only: split off what the model and optimizer hold
        static = split_static(model, opt)
        for p in peaks.values():
            p.update(static)
            p["activations + transient"] = p["total"] - sum(static.values())
        where = f"cuda ({torch.cuda.get_device_name()})"
    else:
        peaks = run_tracked_steps(model, opt, batch, steps=steps, progress=progress, autocast_dtype=autocast,
                                  loss_fn=loss_fn)
        where = "cpu (MemTracker)"
    phase = max(peaks, key=lambda k: peaks[k]["total"])
    return Measurement(device=where, method=st.method, steps=steps, phases=peaks, peak_phase=phase,
                       peak_bytes=peaks[phase]["total"], reserved_bytes=reserved, seconds=time.time() - t0)


# ------------------------------------------------------------------------------ the command
def _check_args(args) -> None:
    for name in ("seq_len", "batch_size", "lora_r", "steps"):
        v = getattr(args, name, None)
        if v is not None and v <= 0:
            raise UserError(f"--{name.replace('_', '-')} {v}: expected a positive integer")
    if args.gpu_gb is not None and not args.gpu_gb > 0:
        raise UserError(f"--gpu-gb {args.gpu_gb:g}: expected a positive number of GiB (e.g. 24)")


def resolve_inputs(args) -> tuple[ModelFacts, str, Settings, str | None]:
    """(facts, model spec, base Settings, local model dir for --measure or None) from the CLI args."""
    src = args.model
    measure_dir = None
    device = "cpu" if getattr(args, "measure", False) and not _cuda() else "cuda"
    if src.endswith((".yaml", ".yml")):
        from ..config import load_config
        cfg = load_config(src)
        spec, _, st = settings_from_config(cfg, device=device)
        if Path(spec).exists():
            measure_dir = spec
    else:
        spec = src
        st = Settings(device=device, dtype="fp32" if device == "cpu" else "bf16", lora_dropout=0.0,
                      fused_loss=_trainer_fuses_loss(spec))
        if Path(src).exists() and _is_local_model(src):
            measure_dir = str(Path(src) if Path(src).is_dir() else Path(src).parent)
    facts = model_facts(spec)
    over = {}
    if args.seq_len is not None:
        over["seq_len"] = args.seq_len
    if args.batch_size is not None:
        over["batch_size"] = args.batch_size
    if args.lora_r is not None:
        over["lora_r"] = args.lora_r
    if getattr(args, "optimizer", None):
        over["optimizer"] = args.optimizer
    if getattr(args, "no_grad_ckpt", False):
        over["grad_ckpt"] = False
    if getattr(args, "attn", None):
        over["attn_impl"] = args.attn
    if getattr(args, "dtype", None):
        over["dtype"] = args.dtype
    if getattr(args, "padded", False):
        over["padded"] = True
    st = replace(st, **over)
    return facts, spec, st, measure_dir


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def cli_memory(args) -> int:
    _check_args(args)
    facts, spec, base, measure_dir = resolve_inputs(args)
    methods = list(dict.fromkeys(getattr(args, "method", None) or DEFAULT_METHODS))
    for m in methods:
        if m not in METHODS:
            raise UserError(f"--method {m!r}: expected one of {', '.join(METHODS)}")
    if args.measure and measure_dir is None:
        raise UserError(f"--measure needs a local model (a model directory with weights, or a training YAML whose "
                        f"model.name_or_path is one); {args.model!r} is not. Use --simulate for a preset or config.json")
    if args.measure and base.device == "cpu":
        methods = [m for m in methods if m != "full-mixed"]  # bf16 autocast on CPU: too slow to be useful
    ests = {m: _estimate(facts, replace(base, method=m).validate()) for m in methods}

    measured = None
    steps = getattr(args, "steps", None) or 1
    if args.measure or args.simulate:
        measured = {}
        for m in methods:
            st = replace(base, method=m).validate()
            print(f"{'measuring' if args.measure else 'simulating'} {m} ...", file=sys.stderr, flush=True)
            if args.measure:
                res = measure_method(measure_dir, st, steps=steps)
            else:
                from .simulate import simulate
                res = simulate(spec, st, steps=steps, progress=True)
            measured[m] = res.to_dict()
        if args.simulate:  # the simulation sees tensors only: compare like with like
            ests = {m: _estimate(facts, replace(base, method=m, device="cpu", fused_loss=False).validate())
                    for m in methods}

    from .report import format_sweep, format_table, sweep, verdict, write_json, write_plot
    verdicts = {m: verdict(facts, e, args.gpu_gb) for m, e in ests.items()} if args.gpu_gb else None
    print(format_table(facts, ests, measured=measured, verdicts=verdicts,
                       measured_label="simulated" if args.simulate else "measured"))
    sweeps = None
    if getattr(args, "sweep", False):
        sweeps = [sweep(facts, replace(base, method=m)) for m in methods if m in ("lora", "qlora")]
        for sw in sweeps:
            print()
            print(format_sweep(sw))
    if args.json:
        write_json(args.json, {
            "model": {k: v for k, v in facts.__dict__.items() if k not in ("config", "linears")},
            "linears": [g.__dict__ for g in facts.linears],
            "estimates": {m: e.to_dict() for m, e in ests.items()},
            "verdicts": verdicts, "measured" if args.measure else "simulated": measured, "sweeps": sweeps,
        })
    if args.plot:
        write_plot(ests, args.plot, gpu_gb=args.gpu_gb, measured=measured,
                   title=f"{facts.name}: batch {base.batch_size} x seq {base.seq_len}, r{base.lora_r}")
    return 0
