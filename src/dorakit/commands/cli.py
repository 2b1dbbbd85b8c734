"""The ``dorakit`` command: finetune, eval, merge, analyze, demo, sweep, params, generate.

The flags live in ``dorakit.commands.parser``; this module runs the commands. Nothing heavy is imported
until a command runs (``dorakit --help`` loads neither torch nor transformers), and third-party load
reports and progress bars are shown only with ``--verbose``.
"""

from __future__ import annotations

import argparse
import errno
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from ..training.config import TrainConfig
from .parser import EXIT_USAGE, build_parser, config_argv, parse_args, read_config_file  # noqa: F401

EXIT_INTERRUPTED = 130


# ---- commands --------------------------------------------------------------------------------------

def _train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(lr=args.lr, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
                       schedule=args.schedule, max_steps=args.max_steps, grad_accum=args.grad_accum,
                       max_grad_norm=args.max_grad_norm, precision=args.precision, seed=args.seed,
                       log_every=args.log_every, eval_every=args.eval_every, save_every=args.save_every,
                       cuda_graph=args.cuda_graph, keep_checkpoints=args.keep_checkpoints)


def _targets(args: argparse.Namespace) -> str | list[str]:
    return args.targets[0] if args.targets == ["all-linear"] else args.targets


def _finetune_args(args: argparse.Namespace):
    from ..training.recipes import FinetuneArgs

    targets = _targets(args)
    return FinetuneArgs(model=args.model, data=args.data, output_dir=args.output_dir, method=args.method,
                      task=args.task, rank=args.rank, alpha=args.alpha, targets=targets,
                      magnitude_only=tuple(args.magnitude_only), dropout=args.dropout, use_rslora=args.use_rslora,
                      norm_grad=args.norm_grad, batch_size=args.batch_size, epochs=args.epochs, max_len=args.max_len,
                      train_on_inputs=args.train_on_inputs, chat_template=args.chat_template, pack=args.pack,
                      eval_data=args.eval_data, eval_limit=args.eval_limit,
                      gradient_checkpointing=args.gradient_checkpointing, record_deltas=args.record_deltas,
                      load_in_4bit=args.load_in_4bit, load_in_8bit=args.load_in_8bit,
                      device=args.device, strategy=args.strategy, resume=args.resume, compile=args.compile,
                      report_to=_report_to(args.report_to), train=_train_config(args))


def _report_to(value: str | tuple[str, ...]) -> tuple[str, ...]:
    """--report-to as names (its default is the string "jsonl"; given flags are parsed into names)."""
    from ..training.trackers import check_report_to

    return check_report_to(value)


def _run_finetune(args: argparse.Namespace) -> int:
    from ..training.recipes import finetune

    outcome = finetune(_finetune_args(args))
    r = outcome.result
    if not outcome.main:  # rank 0 of a distributed run reports for all
        return EXIT_INTERRUPTED if r.interrupted else 0
    pct = 100 * outcome.trainable / outcome.total
    print(f"{args.method}: {r.steps} steps in {r.seconds:.1f} s, trainable {outcome.trainable:,d} of "
          f"{outcome.total:,d} ({pct:.4f}%), final loss {r.final_loss if r.final_loss is not None else float('nan'):.4f}"
          + (f", eval {r.eval}" if r.eval else ""))
    if r.interrupted:
        print(f"interrupted: checkpoint at step {r.steps} in {args.output_dir}/checkpoints; continue with --resume")
        return EXIT_INTERRUPTED
    print(f"saved to {outcome.saved_to}")
    return 0


def _run_eval(args: argparse.Namespace) -> int:
    from ..training.data import load_records
    from ..training.distributed import single_device
    from ..training.evaluate import evaluate_task, format_table, task_from_path
    from ..formats.dispatch import load_adapter
    from ..training.models import load_model, model_task

    if model_task(args.model, "auto") != "causal":
        raise ValueError(f"{args.model}: dorakit eval scores causal language models; this one is not.")
    data = {path: (task_from_path(path), load_records(path, purpose="eval")) for path in args.data}  # checked first
    model, tokenizer = load_model(args.model, "causal")
    if args.adapter:
        load_adapter(model, args.adapter)
    model.to(single_device(args.device))
    methods = ["loglik", "generate"] if args.method == "both" else [args.method]
    tables, results = [], {}
    for method in methods:
        accs = {}
        for task, records in data.values():
            records = records[: args.limit] if args.limit else records
            kw = {"batch_size": args.batch_size}
            if method == "generate":
                kw["max_new_tokens"] = args.max_new_tokens
                kw["num_beams"] = args.num_beams
            accs[task] = evaluate_task(model, tokenizer, records, task, method=method, **kw).accuracy
        results[method] = accs
        tables.append(format_table(accs, label=method))
    print("\n\n".join(tables))
    if args.output:
        from ..formats.io import atomic_write_bytes

        atomic_write_bytes(Path(args.output), json.dumps(results, indent=2).encode())
    return 0


def _run_merge(args: argparse.Namespace) -> int:
    from ..training.models import merge

    print(f"merged model written to {merge(args.model, args.adapter, args.output, args.task)}")
    return 0


