"""Data pipeline: formats, label masks, EOS/BOS, truncation, packing, bad rows, file types, batching order."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qlora_lite.config import DataConfig, load_config
from qlora_lite.data import (
    IGNORE_INDEX, BatchSampler, build_datasets, epoch_order, eval_examples, iter_batches, load_raw_splits,
    make_collator, pack_examples,
)
from qlora_lite.errors import UserError
from qlora_lite.tasks import format_alpaca_prompt

REPO = Path(__file__).resolve().parent.parent
TINY_BASE = REPO / "assets" / "tiny-base"

CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

ALPACA = [
    {"instruction": "Add two numbers", "input": "2 and 2", "output": "4"},
    {"instruction": "Name the capital of France", "input": "", "output": "Paris"},
    {"instruction": "Say hello", "output": "hello world"},
]


@pytest.fixture(scope="module")
def tok():
    """A word-level tokenizer built in memory: BOS added by its post-processor, EOS/pad distinct, ChatML template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    corpus = [format_alpaca_prompt("x", "y"), format_alpaca_prompt("x"),
              "add two numbers and 2 4 name the capital of france paris say hello world "
              "system user assistant you are helpful hi there how are fine thanks one two three four five six"]
    t = Tokenizer(models.WordLevel(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.train_from_iterator(corpus + [c.title() for c in corpus], trainers.WordLevelTrainer(special_tokens=specials))
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", t.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")
    fast.chat_template = CHATML
    return fast


def jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def dcfg(train_file, **kw) -> DataConfig:
    return DataConfig(train_file=str(train_file), **kw)


def words(tok, ids):
    return tok.convert_ids_to_tokens([i for i in ids if i != IGNORE_INDEX])


# ----------------------------------------------------------------------------- formats and label masks

def test_alpaca_masks_the_prompt_and_labels_response_plus_eos(tok, tmp_path):
    train, eval_ds, stats = build_datasets(dcfg(jsonl(tmp_path / "a.jsonl", ALPACA)), tok, seed=0)
    assert eval_ds is None and stats.rows == 3 and stats.truncated == stats.skipped == stats.dropped == 0
    for row, ex in zip(ALPACA, train):
        prompt = tok(format_alpaca_prompt(row["instruction"], row.get("input")), add_special_tokens=False)["input_ids"]
        resp = tok(row["output"], add_special_tokens=False)["input_ids"]
        # Reference: qlora.py's layout, BOS + prompt + response + EOS, loss on response + EOS only.
        assert ex["input_ids"] == [tok.bos_token_id] + prompt + resp + [tok.eos_token_id]
        assert ex["labels"] == [IGNORE_INDEX] * (1 + len(prompt)) + resp + [tok.eos_token_id]
    assert stats.label_tokens == sum(len(tok(r["output"], add_special_tokens=False)["input_ids"]) + 1 for r in ALPACA)


def test_train_on_prompt_labels_everything_but_bos(tok, tmp_path):
    train, _, _ = build_datasets(dcfg(jsonl(tmp_path / "a.jsonl", ALPACA), train_on_prompt=True), tok, seed=0)
    for ex in train:
        assert ex["labels"] == [IGNORE_INDEX] + ex["input_ids"][1:]


def test_text_format_trains_every_token(tok, tmp_path):
    p = jsonl(tmp_path / "t.jsonl", [{"text": "one two three"}, {"body": "four five", "text": "six"}])
    train, _, _ = build_datasets(dcfg(p, format="text"), tok, seed=0)
    assert words(tok, train[0]["input_ids"]) == ["<s>", "one", "two", "three", "</s>"]
    assert train[0]["labels"] == [IGNORE_INDEX] + train[0]["input_ids"][1:]
    train, _, _ = build_datasets(dcfg(p, format="text", text_field="body", on_bad_row="skip"), tok, seed=0)
    assert len(train) == 1 and words(tok, train[0]["labels"]) == ["four", "five", "</s>"]


def test_chat_labels_only_assistant_turns(tok, tmp_path):
    conv = {"messages": [{"role": "system", "content": "you are helpful"},
                         {"role": "user", "content": "hi there"},
                         {"role": "assistant", "content": "hello"},
                         {"role": "user", "content": "how are you"},
                         {"role": "assistant", "content": "fine thanks"}]}
    train, _, _ = build_datasets(dcfg(jsonl(tmp_path / "c.jsonl", [conv]), format="chat"), tok, seed=0)
    ex = train[0]
    full = tok.apply_chat_template(conv["messages"], tokenize=False)
    # Reference: the whole rendered conversation tokenized as one string, between BOS (the template has
    # none) and EOS (the template closes turns with <|im_end|>, which is not this tokenizer's EOS).
    assert ex["input_ids"] == [tok.bos_token_id] + tok(full, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    trained = [t for t, l in zip(words(tok, ex["input_ids"]), ex["labels"]) if l != IGNORE_INDEX]
    # Each assistant turn's content plus the template's end-of-turn marker; no system/user tokens.
    assert trained == ["hello", "<|im_end|>", "fine", "thanks", "<|im_end|>", "</s>"]
    assert ex["labels"][-1] == tok.eos_token_id  # the appended EOS is trained, so generation stops


def test_chat_template_from_config_and_missing_template(tok, tmp_path):
    conv = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    p = jsonl(tmp_path / "c.jsonl", [conv])
    bare = tok.__class__(tokenizer_object=tok.backend_tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    bare.chat_template = None
    with pytest.raises(UserError, match="no chat template; set data.chat_template"):
        build_datasets(dcfg(p, format="chat"), bare, seed=0)
    (tmp_path / "t.jinja").write_text(CHATML)
    train, _, _ = build_datasets(dcfg(p, format="chat", chat_template=str(tmp_path / "t.jinja")), bare, seed=0)
    assert [t for t, l in zip(words(tok, train[0]["input_ids"]), train[0]["labels"]) if l != IGNORE_INDEX] == \
        ["hello", "<|im_end|>", "</s>"]


def test_bos_follows_the_tokenizer_and_template(tok, tmp_path):
    # A tokenizer that adds no BOS (Qwen-like) gets none; EOS is still appended.
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())  # a copy: the fixture stays untouched
    backend.post_processor = None
    plain = tok.__class__(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>")
    assert plain("hi")["input_ids"] == tok("hi", add_special_tokens=False)["input_ids"]
    train, _, _ = build_datasets(dcfg(jsonl(tmp_path / "a.jsonl", ALPACA[2:])), plain, seed=0)
    assert words(tok, train[0]["input_ids"])[0] == "Below" and train[0]["labels"][-1] == tok.eos_token_id
    # A template that writes BOS itself (Llama-style) for a tokenizer that also adds BOS: exactly one BOS,
    # and the template's EOS after the assistant turn means no second EOS.
    tmpl = ("{{ bos_token }}{% for m in messages %}{{ m.role }} : {{ m.content }} "
            "{% if m.role == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}assistant : {% endif %}")
    conv = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    c = jsonl(tmp_path / "c.jsonl", [conv])
    train, _, _ = build_datasets(dcfg(c, format="chat", chat_template=tmpl), tok, seed=0)
    assert words(tok, train[0]["input_ids"]) == ["<s>", "user", ":", "hi", "assistant", ":", "hello", "</s>"]
    assert words(tok, train[0]["labels"]) == ["hello", "</s>"]
    # Template text after a turn's EOS is part of the input but not a target.
    nl = tmpl.replace("{{ eos_token }}", "{{ eos_token }} user")
    train, _, _ = build_datasets(dcfg(c, format="chat", chat_template=nl), tok, seed=0)
    assert words(tok, train[0]["input_ids"])[-2:] == ["</s>", "user"]
    assert words(tok, train[0]["labels"]) == ["hello", "</s>"]
    # The exact-match prompt, tokenized the default way (tokenizer adds BOS), is the training prefix.
    (prompt, answer), = eval_examples(dcfg(c, format="chat", chat_template=tmpl, eval_file=str(c)), 0, tok)
    assert tok(prompt)["input_ids"] == train[0]["input_ids"][:6] and answer == "hello"


def test_truncation_is_counted_and_rows_without_response_are_dropped(tok, tmp_path):
    long_out = {"instruction": "say hello", "input": "", "output": " ".join(["hello"] * 50)}
    p = jsonl(tmp_path / "a.jsonl", ALPACA + [long_out])
    full, _, _ = build_datasets(dcfg(p), tok, seed=0)
    longest_short = max(len(x) for x in full["input_ids"][:3])
    train, _, stats = build_datasets(dcfg(p, max_seq_len=longest_short), tok, seed=0)
    assert stats.truncated == 1 and stats.rows == 4 and stats.dropped == 0
    assert train["input_ids"][:3] == full["input_ids"][:3] and train["input_ids"][3] == full["input_ids"][3][:longest_short]
    assert train["labels"][3][-1] == tok.convert_tokens_to_ids("hello")  # cut mid-response: no EOS, still trained
    # A window that holds only the prompt leaves nothing to learn: such rows are dropped, not trained on.
    prompt_len = 1 + len(tok(format_alpaca_prompt("say hello"), add_special_tokens=False)["input_ids"])
    train, _, stats = build_datasets(dcfg(p, max_seq_len=prompt_len + 1), tok, seed=0)
    assert (stats.rows, stats.dropped) == (2, 2) and all(any(l != IGNORE_INDEX for l in x) for x in train["labels"])
    with pytest.raises(UserError, match="no usable training example"):
        build_datasets(dcfg(p, max_seq_len=5), tok, seed=0)


def test_packing_keeps_masks_per_example(tok, tmp_path):
    p = jsonl(tmp_path / "a.jsonl", ALPACA * 4)
    plain, _, _ = build_datasets(dcfg(p), tok, seed=0)
    packed, _, stats = build_datasets(dcfg(p, packing=True, max_seq_len=128), tok, seed=0)
    assert stats.blocks == len(packed) < len(plain)
    flat_ids = [t for b in packed["input_ids"] for t in b]
    assert flat_ids == [t for x in plain["input_ids"] for t in x]            # same tokens, same order
    for ids, labels, pos in zip(packed["input_ids"], packed["labels"], packed["position_ids"]):
        assert len(ids) == len(labels) == len(pos) <= 128
        starts = [i for i, q in enumerate(pos) if q == 0]
        for s in starts:
            assert labels[s] == IGNORE_INDEX and ids[s] == tok.bos_token_id  # never learn across a boundary
    # Label masks are unchanged apart from each example's first position (already masked for alpaca).
    assert [l for b in packed["labels"] for l in b] == [l for x in plain["labels"] for l in x]
    cols = pack_examples([([1, 2, 3], [1, 2, 3]), ([4, 5], [4, 5]), ([6, 7, 8, 9], [6, 7, 8, 9])], 5)
    assert cols["input_ids"] == [[1, 2, 3, 4, 5], [6, 7, 8, 9]]
    assert cols["labels"] == [[-100, 2, 3, -100, 5], [-100, 7, 8, 9]]
    assert cols["position_ids"] == [[0, 1, 2, 0, 1], [0, 1, 2, 3]]


# ----------------------------------------------------------------------------- bad rows

@pytest.mark.parametrize("bad, reason", [
    ('{"instruction": "x", "output": ', "invalid JSON"),
    ({"instruction": "x"}, "missing field 'output'"),
    ({"instruction": "x", "output": "   "}, "field 'output' is empty"),
    ({"instruction": "x", "output": 4}, "field 'output' must be a string, got int"),
    ({"instruction": "x", "input": ["a"], "output": "y"}, "field 'input' must be a string"),
    ('["not", "an", "object"]', "expected a JSON object"),
])
def test_bad_row_stops_with_file_and_line(tok, tmp_path, bad, reason):
    p = jsonl(tmp_path / "a.jsonl", [ALPACA[0], "", bad, ALPACA[1]])  # line 2 is blank: the bad row is line 3
    with pytest.raises(UserError) as e:
        build_datasets(dcfg(p), tok, seed=0)
    assert str(e.value).startswith(f"{p}:3: {reason}"), str(e.value)
    train, _, stats = build_datasets(dcfg(p, on_bad_row="skip"), tok, seed=0)
    assert stats.skipped == 1 and stats.rows == len(train) == 2 and stats.skipped_examples[0].startswith(f"{p}:3:")


@pytest.mark.parametrize("fmt, row, reason", [
    ("text", {"text": ""}, "field 'text' is empty"),
    ("chat", {"messages": []}, "non-empty list"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
    ("chat", {"messages": [{"role": "bot", "content": "hi"}]}, "role = 'bot'"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}, "is empty"),
    ("chat", {"conversation": []}, "missing field 'messages'"),
])
def test_bad_rows_in_other_formats(tok, tmp_path, fmt, row, reason):
    p = jsonl(tmp_path / "x.jsonl", [row])
    with pytest.raises(UserError, match=f"^{p}:1: .*{reason}"):
        build_datasets(dcfg(p, format=fmt), tok, seed=0)


def test_empty_and_all_skipped_datasets_are_errors(tok, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(UserError, match="empty dataset"):
        build_datasets(dcfg(empty), tok, seed=0)
    bad = jsonl(tmp_path / "bad.jsonl", ["{oops", {"instruction": "x"}])
    with pytest.raises(UserError, match=r"empty dataset \(every row was malformed and skipped\)"):
        build_datasets(dcfg(bad, on_bad_row="skip"), tok, seed=0)


# ----------------------------------------------------------------------------- sources

def test_csv_json_and_parquet_files(tok, tmp_path):
    import csv

    import datasets

    ref, _, _ = build_datasets(dcfg(jsonl(tmp_path / "a.jsonl", ALPACA)), tok, seed=0)
    with (tmp_path / "a.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["instruction", "input", "output"])
        w.writeheader()
        w.writerows([{**{"input": ""}, **r} for r in ALPACA])
    (tmp_path / "a.json").write_text(json.dumps(ALPACA))
    datasets.Dataset.from_list([{**{"input": ""}, **r} for r in ALPACA]).to_parquet(str(tmp_path / "a.parquet"))
    for name in ("a.csv", "a.json", "a.parquet"):
        got, _, _ = build_datasets(dcfg(tmp_path / name), tok, seed=0)
        assert got["input_ids"] == ref["input_ids"] and got["labels"] == ref["labels"], name
    # CSV errors carry the file line (header is line 1); cells are text, so "4" stays a string.
    (tmp_path / "b.csv").write_text('instruction,input,output\nAdd,"2 and 2",4\nSay hello,,\n')
    with pytest.raises(UserError, match=rf"^{tmp_path / 'b.csv'}:3: field 'output' is empty"):
        build_datasets(dcfg(tmp_path / "b.csv"), tok, seed=0)
    (tmp_path / "c.parquet").write_bytes(b"")
    datasets.Dataset.from_list([{"instruction": "x", "output": 3}]).to_parquet(str(tmp_path / "c.parquet"))
    with pytest.raises(UserError, match=r"c.parquet:row 1: field 'output' must be a string"):
        build_datasets(dcfg(tmp_path / "c.parquet"), tok, seed=0)


def test_missing_files_and_unsupported_types(tok, tmp_path):
    with pytest.raises(UserError, match="data.train_file = .*nope.jsonl': file not found"):
        build_datasets(dcfg(tmp_path / "nope.jsonl"), tok, seed=0)
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(UserError, match="unsupported data file type '.txt'"):
        build_datasets(dcfg(tmp_path / "a.txt"), tok, seed=0)
    with pytest.raises(UserError, match="data.eval_file = .*missing.jsonl': file not found"):
        build_datasets(dcfg(jsonl(tmp_path / "a.jsonl", ALPACA), eval_file=str(tmp_path / "missing.jsonl")), tok, 0)


def test_hub_names_go_to_datasets_only_when_not_local(tok, tmp_path, monkeypatch):
    import datasets

    calls = []

    def fake_load(name, split=None, **kw):
        calls.append((name, split))
        if name == "org/broken":
            raise ConnectionError("offline\nmore")
        return datasets.Dataset.from_list(ALPACA[:2] if split == "test" else ALPACA)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    train, eval_ds, stats = build_datasets(dcfg("org/alpaca", eval_split="test"), tok, seed=0)
    assert calls == [("org/alpaca", "train"), ("org/alpaca", "test")] and (stats.rows, stats.eval_rows) == (3, 2)
    with pytest.raises(UserError, match=r"could not load 'org/broken' \(split 'train'\) with datasets: offline$"):
        build_datasets(dcfg("org/broken"), tok, seed=0)
    assert ("./org/local.jsonl", "train") not in calls
    with pytest.raises(UserError, match="file not found"):
        build_datasets(dcfg("./org/local.jsonl"), tok, seed=0)


# ----------------------------------------------------------------------------- eval split

def test_held_out_split_is_seeded_and_disjoint(tok, tmp_path):
    rows = [{"instruction": f"say {w}", "output": w} for w in "one two three four five six".split()] * 3
    for i, r in enumerate(rows):
        r["input"] = str(i)
    p = jsonl(tmp_path / "a.jsonl", rows)
    tr, ev = load_raw_splits(dcfg(p, eval_size=0.25), seed=1)
    assert len(ev) == 4 and len(tr) == 14 and not {w for w, _ in tr} & {w for w, _ in ev}
    assert load_raw_splits(dcfg(p, eval_size=0.25), seed=1) == (tr, ev)
    assert load_raw_splits(dcfg(p, eval_size=0.25), seed=2)[1] != ev
    assert [w for w, _ in tr] == sorted((w for w, _ in tr), key=lambda s: int(s.rsplit(":", 1)[1]))  # file order kept
    assert len(load_raw_splits(dcfg(p, eval_size=5), seed=1)[1]) == 5
    with pytest.raises(UserError, match="leaving none to train on"):
        load_raw_splits(dcfg(p, eval_size=18), seed=1)
    train, eval_ds, stats = build_datasets(dcfg(p, eval_size=0.25), tok, seed=1)
    assert (len(train), len(eval_ds), stats.eval_rows) == (14, 4, 4)


def test_eval_examples_give_prompt_and_answer(tok, tmp_path):
    p = jsonl(tmp_path / "a.jsonl", ALPACA)
    cfg = dcfg(p, eval_file=str(p), num_eval_samples=2)
    pairs = eval_examples(cfg, seed=0)
    assert pairs == [(format_alpaca_prompt("Add two numbers", "2 and 2"), "4"),
                     (format_alpaca_prompt("Name the capital of France"), "Paris")]
    assert len(eval_examples(cfg, seed=0, limit=0)) == 3
    conv = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    c = jsonl(tmp_path / "c.jsonl", [conv])
    (prompt, answer), = eval_examples(dcfg(c, format="chat", eval_file=str(c)), seed=0, tokenizer=tok)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n" and answer == "hello"
    assert eval_examples(dcfg(c, format="text", eval_file=str(c)), seed=0) == []


# ----------------------------------------------------------------------------- batching

def test_collator_right_pads(tok):
    collate = make_collator(tok)
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    b = collate(rows)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, tok.pad_token_id, tok.pad_token_id]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert b["input_ids"].dtype == torch.long and "position_ids" not in b
    b = make_collator(tok, pad_to_multiple_of=8)([{**r, "position_ids": list(range(len(r["input_ids"])))} for r in rows])
    assert b["input_ids"].shape == (2, 8) and b["position_ids"][0, :4].tolist() == [0, 1, 2, 0]
    no_pad = tok.__class__(tokenizer_object=tok.backend_tokenizer, bos_token="<s>", eos_token="</s>")
    assert make_collator(no_pad)(rows)["input_ids"][1, 1] == tok.eos_token_id  # falls back to EOS


def test_epoch_order_is_a_seeded_permutation():
    a = epoch_order(50, seed=3, epoch=0)
    assert sorted(a) == list(range(50)) and a == epoch_order(50, seed=3, epoch=0)
    assert a != epoch_order(50, seed=3, epoch=1) and a != epoch_order(50, seed=4, epoch=0)


def test_batch_sampler_resumes_exactly():
    ref = BatchSampler(10, 3, seed=7)
    uninterrupted = [ref.next_batch() for _ in range(13)]
    assert len(ref) == 4 and uninterrupted[:4] == [epoch_order(10, 7, 0)[i:i + 3] for i in range(0, 10, 3)]
    assert sorted(sum(uninterrupted[4:8], [])) == list(range(10))  # each epoch visits every example once
    first = BatchSampler(10, 3, seed=7)
    got = [first.next_batch() for _ in range(6)]
    state = first.state_dict()
    resumed = BatchSampler(10, 3, seed=7)
    resumed.load_state_dict(state)
    got += [resumed.next_batch() for _ in range(7)]
    assert got == uninterrupted and resumed.epoch == 3
    with pytest.raises(UserError, match="num_examples = 10, this run has 11"):
        BatchSampler(11, 3, seed=7).load_state_dict(state)
    assert len(BatchSampler(10, 3, seed=0, drop_last=True)) == 3


@pytest.fixture(scope="module")
def tiny_lm(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2)).eval()


def _token_losses(model, batch):
    """Per-token cross-entropy (B, T-1) with the HF shift, 0 where the label is -100."""
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:],
                                             ignore_index=IGNORE_INDEX, reduction="none")


def test_padding_is_inert_in_a_causal_lm(tok, tiny_lm, tmp_path):
    """Reference: each example run alone. A right-padded batch gives the same per-token losses."""
    train, _, _ = build_datasets(dcfg(jsonl(tmp_path / "a.jsonl", ALPACA)), tok, seed=0)
    collate = make_collator(tok)
    batch = next(iter_batches(train, 3, collate))
    got = _token_losses(tiny_lm, batch)
    for b in range(3):
        alone = _token_losses(tiny_lm, collate([train[b]]))[0]
        torch.testing.assert_close(got[b, : len(alone)], alone, rtol=1e-4, atol=1e-5)


def test_packed_examples_do_not_see_each_other(tok, tiny_lm, tmp_path):
    """Reference: the unpacked examples. Packing changes neither the tokens that carry loss nor their losses."""
    p = jsonl(tmp_path / "a.jsonl", ALPACA * 2)
    plain, _, _ = build_datasets(dcfg(p), tok, seed=0)
    packed, _, stats = build_datasets(dcfg(p, packing=True, max_seq_len=128), tok, seed=0)
    collate = make_collator(tok)
    batch = collate([packed[i] for i in range(len(packed))])
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == stats.blocks >= 2
    ref = torch.cat([_token_losses(tiny_lm, collate([ex]))[0] for ex in plain])
    ref = ref[ref != 0]
    got = _token_losses(tiny_lm, batch)
    got = got[got != 0]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- bundled tiny data

@pytest.mark.skipif(not (TINY_BASE / "tokenizer_config.json").exists() or
                    not (REPO / "data" / "tiny" / "train.jsonl").exists(), reason="tiny base or data not built")
def test_tiny_config_data_builds_with_the_bundled_tokenizer():
    from transformers import AutoTokenizer

    cfg = load_config(REPO / "configs" / "tiny.yaml")
    tok = AutoTokenizer.from_pretrained(cfg.model.name_or_path)
    train, eval_ds, stats = build_datasets(cfg.data, tok, cfg.train.seed)
    assert stats.rows > 0 and eval_ds is not None and stats.skipped == 0
    ex = train[0]
    assert ex["labels"][-1] == tok.eos_token_id and ex["labels"][0] == IGNORE_INDEX
    pairs = eval_examples(cfg.data, cfg.train.seed)
    assert pairs and all(p.endswith("### Response:\n") and a for p, a in pairs)


@pytest.mark.skipif(not (TINY_BASE / "tokenizer_config.json").exists() or
                    not (REPO / "data" / "tiny" / "chat_sample.jsonl").exists(), reason="tiny base or data not built")
@pytest.mark.parametrize("fmt, name", [("chat", "chat_sample.jsonl"), ("text", "text_sample.jsonl")])
def test_bundled_chat_and_text_samples(fmt, name):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY_BASE)
    train, _, stats = build_datasets(dcfg(REPO / "data" / "tiny" / name, format=fmt, max_seq_len=256), tok, seed=0)
    assert stats.rows > 0 and stats.skipped == stats.truncated == 0
    for ex in train:
        assert ex["input_ids"].count(tok.bos_token_id) == 1 and tok.eos_token_id in ex["labels"]
