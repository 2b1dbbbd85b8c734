"""The ``dorakit`` command: finetune, eval, merge, demo.

Every subcommand takes ``--config FILE`` (YAML or TOML) whose keys are exactly its flags (``max-steps``
or ``max_steps``); flags on the command line override the file. An unknown key is an error.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import sys
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from ..training.distributed import STRATEGIES
from ..training.train import PRECISIONS, SCHEDULES, TrainConfig

EXIT_USAGE, EXIT_INTERRUPTED = 2, 130


# ---- flag types: each checks its value when the command line is parsed (argparse then exits 2) ------

def _integer(low: int, example: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}; e.g. {example}")
        return value
    parse.__name__ = f"integer >= {low}"
    return parse


def _number(low: float, example: str, above: bool = False, below: float | None = None) -> Callable[[str], float]:
    """An argparse type: a finite float >= ``low`` (> with ``above``; < ``below`` if given)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        ok = math.isfinite(value) and (value > low if above else value >= low) and (below is None or value < below)
        if not ok:
            bounds = f"{'>' if above else '>='} {low:g}" + (f" and < {below:g}" if below is not None else "")
            raise argparse.ArgumentTypeError(f"must be a finite number {bounds}, got {text!r}; e.g. {example}")
        return value
    parse.__name__ = "number"
    return parse


def _device(text: str) -> str:
    """An argparse type: "auto" or a torch device this machine has."""
    from ..training.distributed import DistributedError, check_device

    try:
        return check_device(text)
    except DistributedError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--device ")) from None


POSITIVE, NONNEG = _integer(1, 4), _integer(0, 0)


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (no usage block; --help has it) and exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message.rstrip('.')} (see {self.prog} --help)\n")


def _finetune_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="fine-tune a local transformers model with LoRA, DoRA or full FT",
                       description="Fine-tune a local model directory on instruction data (LLM-Adapters JSON, "
                       "JSONL or a datasets directory) or classification data ({text, label}).")
    _finetune_flags(p)
    p.set_defaults(run=_run_finetune)


def _sweep_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="accuracy vs rank: finetune once per (method, rank)",
                       description="Runs finetune for every --methods × --ranks (alpha = --alpha-per-rank × rank) "
                       "into <output-dir>/<method>-r<rank> and writes sweep.md/.csv/.json/.png there; the "
                       "paper's DoRA† is DoRA at half LoRA's rank. Takes every finetune flag.")
    _finetune_flags(p)
    p.add_argument("--methods", nargs="+", default=["lora", "dora"], choices=["lora", "dora", "vera", "dvora"])
    p.add_argument("--ranks", nargs="+", type=_integer(1, 8), default=[4, 8, 16, 32, 64])
    p.add_argument("--alpha-per-rank", type=_number(0, "2", above=True), default=2.0)
    p.set_defaults(run=_run_sweep)


def _params_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("params", help="trainable parameters of a config, counted on the meta device (no weights)")
    p.add_argument("--model", required=True, help="a preset (llama-7b, llama2-7b, llama3-8b) or a local model "
                   "directory (only its config.json is read)")
    _adapter_flags(p)
    p.set_defaults(run=_run_params)


def _adapter_flags(p: argparse.ArgumentParser) -> None:
    """What to adapt and how: shared by finetune, sweep and params."""
    p.add_argument("--method", default="dora", choices=["lora", "dora", "vera", "dvora", "full"])
    p.add_argument("--rank", type=_integer(1, 8), default=8)
    p.add_argument("--alpha", type=_number(0, "16", above=True), default=16.0)
    p.add_argument("--targets", nargs="+", default=["all-linear"], help="module names / globs / re:regex, or all-linear")
    p.add_argument("--magnitude-only", nargs="*", default=[], help="modules that train only a magnitude (DoRA §5)")


