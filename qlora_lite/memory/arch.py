"""Model facts for the memory profiler: read a config, build the model on the meta device, count.

Parameter counts come from the real transformers model built with `torch.device("meta")` (no
memory, no weights), so any causal-LM architecture transformers knows is counted exactly; only
the shapes a formula needs (hidden size, heads, ...) are read from the config.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from ..errors import UserError

PRESET_DIR = Path(__file__).with_name("presets")


def preset_names() -> list[str]:
    """Names of the bundled config.json presets (no weights), e.g. 'llama-2-7b'."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


@dataclass(frozen=True)
class LinearGroup:
    """Linear layers that share a name suffix, e.g. every layer's q_proj."""

    name: str  # last component of the module path, e.g. "q_proj"
    in_features: int  # k
    out_features: int  # d
    count: int  # how many modules carry this name (usually num_hidden_layers)
    has_bias: bool  # bias stays 16-bit when the weight is quantized


@dataclass(frozen=True)
class ModelFacts:
    """What the estimate needs to know about one architecture, counted on the meta device."""

    name: str  # preset name or path the facts came from
    model_type: str  # HF model_type, e.g. "llama"
    architecture: str  # class name of the causal-LM model, e.g. "LlamaForCausalLM"
    total_params: int  # unique parameters (tied embeddings counted once)
    linear_params: int  # weights of nn.Linear / Conv1D in the blocks: what NF4 quantizes
    linear_bias_params: int  # biases of those linears (kept 16-bit)
    embedding_params: int  # token (+ position) embeddings
    lm_head_params: int  # output projection when not tied to the embeddings (never quantized)
    norm_params: int  # LayerNorm / RMSNorm weights and biases
    other_params: int  # anything else
    linears: tuple[LinearGroup, ...]  # quantizable linears grouped by name
    hidden_size: int  # h
    intermediate_size: int  # MLP width
    num_layers: int  # L
    num_heads: int  # attention heads
    num_kv_heads: int  # key/value heads (GQA)
    head_dim: int  # per-head width
    vocab_size: int  # V
    tied_embeddings: bool  # lm_head shares the embedding matrix
    gated_mlp: bool  # SwiGLU-style gate/up/down (Llama) rather than fc/proj (GPT-2)
    config: dict = field(default_factory=dict, compare=False, repr=False)  # the config.json dict

    def linear_groups(self, name: str) -> list[LinearGroup]:
        return [g for g in self.linears if g.name == name]


def _read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(d, dict):
        raise UserError(f"{path}: expected a JSON object (a Hugging Face config.json)")
    return d


def resolve_config_dict(spec: str) -> tuple[str, dict]:
    """A preset name, a config.json file or a model directory -> (display name, config dict)."""
    p = Path(spec)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise UserError(f"{spec}: directory has no config.json (expected a Hugging Face model directory)")
        return str(p), _read_json(p / "config.json")
    if p.is_file():
        return str(p), _read_json(p)
    if (PRESET_DIR / f"{spec}.json").is_file():
        return spec, _read_json(PRESET_DIR / f"{spec}.json")
    raise UserError(f"unknown model {spec!r}: not a file, a model directory or a preset; "
                    f"known presets: {', '.join(preset_names())}")


def _hf_config(name: str, d: dict):
    import transformers
    mt = d.get("model_type")
    if not mt:
        raise UserError(f"{name}: config has no 'model_type' (expected a Hugging Face causal-LM config.json)")
    d = {k: v for k, v in d.items() if k != "model_type"}
    try:
        cfg = transformers.AutoConfig.for_model(mt, **d)
    except ValueError:
        raise UserError(f"{name}: model_type {mt!r} is not known to transformers "
                        f"{transformers.__version__}") from None
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if mt not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UserError(f"{name}: model_type {mt!r} is not a causal language model "
                        f"(no AutoModelForCausalLM class for it)")
    return cfg


def build_meta_model(cfg, dtype=None):
    """The real transformers causal-LM module tree with meta tensors: shapes, no storage."""
    import torch
    import transformers
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype or torch.float32)


