"""What the ``dorakit`` commands do, as typed functions: fine-tune and evaluate (loading and merging: models.py).

Models load only from local directories (``from_pretrained(dir, local_files_only=True)``); nothing
is fetched from a hub. The CLI (cli.py) parses flags into these functions' arguments.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters.config import AdapterConfig
from .checkpoint import claim_run_dir
from .data import (
    IGNORE_INDEX,
    Batches,
    classification_examples,
    collate_causal,
    label_vocab,
    load_classification,
    load_records,
    pad_token_id,
)
from .chat import causal_examples, read_chat_template
from .packing import packed_batches
from .distributed import (
    STRATEGIES,
    Dist,
    barrier,
    check_device,
    check_precision,
    full_trainable,
    setup,
    teardown,
    wrap,
)
from ..adapters.inject import apply_adapters
from ..formats.dispatch import save_adapter
from ..formats.io import atomic_write_bytes
from ..adapters.params import count_parameters
from .train import TrainConfig, TrainResult, train
from .trackers import check_report_to, delta_summary
from .models import HEAD_NAMES, TASKS, RecipeError, load_model, model_task  # noqa: F401  (RecipeError re-exported)

METHODS = ("lora", "dora", "vera", "dvora", "full")


@dataclass(frozen=True)
class FinetuneArgs:
    """Everything ``dorakit finetune`` needs besides the optimisation settings (TrainConfig)."""

    model: str
    data: str
    output_dir: str
    method: str = "dora"
    task: str = "auto"
    rank: int = 8
    alpha: float = 16.0
    targets: Sequence[str] | str = "all-linear"
    magnitude_only: Sequence[str] = ()
    dropout: float = 0.0
    use_rslora: bool = False
    norm_grad: str = "detach"
    batch_size: int = 4
    """Examples per micro-batch per process; a step takes batch_size × grad_accum × processes."""
    epochs: float = 0.0
    max_len: int = 256
    train_on_inputs: bool = False
    chat_template: str | None = None
    """A Jinja chat template file for chat records, replacing (or supplying) the tokenizer's own."""
    pack: bool = False
    """Pack short examples into rows of up to max_len tokens, attention isolated per example (packing.py)."""
    eval_data: str | None = None
    eval_limit: int = 200
    gradient_checkpointing: bool = False
    load_in_4bit: bool = False
    """Load the base in NF4 (bitsandbytes): QLoRA / QDoRA."""
    load_in_8bit: bool = False
    """Load the base in int8 (bitsandbytes LLM.int8()): LoRA / DoRA over an 8-bit base; one process."""
    record_deltas: int = 0
    """Record the paper's ΔM / ΔD every this many steps into <output_dir>/deltas.json (0: off)."""
    device: str = "auto"
    strategy: str = "none"
    """"none" (one process), or "ddp" / "fsdp" under torchrun or accelerate launch (dorakit.training.distributed)."""
    resume: bool = False
    compile: bool = False
    """torch.compile the model (in place: parameter names, checkpoints and saved adapters are unchanged)."""
    report_to: Sequence[str] = ("jsonl",)
    """Where metrics go: "jsonl" (<output_dir>/metrics.jsonl, always written), "tensorboard", "wandb"."""
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def quantized(self) -> str | None:
        """The flag that quantizes the base ("--load-in-4bit" / "--load-in-8bit"), None for a dense base."""
        return "--load-in-4bit" if self.load_in_4bit else "--load-in-8bit" if self.load_in_8bit else None

    def __post_init__(self) -> None:
        """Every field checked here, before anything is loaded or written (the CLI checks its flags earlier)."""
        for name in ("model", "data", "output_dir"):
            if not isinstance(getattr(self, name), (str, os.PathLike)) or not str(getattr(self, name)):
                raise RecipeError(f"{name} must be a path, got {getattr(self, name)!r}.")
        for name, allowed in (("method", METHODS), ("task", TASKS), ("strategy", STRATEGIES)):
            if getattr(self, name) not in allowed:
                raise RecipeError(f"--{name} must be one of {allowed}, got {getattr(self, name)!r}.")
        for name, low, example in (("batch_size", 1, 4), ("max_len", 1, 256), ("eval_limit", 1, 200),
                                   ("record_deltas", 0, 10)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise RecipeError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {value!r}; "
                                  f"e.g. --{name.replace('_', '-')} {example}.")
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, (int, float)) \
                or not math.isfinite(self.epochs) or self.epochs < 0:
            raise RecipeError(f"--epochs must be a finite number >= 0 (0: use --max-steps), got {self.epochs!r}; "
                              "e.g. --epochs 3.")
        if not isinstance(self.train, TrainConfig):
            raise RecipeError(f"train must be a TrainConfig, got {type(self.train).__name__}.")
        check_device(self.device)
        if self.load_in_4bit and self.load_in_8bit:
            raise RecipeError("--load-in-4bit and --load-in-8bit: the base is quantized one way; pass one of them.")
        if self.pack and self.train.cuda_graph:
            raise RecipeError("--pack with --cuda-graph: packed batches carry a 4D attention mask that the graphed "
                              "step does not pad; drop one of them.")
        check_report_to(self.report_to)
        if self.method != "full":  # rank, alpha, targets, dropout, norm_grad: AdapterConfig's own checks
            AdapterConfig(method=self.method, rank=self.rank, alpha=self.alpha, targets=self.targets,
                          magnitude_only=tuple(self.magnitude_only), dropout=self.dropout,
                          use_rslora=self.use_rslora, norm_grad=self.norm_grad)