def _finetune_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="local transformers model directory")
    p.add_argument("--data", required=True, help="training data: .json list, .jsonl, or a datasets directory")
    p.add_argument("--output-dir", required=True, help="run directory (metrics, checkpoints, final adapter)")
    _adapter_flags(p)
    p.add_argument("--task", default="auto", choices=["auto", "causal", "classify"])
    p.add_argument("--dropout", type=_number(0, "0.05", below=1), default=0.0)
    p.add_argument("--use-rslora", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--norm-grad", default="detach", choices=["detach", "exact"])
    p.add_argument("--batch-size", type=_integer(1, 4), default=4)
    p.add_argument("--epochs", type=_number(0, "3"), default=0.0, help="if > 0, sets max-steps from the data size")
    p.add_argument("--max-len", type=_integer(1, 256), default=256, help="token cut-off per example")
    p.add_argument("--train-on-inputs", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--eval-data", default=None, help="evaluated every --eval-every steps and at the end")
    p.add_argument("--eval-limit", type=_integer(1, 200), default=200)
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--load-in-4bit", action=argparse.BooleanOptionalAction, default=False,
                   help="quantize the base to NF4 (bitsandbytes): QLoRA / QDoRA")
    p.add_argument("--record-deltas", type=_integer(0, 10), default=0,
                   help="record the paper's ΔM / ΔD every N steps into <output-dir>/deltas.json (0: off)")
    p.add_argument("--device", type=_device, default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--strategy", choices=STRATEGIES, default="none",
                   help="none: one process; ddp / fsdp (FSDP2, sharded per decoder layer): several processes started "
                   "by torchrun --nproc-per-node N -m dorakit finetune ... or accelerate launch --multi_gpu")
    p.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its last checkpoint")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model (fewer launches: the eager GPU step is host-bound); compiling takes "
                   "a minute or more at the start and again for new sequence lengths")
    d = TrainConfig()
    p.add_argument("--lr", type=_number(0, "2e-4", above=True), default=d.lr)
    p.add_argument("--weight-decay", type=_number(0, "0.01"), default=d.weight_decay)
    p.add_argument("--warmup-steps", type=_integer(0, 100), default=d.warmup_steps)
    p.add_argument("--schedule", default=d.schedule, choices=SCHEDULES)
    p.add_argument("--max-steps", type=_integer(1, 100), default=d.max_steps)
    p.add_argument("--grad-accum", type=_integer(1, 4), default=d.grad_accum)
    p.add_argument("--max-grad-norm", type=_number(0, "1.0"), default=d.max_grad_norm,
                   help="clip the gradient norm to this (0: no clipping)")
    p.add_argument("--precision", default=d.precision, choices=PRECISIONS)
    p.add_argument("--seed", type=_integer(0, 0), default=d.seed)
    p.add_argument("--log-every", type=_integer(1, 10), default=d.log_every)
    p.add_argument("--eval-every", type=_integer(0, 200), default=d.eval_every)
    p.add_argument("--save-every", type=_integer(0, 200), default=d.save_every)
    p.add_argument("--keep-checkpoints", type=_integer(1, 2), default=d.keep_checkpoints,
                   help="keep the newest N checkpoints, delete older ones (the one `latest` names is always kept)")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=d.cuda_graph,
                   help="replay each micro-batch's forward + backward from a CUDA graph (one GPU; sequences padded "
                   "to a bucket width, one graph per width): the eager GPU step is host-bound")


def _eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="accuracy on commonsense tasks (LLM-Adapters format)",
                       description="Accuracy of a causal LM (optionally with an adapter) on one or more "
                       "commonsense test files; prints a table like the paper's Table 1.")
    p.add_argument("--model", required=True, help="local transformers causal LM directory")
    p.add_argument("--adapter", default=None, help="adapter directory (PEFT format) to load first")
    p.add_argument("--data", nargs="+", required=True, help="test files; the task is read from the parent "
                   "directory name (boolq, piqa, social_i_qa, hellaswag, winogrande, ARC-Easy, ARC-Challenge, openbookqa)")
    p.add_argument("--method", default="loglik", choices=["loglik", "generate", "both"])
    p.add_argument("--limit", type=_integer(0, 100), default=0, help="first N records per task (0: all)")
    p.add_argument("--batch-size", type=_integer(1, 8), default=8)
    p.add_argument("--max-new-tokens", type=_integer(1, 32), default=32)
    p.add_argument("--num-beams", type=_integer(1, 4), default=1, help="beam search for --method generate (the DoRA "
                   "repository's commonsense_evaluate.py uses 4; 1 is greedy)")
    p.add_argument("--device", type=_device, default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--output", default=None, help="also write the results as JSON here")
    p.set_defaults(run=_run_eval)


def _merge_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="fold an adapter into its base and save a plain model directory")
    p.add_argument("--model", required=True, help="local base model directory")
    p.add_argument("--adapter", required=True, help="adapter directory (PEFT format)")
    p.add_argument("--output", required=True, help="new directory for the merged model")
    p.add_argument("--task", default="auto", choices=["auto", "causal", "classify"])
    p.set_defaults(run=_run_merge)


def _demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the embedded default: FT vs LoRA vs DoRA on a real model and real data, "
                       "offline on a CPU")
    p.add_argument("--output-dir", default="dorakit-demo", help="where runs, metrics and the report go")
    p.add_argument("--methods", nargs="+", default=["full", "lora", "dora"], choices=["full", "lora", "dora"])
    p.add_argument("--max-steps", type=_integer(0, 100), default=0, help="override the demo's step count (0: its default)")
    p.add_argument("--train-size", type=_integer(0, 200), default=0, help="override the number of training examples")
    p.add_argument("--test-size", type=_integer(0, 200), default=0, help="override the number of test examples")
    p.add_argument("--seed", type=_integer(0, 0), default=0)
    p.set_defaults(run=_run_demo)


