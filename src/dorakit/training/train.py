"""One training loop for every method (LoRA, DoRA, full fine-tuning), nanoGPT-sized.

AdamW over the parameters that require grad, warmup then linear / cosine decay, gradient
accumulation, gradient clipping, autocast (bf16 / fp16) on GPU, seeded and resumable: a checkpoint
(trainable tensors, optimizer, step, RNG states and data position) is written atomically every
``save_every`` steps, on Ctrl-C and at the end, and ``resume=True`` continues from the last one so
that the losses equal those of an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .config import PRECISIONS, SCHEDULES, TrainConfig, TrainConfigError  # noqa: F401  (re-exported)
from .checkpoint import (
    claim_run_dir,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .data import Batches
from .distributed import ONE_PROCESS, Dist, all_sum, autocast_needed, barrier, gradient_sync, unwrap
from .graphs import GraphedMicroStep
from .trackers import Trackers
from .progress import Progress, StopOnInterrupt
from .run_records import check_identity, logged_records, truncate_metrics

ItemCount = Callable[[Mapping[str, Tensor]], int]
"""How many items a model's loss averages over in a micro-batch (label tokens of a causal LM)."""

TokenCount = Callable[[list[int]], int]
"""Input tokens of the items with these indices (tokens/s), where a batch's attention_mask cannot say (packing)."""

Callback = Callable[[int, nn.Module], Mapping[str, float] | None]
"""Called as ``callback(step, model)`` after every optimizer step (e.g. analysis.DeltaRecorder); numbers it
returns are logged as a metrics record of that step (metrics.jsonl and the trackers, rank 0)."""


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of cfg.lr for optimizer step ``step`` (0-based): warmup, then the schedule."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    if cfg.schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class TrainResult:
    """What a finished (or interrupted) run did."""

    steps: int
    start_step: int = 0
    """The step this call started from (0, or a resumed checkpoint's)."""
    losses: list[float] = field(default_factory=list)
    """Mean training loss of each optimizer step run in this call."""
    final_loss: float | None = None
    """The loss of the last step (logged earlier, for a resumed run that had nothing left to do)."""
    interrupted: bool = False
    seconds: float = 0.0
    peak_memory_bytes: int = 0
    eval: dict[str, float] = field(default_factory=dict)
    graph_captures: int = 0
    """CUDA graphs captured (cfg.cuda_graph): one per padded sequence width."""


# ---- the loop ------------------------------------------------------------------------------------

def train(model: nn.Module, batches: Batches, make_batch: Callable[[list[int]], dict[str, Tensor]],
          cfg: TrainConfig, out_dir: str | os.PathLike, *, identity: Mapping[str, object] | None = None,
          evaluate: Callable[[nn.Module], dict[str, float]] | None = None, callbacks: Iterable[Callback] = (),
          resume: bool = False, device: torch.device | str = "cpu", progress: bool = True,
          items: ItemCount | None = None, dist: Dist = ONE_PROCESS,
          pad_values: Mapping[str, int] | None = None, tokens: TokenCount | None = None,
          trackers: Sequence[str] = ()) -> TrainResult:
    """Train the parameters of ``model`` that require grad; ``model(**make_batch(indices)).loss`` is the loss.

    ``batches`` yields each optimizer step's whole batch (all processes, all micro-batches); it is cut
    into cfg.grad_accum × world_size micro-batches, micro-batch i·world + rank going to process
    ``rank``. A step's loss is the mean over all its items, each micro-batch's mean loss weighted
    by ``items(batch)`` (default: its number of examples), so the gradient is the same however the
    batch is split: one process equals N processes with the same global batch. ``model`` may be
    wrapped by dorakit.training.distributed.wrap (DDP or FSDP2); ``dist`` is this process's place.

    ``cfg.cuda_graph`` replays each micro-batch's forward and backward from a CUDA graph
    (dorakit.training.graphs); ``pad_values`` then says how to right-pad the batch's sequence tensors
    (e.g. ``{"input_ids": pad_id, "attention_mask": 0, "labels": -100}``). ``tokens`` counts the input
    tokens of a micro-batch for tokens/s (default: the ones of its 2D attention_mask, else its input_ids).

    Rank 0 holds ``<out>``'s lock while it runs (a second process is refused: one run directory has one
    writer) and writes ``<out>/run.json`` (``identity``: what a resume must match), ``<out>/metrics.jsonl``
    and ``<out>/checkpoints/step-*``. Ctrl-C or SIGTERM writes a checkpoint at the last finished
    step and returns with ``interrupted=True``. ``trackers`` (dorakit.training.trackers.REPORT_TO:
    "tensorboard", "wandb") get every metrics record too, on rank 0.
    """
    out, d, device = Path(out_dir), dist, torch.device(device)
    slots = cfg.grad_accum * d.world_size
    if batches.batch_size % slots:
        raise ValueError(f"a step's batch of {batches.batch_size} items does not split into grad_accum "
                         f"{cfg.grad_accum} × {d.world_size} processes; make it a multiple of {slots}.")
    micro = batches.batch_size // slots
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no parameter that requires grad; apply adapters or unfreeze it first.")
    if cfg.cuda_graph:  # checked before anything is written
        pad_values = _graph_pad_values(model, pad_values, d, device)
    identity = {**(identity or {}), "global_batch": batches.batch_size,
                "train": asdict(cfg) | {"log_every": None, "eval_every": None, "save_every": None,
                                        "grad_accum": None, "cuda_graph": None, "keep_checkpoints": None}}
    sinks = Trackers(trackers, d.main, identity)  # checked before anything is written
    with claim_run_dir(out, resume, d), sinks:
        check_identity(out, identity, resume, d)
        return _train(model, batches, make_batch, cfg, out, evaluate=evaluate, callbacks=callbacks, resume=resume,
                      device=device, progress=progress, items=items, dist=d, pad_values=pad_values, micro=micro,
                      tokens=tokens, sinks=sinks)


