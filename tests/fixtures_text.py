"""Text fixtures for the data and eval tests: a tiny word-level causal-LM tokenizer and the shared data.

Plain functions (not pytest fixtures), so any test file can import them: ``from fixtures_text import ...``
(pytest puts tests/ on sys.path). Nothing here touches the hub.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from dorakit.training.data import Record, format_prompt

SPECIALS = ("<s>", "</s>", "<unk>")  # ids 0, 1, 2: the BOS / EOS ids of conftest's tiny llama and gpt2


def word_tokenizer(directory: Path, texts: Iterable[str], pad: bool = False) -> Any:
    """A whitespace word-level ``PreTrainedTokenizerFast`` over the words of ``texts``, saved and reloaded.

    Ids: <s>=0, </s>=1, <unk>=2, [<pad>=3], then the words in sorted order. Every encoding starts
    with <s> (like Llama's tokenizer); decoding joins words with single spaces. Unknown words map
    to <unk>. The tokenizer is written to ``directory`` and loaded back with AutoTokenizer, the way
    a user's local tokenizer folder would be.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    specials = SPECIALS + (("<pad>",) if pad else ())
    words = sorted({w for text in texts for w in text.split()} - set(specials))
    vocab = {tok: i for i, tok in enumerate([*specials, *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>" if pad else None)
    fast.save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)


def prompt_words(records: Iterable[Record]) -> list[str]:
    """Texts that cover every word of the records' prompts (both templates) and outputs."""
    texts = []
    for r in records:
        texts += [format_prompt(r.instruction, r.input, template) for template in ("finetune", "evaluate")]
        texts.append(r.output)
    return texts


def commonsense_dir() -> Path | None:
    """The shared LLM-Adapters commonsense data: $DORAKIT_COMMONSENSE_DIR, else ../shared/data/commonsense."""
    env = os.environ.get("DORAKIT_COMMONSENSE_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data" / "commonsense"
    return path if path.is_dir() else None


def shared_task_file(task: str, split: str = "test") -> Path:
    """``<commonsense dir>/<task>/<split>.json``; skips the test if the shared data is not there."""
    root = commonsense_dir()
    if root is None or not (root / task / f"{split}.json").is_file():
        pytest.skip(f"shared commonsense data for {task} not found (set DORAKIT_COMMONSENSE_DIR to the "
                    f"folder holding boolq/, ARC-Easy/, ...)")
    return root / task / f"{split}.json"


def write_json(path: Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON (one key per line, like the LLM-Adapters files) and return the path."""
    path.write_text(json.dumps(obj, indent=4), encoding="utf-8")
    return path


CHAT_TEMPLATE = ("{{ bos_token }} {% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|> {% endif %}")
"""A ChatML-like Jinja chat template whose markers are whole words of ``word_tokenizer``."""
CHAT_WORDS = "<|system|> <|user|> <|assistant|> <|tool|> <|end|>"


def chat_tokenizer(directory: Path, texts: Iterable[str], template: str | None = CHAT_TEMPLATE) -> Any:
    """``word_tokenizer`` over ``texts`` and the chat markers, with ``template`` as its chat template
    (saved to ``directory`` and loaded back, so it comes from the tokenizer folder as a user's would)."""
    from transformers import AutoTokenizer

    tok = word_tokenizer(directory, [*texts, CHAT_WORDS])
    if template is not None:
        tok.chat_template = template
        tok.save_pretrained(directory)
        tok = AutoTokenizer.from_pretrained(directory)
    return tok


def boolq_llama(root: Path, n: int = 4) -> tuple[Path, Path]:
    """(a tiny LLaMA saved with a word tokenizer covering the prompts, ``train.json``): the first ``n``
    BoolQ train records and a vocabulary that also covers the first ``n`` test records; the model for
    runs of a command (sweep) on real data in seconds. Skips without the shared data."""
    import torch
    import transformers

    from dorakit.training.data import load_records

    train = load_records(shared_task_file("boolq", "train"))[:n]
    evals = load_records(shared_task_file("boolq"), purpose="eval")[:n]
    data = root / "train.json"
    data.write_text(json.dumps([vars(r) for r in train]))
    model_dir = root / "lm"
    tok = word_tokenizer(model_dir, prompt_words(train + evals))
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, bos_token_id=0, eos_token_id=1)).save_pretrained(model_dir)
    return model_dir, data


def save_word_llama(model_dir: Path, texts: Iterable[str], max_position_embeddings: int = 256) -> Any:
    """A tiny causal LLaMA (2 layers, width 32, seed 0) saved in ``model_dir`` with a word tokenizer over
    ``texts``, like a user's model directory; returns the tokenizer."""
    import torch
    import transformers

    tok = word_tokenizer(model_dir, texts)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=max_position_embeddings, bos_token_id=0, eos_token_id=1,
        pad_token_id=None)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(model_dir)
    return tok
