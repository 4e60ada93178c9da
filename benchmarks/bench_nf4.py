"""NF4 benchmark: quantize/dequantize throughput (our PyTorch reference vs bitsandbytes) and the
host memory peak of loading + quantizing a ~1B-parameter checkpoint from disk.

    python benchmarks/bench_nf4.py                       # writes benchmarks/results/nf4.json
    python benchmarks/bench_nf4.py --skip-load           # throughput only

The load part builds a random Llama of about 1.1B parameters (bf16 safetensors, ~2.2 GB) in a
temp dir once, then measures in a fresh subprocess the peak anonymous RSS (sampled every 5 ms;
memory-mapped checkpoint pages are page cache, not counted) of qlora_lite.load_model (module by
module, bf16 for the unquantized tensors) against transformers' from_pretrained of the same
16-bit checkpoint. VmHWM, which does count mapped file pages, is reported beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES = [(4096, 4096), (11008, 4096)]


def timeit(fn, repeat: int = 5) -> float:
    fn()                                                     # warm-up (caches, lazy imports)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def throughput(repeat: int) -> list[dict]:
    import bitsandbytes.functional as F
    from qlora_lite.nf4 import dequantize_nf4, quantize_nf4
    rows = []
    for shape in SHAPES:
        torch.manual_seed(0)
        w = torch.randn(shape, dtype=torch.bfloat16) * 0.02
        n = w.numel()
        st = quantize_nf4(w)
        packed, qs = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        cases = {
            ("quantize", "qlora_lite (torch)"): lambda: quantize_nf4(w),
            ("quantize", "bitsandbytes"): lambda: F.quantize_4bit(w, blocksize=64, quant_type="nf4",
                                                                  compress_statistics=True),
            ("dequantize", "qlora_lite (torch)"): lambda: dequantize_nf4(st),
            ("dequantize", "bitsandbytes"): lambda: F.dequantize_4bit(packed, qs),
        }
        for (op, impl), fn in cases.items():
            s = timeit(fn, repeat)
            rows.append({"shape": list(shape), "op": op, "impl": impl, "seconds": s, "Mparams_per_s": n / s / 1e6})
            print(f"{str(shape):>14} {op:<11} {impl:<20} {s * 1e3:9.1f} ms  {n / s / 1e6:8.1f} Mparam/s", flush=True)
    return rows


_MEASURE = r"""
import sys, threading, time, torch

def status():
    return {l.split(':')[0]: int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith(('VmHWM', 'RssAnon'))}

peak_anon = 0
def poll():
    global peak_anon
    while True:
        peak_anon = max(peak_anon, status()['RssAnon'])
        time.sleep(0.005)
threading.Thread(target=poll, daemon=True).start()
mode, path = sys.argv[1], sys.argv[2]
base = status()['RssAnon']
t = time.perf_counter()
if mode == "qlora_lite":
    import qlora_lite as ql
    import qlora_lite.quantize as q
    model, _ = ql.load_model(path, load_tokenizer=False, device="cpu", compute_dtype="bf16")
    kept = sum(m.storage_bytes() for m in model.modules() if isinstance(m, q.Linear4bit))
    kept += sum(p.numel() * p.element_size() for p in model.parameters())
else:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    kept = sum(p.numel() * p.element_size() for p in model.parameters())
secs = time.perf_counter() - t
time.sleep(0.05)
print(peak_anon - base, status()['VmHWM'], kept, secs)
"""


def build_checkpoint(path: Path) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      num_attention_heads=32, num_key_value_heads=4, tie_word_embeddings=False)  # TinyLlama-1.1B shape
    with torch.device("meta"):
        n = sum(p.numel() for p in LlamaForCausalLM(cfg).parameters())
    if not (path / "model.safetensors.index.json").exists() and not (path / "model.safetensors").exists():
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
        model.save_pretrained(path, max_shard_size="500MB")
        del model
    return n


def load_memory() -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "llama-1.1b"
        n = build_checkpoint(path)
        out["params"] = n
        out["checkpoint_bytes"] = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        for mode in ("qlora_lite", "transformers"):
            r = subprocess.run([sys.executable, "-c", _MEASURE, mode, str(path)], capture_output=True, text=True,
                               check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
            anon, hwm, kept, secs = r.stdout.split()[-4:]
            out[mode] = {"peak_anon_rss_above_start_bytes": int(anon), "vm_hwm_bytes": int(hwm),
                         "model_bytes": int(kept), "seconds": float(secs)}
            print(f"load {mode:<13} peak anonymous RSS {int(anon) / 2**30:6.2f} GiB above start "
                  f"(VmHWM incl. mapped file pages {int(hwm) / 2**30:5.2f} GiB), model in memory "
                  f"{int(kept) / 2**30:5.2f} GiB, {float(secs):6.1f} s", flush=True)
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--skip-load", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "nf4.json"))
    a = ap.parse_args()
    import bitsandbytes
    import transformers
    result = {
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "load_average_at_start": os.getloadavg()[0],
                    "torch_threads": torch.get_num_threads()},
        "versions": {"torch": torch.__version__, "bitsandbytes": bitsandbytes.__version__,
                     "transformers": transformers.__version__},
        "command": "python benchmarks/bench_nf4.py" + (" --skip-load" if a.skip_load else ""),
        "throughput": throughput(a.repeat),
    }
    if not a.skip_load:
        result["load"] = load_memory()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