@dataclass
class FinetuneOutcome:
    """What finetune produced."""

    result: TrainResult
    saved_to: Path
    trainable: int
    total: int
    main: bool = True
    """Whether this is the process that reports (rank 0 of a distributed run)."""


def _adapter_config(args: FinetuneArgs, model: nn.Module, task: str) -> AdapterConfig | None:
    if args.method not in METHODS:
        raise RecipeError(f"--method must be one of {METHODS}, got {args.method!r}.")
    if args.method == "full":
        if args.quantized:
            raise RecipeError(f"{args.quantized} with --method full: quantized weights cannot be trained; use lora or "
                              "dora (QLoRA / QDoRA).")
        return None
    names = {n.rpartition(".")[2] for n, _ in model.named_modules()}
    heads = [h for h in HEAD_NAMES if h in names] if task == "classify" else []
    return AdapterConfig(method=args.method, rank=args.rank, alpha=args.alpha, targets=args.targets,
                         magnitude_only=tuple(args.magnitude_only), dropout=args.dropout,
                         use_rslora=args.use_rslora, norm_grad=args.norm_grad, modules_to_save=tuple(heads))


def _steps(args: FinetuneArgs, n_items: int, global_batch: int) -> TrainConfig:
    """TrainConfig with max_steps from --epochs when given (an epoch's last step may be short)."""
    if args.epochs <= 0:
        return args.train
    steps = max(1, math.ceil(args.epochs * math.ceil(n_items / global_batch)))
    return TrainConfig(**{**asdict(args.train), "max_steps": steps})


def _check_compile(args: FinetuneArgs) -> None:
    if args.compile and args.quantized:
        raise RecipeError(f"--compile with {args.quantized}: bitsandbytes' quantized layers are not compiled here; "
                          f"drop --compile (or {args.quantized}).")
    if args.compile and args.train.cuda_graph:
        raise RecipeError("--compile with --cuda-graph: use one of them (torch.compile's mode='reduce-overhead' "
                          "captures CUDA graphs itself).")
    if args.compile and not hasattr(torch.compiler, "set_stance"):
        raise RecipeError(f"--compile needs torch >= 2.6 (evaluation runs eager through torch.compiler.set_stance); "
                          f"this is torch {torch.__version__}. Upgrade torch or drop --compile.")


