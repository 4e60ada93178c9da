"""Build the bundled tiny instruction dataset (data/tiny/) and the generators behind it.

The task is two-operand arithmetic on single digits 0..9: add, subtract (first >= second),
and pick the larger of two. Answers are checked exactly, and a model of a few million
parameters pretrained for a few CPU minutes can know all ~250 facts. (Operands up to 99,
then up to 19, were tried first: 400 pretraining steps are too few for a 3.5M-parameter
model to learn multi-digit arithmetic; it answered round numbers.) The problem space is
small, so eval is 45 held-out problems (operand pairs), each asked in several phrasings.

The demo rests on a split between *skill* and *format*:
  - `scripts/build_tiny_base.py` pretrains the tiny base on prose that states arithmetic facts
    ("The sum of 7 and 5 is 12.", "Mia had 12 apples ...") mixed with generic synthetic
    sentences. It never sees the alpaca prompt format.
  - this script writes the same skill in the alpaca format
    ({"instruction": "Add the two numbers.", "input": "7 + 5", "output": "12"}).
    Eval problems (operand pairs) never occur in the instruction train split.
So the base scores ~0% exact match on eval (it does not know where the answer goes or when
to stop) and a short LoRA fine-tune on train lifts that to high accuracy.

Everything is a pure function of a seed; files are written atomically.

    python scripts/build_tiny_data.py [--out data/tiny] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MAX_OPERAND = 9  # operands are drawn from 0..MAX_OPERAND
OPS = ("add", "sub", "max")
N_TRAIN = 2500  # alpaca rows in train.jsonl
N_EVAL = {"add": 15, "sub": 15, "max": 15}  # held-out problems per op
EVAL_ROWS_PER_PROBLEM = 3  # phrasings of each held-out problem in eval.jsonl (135 rows)
N_SAMPLE = 50  # rows in chat_sample.jsonl and text_sample.jsonl

# ---------------------------------------------------------------------------------------
# Problems: (op, a, b) triples and their answers
# ---------------------------------------------------------------------------------------


def answer(op: str, a: int, b: int) -> int:
    """The exact answer of one problem."""
    if op == "add":
        return a + b
    if op == "sub":
        return a - b
    if op == "max":
        return max(a, b)
    raise ValueError(f"unknown op {op!r}")


def all_problems() -> list[tuple[str, int, int]]:
    """Every problem of the task, in a fixed order (sub keeps a >= b, max keeps a != b)."""
    out = []
    rng = range(MAX_OPERAND + 1)
    out += [("add", a, b) for a in rng for b in rng]
    out += [("sub", a, b) for a in rng for b in rng if a >= b]
    out += [("max", a, b) for a in rng for b in rng if a != b]
    return out


def problem_keys(op: str, a: int, b: int) -> set[tuple[str, int, int]]:
    """Keys a problem is known by: add and max are symmetric, so both orders count as one problem."""
    if op in ("add", "max"):
        return {(op, a, b), (op, b, a)}
    return {(op, a, b)}


def eval_problems(seed: int = 0) -> list[tuple[str, int, int]]:
    """The held-out problems: drawn once, then kept out of the instruction train split."""
    rng = random.Random(f"eval-{seed}")
    by_op = {op: [p for p in all_problems() if p[0] == op] for op in OPS}
    chosen, seen = [], set()
    for op in OPS:
        pool = by_op[op][:]
        rng.shuffle(pool)
        for p in pool:
            if len([c for c in chosen if c[0] == op]) == N_EVAL[op]:
                break
            if p in seen:
                continue
            chosen.append(p)
            seen |= problem_keys(*p)
    return chosen


def excluded_keys(seed: int = 0) -> set[tuple[str, int, int]]:
    """All keys of the eval problems (both orders for symmetric ops)."""
    keys: set[tuple[str, int, int]] = set()
    for p in eval_problems(seed):
        keys |= problem_keys(*p)
    return keys


# ---------------------------------------------------------------------------------------
# Alpaca / chat rendering of a problem (the format the base model never saw)
# ---------------------------------------------------------------------------------------

INSTRUCTIONS = {
    "add": ["Add the two numbers.", "What is the sum of these numbers?", "Compute the sum.",
            "Find the total of the two numbers."],
    "sub": ["Subtract the second number from the first.", "What is the difference?",
            "Compute the difference.", "Take the second number away from the first."],
    "max": ["Which number is larger?", "Give the larger number.", "Return the bigger of the two numbers."],
}
# Questions with everything in the instruction (alpaca rows with an empty input).
QUESTIONS = {
    "add": ["What is {a} plus {b}?", "Add {a} and {b}."],
    "sub": ["What is {a} minus {b}?", "Subtract {b} from {a}."],
    "max": ["Which is larger, {a} or {b}?"],
}
INPUTS = {"add": "{a} + {b}", "sub": "{a} - {b}", "max": "{a}, {b}"}
NO_INPUT_FRACTION = 0.25  # share of alpaca rows that put the question in the instruction


def alpaca_row(op: str, a: int, b: int, rng: random.Random) -> dict:
    """One {"instruction", "input", "output"} row; the output is the bare number."""
    out = str(answer(op, a, b))
    if rng.random() < NO_INPUT_FRACTION:
        return {"instruction": rng.choice(QUESTIONS[op]).format(a=a, b=b), "input": "", "output": out}
    return {"instruction": rng.choice(INSTRUCTIONS[op]), "input": INPUTS[op].format(a=a, b=b), "output": out}


def chat_row(op: str, a: int, b: int, rng: random.Random) -> dict:
    """One {"messages": [...]} row: optional system turn, a user question, the assistant's answer."""
    msgs = []
    if rng.random() < 0.3:
        msgs.append({"role": "system", "content": "You are a careful calculator. Answer with the number only."})
    msgs.append({"role": "user", "content": rng.choice(QUESTIONS[op]).format(a=a, b=b)})
    msgs.append({"role": "assistant", "content": str(answer(op, a, b))})
    return {"messages": msgs}


