"""dorakit.training.train: the learning-rate schedule, gradient accumulation, exact resume (after a kill and after
Ctrl-C), atomic checkpoints, and the run.json identity check.

Every run trains a tiny Llama (conftest) with adapters on random equal-length token sequences whose
labels are the inputs, so each micro-batch of b sequences supervises exactly b·(T-1) tokens.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, RaiseAtStep
from torch import Tensor, nn

import dorakit as dk
import dorakit.training.train as train_mod
from dorakit.training.checkpoint import read_checkpoint
from dorakit.training.data import Batches
from dorakit.training.train import TrainConfig, latest_checkpoint, lr_factor, train

SEQ = 6


# ---------------------------------------------------------------------------------------------- helpers

def _model(make_tiny: Callable, method: str = "dora", rank: int = 4, dropout: float = 0.0,
           targets: object = "all-linear", perturb: Callable | None = None) -> nn.Module:
    """A fresh tiny Llama with adapters; the same arguments give bit-identical models."""
    model = make_tiny("llama", seed=0).model
    if method == "full":
        return model
    torch.manual_seed(1)
    dk.apply_adapters(model, dk.AdapterConfig(method=method, rank=rank, alpha=2.0 * rank, targets=targets,
                                              dropout=dropout))
    if perturb is not None:
        perturb(model, seed=2)  # B != 0: every adapter tensor (A included) gets a gradient at step 1
    return model


def _data(n: int, seed: int = 0) -> Callable[[list[int]], dict[str, Tensor]]:
    ids = torch.randint(3, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))  # (N, T)

    def make_batch(idx: list[int]) -> dict[str, Tensor]:
        x = ids[idx]  # (B, T)
        return {"input_ids": x, "labels": x.clone()}

    return make_batch


def _run(model: nn.Module, out: Path, cfg: TrainConfig, *, n: int = 7, batch_size: int = 2,
         **kw: object) -> train_mod.TrainResult:
    """``batch_size`` is the micro-batch: a step takes batch_size × grad_accum items."""
    return train(model, Batches(n, batch_size * cfg.grad_accum, seed=cfg.seed), _data(n), cfg, out, progress=False,
                 **kw)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in _metrics(out) if "loss" in r]


def _steps(out: Path) -> list[int]:
    return [r["step"] for r in _metrics(out) if "loss" in r]


def _trainable(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes): what "untouched" means for a run directory."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------ lr schedule

C3 = 0.5 * (1 + math.cos(math.pi / 4))  # cosine after 1 of 4 decay steps


@pytest.mark.parametrize("schedule, expected", [
    # warmup 2 of 6 steps: (s+1)/2 for s < 2, then decay over the remaining 4 steps
    ("linear", [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]),
    ("cosine", [0.5, 1.0, 1.0, C3, 0.5, 1 - C3]),
    ("constant", [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]),
])
def test_lr_schedule_values_and_logged_lr(make_tiny: Callable, tmp_path: Path, schedule: str,
                                          expected: list[float]) -> None:
    cfg = TrainConfig(lr=0.01, warmup_steps=2, max_steps=6, schedule=schedule)
    factors = [lr_factor(s, cfg) for s in range(cfg.max_steps)]
    assert factors == pytest.approx(expected, abs=1e-12)
    _run(_model(make_tiny), tmp_path, cfg)
    assert [r["lr"] for r in _metrics(tmp_path)] == pytest.approx([0.01 * f for f in expected], abs=1e-15)


def test_lr_schedule_without_warmup_starts_at_peak_and_never_reaches_zero() -> None:
    for schedule in ("linear", "cosine"):
        cfg = TrainConfig(max_steps=10, schedule=schedule)
        factors = [lr_factor(s, cfg) for s in range(10)]
        assert factors[0] == 1.0 and factors[-1] > 0
        assert all(a > b for a, b in itertools.pairwise(factors)), schedule
    long_warmup = TrainConfig(max_steps=4, warmup_steps=8)  # warmup longer than the run: still rising
    assert [lr_factor(s, long_warmup) for s in range(4)] == [1 / 8, 2 / 8, 3 / 8, 4 / 8]


@pytest.mark.parametrize("bad, match", [
    ({"grad_accum": 0}, "grad_accum must be a positive integer"),
    ({"max_steps": 0}, "max_steps must be a positive integer"),
    ({"save_every": -1}, "save_every must be a non-negative integer"),
    ({"lr": float("nan")}, "lr must be a positive number"),
    ({"schedule": "step"}, "schedule must be one of"),
    ({"precision": "fp8"}, "precision must be one of"),
])
def test_train_config_rejects_bad_values(bad: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrainConfig(**bad)


# -------------------------------------------------------------------------------- gradient accumulation

def test_grad_accum_equals_one_big_batch(make_tiny: Callable, perturb: Callable, tmp_path: Path) -> None:
    """One step of batch 4 == one step of 2 micro-batches of 2, checked on the gradient itself.

    The loss is a mean over supervised tokens and every sequence supervises SEQ-1 tokens, so the mean
    of the two micro-batch means is the mean over all 4 sequences and the gradients are equal. Comparing
    only the updated weights would not test this: Adam's first step is ~lr·sign(g), blind to a wrong
    scale of g. So we compare AdamW's first moment, exp_avg = (1 - beta1)·g, against a gradient computed
    here by hand; clipping and dropout are off (clipping would hide a wrong scale too).
    """
    cfg = TrainConfig(lr=1e-2, max_steps=1, max_grad_norm=0.0)
    reference = _model(make_tiny, perturb=perturb)
    reference.train()
    reference(**_data(4)(Batches(4, 4, seed=0).order(0))).loss.backward()
    grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    assert all(g.abs().sum() > 0 for g in grads.values())

    results = {}
    for batch_size, accum in ((4, 1), (2, 2)):
        model, out = _model(make_tiny, perturb=perturb), tmp_path / f"b{batch_size}x{accum}"
        res = _run(model, out, TrainConfig(**{**cfg.__dict__, "grad_accum": accum}), n=4, batch_size=batch_size)
        saved = read_checkpoint(latest_checkpoint(out))
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        results[batch_size] = (res.losses, {n: saved[f"optim.state.{n}.exp_avg"] for n in names}, _trainable(model))
    (loss_a, m_a, w_a), (loss_b, m_b, w_b) = results[4], results[2]
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    for name, g in grads.items():
        torch.testing.assert_close(m_a[name], 0.1 * g, rtol=1e-5, atol=1e-9, msg=name)
        torch.testing.assert_close(m_b[name], 0.1 * g, rtol=1e-5, atol=1e-9, msg=name)
        torch.testing.assert_close(w_a[name], w_b[name], rtol=1e-5, atol=1e-7, msg=name)


# ----------------------------------------------------------------------------------------------- resume

# 7 items in micro-batches of 2 (4 per epoch), 3 per step: the checkpoint at step 3 sits mid-epoch
# and the resumed steps cross several epoch boundaries.
RESUME = TrainConfig(lr=5e-3, warmup_steps=2, max_steps=8, grad_accum=3, save_every=3, seed=5)


@pytest.mark.parametrize("method", ["dora", "lora", "full"])
def test_resume_after_kill_is_identical(make_tiny: Callable, tmp_path: Path, method: str) -> None:
    full = _run(_model(make_tiny, method, dropout=0.2), tmp_path / "full", RESUME)
    model = _model(make_tiny, method, dropout=0.2)
    with pytest.raises(RuntimeError, match="killed at step 5"):
        _run(model, tmp_path / "cut", RESUME, callbacks=[RaiseAtStep(5)])
    ckpt = latest_checkpoint(tmp_path / "cut")
    assert ckpt.name == "step-0000003"
    assert json.loads((ckpt / "state.json").read_text())["batches"]["index"] != 0  # mid-epoch
    assert _steps(tmp_path / "cut") == [1, 2, 3, 4]  # step 5 was killed before its metrics line

    model = _model(make_tiny, method, dropout=0.2)  # a fresh process would rebuild the model like this
    resumed = _run(model, tmp_path / "cut", RESUME, resume=True)
    assert resumed.losses == full.losses[3:]
    assert _losses(tmp_path / "cut") == full.losses
    assert _steps(tmp_path / "cut") == list(range(1, 9))
    w_full = read_checkpoint(latest_checkpoint(tmp_path / "full"))
    w_cut = read_checkpoint(latest_checkpoint(tmp_path / "cut"))
    assert w_full.keys() == w_cut.keys()
    assert all(torch.equal(w_full[k], w_cut[k]) for k in w_full)


def test_resume_test_is_sensitive_to_the_rng_state(make_tiny: Callable, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control: with dropout on, skipping the RNG restore changes the losses after a resume."""
    full = _run(_model(make_tiny, dropout=0.2), tmp_path / "full", RESUME)
    with pytest.raises(RuntimeError):
        _run(_model(make_tiny, dropout=0.2), tmp_path / "cut", RESUME, callbacks=[RaiseAtStep(5)])
    monkeypatch.setattr(train_mod, "set_rng_state", lambda state: None)
    resumed = _run(_model(make_tiny, dropout=0.2), tmp_path / "cut", RESUME, resume=True)
    assert resumed.losses != full.losses[3:]


