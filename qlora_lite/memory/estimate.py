"""The memory model: bytes per category and per phase of one training step, from formulas.

Every term says where it comes from. Symbols: N = parameters, T = batch * seq tokens, h = hidden
size, i = MLP width, q = heads * head_dim, kv = kv_heads * head_dim, V = vocabulary, L = layers,
e = bytes per activation element (the compute dtype: 2 for bf16/fp16, 4 for fp32).

Activations are counted the way PyTorch autograd keeps them for a Llama-style block (RMSNorm,
RoPE, SwiGLU, transformers' modeling code): each op saves only what its backward needs for the
inputs that require grad, so a frozen linear keeps no input, a LoRA adapter keeps its input,
and a trainable linear keeps its input. Korthikanti et al. 2022 count 34*s*b*h + 5*a*s^2*b bytes
per GPT layer (16-bit, with dropout); Llama has no dropout in the block, a gated MLP and fp32
norm upcasts, so it gets its own count below. Other architectures reuse the count (with a plain
two-matrix MLP when there is no gate) and are approximate.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from ..errors import UserError
from ..nf4 import bits_per_param
from .arch import ModelFacts

GiB = 1024 ** 3
MiB = 1024 ** 2

# -------------------------------------------------------------------------- storage facts
# NF4: 4 bits per value + one absmax per 64-value block. Without double quantization the absmax
# is fp32: 0.5 + 4/64 = 0.5625 B/param. With it (QLoRA §3) the absmax is 8-bit with one fp32
# constant per 256 absmaxes: 0.5 + 1/64 + 4/(64*256) = 0.515869 B/param.
NF4_BYTES_DQ = bits_per_param(double_quant=True) / 8     # 0.5159: 4 bits + 8-bit absmax/64 + fp32/(64*256)
NF4_BYTES = bits_per_param(double_quant=False) / 8         # 0.5625: 4 bits + fp32 absmax/64

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

METHODS = ("full", "full-mixed", "lora", "qlora")
METHOD_HELP = {
    "full": "full fine-tuning, pure 16-bit weights and grads, fp32 AdamW states (12 B/param)",
    "full-mixed": "full fine-tuning, mixed precision: fp32 master weights and grads + 16-bit copies (18 B/param)",
    "lora": "LoRA adapters on a frozen 16-bit base",
    "qlora": "LoRA adapters on a frozen NF4 base (QLoRA)",
}

# Optimizers: bytes of state per trainable parameter, as a function of the parameter's bytes.
# AdamW keeps two moments. torch.optim.AdamW allocates them like the parameter (zeros_like);
# bitsandbytes' 32-bit optimizers keep fp32 states whatever the parameter dtype; its 8-bit ones
# keep 1 byte per moment plus one fp32 absmax per 256-value block (tensors < 4096 values stay
# 32-bit). Paged variants are the same sizes in CUDA unified memory, evictable to host RAM.
OPTIMIZERS = ("adamw_32bit", "adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit", "adamw", "adamw_torch")
ADAM8_BYTES = 2 * (1 + 4 / 256)
PAGED_MIN_NUMEL = 100_000  # bitsandbytes pages only tensors with >= 1e5 elements

CATEGORIES = (
    "weights (NF4)",  # packed 4-bit linears + their quantization constants
    "weights (16-bit)",  # base weights kept in the compute dtype (everything for LoRA/full)
    "master weights (fp32)",  # fp32 copy of every weight (mixed-precision full fine-tuning)
    "LoRA adapters",  # A and B matrices
    "gradients",  # .grad of every trainable parameter
    "optimizer states",  # AdamW moments
    "activations",  # tensors saved for backward (+ recomputed layer under checkpointing)
    "logits + loss",  # B x S x V logits, fp32 upcast, log-softmax and their gradients (one chunk when fused)
    "transient",  # short-lived buffers: dequantized weight, backward grads in flight, optimizer temporaries
    "CUDA context + allocator",  # outside the tensor count: driver context, caching-allocator slack
)


@dataclass(frozen=True)
class Settings:
    """One training configuration to estimate."""

    method: str = "qlora"  # full | full-mixed | lora | qlora
    seq_len: int = 512  # tokens per sequence (s)
    batch_size: int = 1  # sequences per micro-batch (b)
    lora_r: int = 16  # LoRA rank
    lora_targets: str | tuple[str, ...] = "all-linear"  # all-linear, name suffixes, or a regex
    lora_dropout: float = 0.0  # dropout on the adapter input (adds a copy + mask per adapted linear)
    optimizer: str = "paged_adamw_32bit"  # see OPTIMIZERS
    grad_ckpt: bool = True  # per-layer activation checkpointing
    attn_impl: str = "sdpa"  # sdpa | flash_attention_2 (no s^2 term) | eager (s^2 term)
    dtype: str = "bf16"  # compute dtype = 16-bit weight dtype (fp32 on CPU)
    adapter_dtype: str | None = None  # LoRA weights' dtype; None = the compute dtype
    double_quant: bool = True  # NF4 double quantization
    device: str = "cuda"  # cuda | cpu: cpu has no CUDA context and no allocator slack
    foreach_optimizer: bool | None = None  # torch AdamW foreach (one state-sized temporary); None = on for cuda
    cuda_context_mib: float = 500.0  # CUDA driver context + cuBLAS workspace, outside PyTorch's allocator
    allocator_overhead: float = 0.05  # caching-allocator slack (reserved - allocated) as a fraction of the peak
    keep_logits: bool = True  # the model output (holding the logits) is alive during backward
    fused_loss: bool = False  # (Q)LoRA: the trainer's fused, chunked head + loss (qlora_lite.loss), no full logits
    padded: bool = False  # batches carry padding: transformers builds a [b,1,s,s] mask and SDPA repeats GQA k/v

    def validate(self) -> "Settings":
        if self.method not in METHODS:
            raise UserError(f"method {self.method!r}: expected one of {', '.join(METHODS)}")
        for name in ("seq_len", "batch_size", "lora_r"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise UserError(f"--{name.replace('_', '-')} {v!r}: expected a positive integer")
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"optimizer {self.optimizer!r}: expected one of {', '.join(OPTIMIZERS)}")
        if self.dtype not in DTYPE_BYTES or (self.adapter_dtype or self.dtype) not in DTYPE_BYTES:
            raise UserError(f"dtype {self.dtype!r}/{self.adapter_dtype!r}: expected one of {', '.join(DTYPE_BYTES)}")
        if self.attn_impl not in ("sdpa", "eager", "flash_attention_2"):
            raise UserError(f"attention implementation {self.attn_impl!r}: expected sdpa, eager or flash_attention_2")
        if not 0 <= self.lora_dropout < 1:
            raise UserError(f"lora dropout {self.lora_dropout!r}: expected 0 <= p < 1")
        return self


@dataclass
class MemoryEstimate:
    """The answer: bytes per category at the peak phase, every phase's total, and the facts used."""

    model: str  # preset / path the facts came from
    settings: dict  # the Settings used, as a dict
    total_params: int  # all parameters of the base model
    trainable_params: int  # parameters receiving gradients
    trainable_share: float  # trainable / (base + adapters)
    lora_params_per_matrix: dict  # e.g. {"q_proj 4096x4096": 131072}
    phases: dict  # phase name -> {category: bytes}; every phase total is sum of its categories
    peak_phase: str  # the phase with the largest total
    peak_bytes: float  # its total, context and allocator slack included
    tensor_peak_bytes: float  # peak without "CUDA context + allocator": what a live-tensor tracker sees
    pageable_bytes: float  # optimizer state that a paged optimizer may keep in host memory
    activations_no_ckpt: float  # saved activations without checkpointing (for comparison)
    activations_ckpt: float  # saved activations with checkpointing (peak during recompute included)
    notes: list = field(default_factory=list)  # assumptions worth reading

    @property
    def peak(self) -> float:
        """Same as peak_bytes."""
        return self.peak_bytes

    @property
    def categories(self) -> dict:
        """Bytes per category at the peak phase."""
        return self.phases[self.peak_phase]

    def to_dict(self) -> dict:
        return asdict(self)