# ---------------------------------------------------------------------------------------
# Pretraining-style prose (used by build_tiny_base.py and for text_sample.jsonl)
# ---------------------------------------------------------------------------------------

NAMES = ["Anna", "Ben", "Mia", "Tom", "Lily", "Sam", "Nora", "Leo", "Ella", "Max", "Ruby", "Jack"]
ANIMALS = ["cat", "dog", "fox", "bird", "horse", "rabbit", "duck", "mouse", "frog", "bear"]
THINGS = ["ball", "book", "box", "cup", "hat", "kite", "key", "lamp", "shoe", "boat", "apple", "coin"]
PLURALS = ["apples", "books", "coins", "shells", "stones", "cards", "pens", "eggs", "stars", "cookies"]
ADJS = ["red", "small", "big", "old", "green", "happy", "blue", "little", "quiet", "bright", "yellow"]
PLACES = ["in the garden", "at the park", "by the river", "in the kitchen", "on the hill",
          "at school", "near the lake", "in the forest", "on the beach", "under the tree"]
VERBS = ["found", "saw", "liked", "lost", "carried", "painted", "wanted", "gave away", "cleaned"]
TIMES = ["In the morning", "One day", "After lunch", "At night", "Later", "On Sunday", "Then"]
FEELINGS = ["happy", "tired", "hungry", "surprised", "sleepy", "glad", "curious"]


def _generic_sentence(rng: random.Random) -> str:
    """One sentence of the generic synthetic text (a small template grammar)."""
    n, t, adj = rng.choice(NAMES), rng.choice(THINGS), rng.choice(ADJS)
    k = rng.randrange(8)
    if k == 0:
        return f"{n} {rng.choice(VERBS)} a {adj} {t} {rng.choice(PLACES)}."
    if k == 1:
        return f"The {adj} {rng.choice(ANIMALS)} ran {rng.choice(PLACES)}."
    if k == 2:
        return f"{rng.choice(TIMES)}, {n} felt {rng.choice(FEELINGS)}."
    if k == 3:
        return f"There were {rng.randrange(2, 100)} {rng.choice(PLURALS)} {rng.choice(PLACES)}."
    if k == 4:
        return f"{n} and {rng.choice(NAMES)} played with the {adj} {t}."
    if k == 5:
        return f"The {t} was {adj}, and the {rng.choice(ANIMALS)} was {rng.choice(FEELINGS)}."
    if k == 6:
        return f"{rng.choice(TIMES)}, the {rng.choice(ANIMALS)} looked at the {t}."
    return f"{n} is {rng.randrange(3, 90)} years old and lives {rng.choice(PLACES)}."


