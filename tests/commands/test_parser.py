"""The command line explains itself: every flag of every subcommand has help text and shows its default,
finetune's flags are grouped, the top-level help lists every subcommand, and ``--help`` loads no torch."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from dorakit.commands import parser as flags

FINETUNE_GROUPS = ["model", "data", "adapter", "optimisation", "precision / speed", "run directory", "distributed"]


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    top = flags.build_parser()
    action = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _flags(p: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in p._actions if a.option_strings and a.dest != "help"]


def test_the_walk_sees_every_subcommand_and_many_flags() -> None:
    subs = _subparsers()
    assert sorted(subs) == sorted(flags.SUMMARIES)
    assert len(_flags(subs["finetune"])) > 40


@pytest.mark.parametrize("command", sorted(flags.SUMMARIES))
def test_every_flag_has_help_and_shows_its_default(command: str) -> None:
    p = _subparsers()[command]
    formatter = p._get_formatter()
    for action in _flags(p):
        assert action.help and action.help.strip(), f"dorakit {command} {action.option_strings[0]} has no help"
        shown = formatter._get_help_string(action) or ""
        if not action.required and action.default is not None:
            assert "%(default)" in shown, f"dorakit {command} {action.option_strings[0]} hides its default"
    text = p.format_help()
    assert "(default: None)" not in text


def test_finetune_flags_are_grouped_and_say_the_default_step_count() -> None:
    p = _subparsers()["finetune"]
    titled = {g.title: [a.dest for a in g._group_actions] for g in p._action_groups}
    assert [t for t in titled if t in FINETUNE_GROUPS] == FINETUNE_GROUPS
    assert not [d for d in titled.get("options", []) if d != "help"]  # nothing left ungrouped
    text = p.format_help()
    assert "Without --max-steps or --epochs a run takes 100 optimizer steps" in text
    assert "(default: 100)" in text


def test_top_level_help_lists_every_subcommand_with_its_summary(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stop:
        flags.build_parser().parse_args(["--help"])
    assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the summaries
    for name, summary in flags.SUMMARIES.items():
        assert f"{name} {summary}" in text


@pytest.mark.parametrize("code", ["import dorakit.commands.cli",
                                  "from dorakit.commands.cli import main; main(['finetune', '--help'])",
                                  "from dorakit.commands.cli import main; main(['--help'])"])
def test_the_command_line_and_its_help_import_no_torch(code: str) -> None:
    probe = (f"import sys\ntry:\n    {code}\nexcept SystemExit:\n    pass\n"
             "heavy = sorted(m for m in ('torch', 'transformers', 'peft', 'bitsandbytes') if m in sys.modules)\n"
             "print('HEAVY', heavy)")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "HEAVY []"


def test_repeated_adapter_flags_from_the_command_line_and_a_config_file(tmp_path) -> None:
    """--adapter [NAME=]DIR repeats (a bare DIR is "default"); a config file's list gives one flag per item."""
    args = flags.parse_args(["generate", "--model", "m", "--adapter", "a", "--adapter", "math=runs/x=1", "--prompt", "p"])
    assert args.adapter == [("default", "a"), ("math", "runs/x=1")]
    config = tmp_path / "gen.yaml"
    config.write_text("adapter: [default=a, code=b]\nuse: code\n")
    args = flags.parse_args(["generate", "--config", str(config), "--model", "m", "--prompt", "p"])
    assert args.adapter == [("default", "a"), ("code", "b")] and args.use == "code"
