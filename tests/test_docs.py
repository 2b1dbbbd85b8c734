"""The manual cannot rot: it builds with MkDocs in strict mode, and every code block in it runs.

Which blocks run, and how (the convention the docs follow; docs/design.md points here):

* Every ```python, ```bash, ```shell and ```sh block of README.md and docs/*.md runs, in page order,
  in a fresh temporary working directory per page that holds what the docs call a user's files:
  ``./my-model`` (a tiny transformers LLaMA with its tokenizer), ``./my-data.json`` (LLM-Adapters
  training records) and ``./commonsense/boolq/test.json`` (test records with answers). So the docs show
  the commands a user types, unchanged; only the model and data behind the names are tiny.
* The python blocks of one page share one namespace, in order. A shell block is a list of
  ``dorakit ...`` commands (``\\`` continues a line, ``#`` starts a comment); each runs in-process
  through ``dorakit.commands.cli.main`` and must exit 0. Any other command needs a skip marker.
* A block that cannot run on a CPU CI machine says so right above its fence:
  ``<!-- test: skip reason="needs 2 GPUs" -->``. A block that needs an optional package says
  ``<!-- test: requires=bitsandbytes -->``; it runs where that package is installed and is reported
  as skipped elsewhere. A skip marker without a reason, or a fence without a language, fails.
* Every ``--flag`` that the docs write after ``dorakit <command>`` (in a block or inline code), and
  every inline ``--flag`` in a ``## dorakit <command>`` section of docs/cli.md, exists in that
  command's argparse parser.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shlex
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fixtures_text import prompt_words, word_tokenizer

from dorakit.training.data import load_records

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN_LANGS = {"python", "bash", "shell", "sh"}
DATA_LANGS = {"json", "yaml", "toml", "text"}
FENCE = re.compile(r"^```(\S*)\s*$")
MARKER = re.compile(r"^<!--\s*test:(.*?)-->\s*$")

# The tiny model's 16-wide k/v projections are narrower than the rank the CLI page shows (32, the paper's);
# dorakit warns about that, rightly, and the tiny tokenizer has no pad token on purpose.
pytestmark = [pytest.mark.filterwarnings("ignore:the tokenizer has no pad token"),
              pytest.mark.filterwarnings("ignore:module .* exceeds min\\(out, in\\)")]


@dataclass
class Block:
    page: str    # path relative to the repository root
    line: int    # line of the opening fence, 1-based
    lang: str
    code: str
    skip: str | None = None      # the reason, if marked skip
    requires: str | None = None  # an optional package the block needs

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def _marker(line: str, where: str) -> dict[str, str]:
    """``<!-- test: skip reason="..." -->`` -> {"skip": "...", ...}."""
    body = MARKER.match(line).group(1)  # type: ignore[union-attr]
    fields = dict(re.findall(r'(\w+)="([^"]*)"', body)) | dict(re.findall(r'(\w+)=([^"\s]+)', body))
    words = set(re.sub(r'\w+=("[^"]*"|\S+)', "", body).split())
    if "skip" in words:
        fields["skip"] = fields.pop("reason", "")
    unknown = (words - {"skip"}) | (set(fields) - {"skip", "requires"})
    assert not unknown, f"{where}: unknown test marker {sorted(unknown)}"
    return fields


def parse_blocks(path: Path, root: Path = ROOT) -> list[Block]:
    """Every fenced block of a markdown file, with the marker on the line above its fence."""
    rel = str(path.relative_to(root))
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, lang = i, m.group(1)
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
        assert end is not None, f"{rel}:{start + 1}: unclosed code fence"
        prev = lines[start - 1] if start > 0 else ""
        mark = _marker(prev, f"{rel}:{start}") if MARKER.match(prev) else {}
        blocks.append(Block(rel, start + 1, lang, "\n".join(lines[start + 1:end]) + "\n",
                            mark.get("skip"), mark.get("requires")))
        i = end + 1
    return blocks


def shell_commands(code: str) -> list[list[str]]:
    """The commands of a shell block: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n", " ", code)
    return [argv for line in joined.splitlines() if (argv := shlex.split(line, comments=True))]


