"""``dorakit generate --prompt-file``: a JSONL batch in which each record picks its own adapter.

A record is ``{"prompt": TEXT}`` or ``{"messages": [{"role": ..., "content": ...}, ...]}`` with an optional
``"adapter": NAME`` (one of the ``--adapter NAME=DIR`` names; ``null`` for the base model; absent: ``--use``,
else "default" or the first adapter), as a request names its adapter in vLLM's OpenAI server (``"model"``)
or LoRAX (``"adapter_id"``). The file is read and checked before the model loads. Records are left-padded
into batches of ``--batch-size`` and generated together, each row through its own adapter
(``adapters.multi.generate``, i.e. ``adapter_routing``); each answer is printed as the record plus
``"output"``, one JSON line per record, in the file's order.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import nn

from ..adapters.fast_path import cached_norms
from ..training.recipes import RecipeError
from .generate import (Sampling, adapter_names, chat_template, default_adapter, encode_chat, encode_plain,
                       generation_config, load_for_generation)

UNSET = object()


def _check_record(record: object, names: list[str], where: str) -> dict[str, Any]:
    """One parsed line: exactly one of "prompt" / "messages", and a known "adapter" (or null / none)."""
    if not isinstance(record, dict):
        raise RecipeError(f"{where}: expected a JSON object such as {{\"prompt\": \"...\", \"adapter\": \"math\"}}, "
                          f"got {type(record).__name__}.")
    keys = [k for k in ("prompt", "messages") if k in record]
    if len(keys) != 1:
        raise RecipeError(f"{where}: a record needs exactly one of \"prompt\" (text) or \"messages\" (a chat), "
                          f"got keys {sorted(record)}.")
    text = record[keys[0]]
    ok = isinstance(text, str) if keys[0] == "prompt" else (
        isinstance(text, list) and text and all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in text))
    if not ok:
        raise RecipeError(f"{where}: \"prompt\" must be text and \"messages\" a non-empty list of "
                          "{\"role\": ..., \"content\": ...} objects.")
    adapter = record.get("adapter", UNSET)
    if adapter is not UNSET and adapter is not None and adapter not in names:
        known = f"the --adapter names are {names}" if names else "no --adapter was given"
        raise RecipeError(f"{where}: adapter {adapter!r} is not loaded ({known}); add --adapter {adapter}=DIR, or "
                          "use null for the base model.")
    return record


def read_prompt_file(path: str, names: list[str]) -> list[dict[str, Any]]:
    """The records of a --prompt-file, each checked (see module doc); at least one."""
    records = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"--prompt-file {path}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise RecipeError(f"{where}: not JSON ({e.msg}); write one JSON object per line.") from None
        records.append(_check_record(record, names, where))
    if not records:
        raise RecipeError(f"--prompt-file {path}: no records; write one {{\"prompt\": \"...\"}} object per line.")
    return records


def _encode(tokenizer: Any, record: dict[str, Any], template: str | None) -> list[int]:
    if "messages" in record:
        if template is None:
            raise RecipeError("a --prompt-file record has \"messages\", which need a chat template; the tokenizer has "
                              "none (or --plain was given): pass --chat-template FILE, or write \"prompt\" records.")
        return encode_chat(tokenizer, record["messages"], template)[0].tolist()
    if template is not None:
        return encode_chat(tokenizer, [{"role": "user", "content": record["prompt"]}], template)[0].tolist()
    return encode_plain(tokenizer, record["prompt"])[0].tolist()


def _left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, T): each row right-aligned, so generation continues every row."""
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


@torch.no_grad()
def generate_rows(model: nn.Module, tokenizer: Any, rows: list[list[int]], names: list[str | None],
                  sampling: Any) -> list[list[int]]:
    """The new token ids of each prompt, row i through adapter ``names[i]`` (None: the base), in one batch."""
    from ..adapters.multi import generate

    config = generation_config(model, tokenizer, sampling)
    ids, mask = _left_padded(rows, config.pad_token_id if config.pad_token_id is not None else 0)
    device = next(model.parameters()).device
    with cached_norms(model):
        out = generate(model, ids.to(device), attention_mask=mask.to(device), generation_config=config,
                       adapter_names=names)
    eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    answers = []
    for row in out[:, ids.shape[1]:].tolist():  # drop what follows the first EOS (the row's padding)
        stop = next((i for i, t in enumerate(row) if t in eos), None)
        answers.append(row if stop is None else row[:stop + 1])
    return answers


def run_batch(model: nn.Module, tokenizer: Any, template: str | None, sampling: Any, records: list[dict[str, Any]],
              batch_size: int, default: str | None, out: TextIO | None = None) -> None:
    """Each record answered by its own adapter, ``batch_size`` records per generate(); JSON lines to ``out``
    (default: stdout)."""
    out = sys.stdout if out is None else out
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        names = [r.get("adapter", default) for r in chunk]
        answers = generate_rows(model, tokenizer, [_encode(tokenizer, r, template) for r in chunk], names, sampling)
        for record, name, new in zip(chunk, names, answers):
            text = tokenizer.decode(new, skip_special_tokens=True).strip()
            out.write(json.dumps({**record, "adapter": name, "output": text}, ensure_ascii=False) + "\n")
        out.flush()


def run_prompt_file(args: Any) -> int:
    """``dorakit generate --prompt-file``: the records are checked before the model loads."""
    from ..training.distributed import single_device

    records = read_prompt_file(args.prompt_file, adapter_names(args))
    model, tokenizer = load_for_generation(args.model, args.adapter, False, single_device(args.device))
    template = None if args.plain else chat_template(tokenizer, args.chat_template)
    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.seed)
    torch.manual_seed(sampling.seed)
    run_batch(model, tokenizer, template, sampling, records, args.batch_size or 8, default_adapter(args))
    return 0
