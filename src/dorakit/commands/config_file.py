"""``--config FILE``: a YAML or TOML mapping whose keys are a command's flags, turned into command-line
flags placed before the real ones (which therefore win)."""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path
from typing import Any


def read_config_file(path: str) -> dict[str, Any]:
    """A YAML (.yaml/.yml) or TOML (.toml) mapping of flag name -> value."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--config {path}: no such file.")
    text = file.read_text()
    if file.suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"--config {path}: invalid TOML ({e}).") from None
    elif file.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"--config {path}: invalid YAML ({e}).") from None
    else:
        raise ValueError(f"--config {path}: use a .yaml, .yml or .toml file.")
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of flag names to values, got {type(data).__name__}.")
    return data


def config_argv(sub: argparse.ArgumentParser, data: dict[str, Any], path: str) -> list[str]:
    """The config file as command-line flags (placed before the real ones, which therefore win)."""
    actions = {a.dest: a for a in sub._actions if a.option_strings and a.dest not in ("help", "config")}
    argv: list[str] = []
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        action = actions.get(dest)
        if action is None:
            valid = ", ".join(sorted(d.replace("_", "-") for d in actions))
            raise ValueError(f"--config {path}: {key!r} is not a flag of this command; valid keys: {valid}.")
        flag = action.option_strings[0]
        if value is None:  # YAML `key: null` (or `~`): keep the flag's default
            continue
        if isinstance(action, argparse.BooleanOptionalAction) or isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise ValueError(f"--config {path}: {key!r} must be true or false, got {value!r}.")
            if value or isinstance(action, argparse.BooleanOptionalAction):
                argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list) and isinstance(action, argparse._AppendAction):  # e.g. adapter: [a=x, b=y]
            argv += [part for item in value for part in (flag, str(item))]
        elif isinstance(value, list):
            argv += [flag, *map(str, value)]
        elif isinstance(value, dict):
            raise ValueError(f"--config {path}: {key!r} must be a value or a list, not a mapping.")
        else:
            argv += [flag, str(value)]
    return argv