# -------------------------------------------------------------------------- parameter bookkeeping
def lora_target_groups(f: ModelFacts, targets) -> list:
    """The linear groups a LoRA target spec selects (lm_head is never in f.linears)."""
    if targets in ("all-linear", "all", None):
        return list(f.linears)
    if isinstance(targets, str):  # a regex over the module name suffix
        rx = re.compile(targets)
        out = [g for g in f.linears if rx.search(g.name)]
    else:
        out = [g for g in f.linears if g.name in set(targets)]
    if not out:
        names = sorted({g.name for g in f.linears})
        raise UserError(f"lora targets {targets!r} match no linear layer of {f.name}; its linears: {', '.join(names)}")
    return out


def lora_params(f: ModelFacts, r: int, targets) -> tuple[int, dict]:
    """Adapter parameters: r * (in + out) per adapted d x k matrix (Hu et al. 2021)."""
    per, total = {}, 0
    for g in lora_target_groups(f, targets):
        n = r * (g.in_features + g.out_features)
        per[f"{g.name} {g.out_features}x{g.in_features}"] = n
        total += n * g.count
    return total, per


def _opt_state_bytes(optimizer: str, numel: int, param_bytes: int, tensor_sizes: list[int]) -> float:
    if optimizer in ("adamw", "adamw_torch"):
        return 2 * param_bytes * numel  # torch AdamW: exp_avg, exp_avg_sq like the parameter
    if optimizer.endswith("8bit"):
        small = sum(n for n in tensor_sizes if n < 4096)  # bitsandbytes keeps these 32-bit
        return ADAM8_BYTES * (numel - small) + 8 * small
    return 8.0 * numel  # bitsandbytes 32-bit: two fp32 moments


