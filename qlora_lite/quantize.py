"""A frozen 4-bit linear layer and the function that swaps a model's linears for it.

``Linear4bit`` keeps the NF4 weight as plain buffers (a uint8 tensor of packed codes plus the
absmax constants), not as a bitsandbytes ``Params4bit``. That keeps the module an ordinary
``nn.Module`` that ``.to()``, ``state_dict()`` and FakeTensorMode all understand, while the
arithmetic still runs on bitsandbytes' kernels: a ``QuantState`` is built around the buffers
and handed to ``bnb.matmul_4bit``.

Two backends, one setting:

* ``"bnb"``   bitsandbytes quantizes and runs the matmul (CUDA and CPU). The production path.
* ``"torch"`` our reference in ``nf4.py`` quantizes, and a small autograd Function dequantizes
              in forward and again in backward, saving only the 4-bit weight. The fallback
              where bitsandbytes cannot be imported, and what the tests hold bitsandbytes to.

``"auto"`` picks ``"bnb"`` when it imports, else ``"torch"``.
"""
from __future__ import annotations

import logging
from functools import lru_cache
from typing import Iterable

import torch
import torch.nn as nn

from .nf4 import DQ_BLOCKSIZE, NF4_BLOCKSIZE, NF4State, dequantize_nf4, double_quantize, dynamic_code, quantize_nf4

log = logging.getLogger(__name__)

BACKENDS = ("auto", "bnb", "torch")


@lru_cache(maxsize=None)
def bnb_available() -> bool:
    """True when bitsandbytes imports and has its 4-bit functions (it may lack a build for this platform)."""
    try:
        import bitsandbytes  # noqa: F401
        import bitsandbytes.functional  # noqa: F401
        return hasattr(bitsandbytes, "matmul_4bit")
    except Exception as e:  # a broken install raises more than ImportError
        log.info("bitsandbytes unavailable (%s); using the PyTorch NF4 reference", e)
        return False


