"""qlora_lite: fine-tune large language models on one GPU with a 4-bit NF4 base and LoRA adapters."""
from .errors import UserError
from .export import export_merged
from .lora import (add_lora, adapter_names, disable_adapters, lora_state_dict, load_lora_state_dict, merge_lora,
                   set_adapter, trainable_summary, unmerge_lora)
from .model import enable_gradient_checkpointing, load_model, resolve_compute_dtype
from .nf4 import bits_per_param, dequantize_nf4, nf4_code_book, quantize_nf4
from .quantize import Linear4bit, quantize_model
from .memory.estimate import estimate_memory
from .train import train

__version__ = "0.1.0"

__all__ = [
    "UserError", "add_lora", "adapter_names", "disable_adapters", "lora_state_dict", "load_lora_state_dict",
    "merge_lora", "set_adapter", "trainable_summary", "unmerge_lora", "enable_gradient_checkpointing", "load_model",
    "resolve_compute_dtype", "bits_per_param", "dequantize_nf4", "nf4_code_book", "quantize_nf4", "Linear4bit",
    "quantize_model", "export_merged", "estimate_memory", "train",
]
