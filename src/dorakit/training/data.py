"""Instruction data for ``dorakit finetune``: load, validate, format, tokenize, collate and batch.

Records follow the LLM-Adapters layout that the DoRA paper's commonsense experiments use (Liu et al.,
ICML 2024, Sec. 5.1): ``{"instruction", "input", "output", "answer"}``, stored as a JSON list, as JSONL
(one object per line), or as a directory written by ``datasets.Dataset.save_to_disk``. The prompt
template is copied character for character from NVlabs/DoRA ``commonsense_reasoning/finetune.py``
(``generate_prompt``) and ``commonsense_evaluate.py`` (``generate_prompt``), themselves from
AGI-Edgerunners/LLM-Adapters. Every error names the file, the record (index and line) and the fix.

Nothing here imports transformers: a tokenizer is anything callable like a Hugging Face tokenizer.
"""

from __future__ import annotations

import random
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from .data_files import FORMATS, MAX_DATA_BYTES, DataError, read_data_text, read_rows  # noqa: F401  (re-exported)

IGNORE_INDEX = -100  # label value that torch's cross_entropy skips
Purpose = Literal["train", "eval"]
Template = Literal["finetune", "evaluate"]


@dataclass(frozen=True)
class Record:
    """One instruction record. ``answer`` is the short gold label (``"true"``, ``"answer3"``) used by eval."""

    instruction: str
    input: str = ""
    output: str = ""
    answer: str | None = None


def _validate(where: str, obj: Any, purpose: Purpose) -> Record:
    """Check one raw row and turn it into a Record; ``purpose`` decides which keys are required."""
    need = ("instruction", "output") if purpose == "train" else ("instruction", "answer")
    schema = ("every training record needs string fields 'instruction' and 'output' ('input' and "
              "'answer' are optional)" if purpose == "train" else
              "every eval record needs string fields 'instruction' and 'answer' ('input' and 'output' "
              "are optional)")
    if not isinstance(obj, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}; {schema}.")
    missing = [k for k in need if obj.get(k) is None]
    if missing:
        raise DataError(f"{where}: missing key {missing[0]!r}; {schema}. The record has keys {_keys(obj)}: add "
                        "it or remove the record.")
    for key in ("instruction", "input", "output", "answer"):
        value = obj.get(key)
        if value is not None and not isinstance(value, str):
            raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__} {value!r}; "
                            f"write it as a JSON string.")
    for key in need:
        if not obj[key].strip():
            raise DataError(f"{where}: {key!r} is empty; {schema}. Fill it in or remove the record.")
    return Record(obj["instruction"], obj.get("input") or "", obj.get("output") or "", obj.get("answer"))


def _keys(obj: Mapping) -> str:
    keys = sorted(map(str, obj))
    return repr(keys[:10])[:-1] + (", ...]" if len(keys) > 10 else "]")


def load_records(path: str | Path, split: str = "train", purpose: Purpose = "train") -> list[Record]:
    """Read and validate instruction records (see ``read_rows`` for the accepted ``path`` forms).

    ``purpose="train"`` requires ``instruction`` and ``output``; ``purpose="eval"`` requires
    ``instruction`` and ``answer``. Keys other than the four known ones are ignored.
    """
    return records_from_rows(read_rows(path, split), purpose)


def records_from_rows(rows: Sequence[tuple[str, Any]], purpose: Purpose = "train") -> list[Record]:
    """Validated instruction records of rows that ``read_rows`` returned."""
    return [_validate(where, obj, purpose) for where, obj in rows]


# --------------------------------------------------------------------------------------------- prompts

_PAD = " " * 16  # upstream writes the template as an indented f-string: the indent is part of the prompt
_INTRO = "Below is an instruction that describes a task. Write a response that appropriately completes " \
         "the request."
_INTRO_INPUT = "Below is an instruction that describes a task, paired with an input that provides further " \
               "context. Write a response that appropriately completes the request."

