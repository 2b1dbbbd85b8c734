"""Hostile inputs to a training run (issue 17, classes 6-9): one writer per run directory, resume
bookkeeping (metrics, tokens), checkpoint pruning and stale temporaries, a full disk, data errors
that name the file and record, and flags refused before anything is loaded or written.

Everything runs on CPU with a tiny Llama and a word tokenizer built here (no shared data). The CLI runs
in-process as ``dorakit.commands.cli.main([...])``.
"""

from __future__ import annotations

import errno
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from fixtures_text import prompt_words, save_word_llama, write_json

import dorakit.training.train as train_mod
from dorakit.training.checkpoint import LOCK_NAME, RunDirBusyError, hold_run_dir, prune_checkpoints
from dorakit.commands.cli import main
from dorakit.adapters.config import ConfigError
from dorakit.training.data import DataError, Record, load_classification, load_records, read_data_text, tokenize_records
from dorakit.training.distributed import DistributedError
from dorakit.training.recipes import FinetuneArgs, RecipeError
from dorakit.training.train import TrainConfig, TrainConfigError

pytestmark = pytest.mark.filterwarnings("ignore:the tokenizer has no pad token")
RECORDS = [{"instruction": f"is the sky {c} today", "output": f"the answer is {a}"}
           for c, a in [("blue", "true"), ("green", "false"), ("grey", "true"), ("red", "false"), ("dark", "true")]]


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A tiny causal Llama + word tokenizer saved like a user's model directory, and 5 training records."""

    root = tmp_path_factory.mktemp("hostile")
    train = write_json(root / "train.json", RECORDS)
    model_dir = root / "tiny-llama"
    tok = save_word_llama(model_dir, prompt_words(load_records(train)))
    return SimpleNamespace(root=root, dir=model_dir, train=train, tok=tok)


def _argv(lm: SimpleNamespace, out: Path, *extra: str, steps: int = 4) -> list[str]:
    return ["finetune", "--model", str(lm.dir), "--data", str(lm.train), "--output-dir", str(out), "--method", "lora",
            "--rank", "2", "--max-steps", str(steps), "--batch-size", "2", "--lr", "1e-2", "--save-every", "1",
            "--device", "cpu", *extra]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _one_error_line(err: str, *needles: str) -> None:
    """stderr ends in one error line (after progress output such as transformers' loading bar) and holds
    no traceback."""
    assert "Traceback" not in err and "dorakit" in err, err
    lines = err[err.index("dorakit"):].strip().splitlines()
    assert len(lines) == 1 and "error: " in lines[0], err
    assert all(n in lines[0] for n in needles), err


