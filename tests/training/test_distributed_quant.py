"""QDoRA on several processes: `dorakit finetune --load-in-4bit --strategy fsdp` under torchrun (gloo, CPU).

The NF4 base (bitsandbytes' packed uint8 codes) is sharded by FSDP2 like any frozen weight; its quant
state (absmax scales) stays whole on every process; the adapter dequantizes the all-gathered codes inside
the layer's forward. The invariants are the dense ones of test_distributed.py: 2 processes at the same
global batch train what one process trains (losses and adapter to float tolerance), a checkpoint resumes
on another process count, and the final adapter is PEFT's (PEFT's own 4-bit model gives the same logits).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_distributed import (  # the same tiny Llama, records and run helpers as the dense tests
    HERE,
    _adapter,
    _argv,
    _cut_at_step_2,
    _env,
    _losses,
    _torchrun,
    lm,  # noqa: F401 (a fixture)
)

import dorakit as dk
from dorakit.commands.cli import main

pytest.importorskip("bitsandbytes")
LR = 1e-2  # _argv's --lr


def _assert_same_training(a: Path, b: Path) -> None:
    """test_distributed's check, with the adapter's absolute tolerance scaled by the learning rate.

    AdamW divides each element's step by its own gradient scale, so an element whose gradient is tiny moves
    by a fraction of lr that follows the gradient's *relative* rounding, which the 2-process reduction order
    changes. Layer 0's q / k lora_B get gradients 100x smaller than the others here (down to 2e-7; attention
    over a tiny random model is near uniform) and differ by up to 5.2e-6 = 5e-4·lr; every other tensor by
    <= 2e-7. The bound is the one test_distributed.py derives for full fine-tuning: 1e-3·lr."""
    assert _losses(a) == pytest.approx(_losses(b), rel=1e-6, abs=0)
    ta, tb = _adapter(a), _adapter(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        torch.testing.assert_close(ta[key], tb[key], rtol=1e-5, atol=1e-3 * LR, msg=key)
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:the tokenizer has no pad token")]


@pytest.fixture(scope="module")
def qruns(lm: SimpleNamespace) -> dict[str, Path]:  # noqa: F811
    """QDoRA on the NF4 base: one process (4 per micro-batch) and 2 processes with FSDP2 (2 each)."""
    out = {"one": lm.root / "q-one", "fsdp": lm.root / "q-fsdp"}
    assert main(_argv(lm, out["one"], "--batch-size", "4", "--load-in-4bit")) == 0
    proc = _torchrun(_argv(lm, out["fsdp"], "--batch-size", "2", "--strategy", "fsdp", "--load-in-4bit"))
    assert proc.stdout.count("saved to") == 1
    return out


def test_two_processes_train_what_one_process_trains_on_a_4bit_base(qruns: dict[str, Path],
                                                                    lm: SimpleNamespace) -> None:  # noqa: F811
    _assert_same_training(qruns["fsdp"], qruns["one"])
    assert len(set(_losses(qruns["one"]))) == 4  # it trained
    dense = lm.root / "q-dense"  # negative control: the NF4 base is not the dense one
    assert main(_argv(lm, dense, "--batch-size", "4", "--max-steps", "1")) == 0
    assert _losses(dense)[0] != pytest.approx(_losses(qruns["one"])[0], rel=1e-6, abs=0)
    state = json.loads((qruns["fsdp"] / "checkpoints" / "step-0000004" / "state.json").read_text())
    assert state["world_size"] == 2


def test_4bit_fsdp_checkpoint_resumes_on_one_process(qruns: dict[str, Path], lm: SimpleNamespace) -> None:  # noqa: F811
    cut = _cut_at_step_2(qruns["fsdp"], lm.root / "q-fsdp-cut")
    with pytest.warns(UserWarning, match="written by 2"):
        assert main(_argv(lm, cut, "--batch-size", "4", "--load-in-4bit", "--resume")) == 0
    _assert_same_training(cut, qruns["fsdp"])
    from dorakit.training.checkpoint import read_checkpoint

    for run in ("one", "fsdp"):  # the same keys either way: trainable tensors only, no bitsandbytes quant state
        keys = read_checkpoint(qruns[run] / "checkpoints" / "step-0000002").keys()
        assert keys == read_checkpoint(qruns["fsdp"] / "checkpoints" / "step-0000004").keys()
        assert not [k for k in keys if "base_layer" in k] and any(k.endswith("magnitude") for k in keys)


def test_the_sharded_runs_adapter_loads_into_peft_4bit_model(qruns: dict[str, Path],
                                                             lm: SimpleNamespace) -> None:  # noqa: F811
    """PEFT's own 4-bit LLaMA (BitsAndBytesConfig) with the 2-process adapter gives dorakit's logits."""
    import transformers

    peft = pytest.importorskip("peft")
    from dorakit.adapters.quant import is_linear4bit

    def load() -> torch.nn.Module:
        cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
        model = transformers.AutoModelForCausalLM.from_pretrained(lm.model, quantization_config=cfg,
                                                                  device_map="cpu", dtype=torch.float32)
        for module in model.modules():  # PEFT's layers call Linear4bit.forward: keep the CPU's bf16 repack off
            if is_linear4bit(module):   # (see tests/adapters/test_quant.py::_no_cpu_repack)
                module.support_avx512bf16_for_cpu = False
        return model.eval()

    ids = torch.randint(2, 20, (2, 9), generator=torch.Generator().manual_seed(0))
    ours = load()
    dk.load_adapter(ours, qruns["fsdp"] / "final")
    theirs = peft.PeftModel.from_pretrained(load(), qruns["fsdp"] / "final").eval()
    assert type(theirs.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    with torch.no_grad():
        expected, got, base = ours(input_ids=ids).logits, theirs(input_ids=ids).logits, load()(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (expected - base).abs().max() > 1e-3  # the adapter changed the logits: the comparison tests it
    assert _adapter(qruns["fsdp"]).keys() == dk.read_adapter(qruns["one"] / "final").tensors.keys()


def test_fsdp_shards_the_packed_4bit_weight_and_matches_the_unsharded_step(lm: SimpleNamespace) -> None:  # noqa: F811
    """Between forwards each process holds half of every packed NF4 weight (a frozen uint8 DTensor, dim 0);
    one QDoRA step's loss and every gradient equal the unsharded 4-bit model's."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(HERE / "qdora_worker.py"), str(lm.model)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["world"] == 2 and r["same_names"] and len(r["stored"]) == 14
    for name, s in r["stored"].items():
        assert s["type"] == "DTensor" and s["shard0"] and s["frozen"] and s["dtype"] == "torch.uint8", name
        assert s["local"] == s["whole"] // 2, name
    assert r["loss_diff"] <= 1e-6 and r["grad_diff"] <= 1e-6 * r["grad_scale"]
