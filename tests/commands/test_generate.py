"""``dorakit generate`` on a tiny Llama with a saved DoRA adapter (B and the magnitude moved off their init, so
the adapter changes the output): greedy tokens with the adapter unmerged equal those with --merge and those
of transformers' own ``model.generate`` on the adapted model; --chat reads stdin until end of input or
/exit, keeping the conversation; bad flags exit 2 with one line.

The CLI runs in-process as ``dorakit.commands.cli.main([...])``; nothing touches the hub.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fixtures_text import word_tokenizer

import dorakit as dk
from dorakit.commands import generate as gen
from dorakit.commands.cli import main

pytestmark = pytest.mark.filterwarnings("ignore:the tokenizer has no pad token")
WORDS = "user assistant : is the sky blue today green red yes no it was dark".split()
TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
            "{% if add_generation_prompt %}assistant : {% endif %}")
PROMPT = "is the sky blue today"
NEW = 6


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A tiny causal Llama whose tokenizer has a chat template, and a DoRA adapter for it saved in PEFT's format."""
    import transformers

    root = tmp_path_factory.mktemp("generate")
    model_dir, adapter_dir = root / "tiny-llama", root / "adapter"
    tok = word_tokenizer(model_dir, [" ".join(WORDS)])
    tok.chat_template = TEMPLATE
    tok.save_pretrained(model_dir)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=0, eos_token_id=1, pad_token_id=None)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(model_dir)
    dk.apply_adapters(model, dk.AdapterConfig(method="dora", rank=4, alpha=8, targets="all-linear"))
    with torch.no_grad():
        for _, layer in dk.adapter_layers(model):
            layer.lora_B.normal_(0, 0.3)
            layer.magnitude.mul_(1 + 0.2 * torch.randn_like(layer.magnitude))
    dk.save_adapter(model, adapter_dir, base_model_name_or_path=str(model_dir), task_type="CAUSAL_LM")
    return SimpleNamespace(dir=model_dir, adapter=adapter_dir, tok=tok)