def _train(model: nn.Module, batches: Batches, make_batch: Callable[[list[int]], dict[str, Tensor]],
           cfg: TrainConfig, out: Path, *, evaluate: Callable[[nn.Module], dict[str, float]] | None,
           callbacks: Iterable[Callback], resume: bool, device: torch.device, progress: bool,
           items: ItemCount | None, dist: Dist, pad_values: Mapping[str, int] | None, micro: int,
           sinks: Trackers, tokens: TokenCount | None = None) -> TrainResult:
    """train() once the run directory is claimed and its identity checked."""
    d, slots = dist, cfg.grad_accum * dist.world_size
    inner = unwrap(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    step = 0
    _seed(cfg.seed + d.rank)  # rank r draws its own dropout masks; rank 0 draws those of a 1-process run
    scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
    ckpt = latest_checkpoint(out) if resume else None
    count_tokens, tokens = tokens, 0  # tokens: input tokens seen over the whole run (continued across resumes)
    if ckpt is not None:
        state = load_checkpoint(ckpt, inner, optimizer, d)
        step = int(state["step"])
        tokens = _saved_tokens(state, ckpt, d)
        batches.load_state_dict(state["batches"])
        _restore_rng(state, cfg, step, d)
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
    if resume and d.main:  # lines logged after the checkpoint (all of them if there is none yet): those steps run again
        truncate_metrics(out / "metrics.jsonl", step)
    sinks.start(out, step if resume else None)
    saved_step = step if ckpt is not None else -1
    amp = _amp(model, cfg, device, cache=True)
    graphed = (GraphedMicroStep(model, params, micro, pad_values, lambda: _amp(model, cfg, device, cache=False),
                                scaler, device, _position_limit(inner)) if cfg.cuda_graph else None)
    result = TrainResult(steps=step, start_step=step)
    boundary = (batches.state_dict(), rng_state())
    stream, bar = batches.forever(), Progress(cfg.max_steps, progress and d.main)
    start, done, run_tokens = time.perf_counter(), 0, 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    with StopOnInterrupt() as stop:
        stopping = False
        while step < cfg.max_steps and not stopping:
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * lr_factor(step, cfg)
            indices = next(stream)
            parts = [indices[k * micro:(k + 1) * micro] for k in range(slots)]
            mine = [parts[i * d.world_size + d.rank] for i in range(cfg.grad_accum)
                    if any(parts[i * d.world_size:(i + 1) * d.world_size])]  # rounds some process has items in
            loss_sum, step_tokens = _accumulate(model, mine, indices[:1], make_batch, items, amp, scaler, d, device,
                                                graphed, count_tokens)
            logging = (step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps
            grad_norm = _optimizer_step(optimizer, scaler, params, cfg.max_grad_norm, keep_grads=graphed is not None,
                                        norm=logging)
            loss_sum, step_tokens = all_sum([loss_sum, step_tokens], d, device)
            step, done = step + 1, done + 1
            tokens, run_tokens = tokens + int(step_tokens), run_tokens + int(step_tokens)
            boundary = (batches.state_dict(), rng_state())
            result.losses.append(loss_sum)
            reported = [callback(step, inner) for callback in callbacks]
            elapsed = time.perf_counter() - start
            bar.update(step, loss_sum, run_tokens / elapsed, done)
            if d.main and logging:
                _emit(out, sinks, {"step": step, "loss": loss_sum, "lr": optimizer.param_groups[0]["lr"],
                                   "grad_norm": grad_norm, "tokens": tokens, "tokens_per_s": run_tokens / elapsed,
                                   "elapsed_s": elapsed})
            for extra in reported:
                if d.main and extra:
                    _emit(out, sinks, {"step": step, **extra})
            if evaluate is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
                record = _run_eval(inner, evaluate)  # every process evaluates (FSDP needs all of them)
                if d.main:
                    _emit(out, sinks, {"step": step, **record})
            if cfg.save_every and step % cfg.save_every == 0:
                _save(out, step, inner, optimizer, boundary, _extra(scaler, tokens), cfg, d)
                saved_step = step
            stopping = all_sum([float(stop.requested)], d, device)[0] > 0  # all processes stop at the same step
        result.interrupted = stopping
    bar.close()
    if step != saved_step and step > 0:  # (rewriting a step already on disk would briefly leave `latest` dangling)
        _save(out, step, inner, optimizer, boundary, _extra(scaler, tokens), cfg, d)
    result.steps, result.seconds = step, time.perf_counter() - start
    result.graph_captures = graphed.captures if graphed is not None else 0
    if device.type == "cuda":
        result.peak_memory_bytes = torch.cuda.max_memory_allocated(device)
    logged = logged_records(out / "metrics.jsonl", step)
    last = [r["loss"] for r in logged if "loss" in r]  # a resumed run with nothing left to do: its logged loss
    result.final_loss = result.losses[-1] if result.losses else (float(last[-1]) if last else None)
    if evaluate is not None and not result.interrupted:
        earlier = [r for r in logged if any(k.startswith("eval_") for k in r)] if done == 0 else []
        if earlier:  # this step's final evaluation is already logged: no second line
            result.eval = {k: v for k, v in earlier[-1].items() if k.startswith("eval_")}
        else:
            result.eval = _run_eval(inner, evaluate)
            if d.main:
                _emit(out, sinks, {"step": step, **result.eval})
    barrier(d)
    return result


def _accumulate(model: nn.Module, mine: list[list[int]], filler: list[int],
                make_batch: Callable[[list[int]], dict[str, Tensor]], items: ItemCount | None,
                amp: AbstractContextManager, scaler: torch.amp.GradScaler | None, d: Dist,
                device: torch.device, graphed: GraphedMicroStep | None = None,
                count_tokens: TokenCount | None = None) -> tuple[float, float]:
    """Forward and backward of this process's micro-batches of one step; returns (Σ item-weighted
    loss, tokens) of this process. The weights need the step's item count over all processes, so it
    is summed first. A process with no items in a round runs ``filler`` at weight 0 (FSDP and DDP
    need every process in every forward and backward). ``graphed``: full micro-batches replay it."""
    batches = [make_batch(part or filler) for part in mine]  # counted where make_batch put them (no sync)
    counts = [(items(b) if items is not None else len(part)) if part else 0 for part, b in zip(mine, batches)]
    total = all_sum([sum(counts)], d, device)[0]
    loss_sum, tokens = torch.zeros((), dtype=torch.float64, device=device), 0
    for j, (part, batch, count) in enumerate(zip(mine, batches, counts)):
        # DDP and FSDP average gradients over processes: × world_size makes it the mean over all items.
        weight = count * d.world_size / total if count else 0.0
        if graphed is not None and count and graphed.fits(batch):
            loss = graphed(batch, weight)
        else:
            batch = {k: v.to(device) for k, v in batch.items()}
            with gradient_sync(model, j == len(batches) - 1):
                with amp:
                    output = model(**batch)
                    weighted = output.loss * weight if count else output.logits.sum() * 0.0
                (scaler.scale(weighted) if scaler else weighted).backward()
            loss = output.loss.detach() if count else None
        if count:
            loss_sum += loss.double() * count
            mask = batch.get("attention_mask")
            if count_tokens is not None:
                tokens += count_tokens(part)
            else:
                tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
    return float(loss_sum) / max(total, 1), tokens


def _amp(model: nn.Module, cfg: TrainConfig, device: torch.device, cache: bool) -> AbstractContextManager:
    """Autocast to cfg.precision where the model needs it (FSDP's mixed precision does not); a CUDA
    graph needs autocast's weight cache off (``cache=False``)."""
    if cfg.precision == "fp32" or not autocast_needed(model):
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if cfg.precision == "bf16" else torch.float16,
                          cache_enabled=cache)


def _position_limit(model: nn.Module) -> int | None:
    """A transformers model's max_position_embeddings (CUDA-graph padding stays within it), else None."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return limit if isinstance(limit, int) and limit > 0 else None


def _graph_pad_values(model: nn.Module, pad_values: Mapping[str, int] | None, d: Dist,
                      device: torch.device) -> Mapping[str, int]:
    """``pad_values`` after checking that this run can capture CUDA graphs (cfg.cuda_graph)."""
    if device.type != "cuda":
        raise ValueError(f"cuda_graph needs a CUDA device, not {device}; drop cuda_graph (--cuda-graph).")
    if d.world_size > 1 or unwrap(model) is not model:
        raise ValueError("cuda_graph with DDP or FSDP is not supported (their communication hooks run on the host); "
                         "train one process (--strategy none), or drop cuda_graph.")
    if getattr(model, "_compiled_call_impl", None) is not None or hasattr(model, "_orig_mod"):
        raise ValueError("cuda_graph with a torch.compile'd model: use one of them (torch.compile's "
                         "mode='reduce-overhead' captures CUDA graphs itself).")
    checkpointing = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5.18; before:
    if checkpointing is None:
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    if checkpointing:
        raise ValueError("cuda_graph with gradient checkpointing is not supported (its recomputation saves and "
                         "restores RNG states on the host); drop one of them.")
    if pad_values is None:
        raise ValueError("cuda_graph needs pad_values: the value each sequence tensor is right-padded with, e.g. "
                         "{'input_ids': pad_id, 'attention_mask': 0, 'labels': -100}.")
    return pad_values


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)


def _restore_rng(state: Mapping[str, object], cfg: TrainConfig, step: int, d: Dist) -> None:
    """This process's saved RNG state; a checkpoint from another number of processes has none that
    fits, so each process reseeds from (seed, step, rank): the data order stays exact, random draws
    such as dropout masks differ from those of an uninterrupted run."""
    if state["rng"] is not None:
        set_rng_state(state["rng"])
        return
    if d.main:
        warnings.warn(f"resuming with {d.world_size} processes from a checkpoint written by {state.get('world_size')}: "
                      "the data order continues exactly, but random draws (dropout) are reseeded.", stacklevel=3)
    _seed(cfg.seed + d.rank + 1_000_003 * step)


def _extra(scaler: torch.amp.GradScaler | None, tokens: int) -> dict[str, object]:
    """state.json's extra fields: the fp16 loss scale and the run's token count so far."""
    return {**_scaler_state(scaler), "tokens": tokens}


def _saved_tokens(state: Mapping[str, object], ckpt: Path, d: Dist) -> int:
    """The token count a checkpoint was saved at; one written before dorakit kept it has none, and the
    count then restarts at 0 (a warning says so: metrics.jsonl's `tokens` counts from this resume)."""
    if "tokens" in state:
        return int(state["tokens"])
    if d.main:
        warnings.warn(f"{ckpt} holds no token count (an older dorakit wrote it): metrics.jsonl's `tokens` restarts "
                      "at 0 from this resume.", stacklevel=4)
    return 0


def _save(out: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
          boundary: tuple[Mapping[str, int | bool], Mapping[str, object]], extra: Mapping[str, object],
          cfg: TrainConfig, d: Dist) -> None:
    """Write the checkpoint of ``step`` (at the step boundary), then delete all but the newest
    cfg.keep_checkpoints."""
    save_checkpoint(out, step, model, optimizer, boundary[0], boundary[1], extra, d)
    if d.main:
        prune_checkpoints(out, cfg.keep_checkpoints)


def _scaler_state(scaler: torch.amp.GradScaler | None) -> dict[str, object]:
    """The fp16 loss scale and its growth counter (plain numbers), so a resumed run scales identically."""
    return {"scaler": scaler.state_dict()} if scaler is not None else {}


def _optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None, params: list[Tensor],
                    max_grad_norm: float, keep_grads: bool = False, norm: bool = False) -> float | None:
    """Unscale (fp16), clip, step, zero the gradients: ``keep_grads`` zeroes them in place (a CUDA graph
    adds into them) instead of freeing them. With ``norm``, returns the gradients' total 2-norm before
    clipping (after unscaling), else None; every process must ask alike (FSDP reduces it over processes)."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    total: Tensor | None = None
    if max_grad_norm > 0:
        total = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    elif norm:
        total = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    grad_norm = None
    if total is not None and norm:
        grad_norm = float(total.full_tensor() if hasattr(total, "full_tensor") else total)  # FSDP: a DTensor
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=not keep_grads)
    return grad_norm


def _run_eval(model: nn.Module, evaluate: Callable[[nn.Module], dict[str, float]]) -> dict[str, float]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return {f"eval_{k}": float(v) for k, v in evaluate(model).items()}
    finally:
        model.train(was_training)


def _emit(out: Path, sinks: Trackers, record: Mapping[str, object]) -> None:
    """A metrics record to metrics.jsonl, then to the trackers (rank 0 only)."""
    _log(out, record)
    sinks.log(record)


def _log(out: Path, record: Mapping[str, object]) -> None:
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


