"""The ``dorakit`` command end to end on CPU: finetune (LoRA / DoRA / full on a tiny causal Llama with real
boolq records, and classification on the real all-MiniLM-L6-v2), merge, eval on real items of every
shared task, Ctrl-C and --resume through the console script, config files, and bad input.

The CLI runs in-process as ``dorakit.commands.cli.main([...])``; the console script runs as a real subprocess
twice. Real data is read from the shared commonsense folder (skipped when absent); what a test trains
on is a handful of its records written to tmp_path, never into the repository.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fixtures_text import prompt_words, save_word_llama, shared_task_file, word_tokenizer
from torch import Tensor, nn

import dorakit as dk
from dorakit.training import recipes
from dorakit.commands.cli import main, parse_args
from dorakit.training.data import load_records
from dorakit.training.evaluate import TASK_TITLES, evaluate_task

# The tiny tokenizers have no pad token on purpose (the EOS fallback); its warning is noise here.
pytestmark = pytest.mark.filterwarnings("ignore:the tokenizer has no pad token")
TASKS = ("boolq", "ARC-Easy", "ARC-Challenge", "openbookqa")
N_EVAL = 3  # real test items per task


# ---------------------------------------------------------------------------------------------- helpers

def _records(task: str, split: str, n: int) -> list[dict]:
    return [vars(r) for r in load_records(shared_task_file(task, split), purpose="eval")[:n]]


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A tiny causal Llama + word tokenizer saved like a user's local model, 6 real boolq training
    records in tmp, and the shared test files it is evaluated on."""
    import transformers

    root = tmp_path_factory.mktemp("cli")
    train = _write(root / "train.json", _records("boolq", "train", 6))
    evals = {task: shared_task_file(task) for task in TASKS}
    seen = [r for task in TASKS for r in load_records(evals[task], purpose="eval")[:N_EVAL]]
    model_dir = root / "tiny-llama"
    tok = word_tokenizer(model_dir, prompt_words(seen + load_records(train)))
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=0, eos_token_id=1, pad_token_id=None)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(model_dir)
    return SimpleNamespace(root=root, dir=model_dir, train=train, evals=evals, tok=tok)


def _write(path: Path, obj: object) -> Path:
    path.write_text(json.dumps(obj, indent=4))
    return path


def _finetune_argv(lm: SimpleNamespace, out: Path, method: str = "dora", *extra: str) -> list[str]:
    return ["finetune", "--model", str(lm.dir), "--data", str(lm.train), "--output-dir", str(out),
            "--method", method, "--rank", "4", "--max-steps", "4", "--batch-size", "2", "--lr", "1e-2",
            "--save-every", "2", "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def runs(lm: SimpleNamespace) -> dict[str, Path]:
    """One finished finetune run per method, each through ``main`` in-process."""
    out = {}
    for method in ("lora", "dora", "full"):
        out[method] = lm.root / f"run-{method}"
        extra = ("--eval-data", str(lm.evals["boolq"]), "--eval-limit", "4", "--eval-every", "2") \
            if method == "dora" else ()
        assert main(_finetune_argv(lm, out[method], method, *extra)) == 0
    return out


def _base(lm: SimpleNamespace) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(lm.dir).eval()


def _logits(model: nn.Module, lm: SimpleNamespace) -> Tensor:
    ids = lm.tok(load_records(lm.train)[0].instruction, return_tensors="pt")["input_ids"]  # (1, T)
    with torch.no_grad():
        return model(input_ids=ids).logits


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _train_losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in _metrics(out) if "loss" in r]


# ------------------------------------------------------------------------------------------ finetune

