"""Prompt template and exact-match evaluation for instruction data.

The trainer scores a model before and after fine-tuning with these helpers, and the data
pipeline builds its alpaca prompts from the same ALPACA_TEMPLATE, so what is evaluated is
exactly what was trained.

    prompts = [format_alpaca_prompt(r["instruction"], r["input"]) for r in rows]
    preds = generate_answers(model, tokenizer, prompts)        # greedy, stops at EOS
    acc = exact_match(preds, [r["output"] for r in rows])      # fraction in [0, 1]
"""
from __future__ import annotations

import inspect
import re
from typing import Iterable, Sequence

import torch

# The Stanford Alpaca prompt, verbatim; the response (then EOS) follows "### Response:\n".
ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
# Used when a row's input is empty, so the prompt does not carry a dangling "### Input:".
ALPACA_TEMPLATE_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def format_alpaca_prompt(instruction: str, input: str | None = None) -> str:
    """The alpaca prompt for one row: the with-input template when `input` has text, else the other."""
    if input is not None and input.strip():
        return ALPACA_TEMPLATE.format(instruction=instruction, input=input)
    return ALPACA_TEMPLATE_NO_INPUT.format(instruction=instruction)


def normalize_answer(s: str) -> str:
    """Lower-case, collapse runs of whitespace, strip outer whitespace and one trailing period.

    Deliberately light: "47." and " 47\\n" match "47", but "47 ### Instruction" (a model that does
    not stop) or "The answer is 47" do not, because stopping and answering in the trained
    format is what fine-tuning has to teach.
    """
    s = re.sub(r"\s+", " ", s.strip().lower())
    if s.endswith("."):
        s = s[:-1].rstrip()
    return s


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions equal to their reference after normalize_answer (0.0 for no rows)."""
    if len(predictions) != len(references):
        raise ValueError(f"exact_match: {len(predictions)} predictions but {len(references)} references")
    if not predictions:
        return 0.0
    hits = sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references))
    return hits / len(predictions)


def _eos_ids(model, tokenizer) -> set[int]:
    """Every token id that ends a generation: the tokenizer's EOS plus the model's generation_config ones."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    if isinstance(extra, int):
        ids.add(extra)
    elif isinstance(extra, Iterable):
        ids |= {int(i) for i in extra}
    if not ids:
        raise ValueError("generate_answers: the tokenizer has no eos_token, so generation cannot stop")
    return ids


def _model_device(model) -> torch.device:
    """Device of the first parameter (or buffer): where the inputs must go."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 16,
                     batch_size: int = 32) -> list[str]:
    """Greedy completions of `prompts`, each cut at its first EOS, decoded without special tokens.

    A plain loop over the model's forward with a KV cache rather than `model.generate`, so that
    it works the same for any HF causal LM, including one whose linears were swapped for 4-bit
    or LoRA-wrapped modules. Prompts are left-padded (the last prompt token of every row sits
    in the same column) and position ids are taken from the attention mask, so a padded row
    sees the same positions as it would alone.
    """
    eos = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)
    device = _model_device(model)
    was_training = model.training
    model.eval()
    answers: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start:start + batch_size])
            # Tokenize each prompt alone (tokenizer adds BOS if it is configured to), then left-pad.
            rows = [tokenizer(p)["input_ids"] for p in chunk]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
                mask[i, width - len(r):] = 1
            ids, mask = ids.to(device), mask.to(device)  # (B, T)
            done = torch.zeros(len(rows), dtype=torch.bool, device=device)
            out_tokens: list[torch.Tensor] = []
            past = None
            step_ids = ids
            # transformers >= 5.24 names the KV cache `cache` (past_key_values is deprecated there)
            cache_kw = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
            for _ in range(max_new_tokens):
                pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -step_ids.shape[1]:]  # (B, t)
                out = model(input_ids=step_ids, attention_mask=mask, position_ids=pos,
                            **{cache_kw: past}, use_cache=True)
                past = getattr(out, cache_kw)
                nxt = out.logits[:, -1, :].argmax(-1)  # (B,)
                nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
                out_tokens.append(nxt)
                done |= torch.isin(nxt, torch.tensor(sorted(eos), device=device))
                if bool(done.all()):
                    break
                step_ids = nxt[:, None]  # (B, 1)
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            gen = torch.stack(out_tokens, dim=1).tolist()  # (B, n_new)
            for row in gen:
                cut = next((j for j, t in enumerate(row) if t in eos), len(row))
                answers.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
    finally:
        model.train(was_training)
    return answers