# -------------------------------------------------------------------------- activations
def layer_activation_bytes(f: ModelFacts, st: Settings, adapted: set, first_layer: bool = False) -> float:
    """Bytes one decoder layer saves for backward (no checkpointing), Llama-style block.

    adapted: names of the linears carrying LoRA in this layer.
    first_layer: the layer right after the embeddings (whose output needs no grad without full FT).
    """
    T = st.batch_size * st.seq_len
    b, s = st.batch_size, st.seq_len
    h, i = f.hidden_size, f.intermediate_size
    q = f.num_heads * f.head_dim
    kv = f.num_kv_heads * f.head_dim
    e = DTYPE_BYTES[st.dtype]
    ea = DTYPE_BYTES[st.adapter_dtype or st.dtype]
    full = st.method.startswith("full")
    mask_b = 1  # LoRA dropout keeps a bool mask (lora.LoRADropout on CPU, torch's kernel on CUDA)

    def keeps_input(*names) -> bool:
        # a linear saves its input when its weight is trainable, or when an adapter reads the input
        # as is; with dropout (or a dtype cast) the adapter saves its own copy instead (lora_extra)
        plain = st.lora_dropout == 0 and ea == e
        return full or (plain and any(n in adapted for n in names))

    def lora_extra(name: str, fan_in: int) -> float:
        if name not in adapted:
            return 0.0
        extra = T * st.lora_r * ea  # A's output, saved by B
        if st.lora_dropout > 0:
            extra += T * fan_in * (e + mask_b)  # dropped copy of the input (saved by A) + mask
        elif ea != e:
            extra += T * fan_in * ea  # input cast to the adapter dtype (saved by A)
        return extra

    total = 0.0
    if first_layer and not full:
        # the first layer's input (frozen embeddings) needs no gradient: its norm saves nothing,
        # and dropout on the q/k/v adapters' input keeps no noise tensor
        n_qkv = len(adapted & {"q_proj", "k_proj", "v_proj", "c_attn", "qkv_proj"})
        total -= 4 * T * h + 4 * T + (n_qkv * T * h * mask_b if st.lora_dropout > 0 else 0)
    # RMSNorm x2 (Llama: x.to(fp32); pow(2).mean; x * rsqrt(var + eps); weight * x.to(dtype)):
    # pow and mul keep the fp32 input (the input itself in fp32, an fp32 copy in 16-bit) and
    # rsqrt's fp32 [T,1] output; a trainable weight also keeps the normalized 16-bit tensor.
    total += 2 * (4 * T * h + 4 * T + (T * h * e if full else 0))
    # Attention input (norm output), kept by q/k/v when trainable or adapted.
    if keeps_input("q_proj", "k_proj", "v_proj", "c_attn", "qkv_proj", "query_key_value"):
        total += T * h * e
    for name, fan_in in (("q_proj", h), ("k_proj", h), ("v_proj", h), ("c_attn", h), ("qkv_proj", h)):
        total += lora_extra(name, fan_in)
    # RoPE (q*cos + rotate_half(q)*sin) keeps only the shared cos/sin; SDPA keeps the rotated q, k
    # and v, its output and fp32 logsumexp [b, heads, s]. Flash/SDPA: no s^2 term.
    total += T * (q + 2 * kv) * e + T * q * e + 4 * b * f.num_heads * s
    if st.padded and st.attn_impl == "sdpa":
        # with a padding mask transformers cannot use SDPA's native GQA: k and v are repeated to
        # all heads (repeat_kv) and those copies are what SDPA keeps; SDPA turns the boolean mask
        # into a [b, 1, s, s] mask in the compute dtype in every layer, and keeps it
        total += 2 * T * (q - kv) * e + b * s * s * e
    if st.attn_impl == "eager":
        # eager: scores = q @ k^T (s^2 per head), softmax in fp32 keeps its output, the cast back
        # to e keeps another copy for P @ V (Korthikanti's 5*a*s^2*b with 2-byte P and 1-byte mask);
        # k and v are repeated to all heads (repeat_kv) before the matmuls.
        p_bytes = 4 + (e if e != 4 else 0)
        total += b * f.num_heads * s * s * p_bytes + 2 * T * (q - kv) * e
    # o_proj's input [T, q]: SDPA/flash return their output in [b, s, heads, hd] memory order, so
    # transformers' transpose(1, 2).contiguous() is free and the input is the saved SDPA output;
    # eager attention makes a real copy
    if st.attn_impl == "eager" and keeps_input("o_proj", "c_proj"):
        total += T * q * e
    total += lora_extra("o_proj", q)
    # Post-attention residual stream kept by the second norm: counted in the norm term above.
    # MLP, SwiGLU: gate [T,i] kept by SiLU, silu(gate) and up kept by the product,
    # the product kept by down_proj when trainable/adapted; input [T,h] kept by gate/up.
    if keeps_input("gate_proj", "up_proj", "c_fc", "gate_up_proj", "fc1"):
        total += T * h * e
    for name in ("gate_proj", "up_proj", "c_fc", "gate_up_proj", "fc1"):
        total += lora_extra(name, h)
    if f.gated_mlp:
        total += 3 * T * i * e
    else:
        total += T * i * e  # fc output kept by the activation (GELU: approximate)
    if keeps_input("down_proj", "c_proj", "fc2"):
        total += T * i * e
    total += lora_extra("down_proj", i)
    return total


