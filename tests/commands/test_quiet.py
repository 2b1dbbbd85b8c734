"""Quiet by default: ``finetune``, ``merge`` and ``eval`` print dorakit's own lines only; transformers' load
report (ANSI codes, and a misleading ``classifier.weight | MISSING`` in merge: the adapter restores the head)
and its progress bars appear only with ``--verbose``; nothing imports peft or bitsandbytes without a 4-bit base.

Output is captured at the file descriptors (capfd) and from logging (caplog): transformers' log handler
writes to the stderr of whenever it was set up, which in a test session may be another test's capture.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixtures_text import prompt_words, shared_task_file, word_tokenizer

from dorakit.commands.cli import main
from dorakit.training.data import load_records

pytestmark = pytest.mark.filterwarnings("ignore:the tokenizer has no pad token")
TEXTS = ["a wonderful and delightful film", "truly great acting", "a dull and boring mess", "terrible plot"]
NOISE = ("MISSING", "LOAD REPORT", "\x1b", "Loading weights", "Failed to load", "bitsandbytes")


def _noise(text: str) -> list[str]:
    return [n for n in NOISE if n in text]


@pytest.fixture
def classifier_run(minilm_path: Path, tmp_path: Path, capfd: pytest.CaptureFixture,
                   caplog: pytest.LogCaptureFixture) -> Path:
    data = tmp_path / "two.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": ["pos", "neg"][i // 2]}) + "\n"
                            for i, t in enumerate(TEXTS)))
    out = tmp_path / "run"
    assert main(["finetune", "--model", str(minilm_path), "--data", str(data), "--output-dir", str(out),
                 "--rank", "4", "--max-steps", "1", "--batch-size", "4", "--max-len", "16", "--device", "cpu"]) == 0
    captured = capfd.readouterr()
    assert "saved to" in captured.out and not _noise(captured.out + captured.err + caplog.text)
    return out


def test_merge_is_quiet_unless_verbose(minilm_path: Path, classifier_run: Path, tmp_path: Path,
                                       capfd: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture) -> None:
    argv = ["merge", "--model", str(minilm_path), "--adapter", str(classifier_run / "final")]
    caplog.clear()
    assert main([*argv, "--output", str(tmp_path / "quiet")]) == 0
    quiet = capfd.readouterr()
    assert quiet.out.strip() == f"merged model written to {tmp_path / 'quiet'}"
    assert not _noise(quiet.out + quiet.err + caplog.text), quiet.err + caplog.text
    assert main([*argv, "--output", str(tmp_path / "loud"), "--verbose"]) == 0
    loud = capfd.readouterr().err + caplog.text
    assert "LOAD REPORT" in loud and "classifier.weight" in loud  # the flag does show it


def test_eval_is_quiet_unless_verbose(tmp_path: Path, capfd: pytest.CaptureFixture,
                                      caplog: pytest.LogCaptureFixture) -> None:
    import transformers

    test_file = shared_task_file("boolq")
    records = load_records(test_file, purpose="eval")[:2]
    model_dir = tmp_path / "tiny-llama"
    tok = word_tokenizer(model_dir, prompt_words(records))
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(model_dir)
    capfd.readouterr()
    caplog.clear()
    argv = ["eval", "--model", str(model_dir), "--data", str(test_file), "--limit", "2", "--device", "cpu"]
    assert main(argv) == 0
    quiet = capfd.readouterr()
    assert "| loglik |" in quiet.out and not _noise(quiet.out + quiet.err + caplog.text), quiet.err
    assert main([*argv, "--verbose"]) == 0
    assert "Loading weights" in capfd.readouterr().err


def test_a_command_imports_neither_peft_nor_bitsandbytes(minilm_path: Path, classifier_run: Path,
                                                          tmp_path: Path) -> None:
    probe = ("import sys\nfrom dorakit.commands.cli import main\n"
             f"code = main(['merge', '--model', {str(minilm_path)!r}, '--adapter', {str(classifier_run / 'final')!r},"
             f" '--output', {str(tmp_path / 'merged')!r}])\n"
             "print('CODE', code, sorted(m for m in ('peft', 'bitsandbytes') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, check=False)
    assert proc.stdout.splitlines()[-1] == "CODE 0 []", proc.stderr
    assert not _noise(proc.stdout + proc.stderr), proc.stderr