def _check_cuda_graph(args: FinetuneArgs, device: torch.device) -> None:
    """--cuda-graph's requirements, before anything is loaded (train() checks them again)."""
    if not args.train.cuda_graph:
        return
    if args.strategy != "none":
        raise RecipeError(f"--cuda-graph with --strategy {args.strategy}: DDP's and FSDP's communication runs on "
                          "the host, which a CUDA graph cannot record; train one process (--strategy none), or drop "
                          "--cuda-graph.")
    if args.quantized:
        raise RecipeError(f"--cuda-graph with {args.quantized}: bitsandbytes' quantized layers are not captured "
                          f"here; drop --cuda-graph (or {args.quantized}).")
    if args.gradient_checkpointing:
        raise RecipeError("--cuda-graph with --gradient-checkpointing: its recomputation saves and restores RNG "
                          "states on the host, which a CUDA graph cannot record; drop one of them.")
    if device.type != "cuda":
        raise RecipeError(f"--cuda-graph needs a CUDA device, not {device}; drop --cuda-graph.")


def _eager(evaluate: Callable[[nn.Module], dict[str, float]]) -> Callable[[nn.Module], dict[str, float]]:
    """``evaluate`` run without the compiled forward: generation's growing shapes would recompile."""
    def run(model: nn.Module) -> dict[str, float]:
        with torch.compiler.set_stance("force_eager"):
            return evaluate(model)
    return run


def _check_distributed(args: FinetuneArgs, d: Dist) -> None:
    """Settings that one process runs but several cannot (yet); before anything is loaded."""
    if d.world_size == 1 and d.strategy == "none":
        return
    check_precision(d.strategy, args.train.precision)
    if args.load_in_4bit and d.strategy != "fsdp":
        raise RecipeError(f"--load-in-4bit with --strategy {d.strategy}: a 4-bit (bitsandbytes) base trains on "
                          "several processes with FSDP2 only (each process holds its shard of the NF4 base); pass "
                          "--strategy fsdp, or run one process with --strategy none.")
    if args.load_in_8bit:
        raise RecipeError(f"--load-in-8bit with --strategy {d.strategy}: an 8-bit (LLM.int8()) base trains in one "
                          "process here; run one process with --strategy none, or use --load-in-4bit --strategy fsdp.")
    if args.record_deltas and d.strategy == "fsdp":
        raise RecipeError("--record-deltas with --strategy fsdp: the ΔM/ΔD recorder reads whole weights, which FSDP "
                          "shards; use --strategy ddp, or run `dorakit analyze` on the saved adapters afterwards.")


