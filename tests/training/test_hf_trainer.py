"""dorakit.training.hf_trainer: real ``transformers.Trainer`` and ``trl.SFTTrainer`` runs on CPU.

The invariants: a checkpoint holds the adapter in PEFT's format plus Trainer's optimizer / scheduler /
RNG state and no tensor of the frozen base; a resume continues exactly (same losses, same adapter);
the final save loads in ``PeftModel.from_pretrained`` with the same logits; and Trainer / SFTTrainer
train the adapters dorakit's own loop trains, when the settings that define the optimisation match:

* AdamW with the same lr, betas and eps (``optim="adamw_torch"``), no weight decay, the same
  gradient clipping (``max_grad_norm``), no warmup and a constant schedule;
* the same batches in the same order: ``train_sampling_strategy="sequential"`` against
  ``Batches(shuffle=False)``, both ending an epoch with its short last batch;
* one micro-batch per step (no accumulation), so both take the loss as the mean over the batch's
  supervised tokens; dropout off (the two loops draw from the RNG in different orders);
* the same adapter initialisation (the model is built with the same seeds before either loop);
* the same precision: ``SFTConfig`` defaults to ``bf16=True`` (autocast, on CPU too); fp32 needs ``bf16=False``.

Every run trains a tiny Llama (conftest) with DoRA on q_proj / v_proj.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import VOCAB
from fixtures_text import word_tokenizer
from torch import Tensor, nn

import dorakit as dk
from dorakit.training.data import Batches, CausalExample, collate_causal
from dorakit.training.train import TrainConfig, train

transformers = pytest.importorskip("transformers")
if "train_sampling_strategy" not in transformers.TrainingArguments.__dataclass_fields__:
    pytest.skip("needs transformers >= 5.2 (TrainingArguments.train_sampling_strategy)", allow_module_level=True)

SEQ = 6
LR = 1e-2
CLIP = 0.3  # below the first steps' gradient norms (~0.3-0.5), so clipping acts and must match
BOOKKEEPING = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin"}
TEXTS = ["the cat sat on the mat", "a dog ran in the park today", "the bird sang", "one two three four five",
         "a cat and a dog", "the park is big and green and quiet"]


# ---------------------------------------------------------------------------------------------- helpers

def _model(make_tiny: Callable, dropout: float = 0.0) -> nn.Module:
    """A fresh tiny Llama with DoRA on q_proj / v_proj; the same arguments give bit-identical models."""
    model = make_tiny("llama", seed=0).model
    torch.manual_seed(1)
    dk.apply_adapters(model, dk.AdapterConfig(method="dora", rank=2, alpha=4.0, targets=["q_proj", "v_proj"],
                                              dropout=dropout))
    return model


def _token_rows(n: int = 7) -> Tensor:
    return torch.randint(3, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(0))  # (N, T)


def _dataset(rows: Tensor) -> list[dict[str, Tensor]]:
    return [{"input_ids": r, "labels": r.clone()} for r in rows]


def _arg_kw(out: Path, max_steps: int, **overrides: object) -> dict[str, object]:
    """TrainingArguments that match TrainConfig(lr=LR, schedule="constant", max_grad_norm=CLIP, seed=0)."""
    return dict(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=2, learning_rate=LR,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, optim="adamw_torch", max_grad_norm=CLIP,
        train_sampling_strategy="sequential", save_steps=2, logging_steps=1, report_to=[], use_cpu=True, seed=0,
        disable_tqdm=True) | overrides


def _args(out: Path, max_steps: int, **overrides: object) -> object:
    return transformers.TrainingArguments(**_arg_kw(out, max_steps, **overrides))


def _losses(trainer: object) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _adapter(model: nn.Module) -> dict[str, Tensor]:
    return dk.peft_state_dict(model)


def _assert_same_adapter(a: dict[str, Tensor], b: dict[str, Tensor], rtol: float = 1e-5, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=atol, msg=key)


def _assert_adapter_differs(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    """Every adapter tensor moved: the runs compared above actually trained."""
    assert all(not torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)


from hf_trainer_worker import StopAt as _StopAt  # noqa: E402  (a run killed after step `at`)


def _dir_bytes(path: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in path.iterdir() if p.is_file()}


# ------------------------------------------------------------------------------- Trainer == dorakit loop

def test_trainer_trains_what_the_dorakit_loop_trains(make_tiny: Callable, tmp_path: Path) -> None:
    """5 steps of 2 over 7 rows (step 4 is the epoch's 1-row tail, step 5 starts epoch 2), clipping on."""
    rows = _token_rows(7)
    init = _adapter(_model(make_tiny))
    ours = _model(make_tiny)
    cfg = TrainConfig(lr=LR, schedule="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=CLIP,
                      max_steps=5, seed=0)
    result = train(ours, Batches(7, 2, seed=0, shuffle=False),
                   lambda idx: {"input_ids": rows[idx], "labels": rows[idx].clone()}, cfg, tmp_path / "loop",
                   progress=False)
    theirs = _model(make_tiny)
    trainer = dk.AdapterTrainer(model=theirs, args=_args(tmp_path / "hf", 5), train_dataset=_dataset(rows))
    trainer.train()
    assert _losses(trainer) == pytest.approx(result.losses, rel=1e-5, abs=0)
    _assert_same_adapter(_adapter(theirs), _adapter(ours))
    _assert_adapter_differs(_adapter(ours), init)


def _sft_trainer(model: nn.Module, out: Path, tok: object, max_steps: int, **trainer_kw: object) -> object:
    import datasets
    import trl

    args = trl.SFTConfig(**_arg_kw(out, max_steps, bf16=False))  # SFTConfig defaults to bf16 (autocast, CPU too)
    return dk.AdapterSFTTrainer(model=model, args=args, processing_class=tok,
                                train_dataset=datasets.Dataset.from_list([{"text": t} for t in TEXTS]), **trainer_kw)


def test_sft_trainer_trains_what_the_dorakit_loop_trains(make_tiny: Callable, tmp_path: Path) -> None:
    """TRL tokenizes plain-text records (BOS ... EOS, every token supervised) into rows of different
    lengths; dorakit's loop trains on those very rows, right-padded by collate_causal."""
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    tok = word_tokenizer(tmp_path / "tok", TEXTS, pad=True)
    theirs = _model(make_tiny)
    trainer = _sft_trainer(theirs, tmp_path / "sft", tok, 4)
    trainer.train()
    rows = [CausalExample(list(r["input_ids"]), list(r["labels"])) for r in trainer.train_dataset]
    assert len({len(r.input_ids) for r in rows}) > 2  # ragged: the token-mean weighting matters
    ours = _model(make_tiny)
    cfg = TrainConfig(lr=LR, schedule="constant", max_grad_norm=CLIP, max_steps=4, seed=0)
    result = train(ours, Batches(len(rows), 2, seed=0, shuffle=False),
                   lambda idx: collate_causal([rows[i] for i in idx], tok.pad_token_id), cfg, tmp_path / "loop",
                   progress=False)
    assert _losses(trainer) == pytest.approx(result.losses, rel=1e-5, abs=0)
    _assert_same_adapter(_adapter(theirs), _adapter(ours))
    _assert_adapter_differs(_adapter(ours), _adapter(_model(make_tiny)))
    _assert_adapter_only_checkpoint(tmp_path / "sft" / "checkpoint-2", theirs)


# ----------------------------------------------------------------------------------------- checkpoints

def _assert_adapter_only_checkpoint(ckpt: Path, model: nn.Module) -> None:
    """The checkpoint's tensors are the adapter's (PEFT's keys) and Trainer's state: nothing of the base."""
    sizes = _dir_bytes(ckpt)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(sizes)
    assert not {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"} & set(sizes)
    assert dk.read_adapter(ckpt).tensors.keys() == {k.removeprefix("base_model.model.") for k in _adapter(model)}
    adapter = sizes["adapter_model.safetensors"]
    weights = {k: v for k, v in sizes.items() if k not in BOOKKEEPING and not k.startswith("rng_state")}  # rng_state_<rank>
    assert sum(weights.values()) < 2 * adapter + 16_384, weights  # the adapter, its config, a tokenizer
    moments = torch.load(ckpt / "optimizer.pt", weights_only=True)["state"].values()  # AdamW: 2 per parameter
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(s["exp_avg"].numel() + s["exp_avg_sq"].numel() for s in moments) == 2 * trainable
    base = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert sum(sizes.values()) < base, (sizes, base)  # the whole checkpoint is smaller than the base's weights


def test_checkpoints_hold_the_adapter_and_trainer_state_not_the_base(make_tiny: Callable, tmp_path: Path) -> None:
    model = _model(make_tiny)
    trainer = dk.AdapterTrainer(model=model, args=_args(tmp_path / "hf", 4), train_dataset=_dataset(_token_rows()))
    trainer.train()
    for step in (2, 4):
        ckpt = tmp_path / "hf" / f"checkpoint-{step}"
        _assert_adapter_only_checkpoint(ckpt, model)
        assert BOOKKEEPING <= set(_dir_bytes(ckpt))  # what a resume needs besides the adapter
        config = json.loads((ckpt / "adapter_config.json").read_text())
        assert config["use_dora"] is True and config["task_type"] == "CAUSAL_LM"
    # negative control: a plain Trainer on the same model writes the whole model, which the check refuses
    plain = transformers.Trainer(model=model, args=_args(tmp_path / "plain", 2), train_dataset=_dataset(_token_rows()))
    plain.train()
    with pytest.raises(AssertionError):
        _assert_adapter_only_checkpoint(tmp_path / "plain" / "checkpoint-2", model)


def test_resume_from_checkpoint_continues_exactly(make_tiny: Callable, tmp_path: Path) -> None:
    """Killed after step 2 of 4 (dropout on, so the restored RNG state matters), resumed on a fresh model."""
    rows = _token_rows(8)
    full_model = _model(make_tiny, dropout=0.1)
    full = dk.AdapterTrainer(model=full_model, args=_args(tmp_path / "full", 4), train_dataset=_dataset(rows))
    full.train()
    killed = dk.AdapterTrainer(model=_model(make_tiny, dropout=0.1), args=_args(tmp_path / "run", 4),
                               train_dataset=_dataset(rows), callbacks=[_StopAt(2)])
    killed.train()
    assert _losses(killed) == pytest.approx(_losses(full)[:2], rel=1e-6, abs=0)
    fresh = _model(make_tiny, dropout=0.1)
    saved = dk.read_adapter(tmp_path / "run" / "checkpoint-2").tensors
    _assert_adapter_differs(_adapter(fresh), {f"base_model.model.{k}": v for k, v in saved.items()})  # load matters
    resumed = dk.AdapterTrainer(model=fresh, args=_args(tmp_path / "run", 4), train_dataset=_dataset(rows))
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert _losses(resumed)[-2:] == pytest.approx(_losses(full)[2:], rel=1e-6, abs=0)
    _assert_same_adapter(_adapter(fresh), _adapter(full_model), rtol=1e-6, atol=1e-7)


def test_final_save_model_loads_in_peft_with_the_same_logits(make_tiny: Callable, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    model = _model(make_tiny)
    trainer = dk.AdapterTrainer(model=model, args=_args(tmp_path / "hf", 3, save_strategy="no"),
                                train_dataset=_dataset(_token_rows()))
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").glob("checkpoint-*"))
    x = _token_rows(3)
    model.eval()
    base = make_tiny("llama", seed=0).model
    with torch.no_grad():
        expected, plain = model(input_ids=x).logits, base(input_ids=x).logits
        loaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "final")).eval()
        assert type(loaded).__name__ == "PeftModelForCausalLM"
        got = loaded(input_ids=x).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain, expected, rtol=0, atol=1e-4)  # the trained adapter changes the logits