# (template, has input) -> prompt up to and including the text the response follows. The two upstream
# scripts differ only in whitespace: finetune.py has trailing spaces after the intro and 16-space blank
# lines; commonsense_evaluate.py has one (or no) trailing space and empty blank lines.
_TEMPLATES: dict[tuple[str, bool], str] = {
    ("finetune", False): f"{_INTRO}  \n\n{_PAD}### Instruction:\n{_PAD}{{instruction}}\n{_PAD}\n"
                         f"{_PAD}### Response:\n{_PAD}",
    ("finetune", True): f"{_INTRO_INPUT} \n\n{_PAD}### Instruction:\n{_PAD}{{instruction}}\n{_PAD}\n"
                        f"{_PAD}### Input:\n{_PAD}{{input}}\n{_PAD}\n{_PAD}### Response:\n{_PAD}",
    ("evaluate", False): f"{_INTRO} \n\n{_PAD}### Instruction:\n{_PAD}{{instruction}}\n\n"
                         f"{_PAD}### Response:\n{_PAD}",
    ("evaluate", True): f"{_INTRO_INPUT}\n\n{_PAD}### Instruction:\n{_PAD}{{instruction}}\n\n"
                        f"{_PAD}### Input:\n{_PAD}{{input}}\n\n{_PAD}### Response:\n{_PAD}",
}
RESPONSE_MARKER = "### Response:"


def format_prompt(instruction: str, input: str = "", template: Template = "finetune") -> str:
    """The Alpaca-style prompt that the response follows (the training text is ``prompt + output``).

    ``template="finetune"`` is NVlabs/DoRA ``finetune.py`` ``generate_prompt`` with an empty output (what
    the model is trained on); ``"evaluate"`` is ``commonsense_evaluate.py`` ``generate_prompt`` (what the
    paper's generation eval feeds). An empty ``input`` selects the shorter no-input form, as upstream.
    """
    if template not in ("finetune", "evaluate"):
        raise ValueError(f"template must be 'finetune' or 'evaluate', got {template!r}.")
    return _TEMPLATES[(template, bool(input))].format(instruction=instruction, input=input)


# ---------------------------------------------------------------------------------------- tokenization

@dataclass(frozen=True)
class CausalExample:
    """Token ids of prompt + response (+ EOS) and labels: ``IGNORE_INDEX`` where no loss is taken."""

    input_ids: list[int]
    labels: list[int]


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Prompt ids with the tokenizer's special tokens (a BOS for Llama), exactly as generation sees them."""
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def tokenize_causal(tokenizer: Any, prompt: str, response: str, max_len: int | None = None, *,
                    add_eos: bool = True, train_on_inputs: bool = False) -> CausalExample:
    """ids = prompt ids + response ids + [EOS], cut to the first ``max_len``; labels = ids, prompt masked.

    Prompt and response are tokenized separately and concatenated, so the mask boundary is exact and
    the prompt ids are the ones ``generate`` conditions on. (LLM-Adapters tokenizes the whole text and
    masks its first ``len(tokenize(prompt))`` ids, which is the same unless a token straddles the
    boundary.) Truncation follows LLM-Adapters' ``cutoff_len``: keep the first ``max_len`` ids, so a long
    record loses the end of its response and the EOS first. ``train_on_inputs=True`` also supervises the
    prompt, which is what the DoRA scripts actually ran (``finetune.py`` defaults it to True).
    """
    prompt_ids = encode_prompt(tokenizer, prompt)
    response_ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    if add_eos:
        eos = tokenizer.eos_token_id
        if eos is None:
            raise DataError("the tokenizer has no EOS token, so the model cannot learn where a response "
                            "ends; set tokenizer.eos_token before tokenizing.")
        if not response_ids or response_ids[-1] != eos:
            response_ids.append(eos)
    ids = (prompt_ids + response_ids)[:max_len]
    n_masked = 0 if train_on_inputs else min(len(prompt_ids), len(ids))
    return CausalExample(ids, [IGNORE_INDEX] * n_masked + ids[n_masked:])


