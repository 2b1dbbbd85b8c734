"""dorakit.training.graphs and train(cuda_graph=True): padding to fixed shapes on CPU; on a GPU, CUDA-graph
training equals eager training (losses, tokens, trained tensors), recaptures for wider batches, runs a
short last batch eagerly, and a model that cannot be captured is a clear error."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, RaiseAtStep
from torch import Tensor, nn

import dorakit as dk
import dorakit.training.graphs as graphs_mod
from dorakit.training.data import IGNORE_INDEX, Batches, CausalExample, collate_causal
from dorakit.training.graphs import WIDTH_MULTIPLE, GraphCaptureError, GraphedMicroStep, pad_to_width, padded_width
from dorakit.training.train import TrainConfig, train

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
PAD = 0
PAD_VALUES = {"input_ids": PAD, "attention_mask": 0, "labels": IGNORE_INDEX}


# ------------------------------------------------------------------------------------------- padding

def test_padded_width_buckets() -> None:
    """Multiples of 64 up to 1024 tokens, then of 1/16 of the next power of two: ≤ 12.5% padding there."""
    assert WIDTH_MULTIPLE == 64
    assert [padded_width(n) for n in (1, 64, 65, 200, 1000, 1024)] == [64, 64, 128, 256, 1024, 1024]
    assert [padded_width(n) for n in (1025, 1100, 2048, 2049, 3000, 4096)] == [1152, 1152, 2048, 2304, 3072, 4096]
    for n in range(1025, 9000, 7):
        width = padded_width(n)
        assert n <= width <= 1.125 * n and width % WIDTH_MULTIPLE == 0, n
    assert len({padded_width(n) for n in range(1, 4097)}) == 16 + 8 + 8  # 64..1024, then 8 per doubling


def test_pad_to_width_pads_the_named_tensors_only() -> None:
    ids = torch.tensor([[5, 6, 7], [8, 9, PAD]])
    batch = {"input_ids": ids, "attention_mask": (ids != PAD).long(), "labels": ids.clone(),
             "class": torch.tensor([1, 0])}
    out = pad_to_width(batch, 5, PAD_VALUES)
    assert out["input_ids"].tolist() == [[5, 6, 7, PAD, PAD], [8, 9, PAD, PAD, PAD]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]]
    assert out["labels"].tolist() == [[5, 6, 7, -100, -100], [8, 9, PAD, -100, -100]]
    assert out["class"] is batch["class"]  # not named in pad_values: untouched
    assert pad_to_width(batch, 3, PAD_VALUES)["input_ids"] is ids  # already that wide: no copy
    assert batch["input_ids"] is ids and batch["input_ids"].shape == (2, 3)  # the input is not modified


@pytest.mark.parametrize("batch, width, match", [
    ({"input_ids": torch.zeros(2, 4, dtype=torch.long)}, 3, "cannot pad sequences of 4 tokens to a width of 3"),
    ({"labels": torch.zeros(2, 4, dtype=torch.long)}, 8, "needs input_ids"),
    ({"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 4, dtype=torch.long),
      "labels": torch.zeros(2, dtype=torch.long)}, 8, r"names 'labels', but its shape \(2,\) is not \(batch, 4, ...\)"),
    ({"input_ids": torch.zeros(2, 4, dtype=torch.long), "labels": torch.zeros(2, 4, dtype=torch.long)}, 8,
     "padding a CUDA-graph micro-batch needs an attention_mask"),
    ({"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 4, dtype=torch.long),
      "position_ids": torch.zeros(2, 4, dtype=torch.long)}, 8,
     r"the batch's \['position_ids'\] have the sequence length of input_ids but no pad value"),
])
def test_pad_to_width_rejects(batch: dict, width: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        pad_to_width(batch, width, PAD_VALUES)


def test_pad_values_must_name_input_ids() -> None:
    with pytest.raises(ValueError, match="pad_values must name input_ids"):
        GraphedMicroStep(nn.Linear(2, 2), [], 2, {"labels": -100}, nullcontext, None, torch.device("cpu"))


def test_cuda_graph_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match="cuda_graph must be True or False, got 'yes'"):
        TrainConfig(cuda_graph="yes")


def _variable_data(n: int, seed: int = 0) -> Callable[[list[int]], dict[str, Tensor]]:
    """Right-padded sequences of 3 to 100 tokens (so a run crosses the 64-token width), labels = inputs."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [3, 100, *torch.randint(3, 100, (n - 2,), generator=gen).tolist()]
    seqs = [torch.randint(3, VOCAB, (n_tok,), generator=gen).tolist() for n_tok in lengths]

    def make_batch(idx: list[int]) -> dict[str, Tensor]:
        return collate_causal([CausalExample(seqs[i], seqs[i]) for i in idx], PAD)

    return make_batch


