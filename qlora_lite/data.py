"""Data pipeline: rows -> prompt/response text -> token ids + label masks -> (packed) -> padded batches.

    train_ds, eval_ds, stats = build_datasets(cfg.data, tokenizer, seed)   # datasets.Dataset(s)
    collate = make_collator(tokenizer)                                      # list[row] -> dict of tensors
    sampler = BatchSampler(len(train_ds), micro_batch_size, seed)           # resumable batch order
    batch = collate([train_ds[i] for i in sampler.next_batch()])

Sources: local .jsonl / .json / .csv / .parquet files, a local dataset directory, or a hub dataset
name (tried only when no local path of that name exists). JSON lines and CSV are read here, line by
line, so a malformed row is reported as `file:line`; parquet, dataset directories and hub datasets
go through `datasets.load_dataset` and are reported as `file:row N`.

Formats (data.format):
  alpaca  {"instruction", "input" (optional), "output"}: prompt = tasks.format_alpaca_prompt(...),
          response = output. Prompt and response are tokenized separately (as qlora.py does), so
          the boundary between masked and trained tokens is exact.
  chat    {"messages": [{"role", "content"}, ...]} rendered with the tokenizer's chat template
          (or data.chat_template); the loss covers assistant turns only (each turn's text up to and
          including the template's end-of-turn marker).
  text    {"text"}: every token is trained.

Tokens: [BOS if the tokenizer adds one] + prompt + response + [EOS]. Labels are -100 on prompt
tokens (unless data.train_on_prompt) so the loss is on the response; the EOS is labeled so the
model learns to stop. Examples longer than data.max_seq_len are cut at the end and counted; an
example left with no labeled token (its prompt filled the whole window) is dropped and counted.

Packing (data.packing): whole examples are placed, in order, into blocks of at most max_seq_len
tokens (an example never straddles two blocks). Labels stay masked per example, the first token
of each example is never a target (so "after this EOS comes that prompt" is not learned), and
position_ids restart at 0 for each example. The collator then leaves out attention_mask, and
transformers (>= 4.56, any attention kernel) turns restarting position_ids into a block-diagonal
causal mask: with use_cache=False a packed example sees only itself, exactly as if unpacked
(tested). Evaluation data is never packed, so eval loss is comparable with packing on or off.
"""
from __future__ import annotations

import csv
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from .errors import UserError

IGNORE_INDEX = -100  # label value that torch's cross-entropy (and HF causal LMs) skip
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
CHAT_ROLES = ("system", "user", "assistant", "tool")


@dataclass
class DataStats:
    """What loading did to the data: shown to the user and written to metrics."""

    rows: int = 0            # training examples kept (before packing)
    eval_rows: int = 0       # evaluation examples kept
    skipped: int = 0         # malformed rows skipped (data.on_bad_row = skip), train + eval
    truncated: int = 0       # examples cut at max_seq_len, train + eval
    dropped: int = 0         # examples with no labeled token left after truncation, train + eval
    tokens: int = 0          # training tokens (sum of example lengths)
    label_tokens: int = 0    # training tokens that carry a loss
    blocks: Optional[int] = None  # packed training blocks (None when packing is off)
    skipped_examples: list[str] = field(default_factory=list)  # first few "file:line: reason" of skipped rows

    def summary(self) -> str:
        """One line for the console."""
        parts = [f"{self.rows} train rows", f"{self.eval_rows} eval rows", f"{self.tokens} train tokens "
                 f"({self.label_tokens} labeled)"]
        if self.blocks is not None:
            parts.append(f"packed into {self.blocks} blocks")
        parts += [f"{self.truncated} truncated", f"{self.dropped} dropped (no response left)", f"{self.skipped} skipped"]
        return ", ".join(parts)


class _BadRow(Exception):
    """A row that does not fit the format; carries the reason (location is added by the caller)."""


@dataclass
class _Bad:
    """Placeholder the readers yield for a line that is not even parseable (bad JSON)."""

    reason: str


# ----------------------------------------------------------------------------- reading rows

