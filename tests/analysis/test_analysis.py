"""dorakit.analysis: the paper's ΔM / ΔD (Liu et al. 2024, §2.2) against a float64 hand computation,
known cases, the factored adapter path against the dense one, merged-vs-base against live adapters,
the training callback against post-hoc checkpoints, and the figure."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import dorakit as dk
from dorakit import analysis
from dorakit.analysis import DeltaRecord, DeltaRecorder

F64 = torch.float64
# Both sides of every comparison are float64 sums of <= ~100 terms in different orders: a few 1e-16
# relative to values of size <= ~10, so 1e-12 absolute leaves room without hiding a wrong formula
# (those differ by >= 1e-6 here).
TOL = {"rtol": 1e-10, "atol": 1e-12}
VARIANTS = ["lora", "dora", "magnitude"]
KINDS = ["linear", "hf_conv1d", "conv2d", "embedding"]


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = F64) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


def hand_deltas(w0: Tensor, wt: Tensor) -> tuple[float, float, list[float]]:
    """ΔM, ΔD and m_t row by row in Python floats (float64), straight from paper Eq. 3-4."""
    rows0, rowst = w0.double().flatten(1).tolist(), wt.double().flatten(1).tolist()
    dm, dd, mags = [], [], []
    for a, b in zip(rows0, rowst):
        na, nb = math.sqrt(math.fsum(x * x for x in a)), math.sqrt(math.fsum(x * x for x in b))
        mags.append(nb)
        dm.append(abs(nb - na))
        dd.append(1.0 - math.fsum(x * y for x, y in zip(a, b)) / (na * nb))
    return sum(dm) / len(dm), sum(dd) / len(dd), mags


# ---- the metric on any pair of weights ---------------------------------------------------------

@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("shape", [(7, 13), (5, 3, 2, 3)])
def test_metrics_match_float64_hand_computation(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    w0, wt = randn(*shape, seed=1, dtype=dtype), randn(*shape, seed=2, dtype=dtype)
    stats = analysis.magnitude_direction(w0, wt, chunk_rows=3)  # chunks of 3 rows: 7 = 3 + 3 + 1
    dm, dd, mags = hand_deltas(w0, wt)
    assert stats.delta_m == pytest.approx(dm, rel=1e-12)
    assert stats.delta_d == pytest.approx(dd, rel=1e-12)
    torch.testing.assert_close(stats.magnitude, torch.tensor(mags, dtype=F64), **TOL)
    assert stats.rows == shape[0] and stats.zero_rows == 0


def test_pure_row_scaling_moves_magnitude_only() -> None:
    w0 = randn(9, 6, seed=3)
    c = torch.linspace(0.5, 2.0, 9, dtype=F64)
    stats = analysis.magnitude_direction(w0, c[:, None] * w0)
    assert stats.delta_d == pytest.approx(0.0, abs=1e-15)
    expected = ((c - 1).abs() * w0.norm(dim=1)).mean().item()
    assert stats.delta_m == pytest.approx(expected, rel=1e-12) and stats.delta_m > 0.1


def test_pure_rotation_at_fixed_norm_moves_direction_only() -> None:
    w0 = randn(9, 6, seed=4)
    q, _ = torch.linalg.qr(randn(6, 6, seed=5))                     # orthogonal: rows keep their norm
    wt = w0 @ q
    stats = analysis.magnitude_direction(w0, wt)
    assert stats.delta_m == pytest.approx(0.0, abs=1e-13)
    assert stats.delta_d == pytest.approx(hand_deltas(w0, wt)[1], rel=1e-12) and stats.delta_d > 0.1


def test_zero_rows_count_in_delta_m_and_are_left_out_of_delta_d() -> None:
    w0, wt = randn(4, 5, seed=6), randn(4, 5, seed=7)
    w0[1] = 0.0
    wt[3] = 0.0
    stats = analysis.magnitude_direction(w0, wt)
    assert stats.zero_rows == 2
    keep = [0, 2]
    assert stats.delta_d == pytest.approx(hand_deltas(w0[keep], wt[keep])[1], rel=1e-12)
    expected_m = (wt.norm(dim=1) - w0.norm(dim=1)).abs().mean().item()
    assert stats.delta_m == pytest.approx(expected_m, rel=1e-12)
    assert math.isnan(analysis.magnitude_direction(torch.zeros(3, 2), torch.ones(3, 2)).delta_d)


def test_bad_shapes_raise() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        analysis.magnitude_direction(torch.ones(3, 4), torch.ones(4, 3))
    with pytest.raises(ValueError, match="no rows"):
        analysis.magnitude_direction(torch.ones(3), torch.ones(3))


def test_fit_line_slope_and_pearson_r() -> None:
    xs = [0.1, 0.2, 0.3, 0.5]
    fit = analysis.fit_line(xs, [1 - 2 * x for x in xs])
    assert (fit.slope, fit.intercept, fit.r, fit.n) == (pytest.approx(-2), pytest.approx(1), pytest.approx(-1), 4)
    noisy = analysis.fit_line([0, 1, 2, 3], [0, 2, 1, 3])
    assert noisy.slope == pytest.approx(0.8) and noisy.r == pytest.approx(0.8)
    assert math.isnan(analysis.fit_line([1.0], [2.0]).slope)
    assert math.isnan(analysis.fit_line([1.0, 1.0], [2.0, 3.0]).r)


@pytest.mark.parametrize(("name", "layer"), [
    ("model.layers.3.self_attn.q_proj", 3), ("encoder.layer.11.attention.self.query", 11),
    ("transformer.h.0.attn.c_attn", 0), ("blocks.2.mlp.fc1", 2), ("model.encoder.conv1", None),
    ("layers.1.sub.layers.4.proj", 4), ("heads.2.proj", None)])
def test_layer_index_from_name(name: str, layer: int | None) -> None:
    assert analysis.layer_index(name) == layer


# ---- the factored adapter path -----------------------------------------------------------------

def make_adapter(kind: str, variant: str, seed: int = 0) -> dk.AdapterLayer:
    """A float64 adapter with nonzero B and a perturbed magnitude, one entry negative."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(seed)
    base = {"linear": lambda: nn.Linear(13, 7), "hf_conv1d": lambda: Conv1D(7, 13),
            "conv2d": lambda: nn.Conv2d(3, 7, (3, 2)), "embedding": lambda: nn.Embedding(13, 7)}[kind]()
    cls = {"linear": dk.LinearAdapter, "hf_conv1d": dk.Conv1DAdapter, "conv2d": dk.ConvAdapter,
           "embedding": dk.EmbeddingAdapter}[kind]
    layer = cls(base.to(F64).requires_grad_(False), variant, rank=3, alpha=5.0)
    with torch.no_grad():
        if layer.lora_B is not None:
            layer.lora_B.copy_(randn(*layer.lora_B.shape, seed=seed + 1) * 0.3)
            layer.lora_A.copy_(randn(*layer.lora_A.shape, seed=seed + 2) * 0.3)
        if variant != "lora":
            layer.magnitude.mul_(torch.rand(7, generator=torch.Generator().manual_seed(seed), dtype=F64) + 0.5)
            layer.magnitude[2] *= -1
    return layer


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind", KINDS)
def test_factored_adapter_stats_equal_dense_computation(kind: str, variant: str) -> None:
    layer = make_adapter(kind, variant)
    factored = analysis.adapter_magnitude_direction(layer, chunk_rows=4)
    dense = analysis.magnitude_direction(layer.weight_2d(), layer.adapted_weight_2d())
    for got, want in zip((factored.magnitude_0, factored.magnitude, factored.cos),
                         (dense.magnitude_0, dense.magnitude, dense.cos)):
        torch.testing.assert_close(got, want, **TOL)
    assert factored.delta_m > 1e-3 and factored.delta_d > 1e-3            # the adapter did something
    assert factored.delta_d == pytest.approx(dense.delta_d, rel=1e-10)


