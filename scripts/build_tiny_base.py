"""Build the bundled tiny pretrained base model (assets/tiny-base/) from scratch on CPU.

Steps, all deterministic for a given --seed:
  1. generate a synthetic corpus: arithmetic facts in prose mixed with generic sentences
     (the generators live in build_tiny_data.py);
  2. train a byte-level BPE tokenizer on it (digits split one per token, so numbers are
     spelled digit by digit and arithmetic is learnable);
  3. pretrain a small Llama (fp32, 2 threads) on packed BOS..EOS documents;
  4. save model (bf16 safetensors) + tokenizer into a temp dir, then rename it into place.

    python scripts/build_tiny_base.py [--out assets/tiny-base] [--steps 400] [--seed 0] [--force]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build_tiny_data as tdata  # noqa: E402  (sibling script: task generators + eval problems)

REPO = Path(__file__).resolve().parent.parent

SPECIAL = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>"}  # ids 0..3, in this order
VOCAB_SIZE = 1024
# Jinja chat template: "<|role|>\ncontent\n" turns, EOS after each assistant turn; BOS is written by
# the template because apply_chat_template tokenizes without adding special tokens.
# Newlines are written as '\n' string literals because HF renders templates with trim_blocks=True.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
MODEL = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=512, rms_norm_eps=1e-5,
             tie_word_embeddings=False, rope_theta=10000.0)


def build_tokenizer(texts: list[str]):
    """Byte-level BPE with single-digit pre-tokens; adds BOS like Llama, never EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL["unk"]))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=2, show_progress=False,
                                  special_tokens=list(SPECIAL.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    bos = SPECIAL["bos"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=SPECIAL["bos"], eos_token=SPECIAL["eos"], unk_token=SPECIAL["unk"],
        pad_token=SPECIAL["pad"], model_max_length=MODEL["max_position_embeddings"], padding_side="right",
        chat_template=CHAT_TEMPLATE)


def pack(tokenizer, docs: list[str], seq_len: int) -> torch.Tensor:
    """BOS doc EOS BOS doc EOS ... cut into rows of seq_len tokens: (N, seq_len) int64."""
    stream: list[int] = []
    for ids in tokenizer(docs)["input_ids"]:  # BOS already prepended by the post-processor
        stream.extend(ids)
        stream.append(tokenizer.eos_token_id)
    n = len(stream) // seq_len
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% of peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


@torch.no_grad()
def mean_loss(model, rows: torch.Tensor, batch_size: int) -> float:
    """Mean next-token loss over rows (N, T)."""
    model.eval()
    losses = [model(input_ids=rows[i:i + batch_size], labels=rows[i:i + batch_size]).loss.item()
              for i in range(0, len(rows), batch_size)]
    model.train()
    return sum(losses) / len(losses)


PROBE = {"add": "The sum of {a} and {b} is", "sub": "{a} minus {b} equals", "max": "The larger of {a} and {b} is"}


def probe_accuracy(model, tokenizer, problems) -> float:
    """Share of problems the base answers right in its own prose format (first number)."""
    from qlora_lite.tasks import generate_answers

    prompts = [PROBE[op].format(a=a, b=b) for op, a, b in problems]
    outs = generate_answers(model, tokenizer, prompts, max_new_tokens=5, batch_size=64)
    hits = 0
    for (op, a, b), out in zip(problems, outs):
        m = re.match(r"\s*(\d+)", out)
        hits += bool(m) and int(m.group(1)) == tdata.answer(op, a, b)
    return hits / len(problems)


def write_card(path: Path, info: dict) -> None:
    """A short model card so the directory explains itself."""
    path.write_text(
        "# tiny-base\n\n"
        "A few-million-parameter Llama pretrained from scratch on CPU by `scripts/build_tiny_base.py`\n"
        "on synthetic prose: arithmetic facts on digits 0..9 (\"The sum of 7 and 5 is 12.\")\n"
        "mixed with generic template sentences. It has never seen the alpaca prompt format of\n"
        "`data/tiny/`. Byte-level BPE tokenizer, one token per digit; the\n"
        "tokenizer adds BOS, never EOS. Weights stored in bf16; compute in fp32 on CPU.\n\n"
        "| | |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in info.items()),
        encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "assets" / "tiny-base"), help="output model directory")
    ap.add_argument("--steps", type=int, default=400, help="pretraining optimizer steps")
    ap.add_argument("--seed", type=int, default=0, help="seed for corpus, init and data order")
    ap.add_argument("--force", action="store_true", help="replace an existing --out directory")
    ap.add_argument("--batch-size", type=int, default=32, help="sequences per step")
    ap.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    ap.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate")
    args = ap.parse_args(argv)

    out = Path(args.out).resolve()
    if out.exists() and not args.force:
        print(f"build_tiny_base: {out} exists; pass --force to replace it", file=sys.stderr)
        return 2

    from transformers import LlamaConfig, LlamaForCausalLM

    t0 = time.time()
    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    rng = random.Random(f"corpus-{args.seed}")

    # -- corpus: the base is meant to know every fact; the instruction format is what is new --
    excl: set = set()
    need_tokens = args.steps * args.batch_size * args.seq_len
    n_docs = need_tokens // 45 + 2000  # ~50 tokens a document; a little spare
    docs = [tdata.pretraining_document(rng, excl) for _ in range(n_docs)]
    val_docs = [tdata.pretraining_document(rng, excl) for _ in range(600)]

    # -- tokenizer -------------------------------------------------------------------------
    tokenizer = build_tokenizer(docs)
    train_rows = pack(tokenizer, docs, args.seq_len)  # (N, T)
    val_rows = pack(tokenizer, val_docs, args.seq_len)[:160]
    print(f"corpus: {len(docs)} documents, {train_rows.numel():,} tokens; vocab {len(tokenizer)}; "
          f"{time.time() - t0:.0f}s")

    # -- model -----------------------------------------------------------------------------
    vocab = -(-len(tokenizer) // 64) * 64  # the BPE may stop short of VOCAB_SIZE on this small language
    cfg = LlamaConfig(vocab_size=vocab, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **MODEL)
    model = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(train_rows), generator=g)

    # -- pretrain --------------------------------------------------------------------------
    model.train()
    warmup = max(1, args.steps // 20)
    bar = tqdm(range(args.steps), desc="pretrain", unit="step")
    ema = None
    for step in bar:
        idx = order[(torch.arange(args.batch_size) + step * args.batch_size) % len(order)]
        x = train_rows[idx]  # (B, T); labels = inputs, the model shifts them
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, warmup)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        bar.set_postfix(loss=f"{ema:.3f}", lr=f"{opt.param_groups[0]['lr']:.1e}")
    bar.close()

    train_loss = mean_loss(model, train_rows[order[:160]], args.batch_size)
    val_loss = mean_loss(model, val_rows, args.batch_size)
    probe = probe_accuracy(model, tokenizer, tdata.eval_problems(args.seed))
    build_s = time.time() - t0
    print(f"final: train loss {train_loss:.4f}, val loss {val_loss:.4f} (ln vocab = {math.log(cfg.vocab_size):.2f}); "
          f"prose-format accuracy on eval problems {probe:.1%}; {build_s:.0f}s")

    # -- save atomically -------------------------------------------------------------------
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        # transformers 5 writes its own class name; the generic one also loads with transformers 4.x.
        tc_path = tmp / "tokenizer_config.json"
        tc = json.loads(tc_path.read_text())
        tc["tokenizer_class"] = "PreTrainedTokenizerFast"
        tc_path.write_text(json.dumps(tc, indent=2) + "\n")
        write_card(tmp / "README.md", {
            "parameters": f"{n_params:,}",
            "layers / hidden / heads / intermediate": f"{cfg.num_hidden_layers} / {cfg.hidden_size} / "
                                                       f"{cfg.num_attention_heads} / {cfg.intermediate_size}",
            "vocab": cfg.vocab_size,
            "pretraining": f"{args.steps} steps x {args.batch_size} x {args.seq_len} tokens, seed {args.seed}",
            "final train loss": f"{train_loss:.4f}",
            "final val loss": f"{val_loss:.4f}",
            "prose-format accuracy on the eval problems": f"{probe:.1%}",
        })
        if out.exists():  # --force: move the old one aside first so a failure never leaves nothing
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out} ({n_params:,} params, {size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