@pytest.mark.parametrize("method", ["lora", "dora"])
def test_finetune_adapter_loads_in_peft_and_dorakit_alike(lm: SimpleNamespace, runs: dict[str, Path],
                                                          method: str) -> None:
    from peft import PeftModel

    out = runs[method]
    assert [s for s, _ in _train_losses(out)] == [1, 2, 3, 4]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-0000002", "step-0000004"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == method and summary["steps"] == 4 and not summary["interrupted"]
    final = out / "final"
    assert json.loads((final / "adapter_config.json").read_text())["use_dora"] is (method == "dora")

    base = _logits(_base(lm), lm)
    ours = _base(lm)
    dk.load_adapter(ours, final)
    peft_model = PeftModel.from_pretrained(_base(lm), final).eval()
    torch.testing.assert_close(_logits(peft_model, lm), _logits(ours, lm), rtol=0, atol=1e-5)
    assert (_logits(ours, lm) - base).abs().max() > 1e-4  # training moved the adapter


def test_finetune_full_saves_a_plain_model(lm: SimpleNamespace, runs: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    final = runs["full"] / "final"
    assert (final / "config.json").is_file() and not (final / "adapter_config.json").exists()
    tuned = AutoModelForCausalLM.from_pretrained(final).eval()
    assert (_logits(tuned, lm) - _logits(_base(lm), lm)).abs().max() > 1e-4


def test_finetune_evaluates_every_n_steps(runs: dict[str, Path]) -> None:
    evals = [(r["step"], r["eval_accuracy"]) for r in _metrics(runs["dora"]) if "eval_accuracy" in r]
    assert [s for s, _ in evals] == [2, 4] and all(0 <= a <= 1 for _, a in evals)
    assert json.loads((runs["dora"] / "summary.json").read_text())["eval_accuracy"] == evals[-1][1]


def test_epochs_set_the_step_count(lm: SimpleNamespace, tmp_path: Path) -> None:
    # 6 records in batches of 2: 3 micro-batches per epoch; 1.5 epochs at 2 per step -> ceil(2.25) = 3 steps
    assert main(_finetune_argv(lm, tmp_path / "run", "lora", "--epochs", "1.5", "--grad-accum", "2")) == 0
    assert [s for s, _ in _train_losses(tmp_path / "run")] == [1, 2, 3]


# --------------------------------------------------------------------------------------------- merge

def test_merge_matches_the_adapted_model(lm: SimpleNamespace, runs: dict[str, Path], tmp_path: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    assert main(["merge", "--model", str(lm.dir), "--adapter", str(runs["dora"] / "final"),
                 "--output", str(out)]) == 0
    assert f"merged model written to {out}" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in n or "magnitude" in n for n, _ in merged.named_parameters())
    adapted = _base(lm)
    dk.load_adapter(adapted, runs["dora"] / "final")
    torch.testing.assert_close(_logits(merged, lm), _logits(adapted, lm), rtol=0, atol=1e-5)
    assert (_logits(merged, lm) - _logits(_base(lm), lm)).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------- eval

@pytest.mark.parametrize("method", ["loglik", "generate"])
def test_eval_prints_a_table_of_every_task(lm: SimpleNamespace, runs: dict[str, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture, method: str) -> None:
    adapter = runs["dora"] / "final"
    argv = ["eval", "--model", str(lm.dir), "--adapter", str(adapter), "--data", *map(str, lm.evals.values()),
            "--method", method, "--limit", str(N_EVAL), "--max-new-tokens", "3", "--device", "cpu",
            "--output", str(tmp_path / "acc.json")]
    assert main(argv) == 0
    table = capsys.readouterr().out
    head, _, row = table.strip().splitlines()
    assert head == "| Model | " + " | ".join(TASK_TITLES[t] for t in TASKS) + " | Avg. |"
    assert row.startswith(f"| {method} |")
    acc = json.loads((tmp_path / "acc.json").read_text())[method]
    model = _base(lm)
    dk.load_adapter(model, adapter)
    for task, path in lm.evals.items():  # the command scores exactly what evaluate_task scores
        kw = {"max_new_tokens": 3} if method == "generate" else {}
        records = load_records(path, purpose="eval")[:N_EVAL]
        assert acc[task] == evaluate_task(model, lm.tok, records, task, method=method, batch_size=8, **kw).accuracy
    assert row == "| " + " | ".join([method, *(f"{100 * acc[t]:.1f}" for t in TASKS),
                                     f"{100 * sum(acc.values()) / len(acc):.1f}"]) + " |"


# ---------------------------------------------------------------------------- classification (MiniLM)

TEXTS = ["a wonderful and delightful film", "truly great acting", "i loved every minute", "superb and moving",
         "a dull and boring mess", "terrible plot and awful acting", "i hated every minute", "weak and tedious"]


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_minilm_classification_saves_the_head(minilm_path: Path, tmp_path: Path, method: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    data = tmp_path / "sst.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": int(i >= 4)}) + "\n" for i, t in enumerate(TEXTS)))
    trained: list[nn.Module] = []
    real_train = recipes.train

    def keep_model(model: nn.Module, *args: object, **kwargs: object) -> object:
        trained.append(model)
        return real_train(model, *args, **kwargs)

    monkeypatch.setattr(recipes, "train", keep_model)
    out = tmp_path / "run"
    assert main(["finetune", "--model", str(minilm_path), "--data", str(data), "--output-dir", str(out),
                 "--method", method, "--rank", "4", "--max-steps", "3", "--batch-size", "4", "--max-len", "16",
                 "--lr", "1e-3", "--device", "cpu"]) == 0
    final = out / "final"
    assert json.loads((final / "adapter_config.json").read_text())["modules_to_save"] == ["classifier"]
    enc = AutoTokenizer.from_pretrained(final)(TEXTS, padding=True, return_tensors="pt")
    model = trained[0].eval()
    with torch.no_grad():
        expected = model(**enc).logits  # (8, 2)

    def reload(seed: int) -> nn.Module:
        torch.manual_seed(seed)  # a fresh, differently initialised classifier: only the file can restore it
        return AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2).eval()

    fresh = reload(123)
    with torch.no_grad():
        assert (fresh(**enc).logits - expected).abs().max() > 1e-3
    dk.load_adapter(fresh, final)
    peft_model = PeftModel.from_pretrained(reload(7), final).eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(**enc).logits, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(peft_model(**enc).logits, expected, rtol=0, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_finetune_with_cuda_graph_equals_eager(tmp_path: Path) -> None:
    """`dorakit finetune --cuda-graph` (the recipe's pad values, the causal collate) logs the eager run's
    losses, to rounding of other GEMM shapes (fp32). Self-contained (made-up records of 2 to 40 words,
    so the padded widths differ), so it runs where the shared data is absent."""

    words = [f"w{i}" for i in range(50)]
    records = [{"instruction": " ".join(words[(3 * i) % 50:][:2 + (7 * i) % 39]), "input": "",
                "output": words[i % 50], "answer": words[i % 50]} for i in range(12)]
    data = _write(tmp_path / "train.json", records)
    model_dir = tmp_path / "tiny-llama"
    save_word_llama(model_dir, prompt_words(load_records(data)), max_position_embeddings=512)
    losses = {}
    for name, extra in (("eager", ()), ("graph", ("--cuda-graph",))):
        assert main(["finetune", "--model", str(model_dir), "--data", str(data), "--output-dir", str(tmp_path / name),
                     "--method", "dora", "--rank", "4", "--max-steps", "4", "--batch-size", "4", "--lr", "1e-2",
                     "--device", "cuda", *extra]) == 0
        losses[name] = _train_losses(tmp_path / name)
    assert [s for s, _ in losses["graph"]] == [s for s, _ in losses["eager"]] == [1, 2, 3, 4]
    torch.testing.assert_close(torch.tensor([v for _, v in losses["graph"]]),
                               torch.tensor([v for _, v in losses["eager"]]), rtol=1e-4, atol=0.0)


# ----------------------------------------------------------------------------------- console script

def _console_script() -> Path:
    path = Path(sys.executable).with_name("dorakit")
    found = path if path.is_file() else (Path(p) if (p := shutil.which("dorakit")) else None)
    if found is None:
        pytest.skip("the dorakit console script is not installed (pip install -e .)")
    return found


def _env() -> dict[str, str]:
    # the same thread count as this process, so the subprocess's floats are bit-identical to ours
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads()),
            "PYTHONUNBUFFERED": "1"}


