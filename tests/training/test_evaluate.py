"""dorakit.training.evaluate: task names, DoRA's answer extraction on real items, log-likelihood scores against a
hand computation, generation (batched == one by one), mode restoring, and the results table."""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from fixtures_text import prompt_words, shared_task_file, word_tokenizer
from torch import Tensor, nn

from dorakit.training.data import Record, encode_prompt, format_prompt, load_records
from dorakit.training.evaluate import (
    DEFAULT_CANDIDATES,
    RESPONSE_FORMAT,
    TASKS,
    accuracy,
    candidates_for,
    evaluate_task,
    extract_answer,
    format_table,
    generate_answers,
    inference,
    loglik_answers,
    loglik_scores,
    normalize_task,
    sequence_logprobs,
    task_from_path,
)

# The tiny tokenizers have no pad token on purpose (the EOS fallback is exercised); its warning is noise here.
pytestmark = pytest.mark.filterwarnings("ignore:the tokenizer has no pad token")
SHARED_TASKS = ("boolq", "ARC-Easy", "ARC-Challenge", "openbookqa")


@functools.cache
def _load(task: str) -> tuple[Record, ...]:
    return tuple(load_records(shared_task_file(task), purpose="eval"))


def _real(task: str, n: int) -> list[Record]:
    return list(_load(task)[:n])


@pytest.fixture
def real_items() -> list[tuple[str, Record]]:
    """Three real test items from each shared task (mixed gold answers)."""
    return [(t, r) for t in SHARED_TASKS for r in _real(t, 3)]


# ---------------------------------------------------------------------------------------- task names

@pytest.mark.parametrize("name, task", [
    ("boolq", "boolq"), ("BoolQ", "boolq"), ("SIQA", "social_i_qa"), ("social_i_qa", "social_i_qa"),
    ("ARC-e", "ARC-Easy"), ("arc_easy", "ARC-Easy"), ("ARC-Challenge", "ARC-Challenge"),
    ("ARC-c", "ARC-Challenge"), ("OBQA", "openbookqa"), ("openbookqa", "openbookqa"),
    ("HellaSwag", "hellaswag"), ("WinoGrande", "winogrande"),
])
def test_normalize_task(name: str, task: str) -> None:
    assert normalize_task(name) == task
    assert all(normalize_task(t) == t for t in TASKS)


def test_task_from_path() -> None:
    assert task_from_path("../shared/data/commonsense/ARC-Easy/test.json") == "ARC-Easy"
    assert task_from_path("data/boolq") == "boolq"
    assert task_from_path("evals/openbookqa.jsonl") == "openbookqa"
    with pytest.raises(ValueError, match="cannot tell the task from 'data/mine/test.json': put the file in a directory named after its task"):
        task_from_path("data/mine/test.json")
    with pytest.raises(ValueError, match="unknown task 'mmlu'"):
        normalize_task("mmlu")


# ---------------------------------------------------------------------------------- answer extraction

@pytest.mark.parametrize("task", SHARED_TASKS)
def test_extract_answer_recovers_gold_on_real_items(task: str) -> None:
    records = _real(task, 50)
    assert len(records) == 50
    for rec in records:
        assert extract_answer(task, rec.output) == rec.answer
        assert rec.answer in candidates_for(rec, task)


def test_candidates_follow_each_records_answer_format() -> None:
    records = _load("ARC-Easy")
    sizes = {len(candidates_for(r, "ARC-Easy")) for r in records}
    assert sizes == {3, 4, 5}
    assert all(r.answer in candidates_for(r, "ARC-Easy") for r in records)
    assert candidates_for(Record("no format line"), "arc-e") == DEFAULT_CANDIDATES["ARC-Easy"]


@pytest.mark.parametrize("task, text, expected", [
    ("boolq", "  the correct answer is false. true!", "false"),  # the first match wins
    ("boolq", "The answer is True", ""),  # case-sensitive, as upstream
    ("boolq", "no idea", ""),
    ("piqa", "solution2 because", "solution2"),
    ("social_i_qa", "answer3", "answer3"),
    ("hellaswag", "the correct answer is ending4", "ending4"),
    ("winogrande", "option1 or option2", "option1"),
    ("openbookqa", "answer5", "answer5"),
    ("ARC-c", "the correct answer is answer2", "answer2"),
])
def test_extract_answer_rules(task: str, text: str, expected: str) -> None:
    assert extract_answer(task, text) == expected