def _is_local_spec(spec: str) -> bool:
    """A spec that must be a local path (so a missing one is 'not found', never a hub lookup)."""
    return (Path(spec).expanduser().exists() or spec.lower().endswith(FILE_SUFFIXES)
            or spec.startswith((".", "/", "~")) or "\\" in spec)


def _read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8", errors="strict") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue  # blank lines (e.g. a trailing newline) are not rows
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"{path}:{lineno}", _Bad(f"invalid JSON ({e.msg} at column {e.colno})")


def _read_json(path: Path) -> Iterator[tuple[str, Any]]:
    text = path.read_text(encoding="utf-8")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several JSON values: it is JSON lines under a .json name
            yield from _read_jsonl(path)
            return
        raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    if isinstance(obj, dict) and len(obj) == 1 and isinstance(next(iter(obj.values())), list):
        obj = next(iter(obj.values()))  # {"data": [...]} / {"train": [...]}
    if not isinstance(obj, list):
        raise UserError(f"{path}: expected a JSON array of rows (or one JSON object per line), "
                        f"got a JSON {type(obj).__name__}")
    for i, row in enumerate(obj):
        yield f"{path}:row {i + 1}", row


def _read_csv(path: Path) -> Iterator[tuple[str, Any]]:
    # The csv module (not pandas) keeps every cell a string and gives exact line numbers.
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames:
            return
        start = 2
        for row in reader:
            if None in row:  # more cells than header names
                yield f"{path}:{start}", _Bad(f"{len(reader.fieldnames) + len(row[None])} cells but the header "
                                              f"has {len(reader.fieldnames)}")
            else:
                yield f"{path}:{start}", row
            start = reader.line_num + 1


def _read_with_datasets(spec: str, split: str, label: str, **kwargs) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        ds = datasets.load_dataset(spec, split=split, **kwargs)
    except Exception as e:  # the library raises many types; the user needs the first line of the reason
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{label}: could not load {spec!r} (split {split!r}) with datasets: {first}") from None
    for i, row in enumerate(ds):
        yield f"{label}:row {i + 1}", row


def read_rows(spec: str, split: str = "train", key: str = "data.train_file") -> Iterator[tuple[str, Any]]:
    """Yield (location, raw row) from a local file, a local dataset dir, or a hub dataset name.

    `location` is "file:line" for .jsonl/.csv, "file:row N" otherwise; unparseable lines come back
    as _Bad placeholders so the caller decides between stopping and skipping.
    """
    path = Path(spec).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            yield from _read_jsonl(path)
        elif suffix == ".json":
            yield from _read_json(path)
        elif suffix == ".csv":
            yield from _read_csv(path)
        elif suffix == ".parquet":
            yield from _read_with_datasets("parquet", "train", str(path), data_files=str(path))
        else:
            raise UserError(f"{path}: unsupported data file type {suffix or '(none)'!r}; "
                            f"expected one of {', '.join(FILE_SUFFIXES)}")
    elif path.is_dir():
        yield from _read_with_datasets(str(path), split, str(path))
    elif _is_local_spec(spec):
        raise UserError(f"{key} = {spec!r}: file not found")
    else:
        yield from _read_with_datasets(spec, split, f"{key} = {spec} (hub dataset)")


# ----------------------------------------------------------------------------- row validation

def _text(row: dict, name: str, *, required: bool = True) -> str:
    if name not in row or row[name] is None:
        if required:
            raise _BadRow(f"missing field {name!r} (fields: {', '.join(map(str, row)) or 'none'})")
        return ""
    v = row[name]
    if not isinstance(v, str):
        raise _BadRow(f"field {name!r} must be a string, got {type(v).__name__} {v!r:.40}")
    if required and not v.strip():
        raise _BadRow(f"field {name!r} is empty")
    return v