def _causal_items(batch: dict[str, torch.Tensor]) -> int:
    """Label tokens a causal LM's loss averages over: labels shifted by one, IGNORE_INDEX left out."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def finetune(args: FinetuneArgs) -> FinetuneOutcome:
    """Fine-tune a local model with LoRA, DoRA or full fine-tuning; writes the adapter (PEFT format) or
    the full model under ``<output_dir>/final``."""
    task = model_task(args.model, args.task)
    d, device = setup(args.strategy, args.device)
    try:
        with ExitStack() as run_dir:  # _finetune claims the run directory (its lock) once it is about to write
            outcome = _finetune(args, task, d, device, run_dir)
    except BaseException:
        teardown(finished=False)
        raise
    teardown()
    return outcome


def _finetune(args: FinetuneArgs, task: str, d: Dist, device: torch.device, run_dir: ExitStack) -> FinetuneOutcome:
    _check_distributed(args, d)
    _check_compile(args)
    _check_cuda_graph(args, device)
    torch.manual_seed(args.train.seed)  # a new head's and the adapters' initial values follow --seed too
    count_tokens = None
    if task != "causal" and (args.pack or args.chat_template):
        raise RecipeError(f"--pack and --chat-template are for causal language models; {args.model} is a "
                          "classification model: drop them.")
    if task == "causal":
        template = read_chat_template(args.chat_template) if args.chat_template else None
        model, tokenizer = load_model(args.model, task, load_in_4bit=args.load_in_4bit, device=device,
                                       load_in_8bit=args.load_in_8bit)
        if template is not None:  # saved with the tokenizer in <output_dir>/final
            tokenizer.chat_template = template
        examples = causal_examples(args.data, tokenizer, args.max_len, train_on_inputs=args.train_on_inputs,
                                   model=str(args.model))
        pad = pad_token_id(tokenizer)

        def make_batch(idx: list[int]) -> dict[str, torch.Tensor]:
            return collate_causal([examples[i] for i in idx], pad)
        n_items, labels = len(examples), None
        pad_values = {"input_ids": pad, "attention_mask": 0, "labels": IGNORE_INDEX}
        if args.pack:  # items are packed rows from here on
            make_batch, n_items, count_tokens, _ = packed_batches(examples, args.max_len, pad, model)
    else:
        pairs = load_classification(args.data)
        labels = label_vocab(pairs)
        model, tokenizer = load_model(args.model, task, num_labels=len(labels), load_in_4bit=args.load_in_4bit,
                                      device=device, load_in_8bit=args.load_in_8bit)
        texts, ids = classification_examples(pairs, labels, source=str(args.data))
        model.config.id2label = dict(enumerate(labels))  # class id -> label, saved with the head
        model.config.label2id = {label: i for i, label in enumerate(labels)}

        def make_batch(idx: list[int]) -> dict[str, torch.Tensor]:
            enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=args.max_len,
                            return_tensors="pt")
            return {**enc, "labels": torch.tensor([ids[i] for i in idx])}
        n_items = len(texts)
        pad_values = {"input_ids": tokenizer.pad_token_id, "attention_mask": 0,
                      "token_type_ids": getattr(tokenizer, "pad_token_type_id", 0)}
    cfg = _adapter_config(args, model, task)
    if cfg is not None:
        apply_adapters(model, cfg)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not args.quantized:  # a quantized model is placed by device_map at load
        model.to(device)
    trainable, total = count_parameters(model)
    global_batch = args.batch_size * args.train.grad_accum * d.world_size
    tcfg = _steps(args, n_items, global_batch)
    evaluate = _eval_fn(args, task, tokenizer, labels) if args.eval_data else None
    if evaluate is not None and args.compile:
        evaluate = _eager(evaluate)
    identity = {k: v for k, v in asdict(args).items()  # the global batch stands for batch_size (train adds it)
                if k not in ("train", "device", "eval_limit", "resume", "record_deltas", "output_dir", "batch_size",
                             "strategy", "compile", "report_to")}
    for key in ("model", "data", "eval_data", "chat_template"):  # the same files however the path is spelled
        if identity[key] is not None:
            identity[key] = os.path.abspath(identity[key])
    batches = Batches(n_items, global_batch, seed=tcfg.seed)
    recorder = _delta_recorder(args, model)
    deltas_path = Path(args.output_dir) / "deltas.json"
    run_dir.enter_context(claim_run_dir(args.output_dir, args.resume, d))  # held until the final save is written
    start = _resume_step(Path(args.output_dir)) if args.resume else 0
    callbacks = []
    if recorder is not None:
        def record(step: int, model: nn.Module) -> dict[str, float]:  # this step's ΔM / ΔD summary, logged
            before = len(recorder.records)
            recorder(step, model)
            return delta_summary(recorder.records[before:])

        def save_with_checkpoint(step: int, _: nn.Module) -> None:  # a killed run keeps its records up to here
            if d.main and tcfg.save_every and step % tcfg.save_every == 0:
                _save_deltas(recorder, deltas_path, first_new_step=start)
        callbacks = [record, save_with_checkpoint]
    engine = wrap(model, d, device, tcfg.precision)
    if args.compile:  # in place (nn.Module.compile): the state dict keeps the model's own names
        engine.compile()
    result = train(engine, batches, make_batch, tcfg, args.output_dir, identity=identity, evaluate=evaluate,
                   callbacks=callbacks, resume=args.resume, device=device,
                   items=_causal_items if task == "causal" else None, dist=d, pad_values=pad_values,
                   tokens=count_tokens, trackers=[name for name in args.report_to if name != "jsonl"])
    final = Path(args.output_dir) / "final"
    if d.main:
        if recorder is not None:
            _save_deltas(recorder, deltas_path, first_new_step=result.start_step)
        _write_summary(Path(args.output_dir), args, result, trainable, total)
    if not result.interrupted:
        with full_trainable(engine, d):  # FSDP: rank 0 holds the whole trained tensors here
            if d.main:
                _save_final(model, final, cfg, args, task, tokenizer, labels)
        barrier(d)
    return FinetuneOutcome(result, final, trainable, total, d.main)


def _save_final(model: nn.Module, final: Path, cfg: AdapterConfig | None, args: FinetuneArgs, task: str,
                tokenizer: Any, labels: list[str] | None) -> None:
    """<output_dir>/final: the adapter in PEFT's format (or the full model), tokenizer, label names."""
    if cfg is not None:
        save_adapter(model, final, base_model_name_or_path=str(args.model),
                     task_type="CAUSAL_LM" if task == "causal" else "SEQ_CLS")
    else:
        model.save_pretrained(final)
    tokenizer.save_pretrained(final)
    if labels is not None:  # class id -> label name for users of the adapter
        atomic_write_bytes(final / "labels.json", json.dumps(labels).encode())


