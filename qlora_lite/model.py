"""Load a Hugging Face causal LM with its linear layers quantized to NF4 while reading the checkpoint.

The model skeleton is built on the meta device (no memory), then the checkpoint is read one
tensor at a time: a linear weight is quantized on the target device as soon as it arrives and
its 16-bit copy is dropped, everything else is cast to the compute dtype and placed. Host
memory therefore peaks near the quantized model plus one tensor, never the whole 16-bit model.
"""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Iterable, Iterator

import torch
import torch.nn as nn

from .errors import UserError
from .quantize import Linear4bit, is_conv1d, quantizable_linears, resolve_backend, set_submodule

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
          "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def resolve_compute_dtype(name: str | torch.dtype = "auto", device: torch.device | str | None = None) -> torch.dtype:
    """"auto": bf16 on a CUDA GPU that supports it, else fp16 on CUDA, fp32 on CPU.

    bf16 matmuls on a CPU are about 100x slower than fp32 (measured on the development
    machines), so "auto" never picks it there; asking for it explicitly works, with a warning.
    """
    device = torch.device(device) if device is not None else default_device()
    if isinstance(name, torch.dtype):
        dtype = name
    elif name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    elif name in DTYPES:
        dtype = DTYPES[name]
    else:
        raise UserError(f"compute dtype must be auto, bf16, fp16 or fp32, got {name!r}")
    if device.type == "cpu" and dtype != torch.float32:
        warnings.warn(f"compute dtype {dtype} on CPU: 16-bit matmuls are far slower than fp32 on most CPUs",
                      stacklevel=2)
    return dtype


