"""dorakit.training.packing and ``dorakit finetune --pack`` / chat data end to end on a tiny LLaMA whose
tokenizer has a chat template: rows, isolation (an example's logits packed = alone), the same loss packed
and unpacked, and packed training that lowers the loss."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fixtures_text import CHAT_TEMPLATE, chat_tokenizer, write_json

from dorakit.commands.cli import main
from dorakit.training.data import IGNORE_INDEX, CausalExample, DataError, collate_causal
from dorakit.training.packing import collate_packed, mask_kind, pack_examples

pytestmark = pytest.mark.filterwarnings("ignore:the tokenizer has no pad token")
WORDS = "is water wet yes it fire cold no hot do birds fly and the sky blue ice".split()


def _examples(n: int, seed: int = 0, vocab: int = 40) -> list[CausalExample]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(2, 12, (1,), generator=gen))
        ids = torch.randint(3, vocab, (length,), generator=gen).tolist()
        cut = int(torch.randint(1, length, (1,), generator=gen))
        out.append(CausalExample(ids, [IGNORE_INDEX] * cut + ids[cut:]))
    return out


def _llama(impl: str, vocab: int = 40, seed: int = 0):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   bos_token_id=0, eos_token_id=1, attn_implementation=impl)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_rows_hold_every_example_once_within_max_len() -> None:
    examples = _examples(50)
    rows = pack_examples(examples, 24)
    assert sorted(i for row in rows for i in row) == list(range(50))
    assert all(sum(len(examples[i].input_ids) for i in row) <= 24 for row in rows)
    assert len(rows) < 50 and rows == pack_examples(examples, 24)  # fewer rows than examples; deterministic
    with pytest.raises(DataError, match="longer than max_len 5"):
        pack_examples(examples, 5)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_an_example_packed_with_others_has_its_logits_alone(impl: str) -> None:
    model = _llama(impl)
    examples = _examples(12, seed=1)
    rows = [[examples[i] for i in row] for row in pack_examples(examples, 30)]
    batch = collate_packed(rows, pad_id=2, mask=mask_kind(model))
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}).logits  # (B, T, V)
        for r, row in enumerate(rows):
            at = 0
            for ex in row:
                alone = model(input_ids=torch.tensor([ex.input_ids])).logits[0]  # (n, V)
                torch.testing.assert_close(packed[r, at:at + len(ex.input_ids)], alone)
                at += len(ex.input_ids)


def test_negative_control_position_ids_alone_do_not_isolate_under_sdpa() -> None:
    """What the 4D mask is for: with use_cache on (LLaMA's default) transformers 5 does not detect packing
    from position_ids, and the second example attends to the first."""
    model = _llama("sdpa")
    a, b = _examples(2, seed=2)
    batch = collate_packed([[a, b]], pad_id=2)
    with torch.no_grad():
        no_mask = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0, len(a.input_ids):]
        alone = model(input_ids=torch.tensor([b.input_ids])).logits[0]
    assert (no_mask - alone).abs().max() > 1e-3


def test_packed_and_padded_batches_have_the_same_loss_and_gradient() -> None:
    model = _llama("sdpa")
    examples = _examples(10, seed=3)
    rows = [[examples[i] for i in row] for row in pack_examples(examples, 30)]
    losses, grads = [], []
    for batch in (collate_causal(examples, pad_id=2), collate_packed(rows, pad_id=2)):
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad.clone())
        assert int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) == sum(  # the same label tokens (shifted)
            sum(label != IGNORE_INDEX for label in ex.labels[1:]) for ex in examples)
    torch.testing.assert_close(losses[0], losses[1])
    torch.testing.assert_close(grads[0], grads[1])


def test_flash_attention_is_refused() -> None:
    model = _llama("sdpa")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(DataError, match="attn_implementation 'sdpa' or 'eager'.*drop --pack"):
        mask_kind(model)


# --------------------------------------------------------------------------------- the CLI, end to end

@pytest.fixture(scope="module")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A tiny LLaMA saved with a tokenizer that has NO chat template, 24 short chats, and a template file."""
    import transformers

    root = tmp_path_factory.mktemp("chat")
    gen = torch.Generator().manual_seed(0)
    chats = []
    for i in range(24):
        q = " ".join(WORDS[j] for j in torch.randint(0, len(WORDS), (1 + i % 5,), generator=gen).tolist())
        chats.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f"yes {q}"}]})
    model_dir = root / "model"
    tok = chat_tokenizer(model_dir, [" ".join(WORDS)], template=None)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(model_dir)
    (root / "chat.jinja").write_text(CHAT_TEMPLATE)
    return SimpleNamespace(root=root, model=model_dir, data=write_json(root / "chats.json", chats),
                           template=root / "chat.jinja", chats=chats)


def _argv(cm: SimpleNamespace, out: Path, *extra: str) -> list[str]:
    return ["finetune", "--model", str(cm.model), "--data", str(cm.data), "--output-dir", str(out), "--method",
            "full", "--lr", "1e-2", "--batch-size", "2", "--max-len", "48", "--device", "cpu", *extra]


def test_chat_data_without_a_template_exits_2_naming_the_fix(chat_model: SimpleNamespace, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    assert main(_argv(chat_model, tmp_path / "run", "--max-steps", "1")) == 2
    err = capsys.readouterr().err
    assert "has no chat template" in err and "--chat-template FILE" in err and len(err.strip().splitlines()) == 1
    assert main(_argv(chat_model, tmp_path / "run2", "--max-steps", "1", "--chat-template",
                      str(tmp_path / "none.jinja"))) == 2
    assert "--chat-template" in capsys.readouterr().err


def test_packed_chat_training_lowers_the_loss_and_counts_real_tokens(chat_model: SimpleNamespace,
                                                                     tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(_argv(chat_model, out, "--pack", "--chat-template", str(chat_model.template), "--max-steps", "20",
                      "--log-every", "1", "--warmup-steps", "0", "--schedule", "constant")) == 0
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if "loss" in r]
    assert len(losses) == 20 and sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3
    # tokens counts the examples' own tokens, not padding and not the 4D mask's entries
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "final")
    assert tok.chat_template == CHAT_TEMPLATE  # saved with the adapter's tokenizer
    sizes = [len(tok(tok.apply_chat_template(c["messages"], tokenize=False), add_special_tokens=False)["input_ids"])
             for c in chat_model.chats]
    rows = pack_examples([CausalExample([0] * n, [0] * n) for n in sizes], 48)
    assert len(rows) < len(sizes)
    per_row = [sum(sizes[i] for i in row) for row in rows]
    assert min(per_row) <= lines[0]["tokens"] <= 2 * max(per_row)  # step 1: one batch of 2 rows
    run = json.loads((out / "run.json").read_text())
    assert run["pack"] is True and run["chat_template"] == str(chat_model.template.resolve())
