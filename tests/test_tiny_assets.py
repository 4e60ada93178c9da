"""The bundled tiny base model and dataset load offline and are what they claim to be;
the exact-match helpers in qlora_lite.tasks behave as documented."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from qlora_lite.tasks import (ALPACA_TEMPLATE, ALPACA_TEMPLATE_NO_INPUT, exact_match, format_alpaca_prompt,
                              generate_answers, normalize_answer)

REPO = Path(__file__).resolve().parent.parent
BASE = REPO / "assets" / "tiny-base"
DATA = REPO / "data" / "tiny"

# Pretraining-style text written for this test (not taken from the corpus).
HELD_OUT_TEXT = (
    "The sum of 3 and 4 is 7. Anna found a small red ball in the garden. 8 minus 5 equals 3. "
    "The larger of 2 and 6 is 6. One day, Ben felt happy. Subtracting 1 from 9 leaves 8."
)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(BASE, local_files_only=True)


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_pretrained(BASE, local_files_only=True, dtype=torch.float32)
    return m.eval()


def _rows(name: str) -> list[dict]:
    with open(DATA / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# -- the base model ------------------------------------------------------------------------


def test_base_dir_is_small_bf16_llama():
    cfg = json.loads((BASE / "config.json").read_text())
    assert cfg["model_type"] == "llama"
    assert cfg["dtype"] == "bfloat16"
    size = sum(f.stat().st_size for f in BASE.iterdir())
    assert size < 8.5e6, f"tiny base is {size / 1e6:.1f} MB"


def test_tokenizer_special_tokens_and_digits(tokenizer):
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token) == \
        ("<s>", "</s>", "<pad>", "<unk>")
    assert tokenizer.pad_token_id != tokenizer.eos_token_id  # padding must never be mistaken for a stop
    ids = tokenizer("12 + 305")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.eos_token_id not in ids  # BOS added, EOS not
    toks = tokenizer.convert_ids_to_tokens(ids)
    assert [t for t in toks if any(c.isdigit() for c in t)] == ["1", "2", "3", "0", "5"]  # one digit a token
    assert tokenizer.decode(ids, skip_special_tokens=True) == "12 + 305"


def test_chat_template_ends_assistant_turns_with_eos(tokenizer):
    msgs = [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "5"}]
    text = tokenizer.apply_chat_template(msgs, tokenize=False)
    assert text == "<s><|user|>\nWhat is 2 plus 3?\n<|assistant|>\n5</s>\n"
    prompt = tokenizer.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>\n") and text.startswith(prompt)


def test_base_is_really_pretrained(model, tokenizer):
    ids = torch.tensor([tokenizer(HELD_OUT_TEXT)["input_ids"]])  # (1, T)
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    # A random init sits near ln(vocab) (~6.6 here); the pretrained base is far below it.
    assert loss < 0.3 * math.log(model.config.vocab_size), loss


def test_base_completes_prose_arithmetic(model, tokenizer):
    # The base knows only part of its facts (~40% of the eval problems in prose form); these it knows.
    prompts = ["The sum of 3 and 4 is", "8 minus 5 equals", "The larger of 9 and 1 is"]
    outs = generate_answers(model, tokenizer, prompts, max_new_tokens=3)
    assert [re.match(r"\s*\d+", o).group().strip() for o in outs] == ["7", "3", "9"]


# -- the dataset ---------------------------------------------------------------------------


def _problem_key(row: dict) -> tuple:
    """Operation, operands (order-free) and answer: identifies a problem however it was phrased."""
    text = (row["instruction"] + " " + row["input"]).lower()
    if re.search(r"\+|plus|add|sum|total", text):
        op = "add"
    elif re.search(r" - |minus|subtract|difference|away", text):
        op = "sub"
    else:
        op = "max"
    nums = tuple(sorted(int(n) for n in re.findall(r"\d+", text)))
    return op, nums, row["output"]


def test_alpaca_splits_are_well_formed_and_disjoint():
    train, evals = _rows("train.jsonl"), _rows("eval.jsonl")
    assert 2000 <= len(train) <= 5000 and 100 <= len(evals) <= 200
    for r in train + evals:
        assert set(r) == {"instruction", "input", "output"}
        assert r["instruction"].strip() and r["output"].strip() and isinstance(r["input"], str)
    assert any(r["input"] == "" for r in train) and any(r["input"] for r in train)  # both templates used
    assert not {_problem_key(r) for r in train} & {_problem_key(r) for r in evals}


def test_other_format_samples():
    chat, text = _rows("chat_sample.jsonl"), _rows("text_sample.jsonl")
    assert len(chat) >= 40 and len(text) >= 40
    for r in chat:
        roles = [m["role"] for m in r["messages"]]
        assert roles[-2:] == ["user", "assistant"] and set(roles) <= {"system", "user", "assistant"}
        assert all(m["content"].strip() for m in r["messages"])
    assert all(r["text"].strip() for r in text)


# -- qlora_lite.tasks ----------------------------------------------------------------------


def test_alpaca_prompt_formatting():
    p = format_alpaca_prompt("Add the two numbers.", "12 + 35")
    assert p == ALPACA_TEMPLATE.format(instruction="Add the two numbers.", input="12 + 35")
    assert p.endswith("### Instruction:\nAdd the two numbers.\n\n### Input:\n12 + 35\n\n### Response:\n")
    for empty in ("", "  ", None):
        q = format_alpaca_prompt("What is 1 plus 2?", empty)
        assert q == ALPACA_TEMPLATE_NO_INPUT.format(instruction="What is 1 plus 2?")
        assert "### Input:" not in q and q.endswith("### Response:\n")


def test_normalize_and_exact_match():
    assert normalize_answer("  47.\n") == "47"
    assert normalize_answer("Hello   World") == "hello world"
    assert exact_match(["47", " 12.", "47 ### Instruction", "The answer is 5"], ["47", "12", "47", "5"]) == 0.5
    assert exact_match([], []) == 0.0
    with pytest.raises(ValueError):
        exact_match(["1"], ["1", "2"])


def test_generate_answers_batched_equals_one_at_a_time(model, tokenizer):
    # Prompts of different lengths: left padding + mask-derived positions must not change the output.
    prompts = ["The sum of 5 and 7 is", "One day, Mia", "The larger of 81 and 18 is", "Tom had 40 coins and found"]
    batched = generate_answers(model, tokenizer, prompts, max_new_tokens=6, batch_size=4)
    single = [generate_answers(model, tokenizer, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert batched == single
    assert all(isinstance(s, str) and tokenizer.eos_token not in s for s in batched)
    assert not model.training  # mode restored


def test_generate_answers_stops_at_eos():
    """A stub LM that always predicts token 7 then EOS: the answer is cut before EOS."""
    from types import SimpleNamespace

    class Stub(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, attention_mask, position_ids, past_key_values, use_cache):
            n = 0 if past_key_values is None else past_key_values
            logits = torch.zeros(input_ids.shape[0], input_ids.shape[1], 10)
            logits[:, -1, 7 if n == 0 else 2] = 1.0  # first new token 7, then EOS (id 2)
            return SimpleNamespace(logits=logits, past_key_values=n + 1)

    class Tok:
        eos_token_id, pad_token_id = 2, 0

        def __call__(self, text):
            return {"input_ids": [1] * len(text)}

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    assert generate_answers(Stub(), Tok(), ["ab", "abcd"], max_new_tokens=5) == ["7", "7"]
