"""``dorakit generate``: talk to a local causal LM, optionally with adapters, streaming to the terminal.

The model loads as ``dorakit eval`` loads it (training.recipes.load_model, then formats.load_adapter, once
per ``--adapter [NAME=]DIR``); the adapters stay unmerged (their layers compute W0 x + DoRA's update, with
the norms computed once per answer inside ``cached_norms``) unless ``merge`` folds the one adapter into the
base weights. --prompt / --chat run one adapter (``--use``) through transformers' ``model.generate`` with a
``TextStreamer``; a --prompt-file batch runs each record's adapter in one mixed batch (batch.py, which
builds on this module).
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import nn

from ..adapters.fast_path import cached_norms
from ..training.recipes import RecipeError

EXIT_WORDS = ("/exit", "/quit")


@dataclass(frozen=True)
class Sampling:
    """How the next tokens are chosen (the CLI's sampling flags)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    """0: greedy decoding; > 0: sample from softmax(logits / temperature)."""
    top_p: float | None = None
    top_k: int | None = None
    seed: int = 0


def load_for_generation(model_dir: str, adapter: str | Sequence[tuple[str, str]] | None = None, merge: bool = False,
                        device: torch.device | str = "cpu") -> tuple[nn.Module, Any]:
    """(model, tokenizer) of a local causal LM in eval mode with ``adapter`` applied: one directory, or
    (name, directory) pairs loaded as named adapters (the first one active); ``merge`` folds the one in."""
    from ..adapters.inject import merge_and_unload
    from ..formats.dispatch import load_adapter
    from ..training.models import load_model, model_task

    if model_task(model_dir, "auto") != "causal":
        raise RecipeError(f"{model_dir}: dorakit generate needs a causal language model; this one is not.")
    model, tokenizer = load_model(model_dir, "causal")
    pairs = [("default", adapter)] if isinstance(adapter, str) else list(adapter or [])
    for name, directory in pairs:  # one for another base fails with an AdapterFileError naming the directory
        load_adapter(model, directory, name=name)
    if pairs and merge:
        merge_and_unload(model)
    return model.to(device).eval(), tokenizer


def chat_template(tokenizer: Any, template_file: str | None) -> str | None:
    """The Jinja chat template to render messages with: ``template_file``'s, else the tokenizer's, else None."""
    if template_file:
        return Path(template_file).read_text()
    return getattr(tokenizer, "chat_template", None) or None


def encode_chat(tokenizer: Any, messages: list[dict[str, str]], template: str) -> torch.Tensor:
    """The conversation rendered with ``template`` and the assistant's turn opened: ids of shape (1, T)."""
    text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]  # the template has BOS


def encode_plain(tokenizer: Any, prompt: str) -> torch.Tensor:
    """``prompt`` as plain text (with the tokenizer's special tokens, e.g. BOS): ids of shape (1, T)."""
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


def generation_config(model: nn.Module, tokenizer: Any, sampling: Sampling) -> Any:
    """The model's generation config (its EOS ids) with the sampling settings, each one explicit."""
    cfg = copy.deepcopy(model.generation_config)
    greedy = sampling.temperature == 0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    cfg.update(max_new_tokens=sampling.max_new_tokens, do_sample=not greedy, num_beams=1, pad_token_id=pad,
               temperature=None if greedy else sampling.temperature,
               top_p=None if greedy else (sampling.top_p or 1.0),  # 1.0 and 0: off
               top_k=None if greedy else (sampling.top_k or 0))
    return cfg


@torch.no_grad()
def complete(model: nn.Module, tokenizer: Any, input_ids: torch.Tensor, sampling: Sampling,
             stream: bool = True) -> list[int]:
    """The new token ids after ``input_ids`` (1, T), printed to stdout as they come when ``stream``."""
    from transformers import TextStreamer

    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    ids = input_ids.to(next(model.parameters()).device)
    with cached_norms(model):  # an unmerged DoRA adapter's norms ||W0 + sBA||_c, once per answer, not per token
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                             generation_config=generation_config(model, tokenizer, sampling))
    return out[0, ids.shape[1]:].tolist()


def chat(model: nn.Module, tokenizer: Any, template: str, sampling: Sampling, lines: Iterable[str],
         prompt_to: TextIO | None = None) -> list[dict[str, str]]:
    """An interactive conversation: each line of ``lines`` is a user message, answered with the whole
    conversation so far as context; stops at the end of ``lines`` or a line ``/exit``. Returns the messages."""
    messages: list[dict[str, str]] = []
    for line in _prompted(lines, prompt_to):
        text = line.strip()
        if text in EXIT_WORDS:
            break
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        new = complete(model, tokenizer, encode_chat(tokenizer, messages, template), sampling)
        messages.append({"role": "assistant", "content": tokenizer.decode(new, skip_special_tokens=True).strip()})
    return messages


def _prompted(lines: Iterable[str], prompt_to: TextIO | None) -> Iterable[str]:
    """``lines``, writing a "> " prompt to ``prompt_to`` before each (a terminal), nothing otherwise."""
    iterator = iter(lines)
    while True:
        if prompt_to is not None:
            prompt_to.write("> ")
            prompt_to.flush()
        line = next(iterator, None)
        if line is None:
            return
        yield line


def adapter_names(args: Any) -> list[str]:
    """The names of the --adapter flags, in order."""
    return [name for name, _ in args.adapter or []]


def default_adapter(args: Any) -> str | None:
    """--use, else "default" if loaded, else the first --adapter (None without adapters)."""
    names = adapter_names(args)
    if args.use is not None:
        return args.use
    return "default" if "default" in names else (names[0] if names else None)


def run_generate(args: Any) -> int:
    """The ``dorakit generate`` command (flags parsed and checked by commands.parser)."""
    from ..adapters.multi import set_adapter
    from ..training.distributed import single_device

    model, tokenizer = load_for_generation(args.model, args.adapter, args.merge, single_device(args.device))
    template = chat_template(tokenizer, args.chat_template)
    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.seed)
    torch.manual_seed(sampling.seed)
    if args.adapter and not args.merge:
        set_adapter(model, default_adapter(args))
    if args.chat:
        if template is None:
            raise RecipeError(f"{args.model}: its tokenizer has no chat template, which --chat needs; pass "
                              "--chat-template FILE (a Jinja template), or use --prompt TEXT (plain text).")
        chat(model, tokenizer, template, sampling, sys.stdin, sys.stderr if sys.stdin.isatty() else None)
        return 0
    if template is not None and not args.plain:
        ids = encode_chat(tokenizer, [{"role": "user", "content": args.prompt}], template)
    else:
        ids = encode_plain(tokenizer, args.prompt)
    complete(model, tokenizer, ids, sampling)
    return 0
