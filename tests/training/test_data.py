"""dorakit.training.data: loading and validating the three formats, the prompt template, label masking,
truncation, padding, classification pairs and resumable batches."""

from __future__ import annotations

import importlib.util
import json
import warnings
from itertools import chain
from pathlib import Path

import pytest
import torch
from fixtures_text import shared_task_file, word_tokenizer, write_json

from dorakit.training.data import (
    IGNORE_INDEX,
    Batches,
    CausalExample,
    DataError,
    Record,
    classification_examples,
    collate_causal,
    encode_prompt,
    format_prompt,
    label_vocab,
    load_classification,
    load_records,
    pad_token_id,
    tokenize_causal,
    tokenize_records,
)

ROWS = [
    {"instruction": "Is water wet? Answer format: true/false", "input": "",
     "output": "the correct answer is true", "answer": "true"},
    {"instruction": "Pick one. Answer format: answer1/answer2", "input": "some context here",
     "output": "the correct answer is answer2", "answer": "answer2"},
    {"instruction": "No answer key in this one", "output": "a free-form reply"},
]
RECORDS = [Record(r["instruction"], r.get("input", ""), r["output"], r.get("answer")) for r in ROWS]
HAS_DATASETS = importlib.util.find_spec("datasets") is not None


@pytest.fixture
def tok(tmp_path: Path):
    texts = [format_prompt(r.instruction, r.input, t) + r.output
             for r in RECORDS for t in ("finetune", "evaluate")]
    return word_tokenizer(tmp_path / "tok", texts)


# --------------------------------------------------------------------------------------------- loading

def test_json_jsonl_and_split_dir_load_the_same_records(tmp_path: Path) -> None:
    write_json(tmp_path / "d.json", ROWS)
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")  # blank lines skipped
    (tmp_path / "task").mkdir()
    write_json(tmp_path / "task" / "test.json", ROWS)
    assert load_records(tmp_path / "d.json") == RECORDS
    assert load_records(tmp_path / "d.jsonl") == RECORDS
    assert load_records(tmp_path / "task", split="test") == RECORDS


@pytest.mark.skipif(not HAS_DATASETS, reason="`datasets` is not installed")
def test_datasets_dir_loads_dataset_and_dataset_dict(tmp_path: Path) -> None:
    import datasets
    import pyarrow as pa

    # One schema for every row (datasets needs uniform columns). An explicit fingerprint skips datasets'
    # dill hashing of the table, which fails with some pyarrow/dill pairs and is not what is tested here.
    ds = datasets.Dataset(pa.Table.from_pylist(ROWS[:2]), fingerprint="test")
    ds.save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dd"))
    assert load_records(tmp_path / "ds") == RECORDS[:2]
    assert load_records(tmp_path / "dd", split="train") == RECORDS[:2]
    with pytest.raises(DataError, match=r"splits \['train'\], not 'test'"):
        load_records(tmp_path / "dd", split="test")


@pytest.mark.skipif(HAS_DATASETS, reason="checks the message shown when `datasets` is missing")
def test_datasets_dir_without_datasets_says_how_to_fix(tmp_path: Path) -> None:
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "dataset_info.json").write_text("{}")
    with pytest.raises(DataError, match="pip install datasets"):
        load_records(tmp_path / "ds")


def test_real_shared_file_loads_for_eval() -> None:
    records = load_records(shared_task_file("boolq"), purpose="eval")
    assert len(records) == 3270
    assert all(r.answer in ("true", "false") and r.input == "" for r in records)


@pytest.mark.parametrize("name, content, pattern", [
    ("empty.json", "", r"empty.json is empty"),
    ("blank.jsonl", "\n  \n", r"blank.jsonl is empty"),
    ("none.json", "[ ]", r"none.json holds no records"),
    ("obj.json", '{"instruction": "x", "output": "y"}',
     r"obj.json, line 1: .*list of records.*rename the file to .jsonl"),
    ("bad.txt", "[]", r"unknown extension '.txt'"),
])
def test_empty_or_wrong_shape_files(tmp_path: Path, name: str, content: str, pattern: str) -> None:
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=pattern):
        load_records(tmp_path / name)