# ----------------------------------------------------------------------------------- loglik scoring

@pytest.fixture
def tiny_lm(make_tiny: Callable, tmp_path: Path, real_items: list[tuple[str, Record]]):
    """The conftest tiny llama in float64 with a word tokenizer covering the real items' prompts."""
    records = [r for _, r in real_items]
    extra = [RESPONSE_FORMAT.format(c) for t, r in real_items for c in candidates_for(r, t)]
    tok = word_tokenizer(tmp_path / "tok", prompt_words(records) + extra)
    model = make_tiny("llama").model
    model.resize_token_embeddings(len(tok))
    return model.double(), tok


def _hand_logprob(model: nn.Module, ids: list[int], n_prompt: int) -> float:
    """sum over response positions t of log softmax(logits[t-1])[ids[t]], one unpadded row, float64."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()  # (T, V)
    logp = logits.log_softmax(-1)
    return sum(logp[t - 1, ids[t]].item() for t in range(n_prompt, len(ids)))


def test_loglik_scores_equal_hand_computation(tiny_lm, real_items) -> None:
    model, tok = tiny_lm
    for task, rec in real_items:
        prompt_ids = encode_prompt(tok, format_prompt(rec.instruction, rec.input))
        (row,) = loglik_scores(model, tok, [rec], task, batch_size=2)  # candidates of one record, padded
        assert [s.answer for s in row] == list(candidates_for(rec, task))
        for s in row:
            response = tok(RESPONSE_FORMAT.format(s.answer), add_special_tokens=False)["input_ids"]
            expected = _hand_logprob(model, prompt_ids + response, len(prompt_ids))
            assert s.n_tokens == len(response) == 5
            torch.testing.assert_close(torch.tensor(s.logprob), torch.tensor(expected),
                                       rtol=1e-12, atol=1e-10)


def test_loglik_scores_do_not_depend_on_batching(tiny_lm, real_items) -> None:
    model, tok = tiny_lm
    by_task: dict[str, list[Record]] = {}
    for task, rec in real_items:
        by_task.setdefault(task, []).append(rec)
    for task, records in by_task.items():
        one = loglik_scores(model, tok, records, task, batch_size=1)
        many = loglik_scores(model, tok, records, task, batch_size=7)  # rows of several records, padded
        for a, b in zip(one, many):
            torch.testing.assert_close(torch.tensor([s.logprob for s in a]),
                                       torch.tensor([s.logprob for s in b]), rtol=1e-12, atol=1e-10)
        best = [max(row, key=lambda s: s.logprob).answer for row in one]
        assert loglik_answers(model, tok, records, task, batch_size=7) == best


def test_sequence_logprobs_on_fixed_logits() -> None:
    logits = torch.randn(2, 4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[-100, 3, 5, -100], [-100, -100, 2, -100]])
    total, count = sequence_logprobs(logits, labels)
    lp = logits.log_softmax(-1)
    expected = torch.stack([lp[0, 0, 3] + lp[0, 1, 5], lp[1, 1, 2]])
    torch.testing.assert_close(total, expected, rtol=0, atol=1e-14)
    assert count.tolist() == [2, 1]
    half_total, _ = sequence_logprobs(logits.half(), labels)
    assert half_total.dtype == torch.float32  # low-precision logits are normalised in float32


class FixedLogits(nn.Module):
    """A stand-in LM whose next-token logits favour one token id everywhere, whatever the input."""

    def __init__(self, vocab: int, favourite: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(vocab))
        with torch.no_grad():
            self.bias[favourite] = 5.0

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> types.SimpleNamespace:
        return types.SimpleNamespace(logits=self.bias.expand(*input_ids.shape, -1))  # (B, T, V)


@pytest.mark.parametrize("favourite", ["answer3", "answer1", "false"])
def test_loglik_picks_the_candidate_the_model_prefers(tmp_path: Path, real_items, favourite: str) -> None:
    records = [(t, r) for t, r in real_items if favourite in candidates_for(r, t)]
    assert records
    tok = word_tokenizer(tmp_path, prompt_words([r for _, r in records]) + ["true false answer1 answer3"])
    model = FixedLogits(len(tok), tok.convert_tokens_to_ids(favourite))
    for task, rec in records:
        assert loglik_answers(model, tok, [rec], task) == [favourite]
        assert loglik_answers(model, tok, [rec], task, normalize=True) == [favourite]
        result = evaluate_task(model, tok, [rec], task, method="loglik")
        assert result.accuracy == (rec.answer == favourite)


# ------------------------------------------------------------------------------------------ generation

def test_batched_greedy_generation_equals_one_by_one(tiny_lm, real_items) -> None:
    model, tok = tiny_lm
    model.float()
    records = [r for _, r in real_items]  # prompts of different lengths: real left padding
    model.train()
    one = generate_answers(model, tok, records, batch_size=1, max_new_tokens=6)
    many = generate_answers(model, tok, records, batch_size=5, max_new_tokens=6)
    assert model.training  # the previous mode is restored
    assert one == many and all(isinstance(t, str) for t in one)
    assert any(one)  # the tiny model does emit words


class Parrot(nn.Module):
    """A stand-in LM whose generate() appends fixed token ids to every prompt."""

    def __init__(self, reply: list[list[int]]) -> None:
        super().__init__()
        self.reply = reply
        self.weight = nn.Parameter(torch.zeros(1))

    def generate(self, input_ids: Tensor, attention_mask: Tensor, **kwargs: object) -> Tensor:
        assert kwargs["do_sample"] is False and not torch.is_grad_enabled() and not self.training
        assert (attention_mask[:, -1] == 1).all()  # left padding: every prompt ends at the last column
        new = torch.tensor(self.reply[: input_ids.shape[0]])
        return torch.cat([input_ids, new], dim=1)


def test_generation_pipeline_extracts_the_answer(tmp_path: Path) -> None:
    records = _real("boolq", 4)
    tok = word_tokenizer(tmp_path, prompt_words(records) + ["### Response: the correct answer is true false"])
    replies = [f"the correct answer is {r.answer}" for r in records[:3]] + ["### Response: true"]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in replies]
    width = max(map(len, ids))
    ids = [row + [tok.eos_token_id] * (width - len(row)) for row in ids]  # EOS is skipped when decoding
    with pytest.warns(UserWarning, match="no pad token"):
        result = evaluate_task(Parrot(ids), tok, records, "boolq", method="generate", batch_size=4)
    assert result.responses == replies[:3] + ["true"]  # text after the last "### Response:"
    assert result.predictions == [r.answer for r in records[:3]] + ["true"]
    assert result.accuracy == (3 + (records[3].answer == "true")) / 4


def test_inference_restores_mode_after_an_error() -> None:
    model = nn.Linear(2, 2)
    for mode in (True, False):
        model.train(mode)
        with pytest.raises(RuntimeError), inference(model):
            assert not model.training and not torch.is_grad_enabled()
            raise RuntimeError
        assert model.training is mode


def test_evaluate_task_needs_answers() -> None:
    with pytest.raises(ValueError, match="record 1 has no 'answer'"):
        evaluate_task(nn.Linear(1, 1), None, [Record("a", answer="true"), Record("b")], "boolq")
    with pytest.raises(ValueError, match="method must be"):
        evaluate_task(nn.Linear(1, 1), None, [Record("a", answer="true")], "boolq",
                      method="vote")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- tables

def test_accuracy() -> None:
    assert accuracy(["true", "", "answer1"], ["true", "false", "answer1"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="equally long"):
        accuracy(["true"], ["true", "false"])
    with pytest.raises(ValueError, match="non-empty"):
        accuracy([], [])


def test_format_table_orders_tasks_like_the_paper() -> None:
    table = format_table({"openbookqa": 0.80, "boolq": 0.695, "ARC-e": 0.8125})
    assert table.splitlines() == [
        "| BoolQ | ARC-e | OBQA | Avg. |",
        "|---|---|---|---|",
        "| 69.5 | 81.2 | 80.0 | 76.9 |",
    ]
    full = format_table({t: 0.5 for t in TASKS}, label="LLaMA-7B DoRA", digits=2)
    head, _, row = full.splitlines()
    assert head == "| Model | BoolQ | PIQA | SIQA | HellaSwag | WinoGrande | ARC-e | ARC-c | OBQA | Avg. |"
    assert row == "| LLaMA-7B DoRA | " + " | ".join(["50.00"] * 9) + " |"
    with pytest.raises(ValueError, match="at least one"):
        format_table({})