def test_resume_before_the_first_checkpoint_restarts_without_duplicate_metrics(make_tiny: Callable,
                                                                               tmp_path: Path) -> None:
    cfg = TrainConfig(lr=5e-3, max_steps=4, grad_accum=2, save_every=0)
    full = _run(_model(make_tiny, dropout=0.2), tmp_path / "full", cfg)
    with pytest.raises(RuntimeError):
        _run(_model(make_tiny, dropout=0.2), tmp_path / "cut", cfg, callbacks=[RaiseAtStep(3)])
    assert latest_checkpoint(tmp_path / "cut") is None and _steps(tmp_path / "cut") == [1, 2]
    resumed = _run(_model(make_tiny, dropout=0.2), tmp_path / "cut", cfg, resume=True)
    assert resumed.losses == full.losses
    assert _steps(tmp_path / "cut") == [1, 2, 3, 4]


def test_fp16_resume_restores_the_loss_scale(make_tiny: Callable, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """fp16 autocast (CPU here) with a gradient scaler: the scale is part of the checkpoint.

    The scaler doubles its scale after every finite step, so it overflows (and skips a step) within a
    few steps; a resumed run that restarted from the initial scale would skip different steps.
    """
    real = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda device: real(device, init_scale=2.0**12, growth_interval=1))
    cfg = TrainConfig(lr=5e-3, max_steps=8, grad_accum=2, save_every=2, precision="fp16")
    full = _run(_model(make_tiny), tmp_path / "full", cfg)
    with pytest.raises(RuntimeError):
        _run(_model(make_tiny), tmp_path / "cut", cfg, callbacks=[RaiseAtStep(3)])
    state = json.loads((latest_checkpoint(tmp_path / "cut") / "state.json").read_text())
    assert state["scaler"]["scale"] > 0 and "_growth_tracker" in state["scaler"]
    resumed = _run(_model(make_tiny), tmp_path / "cut", cfg, resume=True)
    assert resumed.losses == full.losses[2:]