def test_missing_file_and_dir_without_data(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope.json does not exist; pass a .json file"):
        load_records(tmp_path / "nope.json")
    with pytest.raises(DataError, match=r"holds neither train.json, train.jsonl nor a dataset"):
        load_records(tmp_path)


def test_invalid_json_names_record_and_line(tmp_path: Path) -> None:
    text = json.dumps(ROWS, indent=4)
    lines = text.splitlines()
    bad_line = next(i for i, line in enumerate(lines) if "Pick one" in line)  # inside record 1
    lines[bad_line] = lines[bad_line].rstrip(",")  # drop the comma after "instruction": ...
    (tmp_path / "d.json").write_text("\n".join(lines))
    pattern = rf"d.json, record 1 \(line {bad_line + 2}, column \d+\): invalid JSON"
    with pytest.raises(DataError, match=pattern):
        load_records(tmp_path / "d.json")


def test_missing_comma_between_records_names_line(tmp_path: Path) -> None:
    (tmp_path / "d.json").write_text('[\n{"instruction": "a", "output": "b"}\n'
                                     '{"instruction": "c", "output": "d"}]')
    with pytest.raises(DataError, match=r"d.json, line 3: expected ',' or '\]' after record 0"):
        load_records(tmp_path / "d.json")


def test_invalid_jsonl_line_names_line(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text(json.dumps(ROWS[0]) + "\n\n" + '{"instruction": "x", "output": }\n')
    with pytest.raises(DataError, match=r"d.jsonl, record 1 \(line 3\): invalid JSON at column \d+"):
        load_records(tmp_path / "d.jsonl")


@pytest.mark.parametrize("bad, purpose, pattern", [
    ({"instruction": "x"}, "train", r"missing key 'output'; every training record needs"),
    ({"output": "x"}, "train", r"missing key 'instruction'"),
    ({"instruction": "x", "output": "y"}, "eval", r"missing key 'answer'; every eval record needs"),
    ({"instruction": 3, "output": "y"}, "train", r"'instruction' must be a string, got int 3"),
    ({"instruction": "x", "output": "y", "input": ["a"]}, "train", r"'input' must be a string, got list"),
    ({"instruction": "x", "output": "  "}, "train", r"'output' is empty"),
    ("just a string", "train", r"expected a JSON object, got str"),
])
def test_bad_records_name_file_index_and_line(tmp_path: Path, bad: object, purpose: str,
                                              pattern: str) -> None:
    rows = [ROWS[0], ROWS[1], bad]
    write_json(tmp_path / "d.json", rows)
    lines = json.dumps(rows, indent=4).splitlines()
    expected_line = [i + 1 for i, line in enumerate(lines) if line == "    {" or line.startswith('    "')][2]
    with pytest.raises(DataError, match=rf"d.json, record 2 \(line {expected_line}\): {pattern}"):
        load_records(tmp_path / "d.json", purpose=purpose)  # type: ignore[arg-type]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DataError, match=rf"d.jsonl, record 2 \(line 3\): {pattern}"):
        load_records(tmp_path / "d.jsonl", purpose=purpose)  # type: ignore[arg-type]


def test_null_input_reads_as_empty(tmp_path: Path) -> None:
    write_json(tmp_path / "d.json", [{"instruction": "x", "input": None, "output": "y"}])
    assert load_records(tmp_path / "d.json") == [Record("x", "", "y", None)]


# --------------------------------------------------------------------------------------------- prompts

_P = " " * 16


def test_prompt_templates_match_the_dora_scripts_character_for_character() -> None:
    # NVlabs/DoRA commonsense_reasoning/finetune.py generate_prompt, output = "".
    assert format_prompt("Q?") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        f"request.  \n\n{_P}### Instruction:\n{_P}Q?\n{_P}\n{_P}### Response:\n{_P}")
    assert format_prompt("Q?", "ctx") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        f"Write a response that appropriately completes the request. \n\n{_P}### Instruction:\n{_P}Q?\n{_P}\n"
        f"{_P}### Input:\n{_P}ctx\n{_P}\n{_P}### Response:\n{_P}")
    # commonsense_evaluate.py generate_prompt.
    assert format_prompt("Q?", template="evaluate") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        f"request. \n\n{_P}### Instruction:\n{_P}Q?\n\n{_P}### Response:\n{_P}")
    assert format_prompt("Q?", "ctx", template="evaluate") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        f"Write a response that appropriately completes the request.\n\n{_P}### Instruction:\n{_P}Q?\n\n"
        f"{_P}### Input:\n{_P}ctx\n\n{_P}### Response:\n{_P}")
    assert format_prompt("{x} {}").count("{x} {}") == 1  # braces in data are text, not fields
    with pytest.raises(ValueError, match="template must be"):
        format_prompt("Q?", template="alpaca")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------- tokenization