def _analyze_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="the paper's ΔM / ΔD figure and numbers from runs with --record-deltas",
                       description="Reads <run>/deltas.json of each run (dorakit finetune --record-deltas N) and "
                       "writes deltas.png (ΔD on x, ΔM on y, colour = layer, marker = step, one panel per "
                       "method, slope and Pearson r per panel), deltas.csv and fits.json.")
    p.add_argument("--runs", nargs="+", required=True, help="run directories (or deltas.json files)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--module-type", default=None, help="only this module type, e.g. q_proj or query (the "
                   "paper plots the query projection)")
    p.set_defaults(run=_run_analyze)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dorakit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_finetune_parser, _eval_parser, _merge_parser, _analyze_parser, _demo_parser, _sweep_parser,
                _params_parser):
        add(sub)
    for p in sub.choices.values():
        p.add_argument("--config", default=None, help="YAML or TOML file whose keys are this command's flags")
    return parser


# ---- config files ----------------------------------------------------------------------------------

def read_config_file(path: str) -> dict[str, Any]:
    """A YAML (.yaml/.yml) or TOML (.toml) mapping of flag name -> value."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--config {path}: no such file.")
    text = file.read_text()
    if file.suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"--config {path}: invalid TOML ({e}).") from None
    elif file.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"--config {path}: invalid YAML ({e}).") from None
    else:
        raise ValueError(f"--config {path}: use a .yaml, .yml or .toml file.")
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of flag names to values, got {type(data).__name__}.")
    return data


def config_argv(sub: argparse.ArgumentParser, data: dict[str, Any], path: str) -> list[str]:
    """The config file as command-line flags (placed before the real ones, which therefore win)."""
    actions = {a.dest: a for a in sub._actions if a.option_strings and a.dest not in ("help", "config")}
    argv: list[str] = []
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        action = actions.get(dest)
        if action is None:
            valid = ", ".join(sorted(d.replace("_", "-") for d in actions))
            raise ValueError(f"--config {path}: {key!r} is not a flag of this command; valid keys: {valid}.")
        flag = action.option_strings[0]
        if value is None:  # YAML `key: null` (or `~`): keep the flag's default
            continue
        if isinstance(action, argparse.BooleanOptionalAction) or isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise ValueError(f"--config {path}: {key!r} must be true or false, got {value!r}.")
            if value or isinstance(action, argparse.BooleanOptionalAction):
                argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            argv += [flag, *map(str, value)]
        elif isinstance(value, dict):
            raise ValueError(f"--config {path}: {key!r} must be a value or a list, not a mapping.")
        else:
            argv += [flag, str(value)]
    return argv


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The command line, with a --config file's flags put before the real ones (so those win).

    The file is read before the full parse, so it can supply required flags such as --model.
    """
    parser = build_parser()
    argv = list(argv)
    subs = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    if argv and argv[0] in subs:
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--config", default=None)
        path = pre.parse_known_args(argv[1:])[0].config
        if path:
            argv = [argv[0], *config_argv(subs[argv[0]], read_config_file(path), path), *argv[1:]]
    return parser.parse_args(argv)


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
                      train_on_inputs=args.train_on_inputs, eval_data=args.eval_data, eval_limit=args.eval_limit,
                      gradient_checkpointing=args.gradient_checkpointing, record_deltas=args.record_deltas,
                      load_in_4bit=args.load_in_4bit,
                      device=args.device, strategy=args.strategy, resume=args.resume, compile=args.compile,
                      train=_train_config(args))


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
    from ..training.recipes import load_model, model_task

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
    from ..training.recipes import merge

    print(f"merged model written to {merge(args.model, args.adapter, args.output, args.task)}")
    return 0


def _run_analyze(args: argparse.Namespace) -> int:
    from .report import analyze_runs

    fits = analyze_runs(args.runs, args.output_dir, module_type=args.module_type)
    for method, fit in fits.items():
        print(f"{method}: slope {fit['slope']:+.4g}, Pearson r {fit['r']:+.3f} over {fit['n']} points")
    print(f"wrote {args.output_dir}/deltas.png, deltas.csv, fits.json")
    return 0


def _run_sweep(args: argparse.Namespace) -> int:
    from .sweep import sweep

    out = Path(args.output_dir)
    if out.exists() and any(out.iterdir()) and not args.resume:
        raise FileExistsError(f"{out} exists and is not empty; choose a new --output-dir (nothing is overwritten).")
    try:
        rows = sweep(_finetune_args(args), args.methods, args.ranks, out, args.alpha_per_rank)
    except KeyboardInterrupt as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED
    from .report import markdown_table

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
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    try:
        return run_demo(args.output_dir, methods=args.methods, max_steps=args.max_steps,
                        train_size=args.train_size, test_size=args.test_size, seed=args.seed)
    except KeyboardInterrupt as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED


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
    from ..adapters.config import ConfigError
    from ..formats.peft_format import AdapterFileError
    from ..training.checkpoint import RunDirBusyError
    from ..training.data import DataError
    from ..training.recipes import RecipeError

    expected = (ConfigError, DataError, AdapterFileError, RecipeError, FileExistsError, FileNotFoundError,
                ValueError, RunDirBusyError)
    args: argparse.Namespace | None = None
    try:
        args = parse_args(argv)
        run: Callable[[argparse.Namespace], int] = args.run
        return run(args)
    except expected as e:
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