def _run_analyze(args: argparse.Namespace) -> int:
    from .report import analyze_runs

    fits = analyze_runs(args.runs, args.output_dir, module_type=args.module_type, view=args.view,
                        normalize=args.normalize, checkpoints=args.checkpoints, n_boot=args.bootstrap)
    for method, fit in fits.items():
        ci = f" [95% CI {fit['low']:+.4g}, {fit['high']:+.4g}]" if "low" in fit else ""
        print(f"{method}: slope {fit['slope']:+.4g}{ci}, Pearson r {fit['r']:+.3f} over {fit['n']} points")
    if args.view == "per-checkpoint":
        for row in json.loads((Path(args.output_dir) / "checkpoint_fits.json").read_text()):
            ci = f" [{row['low']:+.4g}, {row['high']:+.4g}]" if "low" in row else ""
            print(f"{row['method']} step {row['step']}: slope {row['slope']:+.4g}{ci} over {row['n']} layers")
    extra = ", checkpoint_fits.json" if args.view == "per-checkpoint" else ""
    print(f"wrote {args.output_dir}/deltas.png, deltas.csv, fits.json{extra}")
    return 0


def _run_sweep(args: argparse.Namespace) -> int:
    from .sweep import sweep

    out = Path(args.output_dir)
    if out.exists() and any(out.iterdir()) and not args.resume:
        raise FileExistsError(f"{out} exists and is not empty; choose a new --output-dir (nothing is overwritten).")
    try:
        rows = sweep(_finetune_args(args), args.methods, args.ranks, out, args.alpha_per_rank, args.seeds)
    except KeyboardInterrupt as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED
    from .report import markdown_table

    if args.seeds:
        print((out / "sweep_seeds.md").read_text(), end="")
        return 0
    print(markdown_table(rows, [("method", "method"), ("rank", "rank"), ("accuracy", "accuracy %"),
                                ("percent", "trainable %")]))
    return 0


def _run_params(args: argparse.Namespace) -> int:
    from ..adapters.config import AdapterConfig
    from .sweep import count_for

    cfg = None if args.method == "full" else AdapterConfig(
        method=args.method, rank=args.rank, alpha=args.alpha, targets=_targets(args),
        magnitude_only=tuple(args.magnitude_only))
    c = count_for(args.model, args.method, cfg)
    print(f"{args.model} {args.method}: trainable {c['trainable']:,d} of {c['total']:,d} ({c['percent']:.4f}%); "
          f"base model {c['base']:,d}")
    if args.memory:
        from ..adapters.memory import MemoryPlan, estimate_memory, format_memory
        from .sweep import adapted_meta_model

        plan = MemoryPlan(base=args.base, batch_size=args.batch_size, seq_len=args.seq_len,
                          act_bytes=4 if args.precision == "fp32" else 2,
                          gradient_checkpointing=args.gradient_checkpointing, gpus=args.gpus)
        if args.method == "full" and args.base in ("int8", "nf4"):
            raise ValueError(f"--method full with --base {args.base}: quantized weights cannot be trained; use lora "
                             "or dora.")
        print(f"estimated memory per GPU ({args.base} base, batch {args.batch_size} x {args.seq_len} tokens, "
              f"{args.precision} activations, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, "
              f"{args.gpus} GPU{'s' if args.gpus > 1 else ''}{' with FSDP' if args.gpus > 1 else ''}):")
        print(format_memory(estimate_memory(adapted_meta_model(args.model, cfg), plan)))
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    try:
        return run_demo(args.output_dir, methods=args.methods, max_steps=args.max_steps, train_size=args.train_size,
                        test_size=args.test_size, seed=args.seed, keep_full_model=args.keep_full_model,
                        verbose=args.verbose)
    except KeyboardInterrupt as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED


def _run_generate(args: argparse.Namespace) -> int:
    if args.prompt_file:
        from .batch import run_prompt_file

        return run_prompt_file(args)
    from .generate import run_generate

    return run_generate(args)


RUNS: dict[str, Callable[[argparse.Namespace], int]] = {
    "finetune": _run_finetune, "eval": _run_eval, "merge": _run_merge, "analyze": _run_analyze,
    "demo": _run_demo, "sweep": _run_sweep, "params": _run_params, "generate": _run_generate}


@contextmanager
def third_party_quiet(verbose: bool) -> Iterator[None]:
    """Without ``verbose``: transformers logs only errors and shows no progress bars while a command runs
    (its load report would list e.g. a classifier head as MISSING that the adapter restores right after)."""
    if verbose:
        yield
        return
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _expected_errors() -> tuple[type[Exception], ...]:
    """The errors that are the user's to fix: one line, exit 2 (imported only when one is raised)."""
    from ..adapters.config import ConfigError
    from ..formats.peft_format import AdapterFileError
    from ..training.checkpoint import RunDirBusyError
    from ..training.data import DataError
    from ..training.recipes import RecipeError

    return (ConfigError, DataError, AdapterFileError, RecipeError, FileExistsError, FileNotFoundError,
            ValueError, RunDirBusyError)


DISK_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}


def _disk_full(e: OSError, args: argparse.Namespace | None) -> str:
    """One line for a write that ran out of disk space, naming where it wrote."""
    where = e.filename or next((getattr(args, k) for k in ("output_dir", "output") if getattr(args, k, None)), None)
    resume = " (finetune: with --resume; its last complete checkpoint is intact)" if getattr(args, "command", "") in (
        "finetune", "sweep") else ""
    return (f"{DISK_FULL[e.errno]} while writing {where or 'a file'}: free some space (or choose another output "
            f"directory) and run the command again{resume}.")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args: argparse.Namespace | None = None
    try:
        args = parse_args(argv)
        with third_party_quiet(args.verbose or args.command == "analyze"):  # analyze never loads a model
            return RUNS[args.command](args)
    except (SystemExit, KeyboardInterrupt):  # --help, argparse's exit 2, Ctrl-C: before the next clause imports
        raise
    except _expected_errors() as e:
        one_line = " ".join(part.strip() for part in str(e).splitlines() if part.strip())  # e.g. a library's message
        print(f"dorakit: error: {one_line}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        print(f"dorakit: error: {_disk_full(e, args)}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