@pytest.mark.parametrize("rec", RECORDS, ids=["no-input", "input", "free-form"])
def test_labels_mask_exactly_the_prompt(tok, rec: Record) -> None:
    prompt = format_prompt(rec.instruction, rec.input)
    prompt_ids = encode_prompt(tok, prompt)
    response_ids = tok(rec.output, add_special_tokens=False)["input_ids"]
    ex = tokenize_causal(tok, prompt, rec.output, max_len=512)
    assert prompt_ids[0] == tok.bos_token_id
    assert ex.input_ids == prompt_ids + response_ids + [tok.eos_token_id]
    assert ex.labels == [IGNORE_INDEX] * len(prompt_ids) + response_ids + [tok.eos_token_id]
    assert tok.decode(response_ids) == rec.output
    full = tokenize_causal(tok, prompt, rec.output, max_len=512, train_on_inputs=True)
    assert full.labels == full.input_ids == ex.input_ids


def test_truncation_keeps_the_first_max_len_ids(tok) -> None:
    prompt = format_prompt(RECORDS[0].instruction)
    whole = tokenize_causal(tok, prompt, RECORDS[0].output)
    n_prompt = len(encode_prompt(tok, prompt))
    for max_len in (len(whole.input_ids) - 1, n_prompt + 1, n_prompt, n_prompt - 3):
        ex = tokenize_causal(tok, prompt, RECORDS[0].output, max_len)
        assert ex.input_ids == whole.input_ids[:max_len]
        assert ex.labels == whole.labels[:max_len]
        assert tok.eos_token_id not in ex.input_ids  # the EOS goes first, as with LLM-Adapters' cutoff_len
    assert tokenize_causal(tok, prompt, RECORDS[0].output, n_prompt).labels == [IGNORE_INDEX] * n_prompt


def test_tokenize_records_drops_records_without_a_supervised_token(tok) -> None:
    long_prompt = len(encode_prompt(tok, format_prompt(RECORDS[1].instruction, RECORDS[1].input)))
    short_prompt = len(encode_prompt(tok, format_prompt(RECORDS[0].instruction)))
    assert short_prompt < long_prompt
    with pytest.warns(UserWarning, match=r"1 of 3 records .* dropped them \(indices \[1\]"):
        examples = tokenize_records(RECORDS, tok, max_len=long_prompt)
    assert len(examples) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(tokenize_records(RECORDS, tok, max_len=256)) == 3


def test_eos_already_last_is_not_doubled(tok) -> None:
    ex = tokenize_causal(tok, "a", "the correct answer is true </s>")
    assert ex.input_ids.count(tok.eos_token_id) == 1 and ex.input_ids[-1] == tok.eos_token_id


def test_tokenizer_without_eos_is_an_error() -> None:
    class NoEos:
        eos_token_id = None

        def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
            return {"input_ids": [len(w) for w in text.split()]}

    with pytest.raises(DataError, match="no EOS token"):
        tokenize_causal(NoEos(), "a b", "c")
    assert tokenize_causal(NoEos(), "a b", "ccc", add_eos=False).labels == [IGNORE_INDEX, IGNORE_INDEX, 3]