def test_load_best_model_at_end_loads_the_best_checkpoints_adapter(make_tiny: Callable, tmp_path: Path) -> None:
    """"Best" is the highest eval loss (greater_is_better), so it is step 1, not the last step: loading it
    has to change the model."""
    model = _model(make_tiny)
    args = _args(tmp_path / "hf", 3, save_steps=1, eval_strategy="steps", eval_steps=1, load_best_model_at_end=True,
                 metric_for_best_model="loss", greater_is_better=True, learning_rate=0.05)
    trainer = dk.AdapterTrainer(model=model, args=args, train_dataset=_dataset(_token_rows()),
                                eval_dataset=_dataset(_token_rows()))
    trainer.train()
    assert Path(trainer.state.best_model_checkpoint).name == "checkpoint-1"
    best, last = (dk.read_adapter(tmp_path / "hf" / f"checkpoint-{s}").tensors for s in (1, 3))
    got = {k.removeprefix("base_model.model."): v for k, v in _adapter(model).items()}
    _assert_same_adapter(got, best, rtol=0, atol=0)
    _assert_adapter_differs(best, last)


# ------------------------------------------------------------------------------------------ bad set-ups

def test_refuses_a_model_without_adapters_and_a_peft_model(make_tiny: Callable, tmp_path: Path) -> None:
    with pytest.raises(dk.TrainerSetupError, match="dk.apply_adapters"):
        dk.AdapterTrainer(model=make_tiny("llama").model, args=_args(tmp_path, 1))
    peft = pytest.importorskip("peft")
    peft_model = peft.get_peft_model(make_tiny("llama").model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(dk.TrainerSetupError, match="PEFT model"):
        dk.AdapterTrainer(model=peft_model, args=_args(tmp_path, 1))
    with pytest.raises(dk.TrainerSetupError, match="adapter_task_type must be one of"):
        dk.AdapterTrainer(model=_model(make_tiny), args=_args(tmp_path, 1), adapter_task_type="causal")


def test_sft_trainer_refuses_a_peft_config(make_tiny: Callable, tmp_path: Path) -> None:
    """SFTTrainer wraps the model in a PeftModel when given a peft_config: two adapter systems at once."""
    peft = pytest.importorskip("peft")
    pytest.importorskip("trl")
    tok = word_tokenizer(tmp_path / "tok", TEXTS, pad=True)
    with pytest.raises(dk.TrainerSetupError, match="got a peft_config"):
        _sft_trainer(_model(make_tiny), tmp_path / "sft", tok, 1, peft_config=peft.LoraConfig(r=2))


def test_resume_from_a_whole_model_checkpoint_says_so(make_tiny: Callable, tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoint-1"
    make_tiny("llama").model.save_pretrained(ckpt)  # what a plain Trainer's checkpoint holds
    trainer = dk.AdapterTrainer(model=_model(make_tiny), args=_args(tmp_path / "hf", 2),
                                train_dataset=_dataset(_token_rows()))
    with pytest.raises(dk.TrainerSetupError, match="holds a whole model"):
        trainer.train(resume_from_checkpoint=str(ckpt))


def test_import_dorakit_imports_neither_transformers_nor_trl() -> None:
    code = ("import sys, dorakit, dorakit.training.hf_trainer; "
            "assert not {'transformers', 'trl'} & set(sys.modules), sorted(sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


# ------------------------------------------------------------------------------------ DDP, accelerate

@pytest.mark.slow
def test_ddp_under_accelerate_launch_trains_what_one_process_trains(tmp_path: Path) -> None:
    """2 processes × 1 row (gloo, CPU), killed after step 2 and resumed, against 1 process × 2 rows
    uninterrupted: Trainer's sequential sampler hands process r the r-th row of each global batch."""
    pytest.importorskip("accelerate")
    import socket

    import hf_trainer_worker as worker

    reference = worker.model()
    one = dk.AdapterTrainer(model=reference, args=worker.args(tmp_path / "one", 2), train_dataset=worker.dataset())
    one.train()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           worker.__file__, str(out), "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "losses.json").read_text())
    assert record["world_size"] == 2
    assert record["killed"] == pytest.approx(_losses(one)[:2], rel=1e-5, abs=0)
    assert record["resumed"] == pytest.approx(_losses(one), rel=1e-5, abs=0)
    final = {f"base_model.model.{k}": v for k, v in dk.read_adapter(out / "final").tensors.items()}
    _assert_same_adapter(final, _adapter(reference))
    _assert_adapter_only_checkpoint(out / "checkpoint-2", reference)
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(_dir_bytes(out / "checkpoint-2"))
