"""Local transformers models for the commands: which task a model directory holds, loading it (and its
tokenizer) with an optional 4-bit / 8-bit base, and merging an adapter into a saved copy. Nothing is
fetched from a hub (``from_pretrained(dir, local_files_only=True)``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters.inject import merge_and_unload
from ..formats.dispatch import load_adapter

TASKS = ("auto", "causal", "classify")
HEAD_NAMES = ("classifier", "score")


class RecipeError(ValueError):
    """A command-line input that cannot work (the message names it and the fix)."""


def model_task(model_dir: str | os.PathLike, task: str) -> str:
    """"causal" or "classify" for a local transformers model directory (checked)."""
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise RecipeError(f"{path}: not a transformers model directory (no config.json). Pass the directory that "
                          "save_pretrained wrote (config.json + weights).")
    if task not in TASKS:
        raise RecipeError(f"--task must be one of {TASKS}, got {task!r}.")
    if task != "auto":
        return task
    try:
        arch = json.loads((path / "config.json").read_text()).get("architectures") or []
    except (json.JSONDecodeError, AttributeError) as e:
        raise RecipeError(f"{path / 'config.json'} is not a valid transformers config ({e}); pass a directory that "
                          "save_pretrained wrote.") from None
    return "causal" if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in arch) else "classify"


def load_model(model_dir: str | os.PathLike, task: str, num_labels: int | None = None,
               dtype: torch.dtype = torch.float32, load_in_4bit: bool = False,
               device: torch.device | None = None, load_in_8bit: bool = False) -> tuple[nn.Module, Any]:
    """(model, tokenizer) from a local directory; no network access.

    ``load_in_4bit`` quantizes the linear layers to NF4 with double quantization (QLoRA's data
    type, through bitsandbytes) on ``device``; adapters applied afterwards are QLoRA / QDoRA.
    ``load_in_8bit`` quantizes them to int8 (LLM.int8(), transformers' defaults) instead.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    path = str(model_dir)
    kw: dict[str, Any] = {"local_files_only": True, "dtype": dtype}
    if load_in_4bit or load_in_8bit:
        from transformers import BitsAndBytesConfig

        from ..adapters.quant import require_bitsandbytes

        require_bitsandbytes()
        compute = torch.bfloat16 if device is not None and device.type == "cuda" else torch.float32
        # NF4 codes in bitsandbytes' default uint8 storage: the dtype FSDP2 shards (distributed.wrap)
        config = BitsAndBytesConfig(load_in_8bit=True) if load_in_8bit else BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute, bnb_4bit_quant_storage=torch.uint8)
        kw |= {"quantization_config": config, "device_map": {"": str(device or "cpu")}}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if task == "causal":
            model = AutoModelForCausalLM.from_pretrained(path, **kw)
        else:
            labels_kw = {} if num_labels is None else {"num_labels": num_labels}
            model = AutoModelForSequenceClassification.from_pretrained(path, **labels_kw, **kw)
    except RuntimeError as e:  # e.g. a saved classification head with another number of labels
        raise RecipeError(f"{path}: cannot load it as a {task} model with {num_labels} labels ({e}). Use a base "
                          "without a classification head, or data with the head's label set.") from None
    except (OSError, ValueError, KeyError) as e:
        raise RecipeError(f"{path}: cannot load a transformers {task} model and tokenizer from it ({e}).") from None
    return model, tokenizer


def _head_labels(adapter_dir: str) -> int | None:
    """The label count of a classification head saved in an adapter (modules_to_save), if any."""
    from ..formats.io import read_adapter

    for key, tensor in read_adapter(adapter_dir).tensors.items():
        if key.rpartition(".")[0].rsplit(".", 1)[-1] in HEAD_NAMES and key.endswith(".weight") and tensor.dim() == 2:
            return int(tensor.shape[0])
    return None


def merge(model_dir: str, adapter_dir: str, output_dir: str, task: str = "auto") -> Path:
    """Fold an adapter into its base and save a plain transformers model directory (+ tokenizer)."""
    out = Path(output_dir)
    if out.exists() and any(out.iterdir()):
        raise RecipeError(f"{out} exists and is not empty; choose a new --output directory (nothing is overwritten).")
    kind = model_task(model_dir, task)
    model, tokenizer = load_model(model_dir, kind, num_labels=_head_labels(adapter_dir) if kind == "classify" else None)
    load_adapter(model, adapter_dir)
    merge_and_unload(model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
