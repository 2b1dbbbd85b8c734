"""Train dorakit adapters with Hugging Face ``transformers.Trainer`` or TRL's ``SFTTrainer``.

A plain Trainer handles a dorakit-adapted model as any other model: every checkpoint is the whole
model (``model.safetensors`` with the frozen base) and a resume reloads it through a full state dict.
PEFT models get adapter-only checkpoints because Trainer recognises ``PeftModel`` and calls its
``save_pretrained``. :class:`AdapterTrainerMixin` gives dorakit adapters the same treatment by
overriding the three methods where Trainer moves weights between the model and the disk:

* ``_save`` (every checkpoint and ``save_model``) writes ``dk.save_adapter``'s PEFT files
  (``adapter_config.json`` + ``adapter_model.safetensors``) instead of the model; Trainer still adds
  the optimizer, scheduler, RNG and trainer state beside them, so a checkpoint is the adapter plus
  what a resume needs;
* ``_load_from_checkpoint`` (``train(resume_from_checkpoint=...)``) loads those files into the
  model's adapters in place with ``dk.load_adapter``;
* ``_load_best_model`` (``load_best_model_at_end``) does the same from the best checkpoint.

``AdapterTrainer`` (Trainer + the mixin) and ``AdapterSFTTrainer`` (``trl.SFTTrainer`` + the mixin)
are built on first use, so importing this module imports neither transformers nor trl. Under
``accelerate launch`` / torchrun (DDP) every process trains and the main process writes. FSDP and
DeepSpeed hand ``_save`` a gathered state dict of the whole model and are refused.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters.inject import adapter_config
from ..formats.dispatch import load_adapter, save_adapter

TRAINING_ARGS_NAME = "training_args.bin"  # what Trainer._save writes beside the weights
TASK_TYPES = ("auto", None, "CAUSAL_LM", "SEQ_CLS", "SEQ_2_SEQ_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
"""AdapterTrainerMixin's adapter_task_type: "auto", None, or one of PEFT's TaskType values."""


class TrainerSetupError(ValueError):
    """A Trainer set up in a way the adapter checkpoints cannot serve (no adapters, PEFT, FSDP, DeepSpeed)."""


def _check_model(model: nn.Module, trainer: str) -> None:
    """Refuse, with the fix, a model whose checkpoints the mixin cannot write: a PEFT model, or no adapters."""
    if type(model).__module__.startswith("peft.") or hasattr(model, "peft_config"):
        raise TrainerSetupError(f"{trainer} got a PEFT model (a peft_config, or a PeftModel): train it with the plain "
                                "Trainer / SFTTrainer, or pass a model with dorakit adapters and no peft_config.")
    try:
        adapter_config(model)
    except RuntimeError:
        raise TrainerSetupError(f"{trainer} needs a model with dorakit adapters: call dk.apply_adapters(model, cfg) "
                                "(or dk.load_adapter) before building the trainer.") from None


def causal_lm_task_type(model: nn.Module) -> str | None:
    """``"CAUSAL_LM"`` for a ``*ForCausalLM`` model (PeftModel.from_pretrained then builds
    PeftModelForCausalLM, which generates), else None (the plain PeftModel)."""
    return "CAUSAL_LM" if type(model).__name__.endswith("ForCausalLM") else None


class AdapterTrainerMixin:
    """Adapter-only checkpoints and exact resumes for a ``transformers.Trainer`` subclass.

    Put it first among the bases: ``class MyTrainer(AdapterTrainerMixin, SomeTrainer)``. The model
    passed as ``model=`` must already hold dorakit adapters (``dk.apply_adapters`` or
    ``dk.load_adapter``); only the parameters that require grad are trained, as Trainer always does.

    Args:
        adapter_task_type: the ``task_type`` written to adapter_config.json; "auto" (the default)
            writes "CAUSAL_LM" for a ``*ForCausalLM`` model and nothing otherwise; None writes nothing.

    What has to match for Trainer to train the adapters dorakit's own loop trains (tested): AdamW
    (``optim="adamw_torch"``) with the same lr, no warmup, ``lr_scheduler_type="constant"`` against
    ``schedule="constant"``, the same weight decay and ``max_grad_norm``, the same batches in the same
    order (``train_sampling_strategy="sequential"``, transformers >= 5.2, against ``Batches(shuffle=False)``),
    no gradient accumulation, dropout off, fp32 (``SFTConfig`` defaults to ``bf16=True``).
    """

    # Set by transformers.Trainer; declared so that type checkers know the mixin's expectations.
    model: nn.Module
    args: Any
    accelerator: Any
    state: Any
    processing_class: Any
    data_collator: Any

    def __init__(self, *args: Any, adapter_task_type: str | None = "auto", **kwargs: Any) -> None:
        if adapter_task_type not in TASK_TYPES:
            raise TrainerSetupError(f"adapter_task_type must be one of {TASK_TYPES}, got {adapter_task_type!r}.")
        if kwargs.get("peft_config") is not None:
            raise TrainerSetupError(f"{type(self).__name__} got a peft_config: the model's dorakit adapters are what it "
                                    "trains; drop peft_config (or use the plain SFTTrainer for a PEFT model).")
        model = kwargs.get("model", args[0] if args else None)
        if isinstance(model, nn.Module):  # before Trainer (or SFTTrainer's dataset preparation) does any work
            _check_model(model, type(self).__name__)
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        self.adapter_task_type = adapter_task_type
        _check_model(self.model, type(self).__name__)  # e.g. SFTTrainer wrapped it with its peft_config
        for flag, what in (("is_fsdp_enabled", "FSDP"), ("is_deepspeed_enabled", "DeepSpeed")):
            if getattr(self, flag, False):
                raise TrainerSetupError(f"{type(self).__name__} does not support {what} (its checkpoints gather the "
                                        "whole model); train with one process or DDP (accelerate launch without an "
                                        "FSDP / DeepSpeed config), or use dorakit finetune --strategy fsdp.")

    def _adapter_model(self) -> nn.Module:
        """The model without DDP or torch.compile wrappers: the one whose adapters are saved and loaded."""
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write the adapter in PEFT's format (main process only), the tokenizer and the training
        arguments to ``output_dir``: what Trainer writes for a PeftModel, never the frozen base."""
        if state_dict is not None:  # only the FSDP / DeepSpeed / SageMaker paths pass one; refused in __init__
            raise TrainerSetupError(f"{type(self).__name__} saves the adapter from the model itself, not from a "
                                    "gathered state dict (FSDP / DeepSpeed / SageMaker model parallel).")
        if not self.args.should_save:
            return
        out = Path(output_dir if output_dir is not None else self.args.output_dir)
        model = self._adapter_model()
        task = causal_lm_task_type(model) if self.adapter_task_type == "auto" else self.adapter_task_type
        save_adapter(model, out, task_type=task)
        tokenizer = self.processing_class
        if tokenizer is None:
            tokenizer = getattr(self.data_collator, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(out)
        torch.save(self.args, out / TRAINING_ARGS_NAME)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Copy a checkpoint's adapter into the model's adapters (every process; in place, so the
        optimizer and the DDP wrapper keep their parameters)."""
        load_adapter(self._adapter_model() if model is None else model, _adapter_dir(resume_from_checkpoint))

    def _load_best_model(self) -> None:
        """``load_best_model_at_end``: the adapter of the best checkpoint."""
        load_adapter(self._adapter_model(), _adapter_dir(self.state.best_model_checkpoint))


def _adapter_dir(checkpoint: str | os.PathLike) -> Path:
    """A checkpoint directory, after checking that it holds an adapter and not a whole model."""
    path = Path(checkpoint)
    if not (path / "adapter_model.safetensors").is_file() and any(
            (path / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json",
                                                 "pytorch_model.bin")):
        raise TrainerSetupError(f"{path} holds a whole model (written by a plain Trainer), not a dorakit adapter: "
                                "resume it with the Trainer that wrote it, or start a new run.")
    return path


@cache
def _trainer_class(name: str) -> type:
    """``AdapterTrainer`` / ``AdapterSFTTrainer``, built on first use (importing transformers / trl)."""
    if name == "AdapterTrainer":
        from transformers import Trainer as base
    else:
        try:
            from trl import SFTTrainer as base
        except ImportError:
            raise ImportError("AdapterSFTTrainer needs TRL: pip install 'dorakit[trl]'.") from None
    doc = (f"``{base.__module__}.{base.__name__}`` with dorakit adapter checkpoints: see "
           "dorakit.training.hf_trainer.AdapterTrainerMixin.")
    return type(name, (AdapterTrainerMixin, base), {"__module__": __name__, "__qualname__": name, "__doc__": doc})


def __getattr__(name: str) -> type:
    if name in ("AdapterTrainer", "AdapterSFTTrainer"):
        return _trainer_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