def test_magnitude_only_leaves_direction_exactly_unchanged() -> None:
    layer = make_adapter("linear", "magnitude")
    with torch.no_grad():
        layer.magnitude.abs_()
    stats = analysis.adapter_magnitude_direction(layer)
    assert stats.delta_d == 0.0 and stats.delta_m > 0


def test_merged_adapter_raises_a_clear_error() -> None:
    layer = make_adapter("linear", "dora")
    layer.merge()
    with pytest.raises(dk.AdapterStateError, match="merged"):
        analysis.adapter_magnitude_direction(layer)


def adapted_model(make_tiny: Callable, perturb: Callable, kind: str, method: str) -> tuple[nn.Module, dict]:
    """A float64 tiny model with perturbed adapters, and its base state dict."""
    model = make_tiny(kind).model.to(F64)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    dk.apply_adapters(model, dk.AdapterConfig(method=method, rank=4, alpha=8.0))
    perturb(model, std=0.2)
    return model, base


def by_name(records: list[DeltaRecord]) -> dict[tuple[int | None, str], DeltaRecord]:
    return {(r.step, r.name): r for r in records}


def assert_same_numbers(got: list[DeltaRecord], want: list[DeltaRecord]) -> None:
    got_d, want_d = by_name(got), by_name(want)
    assert set(got_d) == set(want_d) and got_d
    for key, record in want_d.items():
        assert got_d[key].delta_m == pytest.approx(record.delta_m, rel=1e-10, abs=1e-13), key
        assert got_d[key].delta_d == pytest.approx(record.delta_d, rel=1e-10, abs=1e-13), key


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_merged_model_vs_base_equals_live_adapters(make_tiny: Callable, perturb: Callable, kind: str,
                                                   method: str) -> None:
    model, base = adapted_model(make_tiny, perturb, kind, method)
    live = analysis.model_deltas(model)
    assert {r.method for r in live} == {method} and all(r.delta_d > 0 for r in live)
    names = {r.name for r in live}
    transposed = analysis.transposed_keys(model)

    in_place = copy.deepcopy(model)
    dk.merge_adapters(in_place)                                       # keys ``...q_proj.base_layer.weight``
    merged = analysis.compare_state_dicts(base, in_place.state_dict(), transposed=transposed,
                                          include=names.__contains__)
    assert_same_numbers(merged, live)
    unloaded = dk.merge_and_unload(copy.deepcopy(model))
    plain = analysis.compare_state_dicts(base, unloaded.state_dict(), transposed=transposed,
                                         include=names.__contains__)
    assert_same_numbers(plain, live)
    layers = {r.layer for r in live}
    assert layers == {0, 1} and all(r.module_type == r.name.rpartition(".")[2] for r in live)