def test_collate_right_pads_and_masks_padding(tok) -> None:
    examples = [tokenize_causal(tok, format_prompt(r.instruction, r.input), r.output) for r in RECORDS]
    with pytest.warns(UserWarning, match="no pad token; padding with the EOS id 1"):
        pad = pad_token_id(tok)
    batch = collate_causal(examples, pad, pad_to_multiple_of=8)
    width = max(len(e.input_ids) for e in examples)
    assert batch["input_ids"].shape == (3, -(-width // 8) * 8)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        assert batch["input_ids"][row, :n].tolist() == ex.input_ids
        assert batch["labels"][row, :n].tolist() == ex.labels
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        assert (batch["input_ids"][row, n:] == pad).all() and (batch["labels"][row, n:] == IGNORE_INDEX).all()
    assert all(v.dtype == torch.long for v in batch.values())


def test_pad_token_is_used_when_present(tmp_path: Path) -> None:
    tok = word_tokenizer(tmp_path, ["a b"], pad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pad_token_id(tok) == tok.pad_token_id == 3


# ------------------------------------------------------------------------------ encoder classification

def test_classification_pairs_vocab_and_ids(tmp_path: Path) -> None:
    rows = [{"text": "good", "label": 1}, {"text": "bad", "label": 0}, {"text": "meh", "label": 10}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    pairs = load_classification(tmp_path / "c.jsonl")
    vocab = label_vocab(pairs)
    assert vocab == ["0", "1", "10"]  # integers sort numerically
    assert classification_examples(pairs, vocab) == (["good", "bad", "meh"], [1, 0, 2])
    write_json(tmp_path / "i.json", ROWS[:2])
    inst = load_classification(tmp_path / "i.json")
    assert inst == [(ROWS[0]["instruction"], "true"),
                    (ROWS[1]["instruction"] + "\nsome context here", "answer2")]
    with pytest.raises(DataError, match=r"record 0: label 'true' is not among the training labels"):
        classification_examples(inst, vocab)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "x", "label": [1]}))
    with pytest.raises(DataError, match=r"bad.jsonl, record 0 \(line 1\): a classification record needs"):
        load_classification(tmp_path / "bad.jsonl")


# ------------------------------------------------------------------------------------------- batching

def _take(it, k: int) -> list[list[int]]:
    return [next(it) for _ in range(k)]


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("k", [0, 1, 3, 4, 5, 9])
def test_batches_resume_exactly_across_epochs(drop_last: bool, k: int) -> None:
    n, bs = 10, 3  # 4 batches per epoch (3 with drop_last): k crosses epoch boundaries
    reference = _take(Batches(n, bs, seed=7, drop_last=drop_last).forever(), 15)
    first = Batches(n, bs, seed=7, drop_last=drop_last)
    it = first.forever()
    head = _take(it, k)
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip
    resumed = Batches(n, bs, seed=7, drop_last=drop_last)
    resumed.load_state_dict(state)
    assert head + _take(resumed.forever(), 15 - k) == reference


def test_batches_epochs_are_seeded_permutations() -> None:
    b = Batches(10, 3, seed=1)
    assert len(b) == 4
    epoch0 = list(b)
    assert b.state_dict()["epoch"] == 1 and b.state_dict()["index"] == 0  # advanced after the last batch
    epoch1 = list(b)
    assert [len(x) for x in epoch0] == [3, 3, 3, 1]
    assert sorted(chain.from_iterable(epoch0)) == sorted(chain.from_iterable(epoch1)) == list(range(10))
    assert epoch0 != epoch1
    assert list(Batches(10, 3, seed=1)) == epoch0 and list(Batches(10, 3, seed=2)) != epoch0
    assert list(Batches(5, 2, shuffle=False)) == [[0, 1], [2, 3], [4]]
    dropped = Batches(10, 3, seed=1, drop_last=True)
    assert len(dropped) == 3 and all(len(x) == 3 for x in dropped)


def test_batches_partial_epoch_then_for_loop_continues() -> None:
    b = Batches(7, 2, seed=3)
    it = iter(b)
    first = next(it)
    rest = list(iter(b))  # a new iterator picks up at the saved position
    assert list(chain(first, *rest)) == Batches(7, 2, seed=3).order(0)
    assert b.epoch == 1 and next(iter(b)) == Batches(7, 2, seed=3).order(1)[:2]


def test_batches_refuse_a_state_from_other_settings() -> None:
    state = Batches(10, 3, seed=1).state_dict()
    with pytest.raises(ValueError, match="saved batches have n=10, this run has n=11"):
        Batches(11, 3, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="seed=1, this run has seed=2"):
        Batches(10, 3, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="yields no batch"):
        Batches(2, 3, drop_last=True)


def test_causal_example_is_plain_data() -> None:
    ex = CausalExample([0, 5], [IGNORE_INDEX, 5])
    assert collate_causal([ex], 9)["labels"].tolist() == [[IGNORE_INDEX, 5]]