@pytest.mark.slow
def test_console_script_ctrl_c_then_resume_equals_an_uninterrupted_run(lm: SimpleNamespace,
                                                                       tmp_path: Path) -> None:
    """SIGINT to a real `dorakit finetune` once its first checkpoint exists: exit 130, a checkpoint at
    the last finished step, each step logged once; --resume then gives the losses of a run that was
    never interrupted (dropout on, 2 micro-batches per step)."""
    steps = 30
    argv = _finetune_argv(lm, tmp_path / "cut", "dora", "--max-steps", str(steps), "--save-every", "1",
                          "--dropout", "0.1", "--grad-accum", "2", "--batch-size", "1")
    proc = subprocess.Popen([str(_console_script()), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env())
    latest, deadline = tmp_path / "cut" / "checkpoints" / "latest", time.monotonic() + 180
    while not latest.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    if proc.returncode != 130 and (tmp_path / "cut" / "final").exists():
        pytest.skip("the run finished before SIGINT arrived (a very fast machine)")
    assert proc.returncode == 130, stderr
    assert "SIGINT: finishing this step, then saving a checkpoint" in stderr
    k = int(latest.read_text().removeprefix("step-"))
    assert 1 <= k < steps and f"interrupted: checkpoint at step {k}" in stdout
    assert [s for s, _ in _train_losses(tmp_path / "cut")] == list(range(1, k + 1))
    assert json.loads((tmp_path / "cut" / "summary.json").read_text())["interrupted"] is True
    assert not (tmp_path / "cut" / "final").exists()

    quiet = [*argv, "--save-every", "0"]  # how often to save is not part of a run's identity
    assert main([*quiet, "--resume"]) == 0
    assert main(_finetune_argv(lm, tmp_path / "full", "dora", *quiet[quiet.index("--max-steps"):])) == 0
    assert _train_losses(tmp_path / "cut") == _train_losses(tmp_path / "full")
    assert [s for s, _ in _train_losses(tmp_path / "cut")] == list(range(1, steps + 1))
    a, b = (dk.read_adapter(tmp_path / d / "final").tensors for d in ("cut", "full"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------- config files

FLAGS = ["finetune", "--model", "m", "--data", "d.json", "--output-dir", "o", "--method", "lora", "--rank", "4",
         "--alpha", "8", "--targets", "q_proj", "v_proj", "--train-on-inputs", "--no-use-rslora", "--lr", "0.001",
         "--max-steps", "7", "--schedule", "cosine", "--resume"]
YAML = """model: m
data: d.json
output{_}dir: o
method: lora
rank: 4
alpha: 8
targets: [q_proj, v_proj]
train{_}on{_}inputs: true
use{_}rslora: false
lr: 0.001
max{_}steps: 7
schedule: cosine
resume: true
eval{_}data: null
"""
TOML = """model = "m"
data = "d.json"
output{_}dir = "o"
method = "lora"
rank = 4
alpha = 8.0
targets = ["q_proj", "v_proj"]
train{_}on{_}inputs = true
use{_}rslora = false
lr = 1e-3
max{_}steps = 7
schedule = "cosine"
resume = true
"""


def _ns(argv: list[str]) -> dict:
    return {k: v for k, v in vars(parse_args(argv)).items() if k != "config"}


@pytest.mark.parametrize("kind", ["yaml", "toml"])
@pytest.mark.parametrize("sep", ["-", "_"])
def test_config_file_equals_the_flags(tmp_path: Path, kind: str, sep: str) -> None:
    path = tmp_path / f"run.{kind}"
    path.write_text((YAML if kind == "yaml" else TOML).format(_=sep))
    from_file = _ns(["finetune", "--config", str(path)])
    assert from_file == _ns(FLAGS)
    assert from_file["targets"] == ["q_proj", "v_proj"] and from_file["eval_data"] is None


def test_command_line_flags_override_the_file(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(YAML.format(_="-"))
    ns = _ns(["finetune", "--max-steps", "3", "--config", str(path), "--targets", "o_proj",
              "--no-train-on-inputs", "--method", "dora"])
    assert (ns["max_steps"], ns["targets"], ns["train_on_inputs"], ns["method"]) == (3, ["o_proj"], False, "dora")
    assert ns["lr"] == 0.001 and ns["rank"] == 4  # the rest still comes from the file


def test_config_file_for_eval_uses_evals_flags(tmp_path: Path) -> None:
    path = tmp_path / "eval.toml"
    path.write_text('model = "m"\ndata = ["a/boolq/test.json", "b/piqa/test.json"]\nmethod = "both"\nlimit = 5\n')
    assert _ns(["eval", "--config", str(path)]) == _ns(["eval", "--model", "m", "--data", "a/boolq/test.json",
                                                        "b/piqa/test.json", "--method", "both", "--limit", "5"])


@pytest.mark.parametrize("name, text, message", [
    ("a.yaml", "model: m\nmax-step: 3\n", "'max-step' is not a flag of this command; valid keys: "),
    ("a.toml", 'rank = 4\nmagnitude = 2\n', "'magnitude' is not a flag of this command"),
    ("a.yaml", "train-on-inputs: 'true'\n", "'train-on-inputs' must be true or false, got 'true'"),
    ("a.yaml", "resume: yes please\n", "'resume' must be true or false, got 'yes please'"),
    ("a.yaml", "targets: {q: 1}\n", "'targets' must be a value or a list, not a mapping"),
    ("a.yaml", "- model\n- m\n", "expected a mapping of flag names to values, got list"),
    ("a.yaml", "model: [unclosed\n", "invalid YAML"),
    ("a.toml", "model = \n", "invalid TOML"),
    ("a.json", "{}", "use a .yaml, .yml or .toml file"),
])
def test_bad_config_files(tmp_path: Path, capsys: pytest.CaptureFixture, name: str, text: str,
                          message: str) -> None:
    (tmp_path / name).write_text(text)
    assert main(["finetune", "--config", str(tmp_path / name)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dorakit: error: --config {tmp_path / name}: ") and message in err


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["merge", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: no such file" in capsys.readouterr().err


def test_key_of_another_command_is_unknown(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "m.yaml").write_text("model: m\nadapter: a\noutput: o\nrank: 4\n")
    assert main(["merge", "--config", str(tmp_path / "m.yaml")]) == 2
    assert "'rank' is not a flag of this command; valid keys: adapter, model, output, task" in \
        capsys.readouterr().err


# ---------------------------------------------------------------------------------------- bad input

def _bad_inputs(lm: SimpleNamespace, done: Path, bad: Path) -> dict[str, tuple[list[str], str]]:
    """case -> (argv, what stderr must say); every case points at a finished run directory."""
    bad.mkdir(exist_ok=True)
    (bad / "syntax.json").write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output"}\n]')
    _write(bad / "no-output.json", [{"instruction": "a", "output": "b"}, {"instruction": "c"}])
    (bad / "lines.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    (bad / "empty-model").mkdir(exist_ok=True)
    (bad / "broken-config").mkdir(exist_ok=True)
    (bad / "broken-config" / "config.json").write_text("{not json")
    (bad / "no-weights").mkdir(exist_ok=True)
    shutil.copy(lm.dir / "config.json", bad / "no-weights" / "config.json")
    shutil.copytree(bad / "no-weights", bad / "tokenizer-only", dirs_exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(lm.dir / name, bad / "tokenizer-only" / name)
    argv = _finetune_argv(lm, done, "lora")

    def swap(flag: str, value: str) -> list[str]:
        return [value if i and argv[i - 1] == flag else a for i, a in enumerate(argv)]

    return {
        "missing data": (swap("--data", str(bad / "missing.json")), "missing.json does not exist"),
        "malformed json": (swap("--data", str(bad / "syntax.json")), "syntax.json, record 1 (line 3, column"),
        "malformed jsonl": (swap("--data", str(bad / "lines.jsonl")), "lines.jsonl, record 1 (line 2): invalid JSON"),
        "record missing a key": (swap("--data", str(bad / "no-output.json")),
                                 "no-output.json, record 1 (line 6): missing key 'output'"),
        "not a model dir": (swap("--model", str(bad / "empty-model")),
                            "not a transformers model directory (no config.json)"),
        "broken config.json": (swap("--model", str(bad / "broken-config")), "is not a valid transformers config"),
        "no weights or tokenizer": (swap("--model", str(bad / "no-weights")), "cannot load a transformers causal"),
        "no weights": (swap("--model", str(bad / "tokenizer-only")), "no file named model.safetensors"),
        "new run into a run dir": (argv, "already holds a run (run.json); pass --resume"),
        "resume another run": ([*swap("--lr", "0.5"), "--resume"], "is a different run: train.lr: 0.01 -> 0.5"),
        "resume another method": ([*swap("--method", "dora"), "--resume"],
                                  "is a different run: method: 'lora' -> 'dora'"),
        "resume nothing": ([*swap("--output-dir", str(bad / "nothing")), "--resume"], "holds no run to resume"),
        "merge into a non-empty dir": (["merge", "--model", str(lm.dir), "--adapter", str(done / "final"),
                                        "--output", str(done)], "exists and is not empty"),
        "merge a missing adapter": (["merge", "--model", str(lm.dir), "--adapter", str(bad / "nope"),
                                     "--output", str(bad / "merged")], "no such adapter directory"),
        "cuda graph on cpu": ([*swap("--output-dir", str(bad / "graph")), "--cuda-graph"],
                              "--cuda-graph needs a CUDA device, not cpu"),
        "cuda graph and compile": ([*swap("--output-dir", str(bad / "graph")), "--cuda-graph", "--compile"],
                                   "--compile with --cuda-graph: use one of them"),
        "cuda graph and checkpointing": ([*swap("--output-dir", str(bad / "graph")), "--cuda-graph",
                                          "--gradient-checkpointing"], "--cuda-graph with --gradient-checkpointing"),
    }


CASES = ["missing data", "malformed json", "malformed jsonl", "record missing a key", "not a model dir",
         "broken config.json", "no weights or tokenizer", "no weights", "new run into a run dir", "resume another run",
         "resume another method", "resume nothing", "merge into a non-empty dir", "merge a missing adapter",
         "cuda graph on cpu", "cuda graph and compile", "cuda graph and checkpointing"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_and_changes_no_file(lm: SimpleNamespace, runs: dict[str, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture, case: str) -> None:
    argv, message = _bad_inputs(lm, runs["lora"], tmp_path / "bad")[case]
    before = _tree(lm.root), _tree(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "dorakit: error: " in err, err  # (after transformers' loading progress bar, if any)
    assert message in err[err.index("dorakit: error: "):], err
    assert (_tree(lm.root), _tree(tmp_path)) == before
    assert not any((tmp_path / "bad" / name).exists() for name in ("nothing", "merged", "graph"))


def test_unknown_method_is_an_argparse_error(lm: SimpleNamespace, tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(_finetune_argv(lm, tmp_path / "run", "qlora"))
    assert exit_info.value.code == 2
    assert "argument --method: invalid choice: 'qlora'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_resuming_a_finished_run_repeats_nothing(lm: SimpleNamespace, tmp_path: Path) -> None:
    """--resume on a run that already reached max-steps: no second eval line, the summary keeps the
    final loss, and deltas.json keeps the records of the last step."""
    out = tmp_path / "done"
    argv = _finetune_argv(lm, out, "dora", "--eval-data", str(lm.evals["boolq"]), "--eval-limit", "2",
                          "--record-deltas", "2")
    assert main(argv) == 0
    metrics, deltas = (out / "metrics.jsonl").read_text(), (out / "deltas.json").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert main([*argv, "--resume"]) == 0
    assert (out / "metrics.jsonl").read_text() == metrics
    assert (out / "deltas.json").read_text() == deltas
    again = json.loads((out / "summary.json").read_text())
    assert again["final_loss"] == summary["final_loss"] is not None
    assert again["eval_accuracy"] == summary["eval_accuracy"]


def test_shipped_example_config_parses_into_valid_flags() -> None:
    """examples/commonsense_dora.yaml: every key is a finetune flag and its values parse."""
    path = Path(__file__).resolve().parents[2] / "examples" / "commonsense_dora.yaml"
    args = parse_args(["finetune", "--config", str(path), "--model", "m", "--data", "d", "--output-dir", "o"])
    assert (args.method, args.rank, args.alpha, args.lr, args.epochs) == ("dora", 32, 64.0, 2e-4, 3.0)
    assert args.targets == ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
    assert args.train_on_inputs and args.gradient_checkpointing and args.precision == "bf16"


# ------------------------------------------------------------------ regressions from this session's review

def test_merge_of_a_classification_adapter_keeps_its_head_and_labels(minilm_path: Path, tmp_path: Path) -> None:
    """dorakit merge on a classifier: the head's label count comes from the adapter (3 labels here,
    the base config says 2), and the label names travel with the run."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    data = tmp_path / "three.jsonl"
    names = ["neg", "neutral", "pos"]
    data.write_text("".join(json.dumps({"text": t, "label": names[i % 3]}) + "\n" for i, t in enumerate(TEXTS)))
    out = tmp_path / "run"
    assert main(["finetune", "--model", str(minilm_path), "--data", str(data), "--output-dir", str(out),
                 "--method", "dora", "--rank", "4", "--max-steps", "2", "--batch-size", "4", "--max-len", "16",
                 "--device", "cpu"]) == 0
    assert json.loads((out / "final" / "labels.json").read_text()) == names
    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(minilm_path), "--adapter", str(out / "final"), "--output", str(merged)]) == 0
    enc = AutoTokenizer.from_pretrained(out / "final")(TEXTS[:3], padding=True, return_tensors="pt")
    plain = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    base = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=3).eval()
    dk.load_adapter(base, out / "final")
    with torch.no_grad():
        torch.testing.assert_close(plain(**enc).logits, base(**enc).logits, rtol=0, atol=1e-5)


def test_killed_run_keeps_its_delta_records_across_resume(lm: SimpleNamespace, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """ΔM/ΔD records up to the last checkpoint survive a crash; the resumed run adds the rest once."""
    argv = [*_finetune_argv(lm, tmp_path / "ref", "dora"), "--record-deltas", "1"]
    assert main(argv) == 0
    expected = sorted({r["step"] for r in json.loads((tmp_path / "ref" / "deltas.json").read_text())})
    real_train = recipes.train

    def crash_after_step_3(*args: object, callbacks: list, **kwargs: object) -> object:
        def boom(step: int, _: nn.Module) -> None:
            if step == 3:
                raise RuntimeError("simulated kill")
        return real_train(*args, callbacks=[*callbacks, boom], **kwargs)

    run = tmp_path / "crash"
    monkeypatch.setattr(recipes, "train", crash_after_step_3)
    with pytest.raises(RuntimeError, match="simulated kill"):
        main([*_finetune_argv(lm, run, "dora"), "--record-deltas", "1"])
    assert sorted({r["step"] for r in json.loads((run / "deltas.json").read_text())}) == [1, 2]  # checkpoint at 2
    monkeypatch.setattr(recipes, "train", real_train)
    assert main([*_finetune_argv(lm, run, "dora"), "--record-deltas", "1", "--resume"]) == 0
    steps = [r["step"] for r in json.loads((run / "deltas.json").read_text())]
    assert sorted(set(steps)) == expected == [1, 2, 3, 4]
    assert len(steps) == len(json.loads((tmp_path / "ref" / "deltas.json").read_text()))  # none twice


def test_classification_head_with_other_label_count_is_a_clear_error(minilm_path: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    from transformers import AutoModelForSequenceClassification

    two = tmp_path / "two-label-model"
    AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2).save_pretrained(two)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (minilm_path / f).exists():
            shutil.copy(minilm_path / f, two / f)
    data = tmp_path / "three.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": i % 3}) + "\n" for i, t in enumerate(TEXTS)))
    code = main(["finetune", "--model", str(two), "--data", str(data), "--output-dir", str(tmp_path / "r"),
                 "--method", "lora", "--max-steps", "1", "--device", "cpu"])
    assert code == 2 and "3 labels" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