# ---------------------------------------------------------------------------------------------- Ctrl-C

def test_sigint_finishes_the_step_checkpoints_and_resumes_identically(make_tiny: Callable,
                                                                       tmp_path: Path) -> None:
    cfg = TrainConfig(lr=5e-3, max_steps=7, grad_accum=2, seed=3)  # no periodic checkpoints
    full = _run(_model(make_tiny, dropout=0.2), tmp_path / "full", cfg)

    def ctrl_c(step: int, model: nn.Module) -> None:
        if step == 4:
            os.kill(os.getpid(), signal.SIGINT)  # the handler only sets a flag: the step still completes

    handler = signal.getsignal(signal.SIGINT)
    cut = _run(_model(make_tiny, dropout=0.2), tmp_path / "cut", cfg, callbacks=[ctrl_c])
    assert signal.getsignal(signal.SIGINT) is handler  # restored
    assert cut.interrupted and cut.steps == 4 and cut.losses == full.losses[:4]
    assert latest_checkpoint(tmp_path / "cut").name == "step-0000004"
    assert _steps(tmp_path / "cut") == [1, 2, 3, 4]

    resumed = _run(_model(make_tiny, dropout=0.2), tmp_path / "cut", cfg, resume=True)
    assert not resumed.interrupted and resumed.steps == 7
    assert resumed.losses == full.losses[4:]
    assert _losses(tmp_path / "cut") == full.losses
    assert _steps(tmp_path / "cut") == list(range(1, 8))