def _check_row(row: Any, fmt: str, data_cfg) -> Any:
    """Validate one raw row for `fmt`; return its normalized form or raise _BadRow."""
    if isinstance(row, _Bad):
        raise _BadRow(row.reason)
    if not isinstance(row, dict):
        raise _BadRow(f"expected a JSON object, got {type(row).__name__}")
    if fmt == "alpaca":
        return {"instruction": _text(row, "instruction"), "input": _text(row, "input", required=False),
                "output": _text(row, "output")}
    if fmt == "text":
        return {"text": _text(row, data_cfg.text_field)}
    # chat
    name = data_cfg.messages_field
    msgs = row.get(name)
    if msgs is None:
        raise _BadRow(f"missing field {name!r} (fields: {', '.join(map(str, row)) or 'none'})")
    if not isinstance(msgs, list) or not msgs:
        raise _BadRow(f"field {name!r} must be a non-empty list of {{role, content}} messages")
    out = []
    for j, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise _BadRow(f"{name}[{j}] must be an object with role and content, got {type(m).__name__}")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise _BadRow(f"{name}[{j}].role = {role!r}; expected one of {', '.join(CHAT_ROLES)}")
        content = m.get("content")
        if not isinstance(content, str):
            raise _BadRow(f"{name}[{j}].content must be a string, got {type(content).__name__}")
        if role != "system" and not content.strip():
            raise _BadRow(f"{name}[{j}].content ({role}) is empty")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise _BadRow(f"{name} has no assistant message (nothing to learn)")
    return {"messages": out}


def _load_split(spec: str, split: str, data_cfg, key: str, stats: DataStats) -> list[tuple[str, dict]]:
    """Read and validate every row of one source; stop or skip on bad rows as configured."""
    rows: list[tuple[str, dict]] = []
    for where, raw in read_rows(spec, split, key):
        try:
            rows.append((where, _check_row(raw, data_cfg.format, data_cfg)))
        except _BadRow as e:
            if data_cfg.on_bad_row == "error":
                raise UserError(f"{where}: {e} (set data.on_bad_row: skip to skip bad rows)") from None
            stats.skipped += 1
            if len(stats.skipped_examples) < 5:
                stats.skipped_examples.append(f"{where}: {e}")
    if not rows:
        what = "every row was malformed and skipped" if stats.skipped else "no rows"
        raise UserError(f"{key} = {spec}: empty dataset ({what})")
    return rows


def _held_out_count(eval_size: float, n: int) -> int:
    k = int(eval_size) if eval_size >= 1 else max(1, round(eval_size * n))
    return k


def load_raw_splits(data_cfg, seed: int, stats: Optional[DataStats] = None
                    ) -> tuple[list[tuple[str, dict]], list[tuple[str, dict]]]:
    """Validated (location, row) lists for train and eval, following eval_file / eval_split / eval_size.

    The held-out split is a seeded permutation of the validated rows, so the same (data, seed) always
    holds out the same rows; the training rows keep their file order.
    """
    stats = stats if stats is not None else DataStats()
    train = _load_split(data_cfg.train_file, data_cfg.train_split, data_cfg, "data.train_file", stats)
    evals: list[tuple[str, dict]] = []
    if data_cfg.eval_file:
        evals = _load_split(data_cfg.eval_file, "train", data_cfg, "data.eval_file", stats)
    elif data_cfg.eval_split:
        evals = _load_split(data_cfg.train_file, data_cfg.eval_split, data_cfg, "data.eval_split", stats)
    elif data_cfg.eval_size:
        k = _held_out_count(data_cfg.eval_size, len(train))
        if k >= len(train):
            raise UserError(f"data.eval_size = {data_cfg.eval_size}: holds out {k} of {len(train)} rows, "
                            f"leaving none to train on")
        held = set(random.Random(f"eval-split:{seed}").sample(range(len(train)), k))
        evals = [r for i, r in enumerate(train) if i in held]
        train = [r for i, r in enumerate(train) if i not in held]
    return train, evals


# ----------------------------------------------------------------------------- tokenizing

def resolve_chat_template(data_cfg) -> Optional[str]:
    """data.chat_template as Jinja text: inline as written, or read from the file it names; None if unset."""
    t = data_cfg.chat_template
    if t and "{" not in t:  # a file path rather than an inline Jinja template
        p = Path(t).expanduser()
        if not p.is_file():
            raise UserError(f"data.chat_template = {t!r}: file not found")
        return p.read_text(encoding="utf-8")
    return t