class _Kill:
    """A training callback that raises at step ``at`` (a killed process: no final checkpoint)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def __call__(self, step: int, model: object) -> None:
        if step == self.at:
            raise RuntimeError(f"killed at step {step}")


# ------------------------------------------------------------------------------- 6: one run, one writer

HOLD = ("import sys, time; from dorakit.training.checkpoint import hold_run_dir\n"
        "with hold_run_dir(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)\n")


def test_a_second_process_on_a_held_run_dir_fails_fast_naming_the_pid(lm: SimpleNamespace, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    assert main(_argv(lm, out, steps=2)) == 0
    assert not (out / LOCK_NAME).exists()  # released (and removed) when the run ended
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        capsys.readouterr()
        assert main([*_argv(lm, out, steps=2), "--resume"]) == 2
        _one_error_line(capsys.readouterr().err, f"{out} is in use by another dorakit process (PID {holder.pid})")
        with pytest.raises(RunDirBusyError, match=f"PID {holder.pid}"):  # the API refuses too
            with hold_run_dir(out):
                pass
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != LOCK_NAME} == before
    finally:
        holder.kill()
        holder.wait()
    assert main([*_argv(lm, out, steps=2), "--resume"]) == 0  # the holder is gone: the directory is free
    assert [r["step"] for r in _metrics(out)] == [1, 2]


def test_the_lock_is_held_while_training_and_is_reentrant(lm: SimpleNamespace, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    real = train_mod._train

    def spy(*args: object, **kwargs: object) -> object:
        seen.append((tmp_path / "run" / LOCK_NAME).read_text().strip())
        with hold_run_dir(tmp_path / "run"):  # the same process may claim again (recipe, then train)
            pass
        assert (tmp_path / "run" / LOCK_NAME).exists()
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "_train", spy)
    assert main(_argv(lm, tmp_path / "run", steps=1)) == 0
    assert seen == [str(os.getpid())]
    assert not (tmp_path / "run" / LOCK_NAME).exists()


def test_resume_drops_lines_past_the_checkpoint_and_duplicates(lm: SimpleNamespace, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(_argv(lm, full, "--save-every", "2")) == 0
    monkeypatch.setattr(train_mod, "_log", _log_then_kill_at(3))
    with pytest.raises(RuntimeError, match="killed"):
        main(_argv(lm, cut, "--save-every", "2"))
    monkeypatch.undo()
    lines = (cut / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["step"] for ln in lines] == [1, 2, 3]  # step 3 is past the checkpoint (step 2)
    (cut / "metrics.jsonl").write_text("\n".join([*lines[:2], *lines[:2], lines[2]]) + "\n")  # a racing writer's
    assert main([*_argv(lm, cut, "--save-every", "2"), "--resume"]) == 0
    steps = [r["step"] for r in _metrics(cut)]
    assert steps == [1, 2, 3, 4], steps
    # the token counter continues across the resume: the same counts as the uninterrupted run
    assert [r["tokens"] for r in _metrics(cut)] == [r["tokens"] for r in _metrics(full)]
    assert [r["tokens"] for r in _metrics(full)] == sorted({r["tokens"] for r in _metrics(full)})  # increasing


def _log_then_kill_at(step: int):  # noqa: ANN202
    real = train_mod._log

    def log(out: Path, record: dict) -> None:
        real(out, record)
        if record.get("step") == step:
            raise RuntimeError(f"killed after logging step {step}")
    return log


def test_an_old_checkpoint_without_tokens_restarts_the_count_with_a_warning(lm: SimpleNamespace,
                                                                            tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(_argv(lm, out, steps=2)) == 0
    state_file = out / "checkpoints" / "step-0000002" / "state.json"
    state = json.loads(state_file.read_text())
    assert state["tokens"] == _metrics(out)[-1]["tokens"] > 0
    del state["tokens"]
    state_file.write_text(json.dumps(state))
    with pytest.warns(UserWarning, match="holds no token count"):
        assert main([*_argv(lm, out, steps=2), "--resume"]) == 0


# ------------------------------------------------------------------- 7: full disk, pruning, temporaries

def test_keep_checkpoints_prunes_all_but_the_newest(lm: SimpleNamespace, tmp_path: Path) -> None:
    for keep, expected in ((None, ["step-0000003", "step-0000004"]), ("3", ["step-0000002", "step-0000003",
                                                                          "step-0000004"])):
        out = tmp_path / f"keep-{keep}"
        assert main(_argv(lm, out, *(("--keep-checkpoints", keep) if keep else ()))) == 0
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", *expected]


def test_pruning_never_deletes_the_checkpoint_latest_names(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4):
        (root / f"step-{step:07d}").mkdir(parents=True)
        (root / f"step-{step:07d}" / "state.json").write_text("{}")
        (root / f"step-{step:07d}" / ".metadata").write_text("")
    (root / "latest").write_text("step-0000002")  # a run resumed at step 2: steps 3, 4 are to be rewritten
    assert [p.name for p in prune_checkpoints(tmp_path, 1)] == ["step-0000001"]
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-0000002", "step-0000003", "step-0000004"]
    with pytest.raises(ValueError, match="keep must be at least 1"):
        prune_checkpoints(tmp_path, 0)


def test_stale_temporaries_of_dorakit_are_removed_and_nothing_else(lm: SimpleNamespace, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(_argv(lm, out, steps=2)) == 0
    stale = [out / ".metrics.jsonl.k2j_x9ab.tmp", out / "checkpoints" / ".latest.abcdefgh.tmp",
             out / "final" / ".adapter_model.safetensors.0123abcd.tmp"]
    partial = out / "checkpoints" / ".step-0000003.partial"
    mine = [out / "notes.tmp", out / ".notes.tmp", out / "checkpoints" / "step-0000009.partial", out / "x.partial"]
    for path in [*stale, *mine]:
        path.write_text("x")
    partial.mkdir()
    (partial / "rng-0.pt").write_text("half")
    assert main([*_argv(lm, out, steps=2), "--resume"]) == 0
    assert not any(p.exists() for p in [*stale, partial])
    assert all(p.read_text() == "x" for p in mine)


def test_disk_full_is_one_line_and_exit_2(lm: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture) -> None:
    def full(*args: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(train_mod, "_log", full)
    out = tmp_path / "run"
    assert main(_argv(lm, out, steps=2)) == 2
    _one_error_line(capsys.readouterr().err, f"dorakit: error: no space left on device while writing {out}",
                    "--resume")
    assert not (out / LOCK_NAME).exists()
    monkeypatch.undo()
    assert main([*_argv(lm, out, steps=2), "--resume"]) == 0  # nothing was lost


# --------------------------------------------------------------------------------------- 8: data errors

def test_non_utf8_names_file_record_line_and_byte(tmp_path: Path) -> None:
    good = json.dumps(RECORDS[0])
    (tmp_path / "d.jsonl").write_bytes(f"{good}\n\n{good}\n".encode() + b'{"instruction": "caf\xe9", "output": "x"}\n')
    with pytest.raises(DataError, match=r"d.jsonl, record 2, line 4 \(byte offset \d+\): byte 0xe9 is not UTF-8"):
        load_records(tmp_path / "d.jsonl")
    data = b'[\n  {"instruction": "a\xff", "output": "b"}\n]'
    (tmp_path / "d.json").write_bytes(data)
    with pytest.raises(DataError, match=rf"d.json, line 2 \(byte offset {data.index(0xff)}\): byte 0xff is not UTF-8"):
        load_records(tmp_path / "d.json")


def test_a_utf8_bom_is_accepted(tmp_path: Path) -> None:
    for name, text in (("b.json", json.dumps(RECORDS)), ("b.jsonl", "\n".join(map(json.dumps, RECORDS)))):
        (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + text.encode())
        assert [r.instruction for r in load_records(tmp_path / name)] == [r["instruction"] for r in RECORDS]


def test_a_fifo_or_a_device_is_refused_before_it_is_read(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.json")  # opening it for reading would wait for a writer forever
    with pytest.raises(DataError, match="pipe.json is not a regular file"):
        load_records(tmp_path / "pipe.json")
    (tmp_path / "zero.json").symlink_to("/dev/zero")  # reading it would never end
    with pytest.raises(DataError, match="zero.json is not a regular file"):
        load_records(tmp_path / "zero.json")
    write_json(tmp_path / "big.json", RECORDS)
    with pytest.raises(DataError, match="more than the 100 read"):
        read_data_text(tmp_path / "big.json", limit=100)


def test_every_record_over_max_len_is_one_clear_error(lm: SimpleNamespace, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    assert main([*_argv(lm, out), "--max-len", "3"]) == 2
    _one_error_line(capsys.readouterr().err,
                    f"{lm.train}: all 5 records are longer than --max-len 3 tokens", "raise --max-len")
    assert not out.exists()
    recs = [Record("a b c d", output="e")]
    with pytest.raises(DataError, match="max_len .* must be a positive integer, got -5"):
        tokenize_records(recs, lm.tok, -5)


@pytest.mark.parametrize("row, needles", [
    ({"txt": "hello", "label": 1}, ["'text' is missing", "['label', 'txt']", "'text' and a string or integer 'label'"]),
    ({"text": "hello"}, ["'label' is missing", "['text']"]),
    ({"text": "hello", "label": [1]}, ["'label' is a list"]),
    ([1, 2], ["expected a JSON object, got list", "'text'"]),
])
def test_classification_errors_ask_for_text_and_label(tmp_path: Path, row: object, needles: list[str]) -> None:
    write_json(tmp_path / "c.json", [{"text": "fine", "label": 0}, row])
    with pytest.raises(DataError) as info:
        load_classification(tmp_path / "c.json")
    assert str(info.value).startswith(f"{tmp_path / 'c.json'}, record 1 (line 6)"), info.value
    assert all(n in str(info.value) for n in needles), info.value


def test_a_missing_key_names_the_keys_the_record_has(tmp_path: Path) -> None:
    write_json(tmp_path / "t.json", [{"instruction": "a", "ouput": "b"}])
    with pytest.raises(DataError, match=r"t.json, record 0 \(line 2\): missing key 'output'.*has keys "
                                        r"\['instruction', 'ouput'\]"):
        load_records(tmp_path / "t.json")


# ----------------------------------------------------------------------------------------- 9: flags

BAD_FLAGS = [
    ("finetune", ["--batch-size", "0", "--epochs", "1"], "--batch-size: must be an integer >= 1, got '0'"),
    ("finetune", ["--epochs", "inf"], "--epochs: must be a finite number >= 0, got 'inf'"),
    ("finetune", ["--device", "tpu:7"], "--device: 'tpu:7' is not a device"),
    ("finetune", ["--device", "cuda:99"], "--device: cuda:99: this machine has"),
    ("finetune", ["--weight-decay", "nan"], "--weight-decay: must be a finite number >= 0, got 'nan'"),
    ("finetune", ["--max-len", "-5"], "--max-len: must be an integer >= 1"),
    ("finetune", ["--max-grad-norm", "nan"], "--max-grad-norm: must be a finite number >= 0"),
    ("finetune", ["--eval-limit", "-3"], "--eval-limit: must be an integer >= 1"),
    ("finetune", ["--rank", "0"], "--rank: must be an integer >= 1"),
    ("finetune", ["--lr", "0"], "--lr: must be a finite number > 0"),
    ("finetune", ["--dropout", "1.0"], "--dropout: must be a finite number >= 0 and < 1"),
    ("finetune", ["--keep-checkpoints", "0"], "--keep-checkpoints: must be an integer >= 1"),
    ("finetune", ["--log-every", "0"], "--log-every: must be an integer >= 1"),
    ("finetune", ["--max-steps", "two"], "--max-steps: must be an integer >= 1, got 'two'"),
    ("sweep", ["--ranks", "4", "-8"], "--ranks: must be an integer >= 1"),
    ("sweep", ["--alpha-per-rank", "nan"], "--alpha-per-rank: must be a finite number > 0"),
    ("params", ["--rank", "-1"], "--rank: must be an integer >= 1"),
    ("params", ["--alpha", "inf"], "--alpha: must be a finite number > 0"),
    ("eval", ["--limit", "-1"], "--limit: must be an integer >= 0"),
    ("eval", ["--num-beams", "0"], "--num-beams: must be an integer >= 1"),
    ("eval", ["--device", "cuda:99"], "--device: cuda:99: this machine has"),
    ("merge", ["--task", "regress"], "--task: invalid choice"),
    ("analyze", ["--runs"], "--runs: expected at least one argument"),
    ("demo", ["--max-steps", "-1"], "--max-steps: must be an integer >= 0"),
]
REQUIRED = {"finetune": ["--model", "m", "--data", "d.json"], "sweep": ["--model", "m", "--data", "d.json"],
            "params": ["--model", "llama-7b"], "eval": ["--model", "m", "--data", "d.json"],
            "merge": ["--model", "m", "--adapter", "a"], "analyze": [], "demo": []}
OUT = {"finetune": "--output-dir", "sweep": "--output-dir", "merge": "--output", "analyze": "--output-dir",
       "demo": "--output-dir", "eval": "--output", "params": None}


@pytest.mark.parametrize("command, flags, message", BAD_FLAGS, ids=[" ".join([c[0], *c[1]]) for c in BAD_FLAGS])
def test_a_bad_flag_is_one_line_exit_2_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                          command: str, flags: list[str], message: str) -> None:
    out = tmp_path / "out"
    argv = [command, *REQUIRED[command], *((OUT[command], str(out)) if OUT[command] else ()), *flags]
    if command == "analyze" and flags == ["--runs"]:
        argv = [command, "--output-dir", str(out), "--runs"]
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    _one_error_line(capsys.readouterr().err, f"dorakit {command}: error: argument {message}")
    assert list(tmp_path.iterdir()) == []


def test_a_bad_value_in_a_config_file_is_the_same_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "c.yaml").write_text("model: m\ndata: d.json\noutput-dir: out\nweight-decay: .nan\n")
    with pytest.raises(SystemExit) as info:
        main(["finetune", "--config", str(tmp_path / "c.yaml")])
    assert info.value.code == 2
    _one_error_line(capsys.readouterr().err, "--weight-decay: must be a finite number >= 0")


@pytest.mark.parametrize("field, value, error, message", [
    ("batch_size", 0, RecipeError, "--batch-size must be an integer >= 1, got 0"),
    ("epochs", math.inf, RecipeError, "--epochs must be a finite number >= 0"),
    ("max_len", -5, RecipeError, "--max-len must be an integer >= 1"),
    ("eval_limit", -3, RecipeError, "--eval-limit must be an integer >= 1"),
    ("device", "tpu:7", DistributedError, "'tpu:7' is not a device"),
    ("rank", 0, ConfigError, "rank must be a positive integer"),
    ("method", "qlora", RecipeError, "--method must be one of"),
])
def test_finetune_args_check_every_field(field: str, value: object, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        FinetuneArgs(model="m", data="d.json", output_dir="out", **{field: value})


@pytest.mark.parametrize("field, value", [("weight_decay", math.nan), ("max_grad_norm", math.nan), ("lr", math.inf),
                                          ("log_every", 0), ("keep_checkpoints", 0), ("max_steps", True)])
def test_train_config_refuses_non_finite_and_zero_values(field: str, value: object) -> None:
    with pytest.raises(TrainConfigError, match=f"{field} must be"):
        TrainConfig(**{field: value})