def test_cuda_graph_on_cpu_is_an_error_before_anything_is_written(make_tiny: Callable, tmp_path: Path) -> None:
    model = make_tiny("llama").model
    cfg = TrainConfig(max_steps=1, cuda_graph=True)
    with pytest.raises(ValueError, match="cuda_graph needs a CUDA device, not cpu"):
        train(model, Batches(4, 2), _variable_data(4), cfg, tmp_path / "run", progress=False, pad_values=PAD_VALUES)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------- GPU

def _adapted(make_tiny: Callable, perturb: Callable, method: str) -> nn.Module:
    model = make_tiny("llama", seed=0).model
    torch.manual_seed(1)
    dk.apply_adapters(model, dk.AdapterConfig(method=method, rank=4, alpha=8.0, targets="all-linear"))
    perturb(model, seed=2)
    return model.to("cuda")


def _train(model: nn.Module, out: Path, cfg: TrainConfig, n: int = 9, batch: int = 4,
           **kw: object) -> dk.train.TrainResult:
    """Micro-batches of batch / grad_accum rows; 9 examples in batches of 4: every third step's batch
    has a single row, which runs eagerly."""
    return train(model, Batches(n, batch, seed=cfg.seed), _variable_data(n), cfg, out, progress=False,
                 device="cuda", items=lambda b: int((b["labels"][:, 1:] != IGNORE_INDEX).sum()),
                 pad_values=PAD_VALUES, **kw)


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "loss" in line]


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("method", ["dora", "lora"])
@pytest.mark.parametrize("precision, rtol", [("fp32", 1e-4), ("bf16", 4 * 2.0 ** -8), ("fp16", 4 * 2.0 ** -10)])
def test_gpu_cuda_graph_training_equals_eager(make_tiny: Callable, perturb: Callable, tmp_path: Path, method: str,
                                              precision: str, rtol: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """Six steps of grad_accum 2, eager and replayed from CUDA graphs, from the same start: the same
    losses and token counts per step, the same trained tensors (fp32: to rounding of other GEMM shapes;
    bf16: to a few bf16 epsilons). The data's widths cross 64 tokens, so the graph is captured again."""
    common = {"max_steps": 6, "grad_accum": 2, "lr": 1e-2, "precision": precision, "seed": 3}
    eager = _adapted(make_tiny, perturb, method)
    graphed = _adapted(make_tiny, perturb, method)
    start = {n: p.detach().clone() for n, p in eager.named_parameters() if p.requires_grad}
    res_e = _train(eager, tmp_path / "eager", TrainConfig(**common))
    replays = []
    real_call = GraphedMicroStep.__call__
    monkeypatch.setattr(GraphedMicroStep, "__call__", lambda self, *a: replays.append(1) or real_call(self, *a))
    res_g = _train(graphed, tmp_path / "graph", TrainConfig(**common, cuda_graph=True))
    assert res_e.graph_captures == 0 and res_g.graph_captures >= 2  # a 64- and a 128-token width
    assert len(replays) == 8  # 2 epochs of batches 4, 4, 1: 8 micro-batches of 2 replayed, the 2 single rows eager
    rec_e, rec_g = _records(tmp_path / "eager"), _records(tmp_path / "graph")
    assert [r["tokens"] for r in rec_g] == [r["tokens"] for r in rec_e]
    torch.testing.assert_close(torch.tensor(res_g.losses), torch.tensor(res_e.losses), rtol=rtol, atol=0.0)
    trained_e = dict(eager.named_parameters())
    for name, p in graphed.named_parameters():
        if p.requires_grad:  # what training changed, graphed vs eager, relative to the change itself
            change_e, change_g = trained_e[name].detach() - start[name], p.detach() - start[name]
            assert change_e.norm() > 0, name
            assert (change_g - change_e).norm() <= 10 * rtol * change_e.norm(), name


@pytest.mark.gpu
@cuda
def test_gpu_parameter_the_loss_does_not_reach_keeps_no_gradient(make_tiny: Callable, perturb: Callable,
                                                                 tmp_path: Path) -> None:
    """As in eager training, a trainable parameter outside the loss keeps grad None, so AdamW's weight
    decay leaves it alone (the graph's gradient buffers are only kept for parameters the warm-up reached)."""
    model = _adapted(make_tiny, perturb, "dora")
    model.register_parameter("unreached", nn.Parameter(torch.ones(3, device="cuda")))
    _train(model, tmp_path / "run", TrainConfig(max_steps=2, lr=1e-2, weight_decay=0.5, cuda_graph=True))
    assert model.unreached.grad is None and torch.equal(model.unreached.detach(), torch.ones(3, device="cuda"))
    assert model.model.layers[0].self_attn.q_proj.lora_A.grad is not None  # (kept, zeroed in place)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("keep_rng", [True, False])
def test_gpu_cuda_graph_resume_continues_the_same_random_stream(make_tiny: Callable, perturb: Callable,
                                                                tmp_path: Path, keep_rng: bool,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """With dropout, a run killed at step 5 and resumed from its step-3 checkpoint logs the losses of an
    uninterrupted run: the resumed process captures its graphs at other steps, and the warm-up passes'
    dropout draws are kept out of the run's random stream. Negative control (keep_rng=False): without
    that, the resumed losses differ."""
    if not keep_rng:
        monkeypatch.setattr(graphs_mod, "_rng_kept", lambda device: nullcontext())
    cfg = TrainConfig(lr=5e-3, max_steps=6, grad_accum=2, save_every=3, seed=5, cuda_graph=True)

    def model() -> nn.Module:
        m = make_tiny("llama", seed=0).model
        torch.manual_seed(1)
        dk.apply_adapters(m, dk.AdapterConfig(method="dora", rank=4, alpha=8.0, targets="all-linear", dropout=0.2))
        perturb(m, seed=2)
        return m.to("cuda")

    full = _train(model(), tmp_path / "full", cfg)
    with pytest.raises(RuntimeError, match="killed at step 5"):
        _train(model(), tmp_path / "cut", cfg, callbacks=[RaiseAtStep(5)])
    resumed = _train(model(), tmp_path / "cut", cfg, resume=True)
    assert len(resumed.losses) == 3 and resumed.graph_captures >= 1
    close = torch.allclose(torch.tensor(resumed.losses), torch.tensor(full.losses[3:]), rtol=1e-5, atol=0.0)
    assert close == keep_rng, (resumed.losses, full.losses[3:])


@pytest.mark.gpu
@cuda
def test_gpu_cuda_graph_trains_a_bert_classifier_as_eager(tmp_path: Path) -> None:
    """Sequence classification: labels (B,) are not padded, token_type_ids are; the same losses as eager."""
    import transformers

    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=128, pad_token_id=PAD, num_labels=3,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # (graph and eager
    # runs draw different dropout masks: the warm-up passes draw too, and the padded shapes differ)
    tokens = _variable_data(8)

    def make_batch(idx: list[int]) -> dict[str, Tensor]:
        batch = tokens(idx)
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                "token_type_ids": torch.zeros_like(batch["input_ids"]), "labels": torch.tensor(idx) % 3}

    losses = []
    for name, graph in (("eager", False), ("graph", True)):
        torch.manual_seed(0)
        model = transformers.BertForSequenceClassification(cfg)
        dk.apply_adapters(model, dk.AdapterConfig(method="dora", rank=4, alpha=8.0, targets="all-linear",
                                                  modules_to_save=["classifier"]))
        result = train(model.to("cuda"), Batches(8, 4, seed=0), make_batch,
                       TrainConfig(max_steps=4, lr=1e-2, cuda_graph=graph), tmp_path / name, progress=False,
                       device="cuda", pad_values={"input_ids": PAD, "attention_mask": 0, "token_type_ids": 0})
        losses.append(result.losses)
        batches = Batches(8, 4, seed=0).forever()  # the same order: one graph per padded width seen
        widths = {padded_width(make_batch(next(batches))["input_ids"].shape[1]) for _ in range(4)}
        assert result.graph_captures == (len(widths) if graph else 0)
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-4, atol=0.0)


@pytest.mark.gpu
@cuda
def test_gpu_model_that_syncs_with_the_host_is_a_clear_capture_error(tmp_path: Path) -> None:
    class Syncing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(VOCAB, 8)

        def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> object:
            loss = self.emb(input_ids).square().mean()
            if loss.item() > 1e9:  # a host sync: not allowed while capturing
                loss = loss * 0
            return type("Out", (), {"loss": loss})()

    model = Syncing().to("cuda")
    message = "(?s)cannot be captured in a CUDA graph .* Train without cuda_graph"
    with pytest.raises(GraphCaptureError, match=message) as info:
        train(model, Batches(4, 2), _variable_data(4), TrainConfig(max_steps=1, cuda_graph=True), tmp_path / "r",
              progress=False, device="cuda", pad_values=PAD_VALUES)
    assert "operation not permitted when stream is capturing" in str(info.value)  # names the op that failed
    torch.randn(4, device="cuda").sum().item()  # the CUDA RNG and the device still work after the failed capture