def resolve_model_path(name_or_path: str, revision: str | None = None) -> Path:
    """A local model directory, or a hub id downloaded to the local cache (needs a network)."""
    p = Path(name_or_path).expanduser()
    if p.exists():
        if not p.is_dir() or not (p / "config.json").is_file():
            raise UserError(f"{name_or_path}: not a model directory (expected a folder with config.json and weights)")
        return p
    if name_or_path.count("/") != 1 or name_or_path.startswith((".", "/", "~")):
        raise UserError(f"{name_or_path}: no such model directory")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(name_or_path, revision=revision,
                                      allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.bin"]))
    except Exception as e:
        raise UserError(f"{name_or_path}: not a local directory, and the hub download failed "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def checkpoint_files(path: Path) -> list[Path]:
    """The weight files of a model directory: sharded or single safetensors, else PyTorch .bin."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = path / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [path / s for s in shards]
        if (path / single).is_file():
            return [path / single]
    raise UserError(f"{path}: no model weights found (model.safetensors, an index, or pytorch_model.bin)")


def iter_checkpoint(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) one at a time. safetensors is memory-mapped; .bin is read with weights_only=True."""
    for f in files:
        if not f.is_file():
            raise UserError(f"{f}: weight file named in the index is missing")
        try:
            if f.suffix == ".safetensors":
                from safetensors import safe_open
                sf = safe_open(str(f), framework="pt", device="cpu")
                keys = list(sf.keys())
                get = sf.get_tensor
            else:
                sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                keys, get = list(sd), sd.pop
        except Exception as e:
            raise UserError(f"{f}: unreadable or truncated weight file ({str(e).splitlines()[0][:160]})") from None
        for key in keys:
            yield key, get(key)


def load_config(path: Path, trust_remote_code: bool = False):
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as e:
        raise UserError(f"{path}/config.json: cannot be read as a model config ({str(e).splitlines()[0][:200]})") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not trust_remote_code:
        raise UserError(f"{path}: model_type {config.model_type!r} is not a causal language model known to transformers")
    return config


def build_skeleton(config, dtype: torch.dtype, attn_implementation: str | None = None,
                   trust_remote_code: bool = False) -> nn.Module:
    """The model with parameters on the meta device; buffers (e.g. RoPE frequencies) are real."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code, **kw)
    return model


def _param_name(key: str, names: set[str], prefix: str) -> str | None:
    """Map a checkpoint key to the model's parameter name (old GPT-2 files lack the 'transformer.' prefix)."""
    if key in names:
        return key
    if prefix and f"{prefix}.{key}" in names:
        return f"{prefix}.{key}"
    if prefix and key.startswith(prefix + ".") and key[len(prefix) + 1:] in names:
        return key[len(prefix) + 1:]
    return None


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if attr in mod._parameters:
        mod._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        mod._buffers[attr] = value


def load_model(
    name_or_path: str,
    quantize: str | None = "nf4",
    *,
    double_quant: bool = True,
    compute_dtype: str | torch.dtype = "auto",
    backend: str = "auto",
    skip_modules: Iterable[str] = ("lm_head",),
    device: torch.device | str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = "sdpa",
    revision: str | None = None,
    load_tokenizer: bool = True,
    progress: bool = False,
):
    """Load a causal LM from a local directory (or a hub id) as a frozen base for LoRA.

    quantize="nf4": every nn.Linear / Conv1D except ``skip_modules`` (lm_head by default)
    becomes a frozen ``Linear4bit``; norms and embeddings stay in the compute dtype.
    quantize=None: a plain frozen 16/32-bit model (for LoRA without quantization).
    Returns (model, tokenizer); tokenizer is None when ``load_tokenizer`` is False.
    """
    if quantize not in (None, "nf4"):
        raise UserError(f"quantize must be 'nf4' or None, got {quantize!r}")
    device = torch.device(device) if device is not None else default_device()
    dtype = resolve_compute_dtype(compute_dtype, device)
    if quantize:
        backend = resolve_backend(backend)
    path = resolve_model_path(name_or_path, revision)
    config = load_config(path, trust_remote_code)
    files = checkpoint_files(path)
    model = build_skeleton(config, dtype, attn_implementation, trust_remote_code)

    # Decide which linears become 4-bit, and put empty 4-bit shells in their place.
    targets = set(quantizable_linears(model, skip_modules)) if quantize else set()
    transposed = set()
    for name in targets:
        lin = model.get_submodule(name)
        if is_conv1d(lin):
            transposed.add(name)
            in_f, out_f = lin.weight.shape
        else:
            in_f, out_f = lin.in_features, lin.out_features
        shell = Linear4bit(in_f, out_f, bias=lin.bias is not None, compute_dtype=dtype, backend=backend,
                           double_quant=double_quant, device="meta")
        set_submodule(model, name, shell)

    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    names |= {f"{t}.weight" for t in targets}
    names |= {n for n, _ in model.named_buffers()}
    prefix = getattr(model, "base_model_prefix", "")
    loaded, unexpected = set(), []
    items = iter_checkpoint(files)
    if progress:
        from tqdm import tqdm
        items = tqdm(items, desc="loading", unit="tensor")
    with torch.no_grad():
        for key, tensor in items:
            name = _param_name(key, names, prefix)
            if name is None:
                unexpected.append(key)
                continue
            mod_name, _, attr = name.rpartition(".")
            if mod_name in targets and attr == "weight":
                w = tensor.to(device)
                shell = model.get_submodule(mod_name)
                q = Linear4bit(shell.in_features, shell.out_features, bias=shell.bias is not None, compute_dtype=dtype,
                               backend=backend, double_quant=double_quant, device=device)
                q.load_weight(w.t() if mod_name in transposed else w)
                q.from_conv1d = mod_name in transposed
                if shell.bias is not None and shell.bias.device.type != "meta":
                    q.bias = shell.bias
                set_submodule(model, mod_name, q)
                del w
            else:
                cast = tensor.to(device, dtype) if tensor.is_floating_point() else tensor.to(device)
                _set_tensor(model, name, cast)
            loaded.add(name)
            del tensor

    if getattr(config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    missing += [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, Linear4bit) and m.qweight.is_meta]
    if missing:
        raise UserError(f"{path}: checkpoint lacks {len(missing)} weights the model needs, e.g. {missing[:3]}")
    if unexpected:
        log.info("ignored %d checkpoint tensors the model does not use, e.g. %s", len(unexpected), unexpected[:3])

    for p in model.parameters():
        p.requires_grad_(False)
    model.config.use_cache = False
    model.eval()   # like from_pretrained; the trainer switches to train()
    tokenizer = load_tokenizer_for(path, trust_remote_code) if load_tokenizer else None
    return model, tokenizer


def load_tokenizer_for(path: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as e:
        raise UserError(f"{path}: cannot load a tokenizer ({str(e).splitlines()[0][:200]})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def enable_gradient_checkpointing(model: nn.Module, offload: bool = False, reentrant: bool = False) -> None:
    """Activation checkpointing of each decoder layer: only the layer's input is kept, the rest is
    recomputed in backward.

    reentrant=False (torch's non-reentrant kind) works in every setting: data-parallel processes,
    torch.autograd.grad, activation offloading. reentrant=True runs the first forward pass under
    no_grad, so it builds no autograd graph for it; on small, overhead-bound models that is ~7% of a
    step (benchmarks/README.md), on large ones nothing measurable. It needs an input that requires
    grad, which the input-embedding hook (enable_input_require_grads) provides, supports only
    .backward(), and is used by the trainer in single-process runs only. ``offload`` keeps the
    saved layer inputs in pinned host memory instead of on the GPU (transformers >= 5, non-reentrant).
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise UserError(f"{type(model).__name__} does not support gradient checkpointing")
    if reentrant and offload:
        raise UserError("activation offloading works with non-reentrant checkpointing only")
    kwargs = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):      # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, offload=offload)
    else:
        if offload:
            raise UserError("activation offloading needs a newer transformers (activation_checkpointing_enable)")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if reentrant and hasattr(model, "enable_input_require_grads") and getattr(model, "_require_grads_hook", None) is None:
        model.enable_input_require_grads()     # what the no-grad first pass needs to reach the adapters
    model.config.use_cache = False
