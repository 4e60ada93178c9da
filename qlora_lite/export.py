"""Export: fold a LoRA adapter into dequantized base weights and save an ordinary Hugging Face model.

    W_merged = dequant(quant(W)) + (alpha / r) * B @ A      (default: the weights the adapter was trained against)
    W_merged = W16               + (alpha / r) * B @ A      (--base-16bit: the original 16-bit weights)

PEFT merges a QLoRA adapter into the 4-bit model and re-quantizes, so generations change. Here the
merged weight is written in 16 (or 32) bits instead, and the NF4 rounding the adapter saw during
training is reproduced exactly: NF4 quantization is deterministic, so quantizing the base checkpoint
again with the training's settings (block size, double quant, backend) gives the same codes, and
their dequantization is the weight every training step used. Merging into the original 16-bit
weights instead adds W16 - dequant(quant(W)) on top, an error the adapter never saw; both are
offered and the choice is recorded in the export.

The base checkpoint is streamed one tensor at a time and the output written shard by shard, so
host memory stays near one shard plus one tensor, never the whole 16-bit model. Everything is
written into a temporary folder beside ``--out`` and renamed into place only after the export has
been reloaded with transformers and its logits checked against the adapter model in memory.
"""
from __future__ import annotations

import datetime as _dt
import gc
import hashlib
import json
import logging
import os
import re
import shutil
import struct
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from .adapter import CONFIG_NAME, WEIGHTS_NAME, read_adapter
from .errors import UserError
from .lora import parse_peft_key

log = logging.getLogger(__name__)

EXPORT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
METADATA_NAME = "qlora_lite_export.json"
INDEX_NAME = "model.safetensors.index.json"
# Files that make up a tokenizer in its Hugging Face layout (copied verbatim into the export).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "merges.txt",
                   "chat_template.jinja", "chat_template.json")
# Largest max |logit difference| / max(1, max |reference logit|) accepted by the verification, per dtype.
# Rounding the merged weights to bf16 (8 mantissa bits) moves logits by ~0.3% of their scale on the
# tiny test models; a wrong merge (missing delta, transposed Conv1D, wrong scaling) moves them far more.
VERIFY_TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}
DEFAULT_PROMPTS = ("The capital of France is", "def fibonacci(n):",
                   "Below is an instruction that describes a task. Write a response")


class ExportVerificationError(RuntimeError):
    """The reloaded export does not reproduce the adapter model within the dtype's tolerance."""


# ----------------------------------------------------------------------------- small helpers

