"""Chat, prompt–completion and plain-text data for ``dorakit finetune``: the records TRL's SFTTrainer reads.

Four record shapes, one per file (JSON list, JSONL or a ``datasets`` save_to_disk directory, read by
``data.read_rows`` with all its checks):

* conversational ``{"messages": [{"role": ..., "content": ...}, ...]}``: rendered with the tokenizer's
  chat template; the loss is on every assistant turn (its content and the template's end-of-turn text);
* prompt–completion ``{"prompt": str, "completion": str}``: prompt ids (with the tokenizer's special
  tokens) + completion ids + EOS; the loss is on the completion and EOS;
* conversational prompt–completion ``{"prompt": [messages], "completion": [messages]}``: the prompt
  rendered with the generation prompt, then prompt + completion rendered whole; the loss is on the completion;
* language modelling ``{"text": str}``: BOS + text + EOS, the loss on every token.

LLM-Adapters instruction records (``data.py``) remain the fourth shape that ``causal_examples`` accepts.

Assistant spans are found by rendering prefixes and diffing token ids: for assistant message i, the
tokens of ``render(messages[:i], add_generation_prompt=True)`` and of ``render(messages[:i + 1])``
are each matched against the whole conversation's tokens by their longest common prefix; the ids between
the two lengths are that turn's. This works with any template (no ``{% generation %}`` markers needed)
and is exact whenever the template renders earlier turns the same in the prefix as in the whole
conversation; a template that does not (one that rewrites earlier turns) is an error naming the record.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from .data import (
    IGNORE_INDEX,
    CausalExample,
    DataError,
    _keys,
    read_data_text,
    read_rows,
    records_from_rows,
    tokenize_causal,
    tokenize_records,
)

Shape = Literal["messages", "prompt_completion", "chat_prompt_completion", "text", "instruction"]
ROLES = ("system", "user", "assistant", "tool")
MAX_TEMPLATE_BYTES = 1 << 20
"""Largest --chat-template file read (1 MiB; real templates are a few KiB)."""
SHAPES = ("one of these record shapes: {\"messages\": [{\"role\", \"content\"}, ...]}, "
          "{\"prompt\", \"completion\"} (strings or lists of messages), {\"text\"}, or LLM-Adapters "
          "{\"instruction\", \"input\", \"output\"}")
NO_TEMPLATE = ("the tokenizer of {model} has no chat template, so chat records ({what}) cannot be rendered; pass "
               "--chat-template FILE (a Jinja chat template, e.g. the one in the instruct model's "
               "tokenizer_config.json or chat_template.jinja), or write the data as {{\"prompt\", \"completion\"}} "
               "strings or {{\"text\"}}.")


def read_chat_template(path: str | Path) -> str:
    """A --chat-template file's text: a regular UTF-8 file of at most 1 MiB, checked before it is read."""
    path = Path(path)
    if not path.exists() or path.is_dir():
        problem = "is a directory" if path.exists() else "does not exist"
        raise DataError(f"--chat-template {path} {problem}; pass a Jinja chat template file.")
    try:
        text = read_data_text(path, MAX_TEMPLATE_BYTES, what="a Jinja chat template file of at most 1 MiB")
    except DataError as e:
        raise DataError(f"--chat-template {e}") from None
    if not text.strip():
        raise DataError(f"--chat-template {path} is empty; pass a Jinja chat template file.")
    return text


def record_shape(where: str, obj: Any) -> Shape:
    """Which of the accepted shapes a raw record has; an error naming the record and the keys otherwise."""
    if not isinstance(obj, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}; use {SHAPES}.")
    if "messages" in obj:
        return "messages"
    if "prompt" in obj or "completion" in obj:
        return "chat_prompt_completion" if isinstance(obj.get("prompt"), list) else "prompt_completion"
    if "text" in obj and "label" in obj:
        raise DataError(f"{where}: a {{\"text\", \"label\"}} record is classification data, but this is a causal "
                        "language model; fine-tune a classification model (--task classify), or drop 'label' to train "
                        "language modelling on the text.")
    if "text" in obj:
        return "text"
    if "instruction" in obj:
        return "instruction"
    raise DataError(f"{where}: the record has keys {_keys(obj)}; expected {SHAPES}.")


def _messages(where: str, value: Any, key: str) -> list[dict[str, Any]]:
    """Checked messages of ``value``: a non-empty list of {"role": one of ROLES, "content": str}."""
    if not isinstance(value, list) or not value:
        got = "an empty list" if value == [] else "missing" if value is None else f"a {type(value).__name__}"
        raise DataError(f"{where}: {key!r} must be a non-empty list of {{\"role\", \"content\"}} messages, got {got}.")
    out = []
    for i, msg in enumerate(value):
        at = f"{where}, {key}[{i}]"
        if not isinstance(msg, Mapping):
            raise DataError(f"{at}: a message must be an object {{\"role\", \"content\"}}, got {type(msg).__name__}.")
        missing = [k for k in ("role", "content") if msg.get(k) is None]
        if missing:
            raise DataError(f"{at}: missing key {missing[0]!r}; every message needs 'role' and 'content' (it has "
                            f"keys {_keys(msg)}).")
        if msg["role"] not in ROLES:
            raise DataError(f"{at}: role {msg['role']!r} is not one of {list(ROLES)}; rename it.")
        if not isinstance(msg["content"], str):
            raise DataError(f"{at}: 'content' must be a string, got {type(msg['content']).__name__}; lists of "
                            "content parts (images, audio) are not supported, write the text as one string.")
        out.append({k: v for k, v in msg.items() if v is not None})  # datasets fills absent struct fields with None
    return out