ALL_BLOCKS = [b for page in PAGES for b in parse_blocks(page)]


# ------------------------------------------------------------------------------------------- the build

def test_mkdocs_build_is_strict_and_clean(tmp_path: Path) -> None:
    """``mkdocs build --strict`` (mkdocs.yml: strict, validation of links and anchors) succeeds.

    Not ``-q``: mkdocs counts warnings for --strict only at the log level it prints them.
    """
    pytest.importorskip("mkdocs", reason="mkdocs is in the test extra: pip install -e '.[test]'")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "index.html").is_file()


def test_mkdocs_strict_build_fails_on_a_broken_link(tmp_path: Path) -> None:
    """Negative control: the same config on a copy of docs/ with one broken anchor fails."""
    pytest.importorskip("mkdocs", reason="mkdocs is in the test extra: pip install -e '.[test]'")
    import shutil

    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    with open(tmp_path / "docs" / "errors.md", "a", encoding="utf-8") as f:
        f.write("\n[broken](speed.md#no-such-anchor)\n")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "no-such-anchor" in result.stdout + result.stderr


def test_readme_links_point_at_existing_files() -> None:
    """The README is not part of the MkDocs build, so its relative links are checked here."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    assert targets, "the README links into the manual"
    missing = [t for t in targets if "://" not in t and not (ROOT / t).exists()]
    assert not missing, f"README links to missing files: {missing}"


# ------------------------------------------------------------------------------------ every block counted

def test_every_block_is_run_or_marked_with_a_reason(capsys: pytest.CaptureFixture) -> None:
    problems, reasons = [], Counter()
    for b in ALL_BLOCKS:
        if b.lang not in RUN_LANGS | DATA_LANGS:
            problems.append(f"{b.where}: fence language {b.lang!r} (use one of {sorted(RUN_LANGS | DATA_LANGS)})")
        elif b.skip is not None:
            if not b.skip.strip():
                problems.append(f"{b.where}: skip marker without a reason")
            reasons[b.skip] += 1
        elif b.lang in RUN_LANGS - {"python"}:
            bad = [argv[0] for argv in shell_commands(b.code) if argv[0] != "dorakit"]
            if bad:
                problems.append(f"{b.where}: runs {bad}: only dorakit commands run here; mark the block skip")
    assert not problems, "\n".join(problems)
    code = [b for b in ALL_BLOCKS if b.lang in RUN_LANGS]
    run = [b for b in code if b.skip is None]
    with capsys.disabled():
        print(f"\ndocs code blocks: {len(code)}, run {len(run)} "
              f"({sum(b.requires is not None for b in run)} only where an optional package is installed), "
              f"skipped {len(code) - len(run)}:")
        for reason, n in sorted(reasons.items()):
            print(f"  {n} x {reason}")
    assert run, "no block runs"


def test_readme_starts_with_the_two_commands() -> None:
    """README's first two blocks are the install-and-demo line and the test line that CI runs."""
    first, second = parse_blocks(ROOT / "README.md")[:2]
    assert first.code.startswith("python3 -m venv .venv") and first.code.rstrip().endswith("dorakit demo")
    assert second.code == "python -m pytest -q\n"


# -------------------------------------------------------------------------------------------- run them

@pytest.fixture(scope="module")
def user_files(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """What the docs call a user's files: ./my-model, ./my-data.json, ./commonsense/boolq/test.json."""
    import transformers

    root = tmp_path_factory.mktemp("user")
    facts = [("is water wet", "true"), ("is fire cold", "false"), ("do birds fly", "true"),
             ("is ice hot", "false"), ("is the sky blue", "true"), ("do fish walk", "false")]
    train = [{"instruction": f"Please answer with true or false: {q}?", "input": "",
              "output": f"the correct answer is {a}"} for q, a in facts]
    test = [dict(r, answer=a) for r, (_, a) in zip(train[:3], facts, strict=False)]
    (root / "my-data.json").write_text(json.dumps(train, indent=4))
    (root / "commonsense" / "boolq").mkdir(parents=True)
    (root / "commonsense" / "boolq" / "test.json").write_text(json.dumps(test, indent=4))
    records = load_records(root / "my-data.json") + load_records(root / "commonsense/boolq/test.json", purpose="eval")
    model_dir = root / "my-model"
    tok = word_tokenizer(model_dir, prompt_words(records) + ["the correct answer is true false"])
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=0, eos_token_id=1, pad_token_id=None)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(model_dir)
    return SimpleNamespace(root=root, names=["my-model", "my-data.json", "commonsense"])


