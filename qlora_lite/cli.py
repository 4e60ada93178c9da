"""Command line: `qlora-lite train | memory | export` (also `python -m qlora_lite ...`).

Each subcommand's flags are declared here, next to each other, so the public surface is
readable in one place; the work happens in the module each one dispatches to. Exit codes:
0 success, 2 bad input (one line on stderr, no traceback), 1 anything else.
"""
from __future__ import annotations

import argparse
import sys

from .errors import UserError


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="fine-tune from a YAML config",
                       description="Fine-tune a 4-bit base with LoRA adapters from a YAML config.")
    p.add_argument("config", help="YAML config file (see configs/ and `qlora-lite train --list-keys`)", nargs="?")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set lora.r=64 (repeatable)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="auto|PATH",
                   help="continue from the latest checkpoint in output.dir (auto) or from PATH")
    p.add_argument("--list-keys", action="store_true", help="print every config key with its type, default and description")
    p.set_defaults(func=lambda a: __import__("qlora_lite.train", fromlist=["cli_train"]).cli_train(a))


def _add_memory(sub) -> None:
    p = sub.add_parser("memory", help="memory-budget report for full fine-tuning, LoRA and QLoRA",
                       description="Estimate, simulate or measure the memory that full fine-tuning, "
                                   "LoRA and QLoRA need for a model.")
    p.add_argument("model", help="preset name (e.g. llama-2-7b), a HF config.json / model dir, or a training YAML")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per micro-batch")
    p.add_argument("--lora-r", type=int, default=None, help="LoRA rank")
    p.add_argument("--gpu-gb", type=float, default=None,
                   help="GPU memory budget in GiB (as nvidia-smi reports it) for the fits/does-not-fit verdict")
    p.add_argument("--method", action="append", default=None,
                   choices=["full", "full-mixed", "lora", "qlora"],
                   help="method to report (repeatable; default: all four)")
    p.add_argument("--optimizer", default=None,
                   choices=["paged_adamw_32bit", "paged_adamw_8bit", "adamw_32bit", "adamw_8bit", "adamw_torch"],
                   help="optimizer whose states to count (default paged_adamw_32bit, or the YAML's)")
    p.add_argument("--no-grad-ckpt", action="store_true", help="estimate without gradient checkpointing")
    p.add_argument("--attn", default=None, choices=["sdpa", "flash_attention_2", "eager"],
                   help="attention implementation (eager adds the s^2 attention matrices)")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="compute / 16-bit weight dtype")
    p.add_argument("--padded", action="store_true",
                   help="batches carry padding (an attention mask), as without packing; costs an s^2 mask per layer")
    p.add_argument("--sweep", action="store_true", help="also print peak memory over LoRA rank x sequence length")
    p.add_argument("--steps", type=int, default=None, help="steps to run with --measure / --simulate (optimizer states primed first; default 1)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--measure", action="store_true", help="run real steps on this device and report measured peaks")
    mode.add_argument("--simulate", action="store_true", help="run one step on fake tensors (no weights, no GPU)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the report as JSON")
    p.add_argument("--plot", default=None, metavar="PATH", help="write a PNG stacked-bar chart")
    p.set_defaults(func=lambda a: __import__("qlora_lite.memory.cli", fromlist=["cli_memory"]).cli_memory(a))


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="merge adapters into dequantized weights and save a HF model",
                       description="Dequantize the NF4 base, merge the LoRA adapter and save an ordinary "
                                   "Hugging Face model (sharded safetensors).")
    p.add_argument("checkpoint", help="checkpoint or adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="dtype of the exported weights")
    p.add_argument("--base-16bit", default=None, metavar="PATH",
                   help="merge into these original 16-bit weights instead of the dequantized NF4 ones")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out directory (the old one stays until the new one is complete)")
    p.add_argument("--base", default=None, metavar="PATH",
                   help="base model the adapter was trained on (default: base_model_name_or_path in adapter_config.json)")
    p.add_argument("--base-quant", choices=["auto", "nf4", "none"], default="auto",
                   help="how the base was stored in training: nf4 (QLoRA) or none (a 16-bit base); "
                        "auto = the checkpoint's config.yaml, else nf4")
    p.add_argument("--max-shard-size", default="2GB", metavar="SIZE",
                   help="largest safetensors shard, e.g. 2GB, 500MB (default 2GB)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip reloading the export and comparing logits (that needs ~6 bytes/param of memory)")
    p.add_argument("--verify-prompts", type=int, default=2, metavar="N", help="prompts used by the verification")
    p.add_argument("--verify-tokens", type=int, default=16, metavar="N", help="tokens per verification prompt")
    p.add_argument("--device", default="auto", metavar="DEV",
                   help="where the base is re-quantized and verified: auto (cuda if available, as in training), cpu, cuda:N")
    p.set_defaults(func=lambda a: __import__("qlora_lite.export", fromlist=["cli_export"]).cli_export(a))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qlora-lite", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_memory(sub)
    _add_export(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"qlora-lite {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qlora-lite {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:          # e.g. `qlora-lite train --list-keys | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
