"""Memory profiler: will a fine-tune fit, and with which settings?

estimate_memory (formulas, instant) | simulate (fake tensors, no GPU) | measure (real steps).
"""
from .estimate import METHODS, MemoryEstimate, Settings, estimate_memory
from .measure import peak_memory_snapshot


def estimate_for_train_config(cfg) -> MemoryEstimate:
    """The estimate of a training Config's run (its method, model, batch and settings), on CUDA."""
    from .cli import estimate_for_train_config as _f
    return _f(cfg)


__all__ = ["METHODS", "MemoryEstimate", "Settings", "estimate_memory", "estimate_for_train_config",
           "peak_memory_snapshot"]
