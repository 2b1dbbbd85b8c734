"""dorakit params (counts on the meta device) and dorakit sweep (accuracy vs rank)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fixtures_text import boolq_llama, shared_task_file

from dorakit import AdapterConfig
from dorakit.commands.cli import main
from dorakit.commands.sweep import PRESETS, count_for, meta_model

QKVUD = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]  # the paper's LLaMA targets (Hu et al. 2023)


def _hand_count(preset: str, rank: int, dora: bool) -> int:
    """r·(in + out) per adapted (out, in) weight, + out per magnitude, summed over layers."""
    p = PRESETS[preset]
    h, f, kv = p["hidden_size"], p["intermediate_size"], p["num_key_value_heads"] * p["hidden_size"] // p[
        "num_attention_heads"]
    shapes = [(h, h), (kv, h), (kv, h), (f, h), (h, f)]  # (out, in) of q, k, v, up, down
    per_layer = sum(rank * (o + i) + (o if dora else 0) for o, i in shapes)
    return per_layer * p["num_hidden_layers"]


@pytest.mark.parametrize(("method", "rank", "paper_percent"), [("lora", 32, 0.83), ("dora", 32, 0.84),
                                                                 ("dora", 16, 0.43)])
def test_params_reproduce_the_papers_llama_7b_percentages(method: str, rank: int, paper_percent: float) -> None:
    """Table 1 of the paper (LLaMA-7B): LoRA r=32 0.83%, DoRA r=32 0.84%, DoRA† (r=16) 0.43%."""
    cfg = AdapterConfig(method=method, rank=rank, alpha=2 * rank, targets=QKVUD)
    c = count_for("llama-7b", method, cfg)
    assert c["trainable"] == _hand_count("llama-7b", rank, method == "dora")
    assert c["total"] == c["base"] + c["trainable"]
    assert round(c["percent"], 2) == paper_percent


def test_meta_model_holds_no_weights() -> None:
    model = meta_model("llama3-8b")
    assert all(p.device.type == "meta" for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) > 8_000_000_000


def test_params_cli_prints_counts(capsys: pytest.CaptureFixture) -> None:
    assert main(["params", "--model", "llama2-7b", "--method", "lora", "--rank", "32", "--alpha", "64",
                 "--targets", *QKVUD]) == 0
    assert "trainable 56,098,816" in capsys.readouterr().out
    assert main(["params", "--model", "llama-70b"]) == 2
    assert "neither a preset" in capsys.readouterr().err


def test_params_reads_only_config_json_of_a_local_model(tmp_path: Path) -> None:
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=4, vocab_size=100).save_pretrained(tmp_path)  # config only, no weights
    c = count_for(str(tmp_path), "lora", AdapterConfig(method="lora", rank=4, targets=["q_proj"]))
    assert c["trainable"] == 3 * 4 * (64 + 64)


def test_sweep_runs_every_method_and_rank(tmp_path: Path) -> None:
    model_dir, _ = boolq_llama(tmp_path)
    out = tmp_path / "sweep"
    argv = ["sweep", "--model", str(model_dir), "--data", str(tmp_path / "train.json"), "--eval-data",
            str(shared_task_file("boolq")), "--eval-limit", "4", "--ranks", "2", "4", "--max-steps", "1",
            "--batch-size", "2", "--output-dir", str(out), "--device", "cpu"]
    assert main(argv) == 0
    rows = json.loads((out / "sweep.json").read_text())
    assert [(r["method"], r["rank"]) for r in rows] == [("lora", 2), ("lora", 4), ("dora", 2), ("dora", 4)]
    assert all(0 <= r["accuracy"] <= 100 for r in rows)
    assert rows[1]["trainable"] > rows[0]["trainable"] and rows[2]["trainable"] > rows[0]["trainable"]
    assert (out / "dora-r4" / "final" / "adapter_config.json").is_file()
    assert main(argv) == 2                                       # a finished sweep is not overwritten