def tokenize_records(records: Sequence[Record], tokenizer: Any, max_len: int, *,
                     train_on_inputs: bool = False, template: Template = "finetune",
                     source: str = "the data") -> list[CausalExample]:
    """``tokenize_causal`` over records; drops (with a warning) those whose prompt fills ``max_len``.

    A record with no supervised token would add nothing to the loss (and a batch of them a NaN). If
    every record would be dropped, a DataError naming ``source`` (the file) says so.
    """
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
        raise DataError(f"max_len (--max-len) must be a positive integer, got {max_len!r}; e.g. --max-len 256.")
    examples, dropped = [], []
    for i, rec in enumerate(records):
        ex = tokenize_causal(tokenizer, format_prompt(rec.instruction, rec.input, template), rec.output,
                             max_len, train_on_inputs=train_on_inputs)
        if all(label == IGNORE_INDEX for label in ex.labels):
            dropped.append(i)
        else:
            examples.append(ex)
    if records and not examples:
        raise DataError(f"{source}: all {len(records)} records are longer than --max-len {max_len} tokens (each "
                        f"prompt fills it, leaving no response token to learn); raise --max-len.")
    if dropped:
        warnings.warn(f"{len(dropped)} of {len(records)} records have a prompt of {max_len}+ tokens, leaving "
                      f"no response token to learn; dropped them (indices {dropped[:5]}...). Raise max_len "
                      f"to keep them.", stacklevel=2)
    return examples


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its EOS id (with a warning), else an error.

    Padding with EOS is safe here: padded positions get attention_mask 0 and label ``IGNORE_INDEX``,
    and the EOS that ends each response is supervised through its label, not inferred from the pad id.
    """
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token.")
    warnings.warn(f"the tokenizer has no pad token; padding with the EOS id {tokenizer.eos_token_id} "
                  f"(masked out by attention_mask and labels).", stacklevel=2)
    return int(tokenizer.eos_token_id)


def collate_causal(examples: Sequence[CausalExample], pad_id: int,
                   pad_to_multiple_of: int | None = None) -> dict[str, Tensor]:
    """Right-pad a batch: ``input_ids`` with ``pad_id``, ``labels`` with ``IGNORE_INDEX``; each (B, T)."""
    if not examples:
        raise ValueError("collate_causal needs at least one example.")
    width = max(len(ex.input_ids) for ex in examples)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        ids[row, :n] = torch.tensor(ex.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(ex.labels, dtype=torch.long)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ------------------------------------------------------------------------------ encoder classification

def _natural(label: str) -> tuple[int, int | str]:
    return (0, int(label)) if re.fullmatch(r"-?\d+", label) else (1, label)


def load_classification(path: str | Path, split: str = "train") -> list[tuple[str, str]]:
    """``(text, label)`` pairs from ``{"text", "label"}`` records or instruction records with ``answer``.

    An instruction record's text is its instruction, then its input on a new line. Labels may be
    strings or integers in the file; they come back as strings.
    """
    pairs = []
    schema = ("a classification record needs a string 'text' and a string or integer 'label' (or, as an "
              "instruction record, 'instruction' and 'answer')")
    for where, obj in read_rows(path, split):
        if not isinstance(obj, Mapping):
            raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}; {schema}.")
        if "text" in obj or "instruction" not in obj:
            text, label = obj.get("text"), obj.get("label")
            if not isinstance(text, str) or isinstance(label, bool) or not isinstance(label, (str, int)):
                bad = "text" if not isinstance(text, str) else "label"
                got = "missing" if bad not in obj else f"a {type(obj[bad]).__name__}"
                raise DataError(f"{where}: {schema}; this record's {bad!r} is {got} (it has keys {_keys(obj)}). "
                                "Fix the record or remove it.")
            pairs.append((text, str(label)))
        else:
            rec = _validate(where, obj, "eval")
            pairs.append((rec.instruction + ("\n" + rec.input if rec.input else ""), rec.answer or ""))
    return pairs


def label_vocab(pairs: Sequence[tuple[str, str]]) -> list[str]:
    """The sorted label set of the training pairs (integers numerically); index = class id."""
    return sorted({label for _, label in pairs}, key=_natural)


def classification_examples(pairs: Sequence[tuple[str, str]], vocab: Sequence[str],
                            source: str = "the data") -> tuple[list[str], list[int]]:
    """Texts and class ids under ``vocab``; a label outside it is an error naming the pair.

    Multiple choice with an encoder (one forward per candidate) is not supported: use the causal LM path.
    """
    index = {label: i for i, label in enumerate(vocab)}
    unknown = [(i, label) for i, (_, label) in enumerate(pairs) if label not in index]
    if unknown:
        i, label = unknown[0]
        raise DataError(f"{source}, record {i}: label {label!r} is not among the training labels {list(vocab)}; "
                        f"build the vocabulary from data that covers every label.")
    return [text for text, _ in pairs], [index[label] for _, label in pairs]


# ------------------------------------------------------------------------------------------- batching

class Batches:
    """Seeded, resumable batches of indices into a dataset of ``n`` items.

    Epoch ``e`` visits ``range(n)`` in an order fixed by ``(seed, e)`` alone, so a run restored from
    ``state_dict()`` continues exactly where an uninterrupted run would be, across epoch boundaries.
    Iterating yields the rest of the current epoch; after the last batch the state already points at
    the next epoch. ``forever()`` chains epochs for step-based loops.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, drop_last: bool = False,
                 shuffle: bool = True) -> None:
        if n <= 0 or batch_size <= 0:
            raise ValueError(f"n and batch_size must be positive, got n={n}, batch_size={batch_size}.")
        if drop_last and n < batch_size:
            raise ValueError(f"drop_last with {n} items < batch_size {batch_size} yields no batch at all.")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.drop_last, self.shuffle = drop_last, shuffle
        self.epoch = 0
        self.index = 0  # items of the current epoch's order already handed out

    def __len__(self) -> int:
        """Batches per epoch."""
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def order(self, epoch: int) -> list[int]:
        """The permutation of ``range(n)`` that epoch ``epoch`` visits."""
        order = list(range(self.n))
        if self.shuffle:
            random.Random(f"dorakit.Batches:{self.seed}:{epoch}").shuffle(order)  # str seed: SHA-512 mixed
        return order

    def __iter__(self) -> Iterator[list[int]]:
        order = self.order(self.epoch)
        stop = len(self) * self.batch_size if self.drop_last else self.n
        while self.index < stop:
            batch = order[self.index:self.index + self.batch_size]
            self.index += len(batch)
            if self.index >= stop:
                self.epoch, self.index = self.epoch + 1, 0
            yield batch
            if self.index == 0:
                return

    def forever(self) -> Iterator[list[int]]:
        """Batches across epochs without end."""
        while True:
            yield from self

    def state_dict(self) -> dict[str, int | bool]:
        """Position and the settings it is only valid for."""
        return {"epoch": self.epoch, "index": self.index, "n": self.n, "batch_size": self.batch_size,
                "seed": self.seed, "drop_last": self.drop_last, "shuffle": self.shuffle}

    def load_state_dict(self, state: Mapping[str, int | bool]) -> None:
        """Restore a position; an error if it was saved for different data or settings."""
        for key in ("n", "batch_size", "seed", "drop_last", "shuffle"):
            if state[key] != getattr(self, key):
                raise ValueError(f"cannot resume: the saved batches have {key}={state[key]!r}, this run has "
                                 f"{key}={getattr(self, key)!r}; resume with the same data and settings.")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
