"""`dorakit finetune --load-in-8bit`: LoRA / DoRA over a bitsandbytes LLM.int8() base (one process, CPU).

The run trains, its checkpoint resumes to the uninterrupted run's losses and adapter, and the final adapter
is PEFT's: PEFT's own 8-bit model with it gives dorakit's logits. Flags that cannot go with it exit 2.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_distributed import _argv, _assert_same_training, _cut_at_step_2, _launched, _losses, lm  # noqa: F401

import dorakit as dk
from dorakit.commands.cli import main

pytest.importorskip("bitsandbytes")
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:the tokenizer has no pad token")]


def test_8bit_run_trains_resumes_and_loads_into_peft(lm: SimpleNamespace, tmp_path: Path) -> None:  # noqa: F811
    import transformers

    peft = pytest.importorskip("peft")
    run = tmp_path / "int8"
    assert main(_argv(lm, run, "--batch-size", "4", "--load-in-8bit")) == 0
    assert len(set(_losses(run))) == 4
    cut = _cut_at_step_2(run, tmp_path / "int8-cut")
    assert main(_argv(lm, cut, "--batch-size", "4", "--load-in-8bit", "--resume")) == 0
    _assert_same_training(cut, run)

    def load() -> torch.nn.Module:
        cfg = transformers.BitsAndBytesConfig(load_in_8bit=True)
        return transformers.AutoModelForCausalLM.from_pretrained(lm.model, quantization_config=cfg,
                                                                 device_map="cpu", dtype=torch.float32).eval()

    ids = torch.randint(2, 20, (2, 9), generator=torch.Generator().manual_seed(0))
    ours = load()
    dk.load_adapter(ours, run / "final")
    theirs = peft.PeftModel.from_pretrained(load(), run / "final").eval()
    assert type(theirs.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "Linear8bitLt"
    with torch.no_grad():
        expected, got, base = ours(input_ids=ids).logits, theirs(input_ids=ids).logits, load()(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (expected - base).abs().max() > 1e-3  # the adapter changed the logits: the comparison tests it


@pytest.mark.parametrize(("world", "extra", "message"), [
    (None, ("--load-in-8bit", "--load-in-4bit"), "--load-in-4bit and --load-in-8bit"),
    (None, ("--load-in-8bit", "--method", "full"), "--load-in-8bit with --method full"),
    (None, ("--load-in-8bit", "--compile"), "--compile with --load-in-8bit"),
    (1, ("--load-in-8bit", "--strategy", "fsdp"), "--load-in-8bit with --strategy fsdp"),
    (1, ("--load-in-4bit", "--strategy", "ddp"), "pass --strategy fsdp"),
])
def test_bad_quantized_settings_exit_2_and_write_nothing(lm: SimpleNamespace, tmp_path: Path,  # noqa: F811
                                                        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                                                        world: int | None, extra: tuple[str, ...], message: str) -> None:
    if world is not None:
        _launched(monkeypatch, world)
    try:
        code = main(_argv(lm, tmp_path / "out", "--batch-size", "2", *extra))
    except SystemExit as e:  # argparse's own check (both flags) exits at parse time
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