def resolve_backend(backend: str = "auto") -> str:
    if backend not in BACKENDS:
        raise ValueError(f"quant backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "bnb" if bnb_available() else "torch"
    if backend == "bnb" and not bnb_available():
        raise RuntimeError("quant backend 'bnb' was asked for but bitsandbytes cannot be imported")
    return backend


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2 style Conv1D: a linear layer whose weight is stored transposed, [in, out]."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Linear4bit)) or is_conv1d(module)


class _DequantMatmul(torch.autograd.Function):
    """y = x @ dequant(W)^T. Saves only the 4-bit state; backward dequantizes again (no 16-bit copy kept)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, state: NF4State) -> torch.Tensor:
        ctx.state = state
        return x @ dequantize_nf4(state, x.dtype).t()               # (..., out)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None
        w = dequantize_nf4(ctx.state, grad_out.dtype)                # (out, in)
        return grad_out @ w, None                                    # (..., in)


class Linear4bit(nn.Module):
    """A frozen linear layer whose weight is stored in NF4 (optionally double-quantized).

    Buffers: ``qweight`` uint8 [ceil(out*in/2)]; ``absmax`` fp32 [blocks] or, with double
    quantization, uint8 [blocks] plus ``absmax2`` fp32, ``code2`` fp32 [256] and ``offset``.
    Inputs are cast to ``compute_dtype`` for the matmul and the output is cast back.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *,
                 compute_dtype: torch.dtype = torch.float32, backend: str = "auto",
                 double_quant: bool = True, blocksize: int = NF4_BLOCKSIZE, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self.backend = resolve_backend(backend)
        self.double_quant, self.blocksize = double_quant, blocksize
        n = in_features * out_features
        n_blocks = -(-n // blocksize)
        self.register_buffer("qweight", torch.zeros((n + 1) // 2, dtype=torch.uint8, device=device))
        if double_quant:
            self.register_buffer("absmax", torch.zeros(n_blocks, dtype=torch.uint8, device=device))
            self.register_buffer("absmax2", torch.zeros(-(-n_blocks // DQ_BLOCKSIZE), dtype=torch.float32, device=device))
            self.register_buffer("code2", dynamic_code(device))
            self.register_buffer("offset", torch.zeros((), dtype=torch.float32, device=device))
        else:
            self.register_buffer("absmax", torch.zeros(n_blocks, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=compute_dtype, device=device),
                                 requires_grad=False) if bias else None
        self._bnb_state = None  # cached bitsandbytes QuantState, keyed on the buffers' identity
        self.from_conv1d = False  # quantized from a GPT-2 Conv1D ([in, out]); stored as [out, in] like any linear

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, *, transpose: bool = False,
                    compute_dtype: torch.dtype = torch.float32, backend: str = "auto",
                    double_quant: bool = True, device=None) -> "Linear4bit":
        """Quantize a [out, in] weight (``transpose=True`` for a Conv1D's [in, out]) on ``device``."""
        device = torch.device(device) if device is not None else weight.device
        w = weight.detach().to(device)
        if transpose:
            w = w.t()
        out_features, in_features = w.shape
        layer = cls(in_features, out_features, bias is not None, compute_dtype=compute_dtype, backend=backend,
                    double_quant=double_quant, device=device)
        layer.load_weight(w)
        layer.from_conv1d = transpose
        if bias is not None:
            layer.bias.data.copy_(bias.detach().to(device, compute_dtype))
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Module, **kw) -> "Linear4bit":
        """Quantize an ``nn.Linear`` or a transformers ``Conv1D``."""
        return cls.from_weight(linear.weight, linear.bias, transpose=is_conv1d(linear), **kw)

    @torch.no_grad()
    def load_weight(self, w: torch.Tensor) -> None:
        """Quantize ``w`` [out, in] into this layer's buffers, with this layer's backend."""
        if tuple(w.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight shape {tuple(w.shape)} != ({self.out_features}, {self.in_features})")
        w = w.contiguous()
        if self.backend == "bnb":
            # bitsandbytes packs the 4-bit codes (byte-identical to nf4.quantize_nf4); the absmax
            # constants are double-quantized by our exact-nearest code so the stored state is the
            # same whichever backend or device quantized it (bitsandbytes' 8-bit kernels break
            # near-ties differently on CPU, and an export must rebuild exactly what was trained).
            import bitsandbytes.functional as bnbF
            packed, qs = bnbF.quantize_4bit(w, blocksize=self.blocksize, compress_statistics=False,
                                            quant_type="nf4")
            s = NF4State(packed=packed.reshape(-1), absmax=qs.absmax.float(), shape=tuple(w.shape), dtype=w.dtype,
                         blocksize=self.blocksize)
        else:
            s = quantize_nf4(w, blocksize=self.blocksize, double_quant=False)
        if self.double_quant:
            s = double_quantize(s)
        self.qweight, self.absmax = s.packed, s.absmax
        if self.double_quant:
            self.absmax2, self.code2 = s.absmax2, s.code2
            self.offset = torch.tensor(s.offset, dtype=torch.float32, device=w.device)
        self._bnb_state = None

    # -- views of the stored weight -------------------------------------------------------------
    def nf4_state(self) -> NF4State:
        dq = self.double_quant
        return NF4State(
            packed=self.qweight, absmax=self.absmax, shape=(self.out_features, self.in_features),
            dtype=self.compute_dtype, blocksize=self.blocksize,
            absmax2=self.absmax2 if dq else None, code2=self.code2 if dq else None,
            offset=float(self.offset) if dq else 0.0,
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight as a dense [out, in] tensor (fp32 math, then ``dtype``, default compute dtype)."""
        return dequantize_nf4(self.nf4_state(), dtype or self.compute_dtype)

    @property
    def weight_numel(self) -> int:
        return self.in_features * self.out_features

    def storage_bytes(self) -> int:
        """Bytes held by the 4-bit weight and its constants (bias excluded)."""
        names = ("qweight", "absmax", "absmax2", "offset") if self.double_quant else ("qweight", "absmax")
        return sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in names)

    def _quant_state(self):
        from bitsandbytes.functional import QuantState, get_4bit_type
        key = (self.qweight.data_ptr(), self.absmax.data_ptr(), self.compute_dtype)
        if self._bnb_state is None or self._bnb_state[0] != key:
            state2 = None
            offset = None
            if self.double_quant:
                state2 = QuantState(absmax=self.absmax2, code=self.code2, blocksize=DQ_BLOCKSIZE, dtype=torch.float32)
                offset = self.offset
            qs = QuantState(absmax=self.absmax, shape=torch.Size([self.out_features, self.in_features]),
                            code=get_4bit_type("nf4", device=self.qweight.device), blocksize=self.blocksize,
                            quant_type="nf4", dtype=self.compute_dtype, offset=offset, state2=state2)
            self._bnb_state = (key, qs)
        return self._bnb_state[1]

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        x = x.to(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        if self.backend == "bnb":
            import bitsandbytes as bnb
            out = bnb.matmul_4bit(x, self.qweight.view(-1, 1).t(), quant_state=self._quant_state(), bias=bias)
        else:
            out = _DequantMatmul.apply(x, self.nf4_state())
            if bias is not None:
                out = out + bias
        return out.to(in_dtype)

    def _apply(self, fn, *args, **kwargs):
        # .to()/.cuda() must move the 4-bit buffers but never cast them: a dtype cast of the
        # whole model (model.to(torch.bfloat16)) would turn uint8 codes into garbage floats.
        # The fp32 constants must not be cast either (bf16 absmax would lose precision), so they
        # are set aside, and only moved to wherever the packed codes went.
        constants = {n: self._buffers[n] for n in ("absmax", "absmax2", "code2", "offset")
                     if self._buffers.get(n) is not None and self._buffers[n].is_floating_point()}
        super()._apply(fn, *args, **kwargs)
        for n, t in constants.items():
            self._buffers[n] = t.to(self.qweight.device)
        self._bnb_state = None
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nf4, double_quant={self.double_quant}, compute_dtype={self.compute_dtype}, backend={self.backend}")


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(name == p or name.endswith("." + p) for p in patterns)


def quantizable_linears(model: nn.Module, skip: Iterable[str] = ("lm_head",)) -> list[str]:
    """Names of the modules ``quantize_model`` would turn into 4-bit: every Linear/Conv1D not in ``skip``.

    The output embedding (lm_head) is always left out when it is tied to the input embedding.
    """
    skip = list(skip)
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = []
    for name, mod in model.named_modules():
        if (isinstance(mod, nn.Linear) or is_conv1d(mod)) and not _matches(name, skip) and mod is not out_emb:
            names.append(name)
    return names


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


@torch.no_grad()
def quantize_model(model: nn.Module, *, skip: Iterable[str] = ("lm_head",), double_quant: bool = True,
                   backend: str = "auto", compute_dtype: torch.dtype | None = None, device=None) -> nn.Module:
    """Replace every linear layer of an already-loaded model (except ``skip``) by a frozen ``Linear4bit``.

    ``load_model`` quantizes while it reads the checkpoint, which keeps host memory low; this
    function is for a model that is already in memory (tests, a model built from a config).
    """
    names = quantizable_linears(model, skip)
    for name in names:
        lin = model.get_submodule(name)
        cd = compute_dtype or lin.weight.dtype
        q = Linear4bit.from_linear(lin, compute_dtype=cd, backend=backend, double_quant=double_quant,
                                   device=device or lin.weight.device)
        set_submodule(model, name, q)
        del lin
    for p in model.parameters():
        p.requires_grad_(False)
    return model
