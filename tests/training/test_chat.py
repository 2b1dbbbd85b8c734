"""dorakit.training.chat: the SFT record shapes from JSON / JSONL / datasets directories, rendering with the
tokenizer's chat template, assistant-only loss masks, --chat-template files, and malformed records."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
from fixtures_text import CHAT_TEMPLATE, chat_tokenizer, write_json

from dorakit.training.chat import causal_examples, read_chat_template
from dorakit.training.data import IGNORE_INDEX, DataError

HAS_DATASETS = importlib.util.find_spec("datasets") is not None
CHATS = [
    {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "is water wet"},
                  {"role": "assistant", "content": "yes it is"}, {"role": "user", "content": "is fire cold"},
                  {"role": "assistant", "content": "no it is hot"}]},
    {"messages": [{"role": "user", "content": "do birds fly"}, {"role": "assistant", "content": "yes"}]},
]
PROMPT_COMPLETION = [{"prompt": "is water wet", "completion": "yes it is"},
                     {"prompt": "do birds fly", "completion": "yes"}]
CHAT_PROMPT_COMPLETION = [{"prompt": [{"role": "user", "content": "is water wet"}],
                           "completion": [{"role": "assistant", "content": "yes it is"}]},
                          {"prompt": [{"role": "system", "content": "be brief"},
                                      {"role": "user", "content": "do birds fly"}],
                           "completion": [{"role": "assistant", "content": "yes"}]}]
TEXTS = [{"text": "water is wet"}, {"text": "fire is hot and birds fly"}]
SHAPES = {"messages": CHATS, "prompt_completion": PROMPT_COMPLETION, "chat_prompt_completion": CHAT_PROMPT_COMPLETION,
          "text": TEXTS}
WORDS = ["be brief is water wet yes it fire cold no hot do birds fly and"]


@pytest.fixture
def tok(tmp_path: Path):
    return chat_tokenizer(tmp_path / "tok", WORDS)


def _supervised(example) -> list[int]:
    """The ids that carry a loss (labels[0] is never a target: the model shifts labels by one)."""
    return [label for label in example.labels[1:] if label != IGNORE_INDEX]


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _write(path: Path, rows: list[dict], container: str) -> Path:
    if container == "json":
        return write_json(path.with_suffix(".json"), rows)
    if container == "jsonl":
        file = path.with_suffix(".jsonl")
        file.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        return file
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


# ------------------------------------------------------------------------------------ shapes and files

@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_every_shape_reads_the_same_from_json_jsonl_and_a_datasets_dir(tok, tmp_path: Path, shape: str) -> None:
    containers = ["json", "jsonl"] + (["datasets"] if HAS_DATASETS else [])
    got = [causal_examples(_write(tmp_path / f"{shape}-{c}", SHAPES[shape], c), tok, 64) for c in containers]
    assert len(got[0]) == len(SHAPES[shape])
    assert all(g == got[0] for g in got[1:])
    assert all(_supervised(ex) for ex in got[0])


def test_messages_loss_is_on_every_assistant_turn_only(tok, tmp_path: Path) -> None:
    ex = causal_examples(write_json(tmp_path / "d.json", CHATS), tok, 64)[0]
    text = tok.apply_chat_template(CHATS[0]["messages"], tokenize=False)
    assert ex.input_ids == _ids(tok, text)  # rendered by the tokenizer's own template, its BOS included
    assert ex.input_ids[0] == tok.bos_token_id
    # Independently: each assistant turn is its content and the end-of-turn marker.
    assert _supervised(ex) == _ids(tok, "yes it is <|end|>") + _ids(tok, "no it is hot <|end|>")
    on_all = causal_examples(tmp_path / "d.json", tok, 64, train_on_inputs=True)[0]
    assert on_all.input_ids == ex.input_ids and on_all.labels == on_all.input_ids


def test_prompt_completion_strings_mask_the_prompt_and_learn_eos(tok, tmp_path: Path) -> None:
    ex = causal_examples(write_json(tmp_path / "d.json", PROMPT_COMPLETION), tok, 64)[0]
    assert ex.input_ids == tok("is water wet")["input_ids"] + _ids(tok, "yes it is") + [tok.eos_token_id]
    assert _supervised(ex) == _ids(tok, "yes it is") + [tok.eos_token_id]
    on_all = causal_examples(tmp_path / "d.json", tok, 64, train_on_inputs=True)[0]
    assert on_all.labels == on_all.input_ids


def test_conversational_prompt_completion_learns_the_completion(tok, tmp_path: Path) -> None:
    ex = causal_examples(write_json(tmp_path / "d.json", CHAT_PROMPT_COMPLETION), tok, 64)[1]
    row = CHAT_PROMPT_COMPLETION[1]
    assert ex.input_ids == _ids(tok, tok.apply_chat_template(row["prompt"] + row["completion"], tokenize=False))
    assert _supervised(ex) == _ids(tok, "yes <|end|>")


def test_text_is_language_modelling_on_every_token(tok, tmp_path: Path) -> None:
    ex = causal_examples(write_json(tmp_path / "d.json", TEXTS), tok, 64)[1]
    assert ex.input_ids == tok("fire is hot and birds fly")["input_ids"] + [tok.eos_token_id]
    assert ex.labels == ex.input_ids


def test_max_len_cuts_and_drops_records_without_a_supervised_token(tok, tmp_path: Path) -> None:
    path = write_json(tmp_path / "d.json", CHATS)
    cut = causal_examples(path, tok, 12)[0]
    assert cut.input_ids == causal_examples(path, tok, 64)[0].input_ids[:12] and len(cut.labels) == 12
    with pytest.warns(UserWarning, match="1 of 2 records have no supervised token within --max-len 8"):
        kept = causal_examples(path, tok, 8)  # first assistant words: token 11 of chat 0, 7 of chat 1
    assert len(kept) == 1
    with pytest.raises(DataError, match="raise --max-len"):
        causal_examples(path, tok, 2)


# ---------------------------------------------------------------------------------------- templates

def test_a_tokenizer_without_a_chat_template_names_the_fix(tmp_path: Path) -> None:
    plain = chat_tokenizer(tmp_path / "tok", WORDS, template=None)
    for rows in (CHATS, CHAT_PROMPT_COMPLETION):
        with pytest.raises(DataError, match=r"tiny-model has no chat template.*--chat-template FILE"):
            causal_examples(write_json(tmp_path / "d.json", rows), plain, 64, model="tiny-model")
    assert causal_examples(write_json(tmp_path / "p.json", PROMPT_COMPLETION), plain, 64)  # strings need none
    (tmp_path / "t.jinja").write_text(CHAT_TEMPLATE)
    plain.chat_template = read_chat_template(tmp_path / "t.jinja")
    assert causal_examples(write_json(tmp_path / "d.json", CHATS), plain, 64)


def test_chat_template_file_is_checked_before_it_is_read(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_chat_template(tmp_path / "missing.jinja")
    with pytest.raises(DataError, match="is a directory; pass a Jinja chat template file"):
        read_chat_template(tmp_path)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(DataError, match="not a regular file"):
        read_chat_template(tmp_path / "fifo")  # would block if it were opened for reading plainly
    (tmp_path / "big.jinja").write_bytes(b" " * ((1 << 20) + 1))
    with pytest.raises(DataError, match="more than the 1,048,576 read; pass a Jinja chat template"):
        read_chat_template(tmp_path / "big.jinja")
    (tmp_path / "bad.jinja").write_bytes(b"{{ \xff }}")
    with pytest.raises(DataError, match="not UTF-8"):
        read_chat_template(tmp_path / "bad.jinja")
    (tmp_path / "empty.jinja").write_text("  \n")
    with pytest.raises(DataError, match="is empty"):
        read_chat_template(tmp_path / "empty.jinja")


def test_a_template_that_fails_names_the_record(tmp_path: Path) -> None:
    tok = chat_tokenizer(tmp_path / "tok", WORDS, template="{{ raise_exception('only one user turn') }}")
    with pytest.raises(DataError, match=r"d\.json, record 0 \(line 2\): the chat template failed.*only one user"):
        causal_examples(write_json(tmp_path / "d.json", CHATS), tok, 64)


def test_a_template_that_rewrites_earlier_turns_is_refused(tmp_path: Path) -> None:
    """If the prefix renders differently from the whole conversation, spans cannot be located."""
    rewriting = "{% for m in messages %}{{ m['role'] }} {{ messages|length }} {% endfor %}"
    tok = chat_tokenizer(tmp_path / "tok", WORDS + ["user assistant system 1 2 3 4 5"], template=rewriting)
    with pytest.raises(DataError, match="renders this conversation's prefix differently"):
        causal_examples(write_json(tmp_path / "d.json", CHATS[:1]), tok, 64)
    assert causal_examples(tmp_path / "d.json", tok, 64, train_on_inputs=True)  # no spans needed


# ------------------------------------------------------------------------------------ malformed records

PC, CPC, TX = PROMPT_COMPLETION[0], CHAT_PROMPT_COMPLETION[0], TEXTS[0]
BAD = [  # (a good first record, the bad second one, what the error says)
    (CHATS[1], {"messages": [{"role": "robot", "content": "hi"}]}, r"messages\[0\]: role 'robot' is not one of"),
    (CHATS[1], {"messages": [{"role": "user"}]}, r"messages\[0\]: missing key 'content'; every message needs 'role'"),
    (CHATS[1], {"messages": [{"content": "hi"}]}, r"messages\[0\]: missing key 'role'"),
    (CHATS[1], {"messages": [{"role": "user", "content": 3}]}, r"'content' must be a string, got int"),
    (CHATS[1], {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]},
     r"content parts .* not supported"),
    (CHATS[1], {"messages": []}, r"'messages' must be a non-empty list .* got an empty list"),
    (CHATS[1], {"messages": "hello"}, r"'messages' must be a non-empty list .* got a str"),
    (CHATS[1], {"messages": ["hello"]}, r"messages\[0\]: a message must be an object"),
    (CHATS[1], {"messages": [{"role": "user", "content": "hi"}]}, r"no message has role 'assistant'"),
    (PC, {"prompt": "is water wet"}, r"need a string 'completion'; this one's is missing \(keys \['prompt'\]\)"),
    (PC, {"prompt": "q", "completion": 5}, r"need a string 'completion'; this one's is a int"),
    (CPC, {"prompt": [{"role": "user", "content": "q"}]}, r"'completion' must be a non-empty list .* got missing"),
    (CPC, {"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": None}]},
     r"completion\[0\]: missing key 'content'"),
    (TX, {"text": 7}, r"need a string 'text'; this one's is a int"),
    (TX, {"text": "water is wet", "label": 1}, r"classification data, but this is a causal language model"),
    (CHATS[1], {"question": "q", "answer": "a"}, r"keys \['answer', 'question'\]; expected one of these record"),
    (CHATS[1], [1, 2], r"expected a JSON object, got list"),
    (CHATS[1], {"text": "water is wet"}, r"a text record, but .*record 0 \(line \d\) is messages; one file holds"),
    (TX, {"instruction": "q", "output": "a"}, r"an? instruction record, but .* is text"),
]


@pytest.mark.parametrize("container", ["json", "jsonl"])
@pytest.mark.parametrize(("good", "bad", "pattern"), BAD, ids=[p[:30] for *_, p in BAD])
def test_malformed_records_name_the_file_record_and_keys(tok, tmp_path: Path, container: str, good: dict,
                                                         bad: object, pattern: str) -> None:
    path = _write(tmp_path / "chats", [good, bad], container)
    line = 2 if container == "jsonl" else 2 + len(json.dumps(good, indent=4).splitlines())  # after "[" and good
    with pytest.raises(DataError, match=rf"chats\.{container}, record 1 \(line {line}\)[:,] .*" + pattern):
        causal_examples(path, tok, 64)