def _is_linear(mod) -> bool:
    import torch.nn as nn
    from transformers.pytorch_utils import Conv1D
    if isinstance(mod, (nn.Linear, Conv1D)):
        return True
    # the 4-bit linears of this project (or bitsandbytes) also count as linears
    return type(mod).__name__ in ("Linear4bit", "Linear8bitLt")


def count_model(model, name: str = "model", config: dict | None = None) -> ModelFacts:
    """Classify every unique parameter of a (meta or real) model by where it lives."""
    import torch.nn as nn
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    seen: set[int] = set()
    buckets = dict(linear=0, linear_bias=0, embedding=0, lm_head=0, norm=0, other=0)
    groups: dict[str, list] = {}
    for mname, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            if id(p) in seen:
                continue  # tied weights count once
            seen.add(id(p))
            n = p.numel()
            if mod is head:
                buckets["lm_head"] += n
            elif isinstance(mod, nn.Embedding):
                buckets["embedding"] += n
            elif _is_linear(mod):
                buckets["linear_bias" if pname == "bias" else "linear"] += n
            elif "norm" in type(mod).__name__.lower():
                buckets["norm"] += n
            else:
                buckets["other"] += n
        if _is_linear(mod) and mod is not head:
            w = mod.weight
            if isinstance(mod, Conv1D):  # GPT-2 stores [in, out]
                k, d = w.shape
            else:
                k, d = getattr(mod, "in_features", None), getattr(mod, "out_features", None)
            short = mname.rsplit(".", 1)[-1]
            # GPT-2 has two different "c_proj"s (attention 768x768, MLP 3072x768): key by shape too
            g = groups.setdefault((short, k, d), [k, d, 0, getattr(mod, "bias", None) is not None])
            g[2] += 1
    c = model.config
    h = c.hidden_size
    nh = c.num_attention_heads
    hd = getattr(c, "head_dim", None) or h // nh
    inter = getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * h
    linears = tuple(LinearGroup(key[0], *v) for key, v in groups.items())
    return ModelFacts(
        name=name, model_type=c.model_type, architecture=type(model).__name__,
        total_params=sum(buckets.values()), linear_params=buckets["linear"],
        linear_bias_params=buckets["linear_bias"], embedding_params=buckets["embedding"],
        lm_head_params=buckets["lm_head"], norm_params=buckets["norm"], other_params=buckets["other"],
        linears=linears, hidden_size=h, intermediate_size=inter, num_layers=c.num_hidden_layers,
        num_heads=nh, num_kv_heads=getattr(c, "num_key_value_heads", None) or nh, head_dim=hd,
        vocab_size=c.vocab_size, tied_embeddings=head is None or head.weight is model.get_input_embeddings().weight,
        gated_mlp=any(g.name in ("gate_proj", "w1", "gate_up_proj") for g in linears),
        config=config or {},
    )


@lru_cache(maxsize=32)
def _facts_cached(name: str, config_json: str) -> ModelFacts:
    d = json.loads(config_json)
    cfg = _hf_config(name, d)
    try:
        model = build_meta_model(cfg)
    except Exception as e:  # an invalid combination of config values
        raise UserError(f"{name}: transformers could not build the model from this config "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    return count_model(model, name, d)


def model_facts(spec: str | dict, name: str | None = None) -> ModelFacts:
    """Preset name / config.json path / model dir / config dict -> ModelFacts (cached)."""
    if isinstance(spec, dict):
        name, d = name or spec.get("_name_or_path") or "config", spec
    else:
        name, d = resolve_config_dict(os.fspath(spec))
    return _facts_cached(name, json.dumps(d, sort_keys=True))


def hf_config(spec: str | dict):
    """The transformers config object for a preset / path / dict (used by simulate and measure)."""
    if isinstance(spec, dict):
        return _hf_config("config", spec)
    name, d = resolve_config_dict(os.fspath(spec))
    return _hf_config(name, d)