def parse_size(text: str | int) -> int:
    """'2GB' -> 2e9 bytes, '500MB', '64KiB', or a plain byte count (Hugging Face's convention: GB = 1e9)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)?\s*", str(text), flags=re.I)
    if not m:
        raise UserError(f"--max-shard-size: {text!r} is not a size (expected e.g. 2GB, 500MB, 64KiB or a byte count)")
    number, unit = float(m.group(1)), (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    size = int(number * scale)
    if size <= 0:
        raise UserError(f"--max-shard-size: {text!r} must be positive")
    return size


def _human_bytes(n: float) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _make_temp_dir(out: Path, tag: str) -> Path:
    """A fresh hidden folder beside ``out``, with ordinary permissions (mkdtemp's are owner-only)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{tag}-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


def _is_relative_to(p: Path, other: Path) -> bool:
    try:
        p.relative_to(other)
        return True
    except ValueError:
        return False


# ----------------------------------------------------------------------------- what to merge

@dataclass(frozen=True)
class QuantSettings:
    """How the base was stored while the adapter was trained (so it can be reproduced exactly)."""

    quantized: bool                      # True: NF4 base (QLoRA); False: the adapter was trained on the 16-bit base
    double_quant: bool = True            # absmax constants quantized again (8-bit, blocks of 256)
    backend: str = "auto"                # "bnb" | "torch": both give byte-identical codes (tests/test_nf4.py)
    skip_modules: tuple[str, ...] = ("lm_head",)   # linears that stayed 16-bit
    source: str = "default"              # where these settings came from: config.yaml | default | --base-quant


@dataclass(frozen=True)
class LoraDelta:
    """One adapted module: delta W = scaling * B @ A."""

    A: torch.Tensor                      # [r, in]  (embedding: [r, num_embeddings])
    B: torch.Tensor                      # [out, r] (embedding: [dim, r])
    scaling: float                       # alpha / r, or alpha / sqrt(r) with rsLoRA
    embedding: bool                      # lora_embedding_A/B: the weight is [num_embeddings, dim]

    def delta(self, transpose: bool) -> torch.Tensor:
        d = (self.B.float() @ self.A.float()) * self.scaling            # [out, in] (embedding: [dim, num])
        return d.t() if transpose else d


def adapter_deltas(cfg: dict, tensors: dict[str, torch.Tensor], where: str = "adapter") -> dict[str, LoraDelta]:
    """Module path -> LoraDelta, from PEFT-layout tensors (``base_model.model.<path>.lora_A.weight``)."""
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    scaling = alpha / r ** 0.5 if cfg.get("use_rslora") else alpha / r
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        path, which = parse_peft_key(key, where)
        parts.setdefault(path, {})[which] = t
    deltas = {}
    for path, p in parts.items():
        emb = "lora_embedding_A" in p or "lora_embedding_B" in p
        A, B = (p.get("lora_embedding_A"), p.get("lora_embedding_B")) if emb else (p.get("lora_A"), p.get("lora_B"))
        if A is None or B is None:
            raise UserError(f"{where}: module {path!r} has only one of its two LoRA matrices")
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != r or B.shape[1] != r:
            raise UserError(f"{where}: module {path!r} has A {tuple(A.shape)} and B {tuple(B.shape)}, "
                            f"expected rank r={r} from {CONFIG_NAME}")
        deltas[path] = LoraDelta(A=A, B=B, scaling=scaling, embedding=emb)
    return deltas


def read_quant_settings(checkpoint: Path, base_quant: str = "auto") -> QuantSettings:
    """The quant section of <checkpoint>/config.yaml, or NF4 + double quant + skip lm_head for a plain PEFT dir."""
    if base_quant not in ("auto", "nf4", "none"):
        raise UserError(f"--base-quant must be auto, nf4 or none, got {base_quant!r}")
    q: dict = {}
    cfg_path = checkpoint / "config.yaml"
    if cfg_path.is_file():
        import yaml
        try:
            doc = yaml.safe_load(cfg_path.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"{cfg_path}: not valid YAML ({str(e).splitlines()[0]})") from None
        q = doc.get("quant") or {} if isinstance(doc, dict) else {}
        if not isinstance(q, dict):
            raise UserError(f"{cfg_path}: key 'quant' should be a mapping, got {type(q).__name__}")
    if base_quant != "auto":
        quantized, source = base_quant == "nf4", "--base-quant"
    elif q:
        quantized, source = q.get("bits", 4) is not None, "config.yaml"
    else:
        quantized, source = True, "default"
    backend = q.get("backend", "auto")
    if backend not in ("auto", "bnb", "torch"):
        raise UserError(f"{cfg_path}: quant.backend={backend!r}, expected auto, bnb or torch")
    double_quant = bool(q.get("double_quant", True))
    from .quantize import bnb_available
    if backend in ("auto", "bnb"):
        # "auto" picked bitsandbytes wherever it imports, so that is what training most likely used.
        if not bnb_available() and quantized and double_quant:
            # The 4-bit codes and fp32 constants of the two backends are identical, but the 8-bit codes
            # of the double-quantized constants differ in near-ties (~0.1% of blocks; tests/test_nf4.py).
            log.warning("the base was probably quantized with bitsandbytes, which does not import here: using the "
                        "PyTorch NF4 reference, whose double-quantized constants differ from bitsandbytes' in "
                        "~0.1%% of blocks, so a few merged blocks will differ slightly from the trained-against weights")
        backend = "bnb" if bnb_available() else "torch"
    skip = q.get("skip_modules", ["lm_head"])
    if isinstance(skip, str):
        skip = [skip]
    return QuantSettings(quantized=quantized, double_quant=double_quant, backend=backend,
                         skip_modules=tuple(skip or ()), source=source)


def resolve_base(checkpoint: Path, cfg: dict, base: str | None) -> str:
    """The base model the adapter was trained on: --base, else adapter_config.json, else config.yaml."""
    candidates = [base] if base else []
    if not base:
        candidates.append(cfg.get("base_model_name_or_path"))
        y = checkpoint / "config.yaml"
        if y.is_file():
            import yaml
            try:
                doc = yaml.safe_load(y.read_text()) or {}
                candidates.append(((doc.get("model") or {}).get("name_or_path")) if isinstance(doc, dict) else None)
            except yaml.YAMLError:
                pass
    for c in candidates:
        if not c:
            continue
        for p in (Path(c).expanduser(), checkpoint / c):   # relative paths: from here, then from the checkpoint
            if p.is_dir():
                return str(p)
        if not base and not Path(c).is_absolute() and c.count("/") == 1:
            return c   # a hub id; resolve_model_path downloads it
    if base:
        raise UserError(f"--base {base}: no such model directory")
    raise UserError(f"{checkpoint}/{CONFIG_NAME}: base_model_name_or_path {cfg.get('base_model_name_or_path')!r} "
                    f"is not a model directory here; pass --base PATH")


# ----------------------------------------------------------------------------- streaming merge

@dataclass
class _Plan:
    """Everything the streaming merge needs to know about the base model's modules."""

    names: set[str]                 # parameter and buffer names of the model
    prefix: str                     # base_model_prefix, for old checkpoints that omit it
    quant_targets: set[str]         # modules whose weight was NF4 during training
    conv1d: set[str]                # modules whose weight is stored [in, out]
    embeddings: set[str]            # nn.Embedding modules
    tie_groups: dict[str, tuple[str, ...]]  # tied parameter name -> every name sharing its storage
    expected: dict[str, tuple[int, ...]] = field(default_factory=dict)  # unique param name -> shape


def _plan(weights_dir: Path, settings: QuantSettings, merge_nf4: bool) -> tuple[_Plan, object]:
    from .model import build_skeleton, load_config
    from .quantize import is_conv1d, quantizable_linears
    config = load_config(weights_dir)
    skel = build_skeleton(config, torch.float32)
    if getattr(config, "tie_word_embeddings", False) and hasattr(skel, "tie_weights"):
        skel.tie_weights()
    all_names = [n for n, _ in skel.named_parameters(remove_duplicate=False)]
    unique = dict(skel.named_parameters())
    by_ptr: dict[int, list[str]] = {}
    for n, p in skel.named_parameters(remove_duplicate=False):
        by_ptr.setdefault(id(p), []).append(n)
    tie_groups = {n: tuple(g) for g in by_ptr.values() if len(g) > 1 for n in g}
    names = set(all_names) | {n for n, _ in skel.named_buffers()}
    plan = _Plan(
        names=names, prefix=getattr(skel, "base_model_prefix", ""),
        quant_targets=set(quantizable_linears(skel, settings.skip_modules)) if merge_nf4 else set(),
        conv1d={n for n, m in skel.named_modules() if is_conv1d(m)},
        embeddings={n for n, m in skel.named_modules() if isinstance(m, torch.nn.Embedding)},
        tie_groups=tie_groups, expected={n: tuple(p.shape) for n, p in unique.items()},
    )
    del skel
    return plan, config


def _untied(deltas: dict[str, LoraDelta], plan: _Plan) -> list[str]:
    """Tied weights the adapter changes on one side only: the export stores them separately."""
    return sorted({n for n, g in plan.tie_groups.items() if any(m.rpartition(".")[0] in deltas for m in g)})


def _check_deltas(deltas: dict[str, LoraDelta], plan: _Plan, where: str) -> None:
    for path, d in deltas.items():
        wname = f"{path}.weight"
        if wname not in plan.expected and wname not in plan.names:
            raise UserError(f"{where}: adapter module {path!r} is not in the base model (wrong base model?)")
        transpose = path in plan.conv1d or d.embedding
        out_in = (d.B.shape[0], d.A.shape[1])
        shape = plan.expected.get(wname)
        if shape is not None and tuple(reversed(out_in) if transpose else out_in) != tuple(shape):
            raise UserError(f"{where}: adapter module {path!r} has delta shape {out_in}, the base weight is "
                            f"{tuple(shape)} (wrong base model?)")


def merged_tensors(weights_dir: Path, plan: _Plan, deltas: dict[str, LoraDelta], settings: QuantSettings,
                   dtype: torch.dtype, progress: bool = True, device: torch.device | str = "cpu"
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream (name, merged tensor in ``dtype``, on CPU) over the base checkpoint, one tensor at a time.

    ``device`` is where the NF4 weights are re-quantized: the training's device reproduces its
    kernels' rounding exactly (bitsandbytes' CPU and CUDA kernels may break near-ties differently).
    """
    from .model import _param_name, checkpoint_files, iter_checkpoint
    from .quantize import Linear4bit
    files = checkpoint_files(weights_dir)
    total = None
    if all(f.suffix == ".safetensors" for f in files):
        from safetensors import safe_open
        total = 0
        for f in files:
            with safe_open(str(f), framework="pt") as sf:
                total += len(list(sf.keys()))
    items = iter_checkpoint(files)
    bar = None
    if progress:
        from tqdm import tqdm
        items = bar = tqdm(items, total=total, desc="merging", unit="tensor", leave=False)
    seen, used = set(), set()
    untied = set(_untied(deltas, plan))

    def convert(name: str, t: torch.Tensor) -> torch.Tensor:
        mod, _, attr = name.rpartition(".")
        delta = deltas.get(mod) if attr == "weight" else None
        if not t.is_floating_point():
            return t
        transpose = mod in plan.conv1d
        if attr == "weight" and mod in plan.quant_targets:
            # Exactly what load_model builds for training: same class, backend and settings.
            q = Linear4bit.from_weight(t, transpose=transpose, compute_dtype=torch.float32,
                                       backend=settings.backend, double_quant=settings.double_quant, device=device)
            w = q.dequantize(torch.float32).cpu()                      # [out, in]
            w = w.t() if transpose else w                              # back to the checkpoint layout
        elif delta is not None:
            w = t.float()
        else:
            return t.to(dtype)        # the same tensor when the dtype already matches: no copy
        if delta is not None:
            w = w + delta.delta(transpose=transpose or delta.embedding)
            used.add(mod)
        return w.to(dtype).contiguous()

    try:
        with torch.no_grad():
            for key, t in items:
                name = _param_name(key, plan.names, plan.prefix)
                if name is None or name in seen:
                    continue   # e.g. a stale buffer in an old checkpoint, which the model ignores too
                # A tied weight the adapter changes on one side only (e.g. LoRA on the input embedding,
                # whose lm_head reads the raw weight): every name of the group is written separately.
                for n in plan.tie_groups[name] if name in untied else (name,):
                    seen.add(n)
                    yield n, convert(n, t)
                del t
    finally:
        if bar is not None:
            bar.close()
    missing = sorted(n for n in plan.expected if n not in seen and not set(plan.tie_groups.get(n, ())) & seen)
    if missing:
        raise UserError(f"{weights_dir}: checkpoint lacks {len(missing)} weights the model needs, e.g. {missing[:3]}")
    unused = sorted(set(deltas) - used)
    if unused:
        raise UserError(f"adapter modules {unused[:3]} have no weight in {weights_dir} (wrong base model?)")


_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a .safetensors file tensor by tensor, fsynced.

    safetensors.torch.save_file first copies every tensor into one bytes buffer, doubling the
    memory a shard takes; streaming the bytes of each tensor keeps the peak at one shard.
    Layout: 8-byte little-endian header length, JSON header padded to 8 bytes, raw data.
    """
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in _ST_DTYPES:
            raise TypeError(f"{name}: dtype {t.dtype} cannot be stored in safetensors")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for t in tensors.values():
            flat = t.detach().cpu().contiguous().reshape(-1)
            if flat.numel():
                f.write(memoryview(flat.view(torch.uint8).numpy()))   # the tensor's own bytes, no copy
        f.flush()
        os.fsync(f.fileno())


class ShardWriter:
    """Collects tensors into safetensors shards of at most ``max_bytes`` (a bigger tensor gets its own)."""

    def __init__(self, directory: Path, max_bytes: int, metadata: dict[str, str]):
        self.dir, self.max_bytes, self.metadata = directory, max_bytes, metadata
        self.current: dict[str, torch.Tensor] = {}
        self.current_bytes = 0
        self.files: list[tuple[str, list[str]]] = []   # (temporary file name, tensor names)
        self.total_bytes = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        n = t.numel() * t.element_size()
        if self.current and self.current_bytes + n > self.max_bytes:
            self.flush()
        self.current[name] = t
        self.current_bytes += n
        self.total_bytes += n

    def flush(self) -> None:
        if not self.current:
            return
        fname = f"shard-{len(self.files) + 1:05d}.safetensors.part"
        write_safetensors(self.dir / fname, self.current, self.metadata)
        self.files.append((fname, list(self.current)))
        self.current, self.current_bytes = {}, 0

    def finish(self) -> list[str]:
        """Give the shards their final names (model.safetensors, or model-0000i-of-0000n + index)."""
        self.flush()
        n = len(self.files)
        if n == 0:
            raise UserError("the base checkpoint holds no tensors")
        if n == 1:
            os.replace(self.dir / self.files[0][0], self.dir / "model.safetensors")
            return ["model.safetensors"]
        weight_map, names = {}, []
        for i, (tmp_name, keys) in enumerate(self.files, 1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(self.dir / tmp_name, self.dir / final)
            names.append(final)
            weight_map.update({k: final for k in keys})
        index = {"metadata": {"total_size": self.total_bytes, **self.metadata}, "weight_map": dict(sorted(weight_map.items()))}
        (self.dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return names


# ----------------------------------------------------------------------------- verification

@dataclass
class LogitDiff:
    """Absolute logit differences between two models over the verification prompts."""

    max_abs: float       # largest |a - b| over every prompt, position and vocabulary entry
    mean_abs: float      # mean |a - b|


def _diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> LogitDiff:
    d = torch.cat([(x - y).abs().flatten() for x, y in zip(a, b)])
    return LogitDiff(max_abs=float(d.max()), mean_abs=float(d.mean()))


def _prompt_ids(model_dir: str, vocab_size: int, n_prompts: int, n_tokens: int) -> list[torch.Tensor]:
    """A few fixed prompts as token ids (tokenized when the base has a tokenizer, else seeded random ids)."""
    ids: list[torch.Tensor] = []
    try:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(model_dir)
        for text in DEFAULT_PROMPTS[:n_prompts]:
            x = tok(text, return_tensors="pt")["input_ids"][:, :n_tokens]
            if x.numel() and int(x.max()) < vocab_size:
                ids.append(x)
    except Exception:
        ids = []
    if len(ids) < n_prompts:
        g = torch.Generator().manual_seed(0)
        ids = [torch.randint(0, vocab_size, (1, n_tokens), generator=g) for _ in range(n_prompts)]
    return ids


def _collect(big: bool) -> None:
    # Free a dropped model before loading the next one. A full collection costs ~1 s in a big
    # process, so only bother when the models are big enough for their memory to matter.
    if big:
        gc.collect()


@torch.no_grad()
def _logits(model, prompts: list[torch.Tensor]) -> list[torch.Tensor]:
    model.eval()
    device = next(model.parameters()).device
    return [model(input_ids=x.to(device)).logits.float().cpu() for x in prompts]       # each (1, T, vocab)


def _adapter_model_logits(base: str, checkpoint: Path, quantize: bool, settings: QuantSettings,
                          prompts: list[torch.Tensor], with_effect: bool, big: bool, device="cpu"):
    """Logits of base + adapter in memory (fp32 on CPU), and optionally with the adapter switched off."""
    from .adapter import load_adapter
    from .lora import disable_adapters
    from .model import load_model
    model, _ = load_model(base, quantize="nf4" if quantize else None, double_quant=settings.double_quant,
                          compute_dtype="fp32", backend=settings.backend, skip_modules=settings.skip_modules,
                          device=device, load_tokenizer=False)
    load_adapter(model, checkpoint)
    on = _logits(model, prompts)
    off = None
    if with_effect:
        with disable_adapters(model):
            off = _logits(model, prompts)
    del model
    _collect(big)
    return on, off


def _check_verify_memory(n_params: int, device: torch.device) -> None:
    """Reloading the export in fp32 needs ~6 bytes a parameter at peak; refuse before any work when that will not fit."""
    try:
        if device.type == "cuda":
            avail, where = torch.cuda.mem_get_info(device)[0], str(device)
        else:
            import psutil
            avail, where = psutil.virtual_memory().available, "host"
    except Exception:
        return
    need = int(n_params * 4 * 1.6)   # measured: 1.39 GB peak for a 220M-parameter export (fp32: 0.88 GB)
    if need > avail:
        raise UserError(f"verification reloads the export in fp32 and needs ~{_human_bytes(need)} of {where} "
                        f"memory, {_human_bytes(avail)} is free: pass --no-verify (and check the export on a "
                        f"bigger machine)")


# ----------------------------------------------------------------------------- the export

@dataclass
class ExportReport:
    """What an export wrote and how close it is to the adapter model it came from."""

    out: str                                  # the export directory
    checkpoint: str                           # the adapter / training checkpoint it was made from
    base_model: str                           # the base model the adapter was trained on
    merge_base: str                           # "nf4-dequantized" or "16bit"
    merge_base_path: str                      # the weights the deltas were added to
    dtype: str                                # bf16 | fp16 | fp32
    quant: dict                               # QuantSettings of the training base, as a dict
    quantized_on: str                         # device the base was re-quantized on (cpu | cuda:N)
    shards: list[str]                         # weight files written
    total_bytes: int                          # bytes of tensors written
    merged_modules: int                       # modules that received a LoRA delta
    untied: list[str] = field(default_factory=list)  # tied weights written separately (adapter on one side only)
    verified: bool = False                    # the reload + logit comparison ran and passed
    prompts: int = 0                          # verification prompts
    tokens: int = 0                           # tokens per verification prompt (at most)
    tolerance: float | None = None            # max |dlogit| allowed, absolute
    vs_adapter_model: LogitDiff | None = None   # export vs the NF4 base + adapter model the adapter was trained as
    vs_16bit_adapter_model: LogitDiff | None = None  # export vs the 16-bit base + adapter (16-bit merges)
    adapter_effect: LogitDiff | None = None   # adapter on vs off, for scale
    seconds: float = 0.0                      # wall time of the whole export

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        base_desc = {"nf4-dequantized": "dequantized NF4 weights (what the adapter was trained against)",
                     "16bit": "original 16-bit weights"}[self.merge_base]
        lines = [f"exported {self.out}  ({self.dtype}, {len(self.shards)} shard{'s' * (len(self.shards) != 1)}, "
                 f"{_human_bytes(self.total_bytes)}, {self.merged_modules} merged modules, {self.seconds:.1f} s)",
                 f"merge base: {self.merge_base}: {base_desc} from {self.merge_base_path}"]
        if self.untied:
            lines.append(f"untied: {', '.join(self.untied)} (the adapter changes only one of these tied weights)")
        if not self.verified:
            lines.append("verification: skipped (--no-verify)")
            return "\n".join(lines)
        lines.append(f"verification: reloaded with transformers (fp32, {self.quantized_on}), {self.prompts} prompts "
                     f"x <= {self.tokens} tokens")
        rows = []
        if self.vs_adapter_model is not None:
            rows.append(("export vs NF4 base + adapter", self.vs_adapter_model))
        if self.vs_16bit_adapter_model is not None:
            rows.append(("export vs 16-bit base + adapter", self.vs_16bit_adapter_model))
        if self.adapter_effect is not None:
            rows.append(("adapter on vs off (for scale)", self.adapter_effect))
        head = f"  {'logits compared':<34}{'max |diff|':>12}{'mean |diff|':>13}"
        lines += [head, "  " + "-" * (len(head) - 2)]
        lines += [f"  {name:<34}{d.max_abs:>12.3e}{d.mean_abs:>13.3e}" for name, d in rows]
        lines.append(f"  passed: max |diff| against the expected model <= {self.tolerance:.3e} ({self.dtype} tolerance)")
        return "\n".join(lines)


def _copy_side_files(tmp: Path, checkpoint: Path, base_dir: Path | None, config, dtype: torch.dtype,
                     untie: bool) -> None:
    """config.json (no quantization_config, the export dtype), generation_config.json and tokenizer files."""
    import copy
    cfg = copy.deepcopy(config)
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    cfg.dtype = dtype
    if untie:
        for c in (cfg, cfg.get_text_config()):
            c.tie_word_embeddings = False
    cfg.save_pretrained(str(tmp))
    gen_src = next((d / "generation_config.json" for d in (checkpoint, base_dir)
                    if d is not None and (d / "generation_config.json").is_file()), None)
    if gen_src is not None:
        shutil.copyfile(gen_src, tmp / "generation_config.json")
    else:
        from transformers import GenerationConfig
        GenerationConfig.from_model_config(cfg).save_pretrained(str(tmp))
    # The checkpoint's tokenizer wins (a run may have changed its chat template or special tokens).
    for src in (checkpoint, base_dir):
        if src is not None and any((src / f).is_file() for f in ("tokenizer_config.json", "tokenizer.json")):
            for f in TOKENIZER_FILES:
                if (src / f).is_file():
                    shutil.copyfile(src / f, tmp / f)
            break


def _check_out(out: Path, overwrite: bool, protected: list[Path]) -> None:
    o = out.resolve()
    for p in protected:
        if p is not None and (o == p.resolve() or _is_relative_to(p.resolve(), o)):
            raise UserError(f"--out {out}: would replace {p}, which the export reads from; choose another directory")
    if out.exists():
        if not out.is_dir():
            raise UserError(f"--out {out}: exists and is not a directory")
        if not overwrite:
            raise UserError(f"--out {out}: already exists; pass --overwrite to replace it")
        if any(out.iterdir()) and not ((out / "config.json").is_file() or (out / METADATA_NAME).is_file()):
            raise UserError(f"--out {out}: is a non-empty directory that is not a model; refusing to replace it")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:   # some filesystems cannot fsync a directory
        pass
    finally:
        os.close(fd)


def _swap_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished temp dir to ``out``; an old export is moved aside first and deleted last."""
    # Everything on disk before the rename, so a crash never leaves a complete-looking export with empty files.
    for f in tmp.iterdir():
        _fsync(f)
    _fsync(tmp)
    if out.exists():
        if not overwrite:
            raise UserError(f"--out {out}: appeared while exporting; pass --overwrite to replace it")
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rmdir(old)
        os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(old, out)     # put the old export back
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    _fsync(out.parent)


def export_merged(
    checkpoint: str | Path,
    out: str | Path,
    *,
    dtype: str = "bf16",
    base_16bit: str | Path | None = None,
    base: str | Path | None = None,
    base_quant: str = "auto",
    max_shard_size: str | int = "2GB",
    overwrite: bool = False,
    verify: bool = True,
    verify_prompts: int = 2,
    verify_tokens: int = 16,
    device: str = "auto",
    progress: bool = True,
) -> ExportReport:
    """Merge the adapter in ``checkpoint`` into its base and save a plain Hugging Face model at ``out``.

    ``base_16bit``: merge into these original 16-bit weights instead of the dequantized NF4 ones.
    ``base``: the base the adapter was trained on (default: adapter_config.json / config.yaml).
    ``base_quant``: "auto" (config.yaml, else nf4), "nf4", or "none" for an adapter trained on a 16-bit base.
    ``device``: where the base is re-quantized (and the NF4 reference model runs): "auto" = cuda when
    available, like training; the export itself is always written from CPU memory.
    Raises UserError for bad input and ExportVerificationError when the reloaded export does not match.
    """
    from .model import default_device, resolve_model_path
    t0 = time.time()
    try:
        qdevice = default_device() if device == "auto" else torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N") from None
    if qdevice.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available here")
    if dtype not in EXPORT_DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(EXPORT_DTYPES)}, got {dtype!r}")
    torch_dtype = EXPORT_DTYPES[dtype]
    checkpoint, out = Path(checkpoint), Path(out)
    max_bytes = parse_size(max_shard_size)
    cfg, tensors = read_adapter(checkpoint)          # every problem with the adapter is one UserError line
    settings = read_quant_settings(checkpoint, base_quant)
    base_id = resolve_base(checkpoint, cfg, str(base) if base else None)
    base_dir = resolve_model_path(base_id)
    merge_nf4 = settings.quantized and base_16bit is None
    weights_dir = resolve_model_path(str(base_16bit)) if base_16bit is not None else base_dir
    merge_base = "nf4-dequantized" if merge_nf4 else "16bit"
    _check_out(out, overwrite, [checkpoint, base_dir, weights_dir])

    plan, config = _plan(weights_dir, settings, merge_nf4)
    deltas = adapter_deltas(cfg, tensors, where=str(checkpoint / WEIGHTS_NAME))
    _check_deltas(deltas, plan, str(checkpoint / WEIGHTS_NAME))
    n_params = sum(int(torch.Size(s).numel()) for s in plan.expected.values())
    out_bytes = n_params * torch.finfo(torch_dtype).bits // 8
    out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out.parent).free
    if out_bytes * 1.02 + 2**20 > free:
        raise UserError(f"--out {out}: the export needs ~{_human_bytes(out_bytes)}, only {_human_bytes(free)} "
                        f"is free on that disk")
    if verify:
        _check_verify_memory(n_params, qdevice)
    log.info("merging %s into %s (%s) -> %s", checkpoint, weights_dir, merge_base, out)

    meta = {"format": "pt", "qlora_lite.merge_base": merge_base, "qlora_lite.source": str(checkpoint.resolve()),
            "qlora_lite.dtype": dtype}
    tmp = _make_temp_dir(out, "tmp")
    try:
        writer = ShardWriter(tmp, max_bytes, meta)
        for name, t in merged_tensors(weights_dir, plan, deltas, settings, torch_dtype, progress, qdevice):
            writer.add(name, t)
        shards = writer.finish()
        untied = _untied(deltas, plan)
        _copy_side_files(tmp, checkpoint, base_dir if base_dir.is_dir() else None, config, torch_dtype, bool(untied))
        from . import __version__
        report = ExportReport(
            out=str(out), checkpoint=str(checkpoint), base_model=str(base_dir), merge_base=merge_base,
            merge_base_path=str(weights_dir), dtype=dtype, quant=asdict(settings), quantized_on=str(qdevice),
            shards=shards,
            total_bytes=writer.total_bytes, merged_modules=len(deltas), untied=untied)
        big = n_params > 50_000_000
        del writer
        _collect(big)
        if verify:
            _verify(report, tmp, base_dir, weights_dir, checkpoint, settings, merge_nf4, verify_prompts, verify_tokens,
                    big, qdevice)
        report.seconds = round(time.time() - t0, 2)
        metadata = {"format_version": 1, "qlora_lite_version": __version__,
                    "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    "source_checkpoint": str(checkpoint.resolve()),
                    "adapter_sha256": _sha256(checkpoint / WEIGHTS_NAME),
                    "adapter_config": {k: cfg.get(k) for k in ("r", "lora_alpha", "use_rslora", "target_modules")},
                    **report.to_dict()}
        metadata["out"] = str(out.resolve())
        (tmp / METADATA_NAME).write_text(json.dumps(metadata, indent=2) + "\n")
        _swap_into_place(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _verify(report: ExportReport, tmp: Path, base_dir: Path, weights_dir: Path, checkpoint: Path,
            settings: QuantSettings, merge_nf4: bool, n_prompts: int, n_tokens: int, big: bool,
            device: torch.device) -> None:
    """Reload the written export with transformers and compare its logits with the adapter model in memory."""
    from transformers import AutoModelForCausalLM
    vocab = int(_read_json(tmp / "config.json").get("vocab_size") or 0)
    prompts = _prompt_ids(str(base_dir), vocab, n_prompts, n_tokens)
    expected = None
    if settings.quantized:
        ref_q, off = _adapter_model_logits(str(base_dir), checkpoint, True, settings, prompts, with_effect=True, big=big,
                                           device=device)
        report.adapter_effect = _diff(ref_q, off)
        if merge_nf4:
            expected = ref_q
    if not merge_nf4:
        ref16, off16 = _adapter_model_logits(str(weights_dir), checkpoint, False, settings, prompts,
                                             with_effect=not settings.quantized, big=big, device=device)
        expected = ref16
        if off16 is not None:
            report.adapter_effect = _diff(ref16, off16)
    model = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32, device_map=str(device))
    got = _logits(model, prompts)
    del model
    _collect(big)
    if settings.quantized:
        report.vs_adapter_model = _diff(got, ref_q)
    if not merge_nf4:
        report.vs_16bit_adapter_model = _diff(got, expected)
    check = _diff(got, expected)
    scale = max(1.0, max(float(x.abs().max()) for x in expected))
    report.tolerance = VERIFY_TOLERANCE[report.dtype] * scale
    report.prompts, report.tokens = len(prompts), max(int(x.shape[1]) for x in prompts)
    if not check.max_abs <= report.tolerance:   # also catches NaN
        what = "NF4 base + adapter" if merge_nf4 else "16-bit base + adapter"
        raise ExportVerificationError(
            f"verification failed: the reloaded export's logits differ from the {what} model by up to "
            f"{check.max_abs:.3e} (mean {check.mean_abs:.3e}), above the {report.dtype} tolerance "
            f"{report.tolerance:.3e}; nothing was written to {report.out}")
    report.verified = True


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------- CLI

def cli_export(args) -> int:
    """`qlora-lite export CHECKPOINT --out DIR ...`: 0 exported, 2 bad input, 1 verification or write failure."""
    import sys
    try:
        report = export_merged(
            args.checkpoint, args.out, dtype=args.dtype, base_16bit=args.base_16bit,
            base=getattr(args, "base", None), base_quant=getattr(args, "base_quant", "auto"),
            max_shard_size=getattr(args, "max_shard_size", "2GB"), overwrite=args.overwrite,
            verify=not getattr(args, "no_verify", False), verify_prompts=getattr(args, "verify_prompts", 2),
            verify_tokens=getattr(args, "verify_tokens", 16), device=getattr(args, "device", "auto"), progress=True)
    except ExportVerificationError as e:
        print(f"qlora-lite export: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:     # full disk, permissions: one line, and the temp dir is already gone
        print(f"qlora-lite export: error: writing {args.out} failed ({e.strerror or e}); "
              f"nothing was written there", file=sys.stderr)
        return 1
    print(report.table())
    return 0