_resolve_chat_template = resolve_chat_template  # older private name, kept for callers


class _Encoder:
    """Turns validated rows into (input_ids, labels) with one tokenizer's BOS/EOS conventions."""

    def __init__(self, tokenizer, data_cfg):
        self.tok = tokenizer
        self.cfg = data_cfg
        if tokenizer.eos_token_id is None:
            raise UserError("tokenizer has no eos_token: generation could never stop; set one in tokenizer_config.json")
        self.eos = int(tokenizer.eos_token_id)
        # "Handled per tokenizer": add BOS exactly when the tokenizer's own encoding would.
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        bos = tokenizer.bos_token_id
        self.bos = int(bos) if bos is not None and probe[:1] == [bos] else None
        self.template = None
        if data_cfg.format == "chat":
            self.template = resolve_chat_template(data_cfg)
            if self.template is None and not getattr(tokenizer, "chat_template", None):
                raise UserError("data.format = chat but the tokenizer has no chat template; set data.chat_template "
                                "(inline Jinja or a .jinja file) or use format alpaca/text")

    def _render(self, messages: list[dict], gen_prompt: bool) -> str:
        try:
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen_prompt,
                                                chat_template=self.template)
        except Exception as e:  # jinja errors (e.g. a template that rejects role order)
            raise _BadRow(f"chat template failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None

    def segments(self, row: dict) -> tuple[list[tuple[str, bool]], bool]:
        """[(text, trained?)] and whether to prepend BOS, for one row."""
        fmt = self.cfg.format
        if fmt == "alpaca":
            from .tasks import format_alpaca_prompt

            return [(format_alpaca_prompt(row["instruction"], row["input"]), False), (row["output"], True)], True
        if fmt == "text":
            return [(row["text"], True)], True
        # chat: split the rendered conversation at assistant-turn boundaries found by rendering prefixes.
        msgs = row["messages"]
        full = self._render(msgs, gen_prompt=False)
        segs: list[tuple[str, bool]] = []
        pos = 0
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            before = self._render(msgs[:i], gen_prompt=True) if i else ""   # ... + assistant header
            upto = self._render(msgs[: i + 1], gen_prompt=False)             # ... + this assistant turn
            if not (full.startswith(before) and full.startswith(upto) and pos <= len(before) <= len(upto)):
                raise _BadRow("the chat template does not render conversation prefixes as prefixes of the "
                              "whole conversation, so assistant turns cannot be located")
            segs += [(full[pos:len(before)], False), (full[len(before):len(upto)], True)]
            pos = len(upto)
        segs.append((full[pos:], False))
        bos_text = self.tok.bos_token
        return [s for s in segs if s[0]], not (bos_text and full.startswith(bos_text))

    def encode(self, segs: list[tuple[str, bool]], ids_per_seg: list[list[int]], add_bos: bool
               ) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        labels: list[int] = []
        if add_bos and self.bos is not None:
            ids.append(self.bos)
            labels.append(IGNORE_INDEX)  # never predicted: nothing comes before it
        train_all = self.cfg.train_on_prompt
        last_trained = None
        for (_, trained), seg_ids in zip(segs, ids_per_seg):
            ids += seg_ids
            if trained or train_all:
                seg_labels = list(seg_ids)
                if trained and self.cfg.format == "chat" and self.eos in seg_ids and not train_all:
                    # Template text after the turn's EOS (e.g. a newline) is not the model's to predict.
                    cut = len(seg_ids) - seg_ids[::-1].index(self.eos)
                    seg_labels[cut:] = [IGNORE_INDEX] * (len(seg_ids) - cut)
                labels += seg_labels
            else:
                labels += [IGNORE_INDEX] * len(seg_ids)
            if trained:
                last_trained = seg_ids
        # EOS so generation stops: alpaca/text always; chat only if the last assistant turn lacks it
        # (most templates close a turn with EOS or an end-of-turn token already).
        if self.cfg.format != "chat" or (last_trained is not None and self.eos not in last_trained
                                         and ids[-1:] != [self.eos]):
            ids.append(self.eos)
            labels.append(self.eos)
        return ids, labels


def _tokenize_rows(rows: list[tuple[str, dict]], enc: _Encoder, data_cfg, stats: DataStats, desc: str
                   ) -> list[tuple[list[int], list[int]]]:
    """Rows -> [(input_ids, labels)] truncated to max_seq_len; bad rows (chat template) stop or skip."""
    from tqdm.auto import tqdm

    out = []
    chunk = 512  # rows per batched tokenizer call (the fast tokenizer parallelizes a batch)
    bar = tqdm(total=len(rows), desc=desc, unit="row", disable=len(rows) < 5000, leave=False)
    for lo in range(0, len(rows), chunk):
        part = rows[lo: lo + chunk]
        segs_list, bos_list, keep = [], [], []
        for where, row in part:
            try:
                segs, add_bos = enc.segments(row)
            except _BadRow as e:
                if data_cfg.on_bad_row == "error":
                    raise UserError(f"{where}: {e}") from None
                stats.skipped += 1
                continue
            segs_list.append(segs)
            bos_list.append(add_bos)
            keep.append(where)
        flat = [t for segs in segs_list for t, _ in segs]
        flat_ids = enc.tok(flat, add_special_tokens=False)["input_ids"] if flat else []
        k = 0
        for segs, add_bos in zip(segs_list, bos_list):
            ids, labels = enc.encode(segs, flat_ids[k: k + len(segs)], add_bos)
            k += len(segs)
            if len(ids) > data_cfg.max_seq_len:
                ids, labels = ids[: data_cfg.max_seq_len], labels[: data_cfg.max_seq_len]
                stats.truncated += 1
            if all(l == IGNORE_INDEX for l in labels[1:]):  # position 0 is never a target after the shift
                stats.dropped += 1
                continue
            out.append((ids, labels))
        bar.update(len(part))
    bar.close()
    return out


def pack_examples(examples: list[tuple[list[int], list[int]]], max_seq_len: int) -> dict[str, list[list[int]]]:
    """Greedy in-order packing of whole examples into blocks of <= max_seq_len tokens.

    Returns columns input_ids / labels / position_ids, one entry per block. position_ids restart at 0
    for each example; the first label of each example is masked so no example learns to predict the
    start of the next one.
    """
    cols: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": []}
    cur_ids: list[int] = []
    cur_labels: list[int] = []
    cur_pos: list[int] = []
    for ids, labels in examples:
        if cur_ids and len(cur_ids) + len(ids) > max_seq_len:
            cols["input_ids"].append(cur_ids)
            cols["labels"].append(cur_labels)
            cols["position_ids"].append(cur_pos)
            cur_ids, cur_labels, cur_pos = [], [], []
        cur_ids += ids
        cur_labels += [IGNORE_INDEX] + labels[1:]
        cur_pos += list(range(len(ids)))
    if cur_ids:
        cols["input_ids"].append(cur_ids)
        cols["labels"].append(cur_labels)
        cols["position_ids"].append(cur_pos)
    return cols


def build_datasets(data_cfg, tokenizer, seed: int):
    """-> (train_ds, eval_ds or None, DataStats). Datasets are `datasets.Dataset`s with list columns
    input_ids and labels (and position_ids when packed), one example per row, unpadded."""
    import datasets

    stats = DataStats()
    train_rows, eval_rows = load_raw_splits(data_cfg, seed, stats)
    enc = _Encoder(tokenizer, data_cfg)
    train = _tokenize_rows(train_rows, enc, data_cfg, stats, "tokenize train")
    evals = _tokenize_rows(eval_rows, enc, data_cfg, stats, "tokenize eval") if eval_rows else []
    if not train:
        raise UserError(f"data.train_file = {data_cfg.train_file}: no usable training example "
                        f"({stats.dropped} had no response token left within data.max_seq_len = "
                        f"{data_cfg.max_seq_len}, {stats.skipped} skipped)")
    if eval_rows and not evals:
        raise UserError(f"evaluation data: no usable example ({stats.dropped} had no response token left within "
                        f"data.max_seq_len = {data_cfg.max_seq_len})")
    stats.rows, stats.eval_rows = len(train), len(evals)
    stats.tokens = sum(len(ids) for ids, _ in train)
    stats.label_tokens = sum(sum(l != IGNORE_INDEX for l in labels[1:]) for _, labels in train)
    if data_cfg.packing:
        cols = pack_examples(train, data_cfg.max_seq_len)
        stats.blocks = len(cols["input_ids"])
        stats.label_tokens = sum(sum(l != IGNORE_INDEX for l in labels) for labels in cols["labels"])
        train_ds = datasets.Dataset.from_dict(cols)
    else:
        train_ds = datasets.Dataset.from_dict({"input_ids": [i for i, _ in train], "labels": [l for _, l in train]})
    eval_ds = (datasets.Dataset.from_dict({"input_ids": [i for i, _ in evals], "labels": [l for _, l in evals]})
               if evals else None)
    return train_ds, eval_ds, stats


def eval_examples(data_cfg, seed: int, tokenizer=None, limit: Optional[int] = None) -> list[tuple[str, str]]:
    """(prompt, reference answer) pairs from the evaluation rows, for exact-match scoring.

    alpaca: (format_alpaca_prompt(instruction, input), output). chat (needs `tokenizer`): the
    conversation up to its last assistant turn rendered with the generation prompt, and that turn's
    content. text: no prompt/answer split, so []. `limit` defaults to data.num_eval_samples (0 = all).
    Prompts are meant for `tokenizer(prompt)` with its default special tokens (as
    tasks.generate_answers does): a chat template's leading BOS text is removed when the tokenizer
    adds BOS itself, so the prompt tokens match the training tokens exactly.
    """
    from .tasks import format_alpaca_prompt

    if data_cfg.format == "text":
        return []
    _, rows = load_raw_splits(data_cfg, seed)
    limit = data_cfg.num_eval_samples if limit is None else limit
    rows = rows[:limit] if limit else rows
    if data_cfg.format == "alpaca":
        return [(format_alpaca_prompt(r["instruction"], r["input"]), r["output"]) for _, r in rows]
    if tokenizer is None:
        raise ValueError("eval_examples: format chat needs the tokenizer to render prompts")
    enc = _Encoder(tokenizer, data_cfg)
    pairs = []
    bos_text = tokenizer.bos_token if enc.bos is not None else None
    for where, r in rows:
        msgs = r["messages"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        try:
            prompt = enc._render(msgs[:last], gen_prompt=True)
        except _BadRow as e:
            raise UserError(f"{where}: {e}") from None
        if bos_text and prompt.startswith(bos_text):
            prompt = prompt[len(bos_text):]  # the tokenizer puts the BOS back
        pairs.append((prompt, msgs[last]["content"]))
    return pairs


# ----------------------------------------------------------------------------- batching

def make_collator(tokenizer, pad_to_multiple_of: Optional[int] = None) -> Callable[[list[dict]], dict]:
    """list of rows {input_ids, labels[, position_ids]} -> dict of right-padded LongTensors [B, T].

    Unpacked rows give input_ids / attention_mask / labels. Packed rows give input_ids /
    position_ids / labels and deliberately no attention_mask: given position_ids that restart at 0
    and no mask, transformers builds a block-diagonal causal mask, so packed examples do not see
    each other (call the model with use_cache=False, as training should anyway; with a cache it
    falls back to plain causal attention over the block). Pad id = tokenizer.pad_token_id, else
    eos (padding carries label -100 and comes after every real token, so its id does not matter).
    pad_to_multiple_of rounds T up (e.g. 8 for tensor cores).
    """
    import torch

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise UserError("tokenizer has neither a pad_token nor an eos_token to pad with")

    def collate(rows: list[dict]) -> dict[str, "torch.Tensor"]:
        if not rows:
            raise ValueError("collate: empty batch")
        T = max(len(r["input_ids"]) for r in rows)
        if pad_to_multiple_of:
            T = math.ceil(T / pad_to_multiple_of) * pad_to_multiple_of
        B = len(rows)
        input_ids = torch.full((B, T), pad_id, dtype=torch.long)        # (B, T)
        attention_mask = torch.zeros((B, T), dtype=torch.long)          # (B, T) 1 = real token
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)     # (B, T) -100 = no loss
        has_pos = "position_ids" in rows[0] and rows[0]["position_ids"] is not None
        position_ids = torch.zeros((B, T), dtype=torch.long) if has_pos else None
        for b, r in enumerate(rows):
            n = len(r["input_ids"])
            input_ids[b, :n] = torch.as_tensor(r["input_ids"], dtype=torch.long)
            attention_mask[b, :n] = 1
            labels[b, :n] = torch.as_tensor(r["labels"], dtype=torch.long)
            if has_pos:
                position_ids[b, :n] = torch.as_tensor(r["position_ids"], dtype=torch.long)
        if has_pos:
            # Packed rows: no attention_mask, so transformers (>= 4.56) derives a per-example causal
            # mask from the restarting position_ids (the model must be called with use_cache=False).
            # Right padding needs no mask under causal attention: real tokens never see later pads.
            return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    return collate


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled example order of one epoch: a pure function of (n, seed, epoch), so a resumed run
    rebuilds exactly the order it was in. random.Random seeded with a string is stable across
    processes and Python versions (it hashes the string with SHA-512)."""
    order = list(range(n))
    random.Random(f"epoch-order:{seed}:{epoch}").shuffle(order)
    return order


class BatchSampler:
    """Deterministic, resumable micro-batch order: epoch e visits epoch_order(n, seed, e) in slices of
    batch_size; `position` is the index of the next batch within the epoch.

        sampler = BatchSampler(len(train_ds), micro_batch_size, seed)
        idx = sampler.next_batch()                  # list[int]; rolls over to the next epoch
        state = sampler.state_dict()                # store in the checkpoint
        sampler.load_state_dict(state)              # continue exactly where it stopped
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int, drop_last: bool = False):
        if num_examples <= 0 or batch_size <= 0:
            raise ValueError(f"BatchSampler: num_examples={num_examples} and batch_size={batch_size} must be > 0")
        if drop_last and batch_size > num_examples:
            raise UserError(f"micro batch size {batch_size} is larger than the {num_examples} training examples")
        self.num_examples, self.batch_size, self.seed, self.drop_last = num_examples, batch_size, seed, drop_last
        self.epoch = 0
        self.position = 0
        self._order: Optional[list[int]] = None
        self._order_epoch = -1

    def __len__(self) -> int:
        """Batches per epoch."""
        if self.drop_last:
            return self.num_examples // self.batch_size
        return math.ceil(self.num_examples / self.batch_size)

    def _epoch_order(self) -> list[int]:
        if self._order_epoch != self.epoch:
            self._order, self._order_epoch = epoch_order(self.num_examples, self.seed, self.epoch), self.epoch
        return self._order

    def next_batch(self) -> list[int]:
        if self.position >= len(self):
            self.epoch, self.position = self.epoch + 1, 0
        lo = self.position * self.batch_size
        batch = self._epoch_order()[lo: lo + self.batch_size]
        self.position += 1
        return batch

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_examples": self.num_examples, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for k in ("num_examples", "batch_size", "seed"):
            if state.get(k) != getattr(self, k):
                raise UserError(f"cannot resume the data order: checkpoint has {k} = {state.get(k)}, "
                                f"this run has {getattr(self, k)} (data, data config or batch size changed)")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def iter_batches(dataset, batch_size: int, collate: Callable[[list[dict]], dict]) -> Iterator[dict]:
    """In-order, un-shuffled batches of a dataset (for evaluation)."""
    for lo in range(0, len(dataset), batch_size):
        yield collate([dataset[i] for i in range(lo, min(lo + batch_size, len(dataset)))])
