"""Commonsense multiple-choice accuracy for ``dorakit eval`` (DoRA paper, Liu et al., ICML 2024, Table 1).

Two ways to turn a causal LM into a choice among a record's candidate answers:

* generation: greedy (or beam) decoding after the prompt, then the first answer word the task's regex
  finds, as NVlabs/DoRA ``commonsense_reasoning/commonsense_evaluate.py`` (``extract_answer``) does;
  a response with no answer word counts as wrong.
* log-likelihood: for each candidate c, score(c) = sum_t log p(y_t | prompt, y_<t) over the tokens y of
  the response ``"the correct answer is {c}"`` (the form of every training output); pick the argmax.

Tasks and their answer words: boolq true/false, piqa solution1/2, social_i_qa answer1..3, hellaswag
ending1..4, winogrande option1/2, ARC-Easy / ARC-Challenge / openbookqa answer1..4 (ARC has a few
3- and 5-choice items: a record's own "Answer format: a/b/c" line gives its candidates).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .data import (
    IGNORE_INDEX,
    RESPONSE_MARKER,
    CausalExample,
    Record,
    Template,
    collate_causal,
    encode_prompt,
    format_prompt,
    pad_token_id,
    tokenize_causal,
)
from ..adapters.fast_path import cached_norms

# Paper Table 1 column order, and the column titles it uses.
TASKS = ("boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa")
TASK_TITLES = {"boolq": "BoolQ", "piqa": "PIQA", "social_i_qa": "SIQA", "hellaswag": "HellaSwag",
               "winogrande": "WinoGrande", "ARC-Easy": "ARC-e", "ARC-Challenge": "ARC-c",
               "openbookqa": "OBQA"}
# commonsense_evaluate.py extract_answer: the first match of these (case-sensitive) alternations.
ANSWER_WORDS: dict[str, tuple[str, ...]] = {
    "boolq": ("true", "false"),
    "piqa": ("solution1", "solution2"),
    "social_i_qa": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "hellaswag": ("ending1", "ending2", "ending3", "ending4"),
    "winogrande": ("option1", "option2"),
    "ARC-Easy": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "ARC-Challenge": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "openbookqa": ("answer1", "answer2", "answer3", "answer4", "answer5"),
}
# Candidates when a record has no "Answer format:" line: the choices the LLM-Adapters data offers.
DEFAULT_CANDIDATES: dict[str, tuple[str, ...]] = {
    **ANSWER_WORDS,
    "social_i_qa": ("answer1", "answer2", "answer3"),
    "ARC-Easy": ("answer1", "answer2", "answer3", "answer4"),
    "ARC-Challenge": ("answer1", "answer2", "answer3", "answer4"),
    "openbookqa": ("answer1", "answer2", "answer3", "answer4"),
}
RESPONSE_FORMAT = "the correct answer is {}"  # every LLM-Adapters commonsense output reads like this
_ALIASES = {"boolq": "boolq", "piqa": "piqa", "socialiqa": "social_i_qa", "siqa": "social_i_qa",
            "hellaswag": "hellaswag", "winogrande": "winogrande", "arce": "ARC-Easy", "arceasy": "ARC-Easy",
            "arcc": "ARC-Challenge", "arcchallenge": "ARC-Challenge", "openbookqa": "openbookqa",
            "obqa": "openbookqa"}
_FORMAT_LINE = re.compile(r"Answer format:\s*(\S+)\s*$")


def normalize_task(name: str) -> str:
    """The canonical task name (as in ``TASKS``) for a spelling like "ARC-e", "arc_easy", "SIQA", "OBQA"."""
    task = _ALIASES.get(re.sub(r"[^a-z]", "", name.lower()))
    if task is None:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}.")
    return task


def task_from_path(path: str | Path) -> str:
    """The task a data path belongs to, from its directory name (``.../boolq/test.json``) or file stem."""
    path = Path(path)
    names = [path.parent.name, path.stem] if path.suffix in (".json", ".jsonl") else [path.name]
    for name in names:
        try:
            return normalize_task(name)
        except ValueError:
            continue
    raise ValueError(f"cannot tell the task from {str(path)!r}: put the file in a directory named after its "
                     f"task, e.g. boolq/test.json (one of {', '.join(TASKS)}).")


def extract_answer(task: str, text: str) -> str:
    """The first answer word of ``task`` in ``text``, or "" if none (DoRA ``extract_answer``'s rules)."""
    words = ANSWER_WORDS[normalize_task(task)]
    found = re.findall("|".join(words), text.strip())
    return found[0] if found else ""


def candidates_for(record: Record, task: str) -> tuple[str, ...]:
    """A record's answer choices: its "Answer format: a/b/c" line, else the task's default set."""
    match = _FORMAT_LINE.search(record.instruction)
    if match:
        return tuple(match.group(1).split("/"))
    return DEFAULT_CANDIDATES[normalize_task(task)]


def accuracy(predictions: Sequence[str], answers: Sequence[str | None]) -> float:
    """Fraction of exact matches; an empty or mismatched pair of lists is an error."""
    if not predictions or len(predictions) != len(answers):
        raise ValueError(f"accuracy needs equally long, non-empty lists, got {len(predictions)} predictions "
                         f"and {len(answers)} answers.")
    return sum(p == a for p, a in zip(predictions, answers)) / len(predictions)


@contextmanager
def inference(model: nn.Module) -> Iterator[None]:
    """``model.eval()``, ``torch.no_grad()`` and ``dk.cached_norms`` (DoRA norms computed once) inside;
    the previous train/eval mode restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), cached_norms(model):
            yield
    finally:
        model.train(was_training)


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _left_pad(rows: Sequence[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids, mask


def generate_answers(model: nn.Module, tokenizer: Any, records: Sequence[Record], *, batch_size: int = 1,
                     max_new_tokens: int = 32, num_beams: int = 1,
                     template: Template = "evaluate") -> list[str]:
    """Deterministic responses (no sampling) to each record's prompt, left-padded in batches.

    Each response is the decoded new tokens after the last "### Response:", stripped, as upstream.
    The DoRA script decodes with ``num_beams=4`` (its GenerationConfig also sets temperature/top_p/
    top_k, unused without sampling), batch size 1 and its own prompt whitespace (``template="evaluate"``);
    pass ``num_beams=4`` to match it exactly; the default ``num_beams=1`` is greedy.
    """
    pad_id = pad_token_id(tokenizer)
    texts: list[str] = []
    with inference(model):
        for start in range(0, len(records), batch_size):
            chunk = records[start:start + batch_size]
            prompts = [format_prompt(r.instruction, r.input, template) for r in chunk]
            ids, mask = _left_pad([encode_prompt(tokenizer, p) for p in prompts], pad_id)
            out = model.generate(input_ids=ids.to(_device(model)), attention_mask=mask.to(_device(model)),
                                 do_sample=False, num_beams=num_beams, max_new_tokens=max_new_tokens,
                                 pad_token_id=pad_id)  # (B, T + new)
            decoded = tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
            texts += [d.split(RESPONSE_MARKER)[-1].strip() for d in decoded]
    return texts


def sequence_logprobs(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per row, sum_t log softmax(logits[t-1])[labels[t]] over labels != -100, and how many t counted.

    ``logits`` (B, T, V) come from the same (B, T) ids that ``labels`` mark; position t-1 predicts t.
    Only the scored positions are normalised (in at least float32), so memory is O(scored tokens x V).
    """
    targets = labels[:, 1:]  # (B, T-1)
    scored = targets != IGNORE_INDEX
    dtype = torch.promote_types(logits.dtype, torch.float32)
    picked = logits[:, :-1][scored].to(dtype).log_softmax(-1)  # (N, V)
    token_lp = picked.gather(1, targets[scored].unsqueeze(1)).squeeze(1)  # (N,)
    rows = scored.nonzero()[:, 0]
    total = torch.zeros(labels.shape[0], dtype=dtype, device=logits.device).index_add_(0, rows, token_lp)
    return total, scored.sum(1)


@dataclass(frozen=True)
class CandidateScore:
    """One candidate's response log-likelihood: ``logprob`` summed over its ``n_tokens`` scored tokens."""

    answer: str
    logprob: float
    n_tokens: int


def loglik_scores(model: nn.Module, tokenizer: Any, records: Sequence[Record], task: str, *,
                  batch_size: int = 8, response_format: str = RESPONSE_FORMAT,
                  template: Template = "finetune") -> list[list[CandidateScore]]:
    """Score every candidate of every record: the log-likelihood of ``response_format.format(c)``.

    The ids are built exactly as training builds them (``tokenize_causal``: prompt + response, no EOS,
    no truncation), so the score is the training objective restricted to one candidate. The shared
    words "the correct answer is" add the same amount to every candidate, so they do not change the
    argmax (they do dilute a per-token mean).
    """
    pairs: list[tuple[int, str, CausalExample]] = []
    for i, rec in enumerate(records):
        prompt = format_prompt(rec.instruction, rec.input, template)
        for cand in candidates_for(rec, task):
            example = tokenize_causal(tokenizer, prompt, response_format.format(cand), add_eos=False)
            pairs.append((i, cand, example))
    pad_id = pad_token_id(tokenizer)
    scores: list[list[CandidateScore]] = [[] for _ in records]
    with inference(model):
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            batch = collate_causal([example for _, _, example in chunk], pad_id)
            batch = {k: v.to(_device(model)) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            total, count = sequence_logprobs(logits, batch["labels"])
            for (i, cand, _), lp, n in zip(chunk, total.tolist(), count.tolist()):
                scores[i].append(CandidateScore(cand, lp, n))
    return scores


def loglik_answers(model: nn.Module, tokenizer: Any, records: Sequence[Record], task: str, *,
                   normalize: bool = False, **kwargs: Any) -> list[str]:
    """The highest-scoring candidate per record (``loglik_scores``; ``kwargs`` go there).

    ``normalize=True`` ranks by the mean log-probability per scored token instead of the sum, which
    matters only when candidates tokenize to different lengths (lm-eval-harness's ``acc_norm`` divides
    by byte length instead).
    """
    def key(s: CandidateScore) -> float:
        return s.logprob / max(s.n_tokens, 1) if normalize else s.logprob

    return [max(row, key=key).answer for row in loglik_scores(model, tokenizer, records, task, **kwargs)]


@dataclass(frozen=True)
class TaskResult:
    """Accuracy on one task and the per-record predictions behind it."""

    task: str
    accuracy: float
    predictions: list[str]
    responses: list[str] | None = None  # generated text, for the generation method


def evaluate_task(model: nn.Module, tokenizer: Any, records: Sequence[Record], task: str,
                  method: Literal["generate", "loglik"] = "generate", **kwargs: Any) -> TaskResult:
    """Accuracy of ``model`` on ``records`` (each with an ``answer``) by generation or log-likelihood."""
    task = normalize_task(task)
    missing = [i for i, r in enumerate(records) if r.answer is None]
    if missing:
        raise ValueError(f"record {missing[0]} has no 'answer'; evaluation needs the gold answer word.")
    answers = [r.answer for r in records]
    if method == "generate":
        responses = generate_answers(model, tokenizer, records, **kwargs)
        predictions = [extract_answer(task, text) for text in responses]
        return TaskResult(task, accuracy(predictions, answers), predictions, responses)
    if method == "loglik":
        predictions = loglik_answers(model, tokenizer, records, task, **kwargs)
        return TaskResult(task, accuracy(predictions, answers), predictions)
    raise ValueError(f"method must be 'generate' or 'loglik', got {method!r}.")


def format_table(results: Mapping[str, float], label: str | None = None, digits: int = 1) -> str:
    """A markdown table like the paper's Table 1: accuracy in % per task (paper order), then the average.

    ``results`` maps task names (any spelling ``normalize_task`` knows) to accuracies in [0, 1];
    ``label`` adds a first column naming the row (e.g. "LLaMA-7B DoRA").
    """
    if not results:
        raise ValueError("format_table needs at least one task result.")
    by_task = {normalize_task(t): acc for t, acc in results.items()}
    tasks = [t for t in TASKS if t in by_task]
    head = [TASK_TITLES[t] for t in tasks] + ["Avg."]
    cells = [f"{100 * by_task[t]:.{digits}f}" for t in tasks]
    cells.append(f"{100 * sum(by_task.values()) / len(by_task):.{digits}f}")
    if label is not None:
        head, cells = ["Model", *head], [label, *cells]
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|",
                      "| " + " | ".join(cells) + " |"])