def _reference(lm: SimpleNamespace, ids: torch.Tensor, adapter: bool = True) -> list[int]:
    """transformers' greedy model.generate on the base with the adapter loaded by dorakit (no cached norms)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(lm.dir, dtype=torch.float32)
    if adapter:
        dk.load_adapter(model, lm.adapter)
    out = model.eval().generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=NEW, pad_token_id=1)
    return out[0, ids.shape[1]:].tolist()


def _argv(lm: SimpleNamespace, *extra: str) -> list[str]:
    return ["generate", "--model", str(lm.dir), "--max-new-tokens", str(NEW), "--device", "cpu", *extra]


def _spy(monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """The new token ids of every answer the CLI generates."""
    answers: list[list[int]] = []
    real = gen.complete

    def complete(*args: object, **kwargs: object) -> list[int]:
        answers.append(real(*args, **kwargs))
        return answers[-1]
    monkeypatch.setattr(gen, "complete", complete)
    return answers


@pytest.mark.parametrize("template", [False, True])
def test_greedy_unmerged_equals_merged_equals_transformers(lm: SimpleNamespace, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture, template: bool) -> None:
    flags = () if template else ("--plain",)
    ids = gen.encode_chat(lm.tok, [{"role": "user", "content": PROMPT}], TEMPLATE) if template else \
        gen.encode_plain(lm.tok, PROMPT)
    expected = _reference(lm, ids)
    assert expected != _reference(lm, ids, adapter=False)  # the adapter changes what is generated
    answers = _spy(monkeypatch)
    assert main(_argv(lm, "--adapter", str(lm.adapter), "--prompt", PROMPT, *flags)) == 0
    unmerged_text = capsys.readouterr().out
    assert main(_argv(lm, "--adapter", str(lm.adapter), "--merge", "--prompt", PROMPT, *flags)) == 0
    merged_text = capsys.readouterr().out
    assert answers == [expected, expected]
    assert unmerged_text == merged_text and unmerged_text.strip() == lm.tok.decode(expected, skip_special_tokens=True)


def test_sampling_is_seeded(lm: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    answers = _spy(monkeypatch)
    sampled = ("--temperature", "1.5", "--top-k", "20", "--top-p", "0.95")
    for seed in ("1", "1", "2", "3"):
        assert main(_argv(lm, "--prompt", PROMPT, "--plain", "--max-new-tokens", "12", *sampled, "--seed", seed)) == 0
    assert answers[0] == answers[1] and len({tuple(a) for a in answers}) > 1


def test_chat_keeps_the_conversation_until_end_of_input(lm: SimpleNamespace, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture) -> None:
    seen: list[list[dict[str, str]]] = []
    real = gen.encode_chat
    monkeypatch.setattr(gen, "encode_chat", lambda tok, messages, template: (seen.append(list(messages)),
                                                                             real(tok, messages, template))[1])
    answers = _spy(monkeypatch)
    monkeypatch.setattr(sys, "stdin", io.StringIO("is the sky blue\n\nis it green\n"))
    assert main(_argv(lm, "--adapter", str(lm.adapter), "--chat")) == 0
    assert [[m["role"] for m in messages] for messages in seen] == [["user"], ["user", "assistant", "user"]]
    assert seen[1][1]["content"] == lm.tok.decode(answers[0], skip_special_tokens=True).strip()
    assert seen[1][2]["content"] == "is it green"
    # the second answer continues the whole conversation: what transformers generates from the same ids
    assert answers[1] == _reference(lm, real(lm.tok, seen[1], TEMPLATE))
    assert len(capsys.readouterr().out.strip().splitlines()) == 2  # two streamed answers


def test_chat_stops_at_exit(lm: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    answers = _spy(monkeypatch)
    monkeypatch.setattr(sys, "stdin", io.StringIO("is the sky blue\n/exit\nis it green\n"))
    assert main(_argv(lm, "--chat")) == 0
    assert len(answers) == 1


def test_chat_without_a_template_names_the_fix(lm: SimpleNamespace, tmp_path: Path,
                                               capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    plain = tmp_path / "plain"
    shutil.copytree(lm.dir, plain, ignore=shutil.ignore_patterns("*token*", "chat_template*"))  # the weights
    word_tokenizer(plain, [" ".join(WORDS)])  # the same words, no chat template
    assert lm.tok.get_vocab() == word_tokenizer(plain, [" ".join(WORDS)]).get_vocab()
    monkeypatch.setattr(sys, "stdin", io.StringIO("is the sky blue\n"))
    assert main(["generate", "--model", str(plain), "--chat", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no chat template" in err[0] and "--chat-template FILE" in err[0], err
    template = tmp_path / "chat.jinja"
    template.write_text(TEMPLATE)
    answers = _spy(monkeypatch)
    assert main(["generate", "--model", str(plain), "--chat", "--chat-template", str(template), "--device", "cpu",
                 "--max-new-tokens", str(NEW)]) == 0
    assert answers == [_reference(lm, gen.encode_chat(lm.tok, [{"role": "user", "content": "is the sky blue"}],
                                                      TEMPLATE), adapter=False)]


@pytest.mark.parametrize("extra, needle", [
    ((), "one of the arguments --prompt --chat is required"),
    (("--prompt", "x", "--chat"), "not allowed with argument"),
    (("--prompt", "x", "--merge"), "--merge needs --adapter"),
    (("--prompt", "x", "--top-p", "0.9"), "--top-p apply to sampling; set --temperature > 0"),
    (("--prompt", "x", "--top-k", "5"), "--top-k apply to sampling"),
    (("--prompt", "x", "--temperature", "1", "--top-p", "0"), "must be a finite number > 0"),
    (("--prompt", "x", "--temperature", "1", "--top-p", "1.5"), "must be a number > 0 and <= 1"),
    (("--prompt", "x", "--temperature", "-1"), "must be a finite number >= 0"),
    (("--prompt", "x", "--max-new-tokens", "0"), "must be an integer >= 1"),
    (("--prompt", "x", "--chat-template", "nowhere.jinja"), "no such file"),
    (("--chat", "--plain"), "--plain applies to --prompt"),
])
def test_bad_flags_exit_2_with_one_line(lm: SimpleNamespace, capsys: pytest.CaptureFixture, extra: tuple[str, ...],
                                        needle: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model", str(lm.dir), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and needle in err[0], err


# ---- several adapters: --adapter NAME=DIR, --use, --prompt-file ---------------------------------------

@pytest.fixture(scope="module")
def more(lm: SimpleNamespace, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A second adapter for the same base (LoRA, other targets) and a DoRA adapter for a wider Llama."""
    import transformers

    root = tmp_path_factory.mktemp("more")
    model = transformers.AutoModelForCausalLM.from_pretrained(lm.dir, dtype=torch.float32)
    dk.apply_adapters(model, dk.AdapterConfig(method="lora", rank=2, alpha=4, targets=["o_proj", "up_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for _, layer in dk.adapter_layers(model):
            layer.lora_B.normal_(0, 0.5)
    dk.save_adapter(model, root / "math", base_model_name_or_path=str(lm.dir), task_type="CAUSAL_LM")
    cfg = model.config.to_dict() | {"hidden_size": 48, "head_dim": 12}
    other = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
    dk.apply_adapters(other, dk.AdapterConfig(method="dora", rank=4, alpha=8, targets="all-linear"))
    dk.save_adapter(other, root / "other", task_type="CAUSAL_LM")
    return SimpleNamespace(math=root / "math", other=root / "other")


def _alone(lm: SimpleNamespace, ids: torch.Tensor, adapter: Path | None) -> list[int]:
    """transformers' greedy generate with only ``adapter`` loaded (None: the base)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(lm.dir, dtype=torch.float32)
    if adapter is not None:
        dk.load_adapter(model, adapter)
    out = model.eval().generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=NEW, pad_token_id=1)
    return out[0, ids.shape[1]:].tolist()


def test_prompt_file_runs_each_record_through_its_adapter(lm: SimpleNamespace, more: SimpleNamespace, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    """A mixed batch (left-padded, two generate() calls of 3): each answer is the one its adapter alone gives."""
    import json

    records = [{"prompt": "is the sky blue today", "adapter": "math"}, {"prompt": "is it green"},
               {"messages": [{"role": "user", "content": "red or blue"}], "adapter": None, "id": 7},
               {"prompt": "the sky was dark", "adapter": "math"}, {"prompt": "yes", "adapter": "default"}]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    argv = _argv(lm, "--adapter", str(lm.adapter), "--adapter", f"math={more.math}", "--prompt-file", str(path),
                 "--batch-size", "3")
    assert main(argv) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    dirs = {"math": more.math, "default": lm.adapter, None: None}
    for record, line in zip(records, lines, strict=True):
        name = record.get("adapter", "default")
        assert line == {**record, "adapter": name, "output": line["output"]}
        messages = record.get("messages") or [{"role": "user", "content": record["prompt"]}]
        want = _alone(lm, gen.encode_chat(lm.tok, messages, TEMPLATE), dirs[name])
        assert line["output"] == lm.tok.decode(want, skip_special_tokens=True).strip(), record
    first = gen.encode_chat(lm.tok, [{"role": "user", "content": records[0]["prompt"]}], TEMPLATE)
    assert _alone(lm, first, more.math) != _alone(lm, first, None)  # the second adapter changes the answer


def test_use_picks_the_adapter_of_prompt(lm: SimpleNamespace, more: SimpleNamespace,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    answers = _spy(monkeypatch)
    for use in ("math", "default"):
        assert main(_argv(lm, "--adapter", f"default={lm.adapter}", "--adapter", f"math={more.math}", "--use", use,
                          "--prompt", PROMPT, "--plain")) == 0
    ids = gen.encode_plain(lm.tok, PROMPT)
    assert answers == [_alone(lm, ids, more.math), _alone(lm, ids, lm.adapter)]


def _bad_records(tmp_path: Path, text: str) -> str:
    path = tmp_path / f"bad{len(list(tmp_path.glob('bad*')))}.jsonl"
    path.write_text(text)
    return str(path)


def test_bad_adapter_inputs_exit_2_with_one_line(lm: SimpleNamespace, more: SimpleNamespace, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    a, m = str(lm.adapter), f"math={more.math}"
    cases = [
        (("--adapter", "=x", "--prompt", "x"), "expected DIR or NAME=DIR"),
        (("--adapter", "math=", "--prompt", "x"), "expected DIR or NAME=DIR"),
        (("--adapter", "no/slash=x", "--prompt", "x"), "expected DIR or NAME=DIR"),
        (("--adapter", a, "--adapter", a, "--prompt", "x"), "--adapter names ['default'] more than once"),
        (("--adapter", m, "--adapter", m, "--prompt", "x"), "--adapter names ['math'] more than once"),
        (("--adapter", a, "--use", "nope", "--prompt", "x"), "--use 'nope' is not one of the --adapter names"),
        (("--adapter", a, "--adapter", m, "--merge", "--prompt", "x"), "--merge folds one adapter"),
        (("--prompt-file", str(tmp_path / "none.jsonl")), "no such file"),
        (("--prompt", "x", "--batch-size", "4"), "--batch-size applies to --prompt-file"),
        (("--prompt", "x", "--prompt-file", _bad_records(tmp_path, "")), "--prompt-file is a batch of its own"),
        (("--prompt-file", _bad_records(tmp_path, "\n")), "no records"),
        (("--adapter", a, "--prompt-file", _bad_records(tmp_path, '{"prompt": "x", "adapter": "nope"}\n')),
         "line 1: adapter 'nope' is not loaded"),
        (("--prompt-file", _bad_records(tmp_path, '{"prompt": "x"}\n{"text": "x"}\n')), "line 2: a record needs"),
        (("--prompt-file", _bad_records(tmp_path, "{oops\n")), "line 1: not JSON"),
        (("--adapter", f"other={more.other}", "--prompt", "x"), "the adapter was made for a different base model"),
    ]
    for extra, needle in cases:
        try:
            code = main(["generate", "--model", str(lm.dir), "--device", "cpu", *extra])
        except SystemExit as e:
            code = e.code
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and needle in err[0], (extra, err)
