"""Value types of the ``dorakit`` command line's flags: each checks its value when the command line is
parsed, so a bad value is one line and exit 2 before anything is loaded (no torch imported here, except
by ``device`` when it is called)."""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

def integer(low: int, example: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}; e.g. {example}")
        return value
    parse.__name__ = f"integer >= {low}"
    return parse


def number(low: float, example: str, above: bool = False, below: float | None = None) -> Callable[[str], float]:
    """An argparse type: a finite float >= ``low`` (> with ``above``; < ``below`` if given)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        ok = math.isfinite(value) and (value > low if above else value >= low) and (below is None or value < below)
        if not ok:
            bounds = f"{'>' if above else '>='} {low:g}" + (f" and < {below:g}" if below is not None else "")
            raise argparse.ArgumentTypeError(f"must be a finite number {bounds}, got {text!r}; e.g. {example}")
        return value
    parse.__name__ = "number"
    return parse


def device(text: str) -> str:
    """An argparse type: "auto" or a torch device this machine has (torch is imported only here)."""
    from ..training.distributed import DistributedError, check_device

    try:
        return check_device(text)
    except DistributedError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--device ")) from None


class ReportTo(argparse.Action):
    """--report-to: comma- or space-separated tracker names, each checked (known, library installed)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        from ..training.trackers import TrackerError, check_report_to

        names = [n for v in ([values] if isinstance(values, str) else values) for n in v.split(",") if n]
        try:
            setattr(namespace, self.dest, check_report_to(names))
        except TrackerError as e:
            raise argparse.ArgumentError(self, str(e).removeprefix(f"{self.option_strings[0]} ")) from None


def unit_interval(text: str) -> float:
    """An argparse type: a number in (0, 1] (--top-p)."""
    value = number(0, "0.9", above=True)(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be a number > 0 and <= 1, got {text!r}; e.g. 0.9")
    return value


def existing_file(text: str) -> str:
    """An argparse type: a file that exists."""
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text!r}; pass a Jinja chat template file")
    return text


ADAPTER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}")
"""A valid adapter name (the rule of dorakit.adapters.multi, repeated here so --help loads no torch)."""


def adapter_spec(text: str) -> tuple[str, str]:
    """An argparse type: --adapter DIR (the adapter named "default") or --adapter NAME=DIR, as (name, dir)."""
    name, sep, directory = text.partition("=")
    if not sep:
        return "default", text
    if not ADAPTER_NAME.fullmatch(name) or not directory:
        raise argparse.ArgumentTypeError(
            f"expected DIR or NAME=DIR with NAME 1-64 letters, digits, '_' or '-' and a directory, got {text!r}; "
            "e.g. --adapter math=runs/math/final (a directory whose path has '=' in it: default=PATH)")
    return name, directory


def prompt_file(text: str) -> str:
    """An argparse type: a JSONL file that exists (its records are checked when it is read)."""
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text!r}; pass a JSONL file of {{\"prompt\": ...}} or "
                                         "{\"messages\": [...]} records, each with an optional \"adapter\"")
    return text