# ---- the training callback against post-hoc computations on checkpoints ------------------------

def train(model: nn.Module, steps: int, callback: Callable[[int, nn.Module], None],
          save: Callable[[nn.Module], dict[str, Tensor]], every: int) -> dict[int, dict[str, Tensor]]:
    """A few AdamW steps of next-token loss; returns step -> saved tensors at multiples of ``every``."""
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    checkpoints = {}
    for step in range(1, steps + 1):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        callback(step, model)
        if step % every == 0:
            checkpoints[step] = {k: v.detach().clone() for k, v in save(model).items()}
    return checkpoints


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_callback_equals_post_hoc_on_adapter_checkpoints(make_tiny: Callable, method: str) -> None:
    model = make_tiny("llama").model.to(F64)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    dk.apply_adapters(model, dk.AdapterConfig(method=method, rank=4, alpha=8.0, targets=("q_proj", "v_proj")))
    recorder = DeltaRecorder(every=2)
    ckpts = train(model, 6, recorder, dk.adapter_state_dict, every=2)
    assert sorted({r.step for r in recorder.records}) == [2, 4, 6] and len(recorder.records) == 3 * 4
    assert all(r.delta_d > 0 and r.delta_m > 0 for r in recorder.records)
    assert_same_numbers(analysis.adapter_checkpoint_series(model, ckpts), recorder.records)

    names = {r.name for r in recorder.records}
    for step, state in ckpts.items():                                 # dense route: load, merge, compare
        replay = copy.deepcopy(model)
        replay.load_state_dict(state, strict=False)
        merged = dk.merge_and_unload(replay).state_dict()
        dense = analysis.compare_state_dicts(base, merged, include=names.__contains__, step=step, method=method)
        assert_same_numbers(dense, [r for r in recorder.records if r.step == step])