def _delta_recorder(args: FinetuneArgs, model: nn.Module):
    """ΔM / ΔD every --record-deltas steps; full fine-tuning snapshots W0 now, before any update."""
    if args.record_deltas <= 0:
        return None
    from ..analysis import DeltaRecorder

    if args.method == "full":
        return DeltaRecorder(args.record_deltas, method="ft", reference=model)
    return DeltaRecorder(args.record_deltas, method=args.method)


def _resume_step(out: Path) -> int:
    """The step a resumed run starts from (its latest checkpoint's), 0 if none."""
    from .checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(out) if (out / "run.json").exists() else None
    return int(json.loads((ckpt / "state.json").read_text())["step"]) if ckpt else 0


def _save_deltas(recorder: Any, path: Path, first_new_step: int) -> None:
    """Write deltas.json: records kept from before a resume (steps up to its checkpoint) + this run's."""
    from ..analysis import read_json, records_json

    old = [r for r in read_json(path) if r.step is not None and r.step <= first_new_step] if path.exists() else []
    atomic_write_bytes(path, records_json(old + recorder.records).encode())  # a crash mid-write keeps the old file


def _write_summary(out: Path, args: FinetuneArgs, result: TrainResult, trainable: int, total: int) -> None:
    """<output_dir>/summary.json: what the run did, for reports (dorakit demo reads it)."""
    summary = {"method": args.method, "steps": result.steps, "seconds": result.seconds,
               "interrupted": result.interrupted, "trainable": trainable, "total": total,
               "trainable_percent": 100 * trainable / total, "final_loss": result.final_loss,
               "peak_cuda_bytes": result.peak_memory_bytes, **result.eval}
    atomic_write_bytes(out / "summary.json", json.dumps(summary, indent=2).encode())


def _eval_fn(args: FinetuneArgs, task: str, tokenizer: Any, labels: list[str] | None):
    """A callable model -> {"accuracy": ...} over --eval-data (first --eval-limit items)."""
    if task == "classify":
        pairs = load_classification(args.eval_data)[: args.eval_limit]
        texts, ids = classification_examples(pairs, labels or [], source=str(args.eval_data))
        return lambda model: {"accuracy": classify_accuracy(model, tokenizer, texts, ids, args.batch_size,
                                                            args.max_len)}
    from .evaluate import evaluate_task, task_from_path

    records = load_records(args.eval_data, purpose="eval")[: args.eval_limit]
    name = task_from_path(args.eval_data)
    return lambda model: {"accuracy": evaluate_task(model, tokenizer, records, name, method="loglik").accuracy}


@torch.no_grad()
def classify_accuracy(model: nn.Module, tokenizer: Any, texts: Sequence[str], ids: Sequence[int],
                      batch_size: int = 32, max_len: int = 256) -> float:
    """Share of ``texts`` whose argmax logit is the label id."""
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True, max_length=max_len,
                        return_tensors="pt").to(device)
        pred = model(**enc).logits.argmax(-1).cpu()
        correct += int((pred == torch.tensor(ids[start:start + batch_size])).sum())
    return correct / max(1, len(texts))