def _fact_sentence(op: str, a: int, b: int, rng: random.Random) -> str:
    """One arithmetic fact stated in prose (the skill, in a format unlike the instruction data)."""
    c = answer(op, a, b)
    n, p = rng.choice(NAMES), rng.choice(PLURALS)
    if op == "add":
        return rng.choice([
            f"The sum of {a} and {b} is {c}.",
            f"{a} plus {b} equals {c}.",
            f"If you add {b} to {a}, you get {c}.",
            f"Adding {a} and {b} gives {c}.",
            f"{a} + {b} = {c}.",
            f"{n} had {a} {p} and found {b} more, so {n} had {c} {p}.",
        ])
    if op == "sub":
        return rng.choice([
            f"{a} minus {b} equals {c}.",
            f"If you take {b} away from {a}, you get {c}.",
            f"Subtracting {b} from {a} leaves {c}.",
            f"The difference between {a} and {b} is {c}.",
            f"{a} - {b} = {c}.",
            f"{n} had {a} {p} and gave away {b}, so {n} had {c} {p} left.",
        ])
    lo = min(a, b)
    return rng.choice([
        f"The larger of {a} and {b} is {c}.",
        f"Between {a} and {b}, the bigger number is {c}.",
        f"{c} is greater than {lo}.",
        f"{n} compared {a} and {b} and picked {c} because it is larger.",
    ])


def random_problem(rng: random.Random, exclude: set) -> tuple[str, int, int]:
    """A uniformly drawn problem whose keys are not in `exclude`."""
    while True:
        op = rng.choice(OPS)
        a, b = rng.randrange(MAX_OPERAND + 1), rng.randrange(MAX_OPERAND + 1)
        if op == "sub" and a < b:
            a, b = b, a
        if op == "max" and a == b:
            continue
        if (op, a, b) not in exclude:
            return op, a, b


FACT_FRACTION = 0.85  # share of pretraining sentences that state an arithmetic fact


def pretraining_document(rng: random.Random, exclude: set) -> str:
    """One pretraining document: 3..7 sentences, mostly arithmetic facts among generic ones."""
    sents = []
    for _ in range(rng.randint(3, 7)):
        if rng.random() < FACT_FRACTION:
            sents.append(_fact_sentence(*random_problem(rng, exclude), rng))
        else:
            sents.append(_generic_sentence(rng))
    return " ".join(sents)


# ---------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------


def build_rows(seed: int = 0) -> dict[str, list[dict]]:
    """All four files' rows, as a pure function of the seed."""
    rng = random.Random(f"rows-{seed}")
    held_out = eval_problems(seed)
    excl = excluded_keys(seed)
    # Train: problems that share no key with eval, each used a few times with different phrasings.
    pool = [p for p in all_problems() if p not in excl]
    train_probs = []
    while len(train_probs) < N_TRAIN:
        rng.shuffle(pool)
        train_probs += pool[: N_TRAIN - len(train_probs)]
    train = [alpaca_row(*p, rng) for p in train_probs]
    evals, seen_rows = [], set()
    for p in held_out:
        phrasings = []
        for _ in range(50):  # draw until EVAL_ROWS_PER_PROBLEM distinct phrasings of this problem
            if len(phrasings) == EVAL_ROWS_PER_PROBLEM:
                break
            a, b = (p[2], p[1]) if p[0] != "sub" and rng.random() < 0.5 else (p[1], p[2])
            row = alpaca_row(p[0], a, b, rng)
            if (row["instruction"], row["input"]) not in seen_rows:
                seen_rows.add((row["instruction"], row["input"]))
                phrasings.append(row)
        evals += phrasings
    chat = [chat_row(*p, rng) for p in train_probs[:N_SAMPLE]]
    text = [{"text": pretraining_document(rng, set())} for _ in range(N_SAMPLE)]
    return {"train.jsonl": train, "eval.jsonl": evals, "chat_sample.jsonl": chat, "text_sample.jsonl": text}


def write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    """Write rows as JSON lines to a temp file next to `path`, then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "data" / "tiny"), help="output directory")
    ap.add_argument("--seed", type=int, default=0, help="seed for problem selection and phrasing")
    args = ap.parse_args(argv)
    out = Path(args.out)
    for name, rows in build_rows(args.seed).items():
        write_jsonl_atomic(out / name, rows)
        print(f"wrote {out / name} ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