def test_eval_runs_every_n_steps_and_at_the_end_in_eval_mode(make_tiny: Callable, tmp_path: Path) -> None:
    seen: list[bool] = []

    def evaluate(model: nn.Module) -> dict[str, float]:
        seen.append(model.training)
        return {"accuracy": 0.5}

    model = _model(make_tiny)
    res = _run(model, tmp_path, TrainConfig(max_steps=5, eval_every=2), evaluate=evaluate)
    assert [(r["step"], r["eval_accuracy"]) for r in _metrics(tmp_path) if "eval_accuracy" in r] == \
        [(2, 0.5), (4, 0.5), (5, 0.5)]
    assert seen == [False] * 3 and model.training and res.eval == {"eval_accuracy": 0.5}


def test_metrics_lines_and_progress(make_tiny: Callable, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    train(_model(make_tiny), Batches(4, 2), _data(4), TrainConfig(max_steps=3, log_every=2), tmp_path)
    lines = _metrics(tmp_path)
    assert [r["step"] for r in lines] == [2, 3]  # every log_every steps, and the last one
    assert set(lines[0]) == {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s"}
    assert lines[1]["tokens"] == 3 * 2 * SEQ and lines[1]["tokens_per_s"] > 0
    err = capsys.readouterr().err  # loss, tokens/s and ETA on stderr
    assert re.search(rf"train step 3/3 loss {lines[1]['loss']:.4f} [\d,]+ tok/s ETA \d\d:\d\d:\d\d", err), err


# ----------------------------------------------------------------------------------- atomic checkpoints

@pytest.mark.parametrize("writer", ["torch.save", "dcp.save"])
def test_failed_save_leaves_the_previous_checkpoint_and_latest(make_tiny: Callable, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              writer: str) -> None:
    cfg = TrainConfig(max_steps=4, save_every=2)
    before: dict[str, bytes] = {}

    def break_saving(step: int, model: nn.Module) -> None:
        if step == 3:
            before.update(_tree(tmp_path / "checkpoints"))

            def disk_full(*args: object, **kwargs: object) -> None:
                raise OSError("No space left on device")

            if writer == "torch.save":
                monkeypatch.setattr(torch, "save", disk_full)
            else:
                monkeypatch.setattr(torch.distributed.checkpoint, "save", disk_full)

    with pytest.raises(OSError, match="No space left"):
        _run(_model(make_tiny), tmp_path, cfg, callbacks=[break_saving])
    monkeypatch.undo()
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-0000002"]  # no temp directory left
    assert _tree(root) == before and before["latest"] == b"step-0000002"
    resumed = _run(_model(make_tiny), tmp_path, cfg, resume=True)  # and the run continues from it
    assert resumed.steps == 4 and _steps(tmp_path) == [1, 2, 3, 4]


def test_failed_first_save_leaves_no_checkpoint(make_tiny: Callable, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError):
        _run(_model(make_tiny), tmp_path, TrainConfig(max_steps=2, save_every=1))
    assert list((tmp_path / "checkpoints").iterdir()) == []
    assert latest_checkpoint(tmp_path) is None


def test_each_step_is_saved_once(make_tiny: Callable, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The end-of-run save skips a step the periodic save already wrote (rewriting it would delete the
    directory `latest` names before its replacement is renamed into place)."""
    saved: list[int] = []
    real = train_mod.save_checkpoint
    monkeypatch.setattr(train_mod, "save_checkpoint", lambda out, step, *a: saved.append(step) or real(out, step, *a))
    _run(_model(make_tiny), tmp_path, TrainConfig(max_steps=4, save_every=2))
    assert saved == [2, 4]
    _run(_model(make_tiny), tmp_path, TrainConfig(max_steps=4, save_every=2), resume=True)  # nothing left to do
    assert saved == [2, 4]


# ------------------------------------------------------------------------------------- run identity

IDENTITY = {"model": "tiny-llama", "method": "dora", "rank": 4}
SHORT = TrainConfig(max_steps=2, save_every=1)


@pytest.fixture
def done(make_tiny: Callable, tmp_path: Path) -> Path:
    """A finished run directory."""
    out = tmp_path / "run"
    _run(_model(make_tiny), out, SHORT, identity=IDENTITY)
    return out


def test_new_run_into_an_existing_run_refuses_and_touches_nothing(make_tiny: Callable, done: Path) -> None:
    before = _tree(done)
    with pytest.raises(FileExistsError, match="already holds a run .*pass --resume"):
        _run(_model(make_tiny), done, SHORT, identity=IDENTITY)
    assert _tree(done) == before


@pytest.mark.parametrize("identity, cfg, key", [
    ({**IDENTITY, "rank": 8}, SHORT, "rank: 4 -> 8"),
    (IDENTITY, TrainConfig(max_steps=2, save_every=1, lr=1e-3), "train.lr: 0.0002 -> 0.001"),
    (IDENTITY, TrainConfig(max_steps=3, save_every=1), "train.max_steps: 2 -> 3"),
])
def test_resume_with_other_settings_names_the_setting(make_tiny: Callable, done: Path, identity: dict,
                                                      cfg: TrainConfig, key: str) -> None:
    before = _tree(done)
    with pytest.raises(ValueError, match=f"is a different run: {key}"):
        _run(_model(make_tiny), done, cfg, identity=identity, resume=True)
    assert _tree(done) == before


def test_resume_logging_settings_may_change(make_tiny: Callable, done: Path) -> None:
    res = _run(_model(make_tiny), done, TrainConfig(max_steps=2, save_every=0, log_every=5), identity=IDENTITY,
               resume=True)
    assert res.steps == 2 and res.losses == []


def test_resume_without_a_run_errors(make_tiny: Callable, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="holds no run to resume"):
        _run(_model(make_tiny), tmp_path / "nothing", SHORT, resume=True)
    assert not (tmp_path / "nothing").exists()


@pytest.mark.parametrize("other, match", [
    ({"targets": ["q_proj", "v_proj"]}, "trainable tensors differ from the model's"),
    ({"rank": 2}, r"lora_A is \(4, \d+\) in the checkpoint but \(2, \d+\) in the model"),
])
def test_checkpoint_of_another_model_errors(make_tiny: Callable, done: Path, other: dict, match: str) -> None:
    before = _tree(done)
    with pytest.raises(ValueError, match=match):
        _run(_model(make_tiny, **other), done, SHORT, identity=IDENTITY, resume=True)
    assert _tree(done) == before


def test_dangling_latest_pointer_is_a_clear_error(make_tiny: Callable, done: Path) -> None:
    (done / "checkpoints" / "latest").write_text("step-0000009")
    with pytest.raises(FileNotFoundError, match="names step-0000009, which is missing or incomplete"):
        _run(_model(make_tiny), done, SHORT, identity=IDENTITY, resume=True)