def _string(where: str, obj: Mapping, key: str, shape: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        got = "missing" if value is None else f"a {type(value).__name__}"
        raise DataError(f"{where}: {shape} records need a string {key!r}; this one's is {got} (keys {_keys(obj)}).")
    return value


def _render(tokenizer: Any, messages: list[dict[str, Any]], where: str, generation: bool = False) -> list[int]:
    """Token ids of ``messages`` rendered by the chat template (the template writes any BOS itself)."""
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    except Exception as e:  # jinja2's TemplateError, or raise_exception() inside the template
        raise DataError(f"{where}: the chat template failed on this record ({type(e).__name__}: {e}); fix the "
                        "record or the template (--chat-template).") from None
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _span(tokenizer: Any, full: list[int], before: list[dict], through: list[dict], where: str) -> tuple[int, int]:
    """[start, end) of the ids that ``through`` adds to ``before`` (rendered with the generation prompt) in ``full``.

    Both renders must be exact prefixes of ``full``: otherwise the template renders a turn differently
    depending on what follows (or a token merges across the boundary), and the span is refused, not guessed.
    """
    head = _render(tokenizer, before, where, generation=True) if before else []
    upto = _render(tokenizer, through, where)
    start, end = _common(head, full), _common(upto, full)
    if start < len(head) or end < len(upto) or end <= start:
        raise DataError(f"{where}: the chat template renders this conversation's prefix differently from the whole "
                        "conversation, so the assistant tokens cannot be located; use a template that renders earlier "
                        "turns unchanged (--chat-template), or --train-on-inputs.")
    return start, end


def chat_example(tokenizer: Any, where: str, obj: Mapping, shape: Shape, max_len: int,
                 train_on_inputs: bool) -> CausalExample:
    """Token ids and labels of one record of shape ``shape`` (see the module docstring)."""
    if shape == "text":
        return tokenize_causal(tokenizer, "", _string(where, obj, "text", "language-modelling"), max_len,
                               train_on_inputs=True)
    if shape == "prompt_completion":
        prompt = _string(where, obj, "prompt", "prompt-completion")
        return tokenize_causal(tokenizer, prompt, _string(where, obj, "completion", "prompt-completion"), max_len,
                               train_on_inputs=train_on_inputs)
    if shape == "messages":
        messages = _messages(where, obj["messages"], "messages")
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not turns:
            raise DataError(f"{where}: no message has role 'assistant', so there is nothing to learn; add the "
                            "assistant's reply or remove the record.")
        full = _render(tokenizer, messages, where)
        spans = [] if train_on_inputs else [_span(tokenizer, full, messages[:i], messages[:i + 1], where) for i in turns]
    else:  # conversational prompt-completion
        prompt = _messages(where, obj.get("prompt"), "prompt")
        completion = _messages(where, obj.get("completion"), "completion")
        full = _render(tokenizer, prompt + completion, where)
        spans = [] if train_on_inputs else [(_span(tokenizer, full, prompt, prompt + completion, where)[0], len(full))]
    keep = [False] * len(full)
    for start, end in spans:
        keep[start:end] = [True] * (end - start)
    labels = [t if (k or train_on_inputs) else IGNORE_INDEX for t, k in zip(full, keep)]
    return CausalExample(full[:max_len], labels[:max_len])


def _needs_template(shape: Shape) -> bool:
    return shape in ("messages", "chat_prompt_completion")


def causal_examples(path: str | Path, tokenizer: Any, max_len: int, *, train_on_inputs: bool = False,
                    model: str = "the model") -> list[CausalExample]:
    """Tokenized training examples of a causal-LM data file in any accepted shape (one shape per file).

    Examples with no supervised token after the ``max_len`` cut are dropped with a warning (an error if
    all are). A chat shape needs ``tokenizer.chat_template`` (set it from --chat-template first).
    """
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
        raise DataError(f"max_len (--max-len) must be a positive integer, got {max_len!r}; e.g. --max-len 256.")
    rows = read_rows(path)
    first_where, first = rows[0]
    shape = record_shape(first_where, first)
    if shape == "instruction":
        return tokenize_records(records_from_rows(rows), tokenizer, max_len, train_on_inputs=train_on_inputs,
                                source=str(path))
    if _needs_template(shape) and not getattr(tokenizer, "chat_template", None):
        what = "'messages'" if shape == "messages" else "'prompt' / 'completion' as lists of messages"
        raise DataError(NO_TEMPLATE.format(model=model, what=what))
    examples, dropped = [], []
    for i, (where, obj) in enumerate(rows):
        this = record_shape(where, obj)
        if this != shape:
            raise DataError(f"{where}: a {this.replace('_', '-')} record, but {first_where} is {shape.replace('_', '-')};"
                            " one file holds one record shape: split the file.")
        ex = chat_example(tokenizer, where, obj, shape, max_len, train_on_inputs)
        if all(label == IGNORE_INDEX for label in ex.labels[1:]):  # labels[0] is never a target (shifted)
            dropped.append(i)
        else:
            examples.append(ex)
    if not examples:
        raise DataError(f"{path}: all {len(rows)} records are longer than --max-len {max_len} tokens before their "
                        "first supervised token; raise --max-len.")
    if dropped:
        warnings.warn(f"{len(dropped)} of {len(rows)} records have no supervised token within --max-len {max_len}; "
                      f"dropped them (indices {dropped[:5]}...). Raise --max-len to keep them.", stacklevel=2)
    return examples
