"""Run by ``accelerate launch`` from test_hf_trainer.py: dorakit.AdapterTrainer under DDP (gloo, CPU).

Trains the tiny Llama of test_hf_trainer.py for 2 of 4 steps (a run killed after its step-2
checkpoint), resumes a fresh model from that checkpoint, finishes and saves the final adapter:

    accelerate launch --multi_gpu --num_processes 2 tests/training/hf_trainer_worker.py OUT PER_DEVICE_BATCH

Rank 0 writes ``OUT/losses.json``: the logged loss of every step of both runs, and the number of processes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: conftest's builders

import torch  # noqa: E402
import transformers  # noqa: E402
from conftest import _llama  # noqa: E402

import dorakit as dk  # noqa: E402
from dorakit.training.distributed import leave_process_group  # noqa: E402

ROWS, SEQ, VOCAB = 8, 6, 64


def model() -> torch.nn.Module:
    """test_hf_trainer._model: the same seeds give the same model in every process and in the test."""
    torch.manual_seed(0)
    m = _llama().model
    torch.manual_seed(1)
    dk.apply_adapters(m, dk.AdapterConfig(method="dora", rank=2, alpha=4.0, targets=["q_proj", "v_proj"]))
    return m


def dataset() -> list[dict[str, torch.Tensor]]:
    rows = torch.randint(3, VOCAB, (ROWS, SEQ), generator=torch.Generator().manual_seed(0))  # (N, T)
    return [{"input_ids": r, "labels": r.clone()} for r in rows]


def args(out: Path, per_device: int) -> transformers.TrainingArguments:
    return transformers.TrainingArguments(
        output_dir=str(out), max_steps=4, per_device_train_batch_size=per_device, learning_rate=1e-2,
        lr_scheduler_type="constant", optim="adamw_torch", max_grad_norm=0.3, train_sampling_strategy="sequential",
        save_steps=2, logging_steps=1, report_to=[], use_cpu=True, seed=0, disable_tqdm=True)


class StopAt(transformers.TrainerCallback):
    """Ends training after step ``at`` (its checkpoint already written): a run killed there."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, args: object, state: object, control: object, **kw: object) -> object:
        if state.global_step == self.at:
            control.should_training_stop = True
        return control


def losses(trainer: transformers.Trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def main(out: Path, per_device: int) -> None:
    killed = dk.AdapterTrainer(model=model(), args=args(out, per_device), train_dataset=dataset(),
                               callbacks=[StopAt(2)])
    killed.train()
    resumed = dk.AdapterTrainer(model=model(), args=args(out, per_device), train_dataset=dataset())
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    resumed.save_model(str(out / "final"))
    if resumed.args.process_index == 0:
        # the resumed trainer's log starts with the checkpoint's (steps 1-2), then logs steps 3-4
        record = {"world_size": resumed.args.world_size, "killed": losses(killed), "resumed": losses(resumed)}
        (out / "losses.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
    leave_process_group()  # under gloo, leaving without it can abort at exit (see distributed.teardown)