def layer_backward_transient(f: ModelFacts, st: Settings) -> float:
    """Gradients in flight while one layer runs backward, beyond what the layer saved.

    At the SwiGLU product's backward the grads of silu(gate) and of up ([T, i] each) and the
    residual-stream grad ([T, h]) exist, while the down projection's saved input has already
    been released: net about one [T, i] plus one [T, h] tensor (checked against MemTracker on
    tiny Llamas, with and without dropout, LoRA and full fine-tuning).
    """
    T = st.batch_size * st.seq_len
    return T * (f.intermediate_size + f.hidden_size) * DTYPE_BYTES[st.dtype]


def logits_bytes(f: ModelFacts, st: Settings) -> dict:
    """Logits and the loss (transformers' ForCausalLMLoss: logits.float() -> cross_entropy).

    forward: logits [T, V] in e (held by the model output) + their fp32 upcast (only when e < 4)
    + log_softmax's fp32 output (kept for backward).
    backward: grad of the log-softmax output and grad of its input (fp32 each) appear while the
    saved output still lives: e + 12 bytes per logit at the worst moment.
    """
    TV = st.batch_size * st.seq_len * f.vocab_size
    e = DTYPE_BYTES[st.dtype]
    if st.fused_loss and st.method in ("lora", "qlora"):
        # loss.linear_cross_entropy: one chunk of fp32 logits at a time (with its compute-dtype matmul
        # output and gradient when e < 4) and the [T, h] hidden-state gradient kept for backward
        from ..loss import CHUNK_BYTES
        T = st.batch_size * st.seq_len
        rows = min(T, max(1, CHUNK_BYTES // (4 * f.vocab_size)))
        grad_h = T * f.hidden_size * e
        return {"forward": rows * f.vocab_size * (4 + (2 * e if e < 4 else 0)) + grad_h,
                "backward": 2 * grad_h, "held": grad_h}
    held = TV * e if st.keep_logits else 0
    fwd = held + (TV * 4 if e < 4 else 0) + TV * 4
    bwd = (TV * e if st.keep_logits or e == 4 else 0) + 12 * TV
    return {"forward": fwd, "backward": bwd, "held": held}


# -------------------------------------------------------------------------- the estimate
def estimate_memory(model_cfg, *, method: str = "qlora", seq_len: int = 512, batch_size: int = 1,
                    lora_r: int = 16, **kw) -> MemoryEstimate:
    """Estimate the memory of one training step.

    model_cfg: ModelFacts, a preset name, a config.json path / model dir, or a config dict.
    Other keyword arguments are Settings fields (optimizer, grad_ckpt, attn_impl, dtype, ...).
    """
    from .arch import model_facts
    f = model_cfg if isinstance(model_cfg, ModelFacts) else model_facts(model_cfg)
    st = Settings(method=method, seq_len=seq_len, batch_size=batch_size, lora_r=lora_r, **kw).validate()
    return _estimate(f, st)


def _estimate(f: ModelFacts, st: Settings) -> MemoryEstimate:
    e = DTYPE_BYTES[st.dtype]
    ea = DTYPE_BYTES[st.adapter_dtype or st.dtype]
    T = st.batch_size * st.seq_len
    N = f.total_params
    non_linear = N - f.linear_params  # embeddings, lm_head, norms, biases: never quantized
    notes = []
    c = dict.fromkeys(CATEGORIES, 0.0)

    # ---- weights and trainable parameters
    if st.method == "qlora":
        nf4 = NF4_BYTES_DQ if st.double_quant else NF4_BYTES
        # (the 256-entry code of the second quantization is one tensor shared by all layers)
        c["weights (NF4)"] = f.linear_params * nf4
        c["weights (16-bit)"] = non_linear * e
    elif st.method == "full-mixed":
        # fp32 master weights are the model; autocast makes 16-bit copies of every weight the
        # matmuls use, which stay alive (saved for backward) until their layer's backward ran.
        c["master weights (fp32)"] = 4 * N
        c["weights (16-bit)"] = (f.linear_params + f.lm_head_params) * 2
    else:
        c["weights (16-bit)"] = N * e

    if st.method.startswith("full"):
        trainable = N
        pbytes = 4 if st.method == "full-mixed" else e
        sizes = [g.in_features * g.out_features for g in f.linears for _ in range(g.count)] + \
            [n for n in (f.embedding_params, f.lm_head_params) if n]  # roughly one tensor each
        lora_total, per_matrix = 0, {}
    else:
        lora_total, per_matrix = lora_params(f, st.lora_r, st.lora_targets)
        trainable = lora_total
        pbytes = ea
        c["LoRA adapters"] = lora_total * ea
        sizes = [st.lora_r * n for g in lora_target_groups(f, st.lora_targets)
                 for n in (g.in_features, g.out_features) for _ in range(g.count)]
    grads = trainable * pbytes
    opt = _opt_state_bytes(st.optimizer, trainable, pbytes, sizes)
    pageable = 0.0
    if st.optimizer.startswith("paged"):
        big = sum(n for n in sizes if n >= PAGED_MIN_NUMEL) if not st.method.startswith("full") else \
            trainable - sum(n for n in sizes if n < PAGED_MIN_NUMEL)
        pageable = opt * (big / trainable) if trainable else 0.0

    # ---- activations
    adapted = set() if st.method.startswith("full") else {g.name for g in lora_target_groups(f, st.lora_targets)}
    per_layer = layer_activation_bytes(f, st, adapted)
    full = st.method.startswith("full")
    # Outside the blocks: final norm keeps its fp32 input (+ normalized copy when trainable); the
    # lm_head keeps its input only when trainable; cos/sin of RoPE [b, s, head_dim] x2 are shared.
    outer = 4 * T * f.hidden_size + 4 * T + (2 * T * f.hidden_size * e if full else 0) \
        + 2 * T * f.head_dim * e
    if st.padded and st.attn_impl != "flash_attention_2":
        outer += st.batch_size * st.seq_len ** 2  # the boolean [b, 1, s, s] mask, shared by all layers
    layer_in = T * f.hidden_size * e  # what a checkpointed layer keeps: its input
    first = layer_activation_bytes(f, st, adapted, first_layer=True)
    act_no_ckpt = (f.num_layers - 1) * per_layer + first + outer
    act_ckpt_fwd = f.num_layers * layer_in + outer
    act_fwd = act_ckpt_fwd if st.grad_ckpt else act_no_ckpt
    act_ckpt = act_ckpt_fwd + per_layer  # + one layer recomputed at a time in backward
    bwd_transient = layer_backward_transient(f, st)
    lg = logits_bytes(f, st)

    # ---- transients
    biggest = max(g.in_features * g.out_features for g in f.linears)
    # one dequantized weight [out, in] per 4-bit matmul (bitsandbytes backend; the pure-torch
    # reference backend dequantizes through fp32 and needs a few times more, briefly)
    dequant = biggest * e if st.method == "qlora" else 0.0
    foreach = st.foreach_optimizer if st.foreach_optimizer is not None else st.device == "cuda"
    if st.optimizer in ("adamw", "adamw_torch"):
        # torch AdamW: foreach computes sqrt(exp_avg_sq) for all params at once (one state-sized
        # temporary); the per-parameter loop makes sqrt(v) and sqrt(v) / bias_correction for one
        # tensor at a time (two temporaries of the largest tensor)
        step_tmp = (trainable if foreach else 2 * max(sizes, default=0)) * pbytes
    else:
        step_tmp = 0.0  # bitsandbytes updates in place, in one fused kernel per tensor

    base = {k: c[k] for k in ("weights (NF4)", "weights (16-bit)", "master weights (fp32)", "LoRA adapters")}

    def phase(**kv) -> dict:
        p = dict.fromkeys(CATEGORIES, 0.0)
        p.update(base)
        p.update(kv)
        return p

    # A steady-state step: optimizer states exist from the previous step; grads were set to None.
    # mixed precision: the autocast 16-bit weight copies are gone once each layer's backward ran
    after_bwd = {"weights (16-bit)": 0.0} if st.method == "full-mixed" else {}
    head_grads = (f.lm_head_params + f.norm_params) * pbytes if full else 0.0
    L = f.num_layers
    if st.grad_ckpt:
        # layer l recomputes its activations; checkpoints of layers 0..l are still held
        top = act_ckpt_fwd + per_layer
        bottom = layer_in + per_layer
    else:
        top = act_no_ckpt  # the top layer's backward starts with everything saved
        bottom = per_layer
    # at the bottom layer the final norm's saved tensors are gone; the embedding's and this
    # layer's weight grads are not written yet
    layer_params = (f.linear_params + f.linear_bias_params + f.norm_params) / max(L, 1)
    bottom_grads = max(grads - (f.embedding_params + layer_params) * pbytes, 0.0) if full else grads
    phases = {
        "load": phase(**after_bwd),
        "forward": phase(**{"optimizer states": opt, "activations": act_fwd,
                            "logits + loss": lg["forward"], "transient": dequant}),
        # loss backward: every saved activation, the logits' gradients
        "backward (loss)": phase(**{"optimizer states": opt, "activations": act_fwd,
                                    "logits + loss": lg["backward"], "transient": dequant}),
        # the top layer's backward (most activations) and the bottom layer's (most gradients)
        "backward (top layer)": phase(**{"optimizer states": opt, "activations": top, "gradients": head_grads,
                                         "logits + loss": lg["held"], "transient": dequant + bwd_transient}),
        "backward (bottom layer)": phase(**after_bwd, **{"optimizer states": opt, "gradients": bottom_grads,
                                         "activations": bottom, "logits + loss": lg["held"],
                                         "transient": dequant + bwd_transient}),
        "optimizer step": phase(**after_bwd, **{"optimizer states": opt, "gradients": grads,
                                                "transient": step_tmp, "logits + loss": lg["held"]}),
    }
    tensor_peak_phase = max(phases, key=lambda k: sum(phases[k].values()))
    tensor_peak = sum(phases[tensor_peak_phase].values())
    overhead = 0.0
    if st.device == "cuda":
        overhead = st.cuda_context_mib * MiB + st.allocator_overhead * tensor_peak
        notes.append(f"CUDA context {st.cuda_context_mib:.0f} MiB + allocator slack "
                     f"{st.allocator_overhead:.0%} of the tensor peak (configurable constants)")
    for p in phases.values():
        p["CUDA context + allocator"] = overhead
    if not f.gated_mlp or f.model_type not in ("llama", "mistral", "qwen2"):
        notes.append(f"activations use the Llama-style count; {f.model_type} is approximate")
    if st.method == "qlora":
        notes.append("frozen 4-bit linears keep no input (bitsandbytes' matmul_4bit saves only the packed "
                     "weight; checked with 0.50); adapters keep theirs")
    denom = N + (lora_total if not full else 0)
    return MemoryEstimate(
        model=f.name, settings=asdict(st), total_params=N, trainable_params=trainable,
        trainable_share=trainable / denom if denom else 0.0, lora_params_per_matrix=per_matrix,
        phases=phases, peak_phase=tensor_peak_phase, peak_bytes=tensor_peak + overhead,
        tensor_peak_bytes=tensor_peak, pageable_bytes=pageable, activations_no_ckpt=act_no_ckpt,
        activations_ckpt=act_ckpt, notes=notes)
