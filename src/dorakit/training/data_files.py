"""Reading a data file's rows: a .json list, a .jsonl file or a ``datasets`` directory, each row with
where it came from (file, record, line) for the errors, and every file checked before it is read
(regular file, size, UTF-8)."""

from __future__ import annotations

import codecs
import json
import os
import stat
from pathlib import Path
from typing import Any

FORMATS = "a .json file holding a list of records, a .jsonl file (one record per line), " \
          "or a directory written by datasets' save_to_disk"


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file, the record and the fix."""


def read_rows(path: str | Path, split: str = "train") -> list[tuple[str, Any]]:
    """Raw rows of a data file as ``(where, object)``; ``where`` reads like "data.json, record 3 (line 17)".

    ``path`` is a .json list, a .jsonl file, a directory holding ``{split}.json`` / ``{split}.jsonl``
    (the LLM-Adapters ``dataset/<task>/`` layout), or a ``save_to_disk`` directory (``split`` picks the
    split of a DatasetDict).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {path} does not exist; pass {FORMATS}.")
    if path.is_dir():
        for name in (f"{split}.json", f"{split}.jsonl"):
            if (path / name).is_file():
                return read_rows(path / name, split)
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            return _read_datasets_dir(path, split)
        raise DataError(f"directory {path} holds neither {split}.json, {split}.jsonl nor a dataset saved "
                        f"with datasets' save_to_disk; pass {FORMATS}.")
    text = read_data_text(path)
    if not text.strip():
        raise DataError(f"{path} is empty; it must hold at least one record ({FORMATS}).")
    if path.suffix == ".json":
        rows = _read_json_list(path, text)
    elif path.suffix == ".jsonl":
        rows = _read_jsonl(path, text)
    else:
        raise DataError(f"{path}: unknown extension {path.suffix!r}; pass {FORMATS}.")
    if not rows:
        raise DataError(f"{path} holds no records; it must hold at least one.")
    return rows


MAX_DATA_BYTES = 4 * 2**30
"""Largest .json / .jsonl data file read (4 GiB; its records take several times that in memory): a larger
one is refused; save bigger data with datasets' save_to_disk, which is read without loading it whole."""


def read_data_text(path: Path, limit: int = MAX_DATA_BYTES, what: str = FORMATS) -> str:
    """A data file's text: checked to be a regular file of at most ``limit`` bytes before it is read (a
    FIFO would block, /dev/zero never end), decoded as UTF-8 with an optional byte-order mark. ``what``
    names the file expected, in the errors (default: a data file)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # non-blocking: opening a FIFO must not wait for a writer
    except OSError as e:
        raise DataError(f"{path}: cannot open it ({e.strerror}); pass a readable file ({what}).") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise DataError(f"{path} is not a regular file (a FIFO, device or socket); pass {what}.")
        if info.st_size > limit and what != FORMATS:
            raise DataError(f"{path} is {info.st_size:,d} bytes, more than the {limit:,d} read; pass {what}.")
        if info.st_size > limit:
            raise DataError(f"{path} is {info.st_size:,d} bytes, more than the {limit:,d} read from a .json / .jsonl "
                            "file; split it, or save it with datasets' save_to_disk and pass that directory.")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise DataError(f"{path} grew past {limit:,d} bytes while it was read; pass a file that is not being written.")
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0  # what Windows editors put first
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        start = bom + e.start  # byte offset in the file
        line = data.count(b"\n", 0, start) + 1
        record = ""
        if path.suffix == ".jsonl":
            before = data[:start].split(b"\n")[:-1]
            record = f"record {sum(1 for ln in before if ln.strip())}, "
        raise DataError(f"{path}, {record}line {line} (byte offset {start}): byte {data[start]:#04x} is not UTF-8 "
                        "text; save the file as UTF-8.") from None


def _line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _read_json_list(path: Path, text: str) -> list[tuple[str, Any]]:
    """Parse a JSON list element by element, so each record knows the line it starts on."""
    decoder = json.JSONDecoder()
    pos = len(text) - len(text.lstrip())
    if text[pos] != "[":
        hint = " (one object per line is JSONL: rename the file to .jsonl)" if text[pos] == "{" else ""
        raise DataError(f"{path}, line {_line(text, pos)}: a .json data file must be a list of records "
                        f"[{{...}}, ...]{hint}.")
    rows: list[tuple[str, Any]] = []
    pos, line, counted = pos + 1, 1, 0  # line number of text[counted], kept incrementally: O(file size)
    while True:
        pos = _skip_space(text, pos)
        if pos < len(text) and text[pos] == "]" and not rows:
            return rows
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, record {len(rows)} (line {e.lineno}, column {e.colno}): invalid JSON: "
                            f"{e.msg}; fix the JSON syntax there.") from None
        line, counted = line + text.count("\n", counted, pos), pos
        rows.append((f"{path}, record {len(rows)} (line {line})", obj))
        pos = _skip_space(text, end)
        if pos < len(text) and text[pos] == "]":
            if text[pos + 1:].strip():
                raise DataError(f"{path}, line {_line(text, pos + 1)}: text after the closing ']'; "
                                f"remove it.")
            return rows
        if pos >= len(text) or text[pos] != ",":
            raise DataError(f"{path}, line {_line(text, min(pos, len(text) - 1))}: expected ',' or ']' after "
                            f"record {len(rows) - 1}; fix the JSON syntax there.")
        pos += 1


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _read_jsonl(path: Path, text: str) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, record {len(rows)} (line {lineno})"
        try:
            rows.append((where, json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON at column {e.colno}: {e.msg}; each line of a .jsonl file "
                            f"must be one complete JSON object.") from None
    return rows


def _read_datasets_dir(path: Path, split: str) -> list[tuple[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path} was written by datasets' save_to_disk, but the `datasets` package is not "
                        f"installed; pip install datasets, or export the data to .json/.jsonl.") from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path} has splits {sorted(ds)}, not {split!r}; pick one of those.")
        ds = ds[split]
    return [(f"{path}, {split} row {i}", row) for i, row in enumerate(ds)]