def _run_shell(block: Block) -> None:
    from dorakit.commands.cli import main

    for argv in shell_commands(block.code):
        try:
            code = main(argv[1:])
        except SystemExit as e:  # argparse exits on a bad flag
            code = e.code
        assert code == 0, f"{block.where}: `{shlex.join(argv)}` exited {code}"


@pytest.mark.parametrize("page", [p for p in PAGES if any(b.lang in RUN_LANGS for b in parse_blocks(p))],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_page_code_blocks_run(page: Path, user_files: SimpleNamespace, tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    for name in user_files.names:
        (tmp_path / name).symlink_to(user_files.root / name)
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__docs__"}
    missing = []
    for block in parse_blocks(page):
        if block.lang not in RUN_LANGS or block.skip is not None:
            continue
        if block.requires and importlib.util.find_spec(block.requires) is None:
            missing.append(f"{block.where} needs {block.requires}")
            continue
        if block.lang == "python":
            exec(compile(block.code, block.where, "exec"), namespace)  # noqa: S102
        else:
            _run_shell(block)
    if missing:
        pytest.skip("; ".join(missing))


# ------------------------------------------------------------------------------------- flags in the docs

def _subparsers() -> dict[str, argparse.ArgumentParser]:
    from dorakit.commands import cli

    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _mentions(page: Path, root: Path = ROOT) -> list[tuple[str, str, str]]:
    """(where, subcommand, --flag) for every flag the page writes after ``dorakit <subcommand>``."""
    rel = str(page.relative_to(root))
    text = page.read_text(encoding="utf-8")
    found = []
    snippets = [b.code for b in parse_blocks(page, root) if b.lang in RUN_LANGS - {"python"}]
    snippets += re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    for snippet in snippets:
        for line in re.sub(r"\\\n", " ", snippet).splitlines():
            for m in re.finditer(r"\bdorakit (\w[\w-]*)((?:\s+[^\s#]+)*)", line):
                found += [(rel, m.group(1), f) for f in re.findall(r"(?<!\S)(--[a-z][\w-]*)", m.group(2))]
    if page.name == "cli.md":  # a `--flag` anywhere in a "## dorakit <command>" section is that command's
        for section in re.split(r"^## ", text, flags=re.M)[1:]:
            head = re.match(r"dorakit (\w+)", section)
            if head:
                found += [(rel, head.group(1), f) for f in re.findall(r"`(--[a-z][\w-]*)", section)]
    return found


def test_every_flag_in_the_docs_exists() -> None:
    parsers = _subparsers()
    mentions = [m for page in PAGES for m in _mentions(page)]
    assert len(mentions) > 30, "the flag scan found too little to be checking anything"
    wrong = sorted({f"{where}: dorakit {cmd} {flag}" for where, cmd, flag in mentions
                    if cmd not in parsers or flag not in parsers[cmd]._option_string_actions})
    assert not wrong, "flags the docs name that the parser does not have:\n" + "\n".join(wrong)


def test_flag_check_catches_an_unknown_flag(tmp_path: Path) -> None:
    """Negative control for the scan above."""
    page = tmp_path / "page.md"
    page.write_text("Run `dorakit finetune --model m --no-such-flag 3`.\n")
    mentions = _mentions(page, root=tmp_path)
    parsers = _subparsers()
    assert ("page.md", "finetune", "--no-such-flag") in mentions
    assert "--no-such-flag" not in parsers["finetune"]._option_string_actions