def test_callback_for_full_fine_tuning_equals_checkpoint_series(make_tiny: Callable, tmp_path: Path) -> None:
    model = make_tiny("gpt2").model.to(F64)                           # Conv1D weights, stored (in, out)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    recorder = DeltaRecorder(every=2, reference=model, include=lambda name, m: ".attn." in name)
    ckpts = train(model, 4, recorder, nn.Module.state_dict, every=2)
    assert {r.method for r in recorder.records} == {"ft"} and len(recorder.records) == 2 * 4
    names = {r.name for r in recorder.records}
    series = analysis.checkpoint_series(base, ckpts, transposed=analysis.transposed_keys(model),
                                        include=names.__contains__, method="ft")
    assert_same_numbers(series, recorder.records)
    assert analysis.read_json(recorder.save(tmp_path / "deltas.json")) == recorder.records


def test_recorder_without_adapters_or_snapshot_raises(make_tiny: Callable) -> None:
    with pytest.raises(ValueError, match="reference=model"):
        DeltaRecorder(every=1)(1, make_tiny("llama").model)
    with pytest.raises(ValueError, match="positive integer"):
        DeltaRecorder(every=0)


# ---- output: rows, files, figure ----------------------------------------------------------------

def fake_records() -> list[DeltaRecord]:
    """Points shaped like the paper's Fig. 2: FT and DoRA slope down, LoRA slopes up."""
    records = []
    for method, sign in (("ft", -1.0), ("lora", 1.0), ("dora", -1.0)):
        for step in (100, 200, 300):
            for layer in range(4):
                dd = 1e-3 * (step / 100 + 0.3 * layer)
                dm = 0.05 + sign * 10 * dd + 1e-4 * layer
                records.append(DeltaRecord(f"model.layers.{layer}.self_attn.q_proj", layer, "q_proj", dm, dd,
                                           step, method, rows=32))
    return records


def test_rows_csv_and_json_round_trip(tmp_path: Path) -> None:
    records = fake_records()
    rows = analysis.to_rows(records)
    assert rows[0]["module_type"] == "q_proj" and set(rows[0]) >= {"layer", "step", "method", "delta_m", "delta_d"}
    lines = analysis.write_csv(records, tmp_path / "d.csv").read_text().splitlines()
    assert len(lines) == len(records) + 1 and lines[0].startswith("name,layer,module_type,delta_m,delta_d")
    assert analysis.read_json(analysis.write_json(records, tmp_path / "d.json")) == records
    means = analysis.summarize(records, by="method")
    assert means["lora"][1] == pytest.approx(means["dora"][1])


def test_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = analysis.plot_deltas(fake_records(), tmp_path / "fig2.png", module_type="q_proj")
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000


def test_plot_without_matplotlib_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"dorakit\[plot\]"):
        analysis.plot_deltas(fake_records(), tmp_path / "fig.png")


def test_importing_dorakit_and_analysis_does_not_import_matplotlib() -> None:
    code = "import sys, dorakit, dorakit.analysis; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
