"""The ``dorakit`` command line's flags: every subcommand, its help text, defaults and value checks.

Importing this module is light (no torch, no transformers), so ``dorakit --help`` answers at once;
``dorakit.commands.cli`` runs the commands. A ``--config FILE`` (YAML or TOML) gives flags too: its
keys are exactly the command's flags (``max-steps`` or ``max_steps``) and the command line wins.
"""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Sequence
from typing import NoReturn

from ..training.config import PRECISIONS, SCHEDULES, STRATEGIES, TrainConfig
from .argtypes import ReportTo, adapter_spec, device, existing_file, integer, number, prompt_file, unit_interval
from .config_file import config_argv, read_config_file  # noqa: F401  (re-exported: cli imports them from here)

EXIT_USAGE = 2
DESCRIPTION = """\
dorakit: DoRA, LoRA, VeRA and DVoRA adapters, exact to the paper and to PEFT's files.

`dorakit COMMAND --help` shows a command's flags, each with its default. Every command also takes
--config FILE (YAML or TOML, keys = its flags; the command line wins) and --verbose."""
SUMMARIES = {
    "finetune": "fine-tune a local transformers model with LoRA, DoRA, VeRA, DVoRA or full fine-tuning",
    "eval": "accuracy on commonsense tasks (LLM-Adapters format), optionally with an adapter",
    "merge": "fold an adapter into its base and save a plain model directory",
    "analyze": "the paper's ΔM / ΔD figure and numbers from runs made with --record-deltas",
    "demo": "full FT vs LoRA vs DoRA on a real model and real data, offline on a CPU, in minutes",
    "sweep": "accuracy vs rank: finetune once per (method, rank) and tabulate",
    "params": "trainable parameters of a config, counted on the meta device (no weights loaded)",
    "generate": "talk to a local causal LM, optionally with adapters: one --prompt, a --chat or a --prompt-file batch",
}


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; every flag's help ends with its default (not for required flags or None)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.required or action.default in (None, argparse.SUPPRESS) or "%(default)" in text:
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (no usage block; --help has it) and exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message.rstrip('.')} (see {self.prog} --help)\n")


def _add(sub: argparse._SubParsersAction, name: str, description: str = "") -> argparse.ArgumentParser:
    summary = SUMMARIES[name]
    text = description or summary[0].upper() + summary[1:] + "."
    text = "\n".join(textwrap.fill(paragraph, 100) for paragraph in text.split("\n"))  # kept as written
    return sub.add_parser(name, help=summary, description=text, formatter_class=_Formatter)


def _adapter_flags(g: argparse._ActionsContainer) -> None:
    """What to adapt and how: shared by finetune, sweep and params."""
    g.add_argument("--method", default="dora", choices=["lora", "dora", "vera", "dvora", "full"],
                   help="adapter method; full: ordinary fine-tuning of every weight")
    g.add_argument("--rank", type=integer(1, 8), default=8, help="rank r of the low-rank update BA")
    g.add_argument("--alpha", type=number(0, "16", above=True), default=16.0,
                   help="scaling numerator: the update is (alpha / rank) BA (alpha / sqrt(rank) with --use-rslora)")
    g.add_argument("--targets", nargs="+", default=["all-linear"],
                   help="modules to adapt: names, globs, re:REGEX, or all-linear (every linear layer but the output / classifier heads)")
    g.add_argument("--magnitude-only", nargs="*", default=[],
                   help="modules that train only DoRA's magnitude vector (the paper's §5 variant)")


def _finetune_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True, help="local transformers model directory")
    g.add_argument("--task", default="auto", choices=["auto", "causal", "classify"],
                   help="auto: read it from the model's config.json (causal LM, or sequence classification)")
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help="training data: .json list, .jsonl, or a datasets directory "
                   "(LLM-Adapters {instruction, input, output}; chat {messages}, {prompt, completion} or {text}; "
                   "classification {text, label})")
    g.add_argument("--max-len", type=integer(1, 256), default=256, help="token cut-off per example (with --pack: "
                   "per packed row)")
    g.add_argument("--train-on-inputs", action=argparse.BooleanOptionalAction, default=False,
                   help="also train on the prompt's tokens (chat: every turn), not only on the answer's")
    g.add_argument("--chat-template", default=None, metavar="FILE",
                   help="Jinja chat template for {messages} data, replacing the tokenizer's own (saved with the "
                   "tokenizer in <output-dir>/final)")
    g.add_argument("--pack", action=argparse.BooleanOptionalAction, default=False,
                   help="pack short examples into rows of up to --max-len tokens, attention isolated per example "
                   "(--batch-size then counts rows)")
    g.add_argument("--eval-data", default=None, help="evaluation data, scored every --eval-every steps and at the end")
    g.add_argument("--eval-limit", type=integer(1, 200), default=200, help="evaluate on the first N records")
    g = p.add_argument_group("adapter")
    _adapter_flags(g)
    g.add_argument("--dropout", type=number(0, "0.05", below=1), default=0.0, help="dropout on the adapter's input")
    g.add_argument("--use-rslora", action=argparse.BooleanOptionalAction, default=False,
                   help="rank-stabilised scaling alpha / sqrt(rank)")
    g.add_argument("--norm-grad", default="detach", choices=["detach", "exact"],
                   help="DoRA's norm ||W0 + sBA||_c: detach (the paper's §4.3, less memory) or exact gradient")
    _optimisation_flags(p)
    _speed_flags(p)
    _run_dir_flags(p)
    g = p.add_argument_group("distributed")
    g.add_argument("--strategy", choices=STRATEGIES, default="none",
                   help="none: one process; ddp / fsdp (FSDP2, sharded per decoder layer): several processes started "
                   "by torchrun --nproc-per-node N -m dorakit finetune ... or accelerate launch --multi_gpu")


def _optimisation_flags(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    g = p.add_argument_group("optimisation", "AdamW with warmup, then the --schedule; a run takes --max-steps\n"
                             "optimizer steps (100 unless given), or --epochs passes over the data if set.")
    g.add_argument("--max-steps", type=integer(1, 100), default=d.max_steps,
                   help="optimizer steps in total (each of --grad-accum micro-batches); --epochs > 0 replaces it")
    g.add_argument("--epochs", type=number(0, "3"), default=0.0,
                   help="if > 0, train this many passes over the data (sets --max-steps from the data size)")
    g.add_argument("--batch-size", type=integer(1, 4), default=4, help="examples per micro-batch")
    g.add_argument("--grad-accum", type=integer(1, 4), default=d.grad_accum, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=number(0, "2e-4", above=True), default=d.lr, help="peak learning rate of AdamW")
    g.add_argument("--weight-decay", type=number(0, "0.01"), default=d.weight_decay,
                   help="AdamW's decoupled weight decay")
    g.add_argument("--warmup-steps", type=integer(0, 100), default=d.warmup_steps,
                   help="linear warmup from 0 to --lr over this many steps")
    g.add_argument("--schedule", default=d.schedule, choices=SCHEDULES,
                   help="after warmup: linear or cosine decay to 0, or constant")
    g.add_argument("--max-grad-norm", type=number(0, "1.0"), default=d.max_grad_norm,
                   help="clip the gradient norm to this (0: no clipping)")
    g.add_argument("--seed", type=integer(0, 0), default=d.seed, help="seeds torch, Python's random and the data order")


def _speed_flags(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    g = p.add_argument_group("precision / speed")
    g.add_argument("--device", type=device, default="auto", help="auto, cpu, cuda, cuda:N or mps")
    g.add_argument("--precision", default=d.precision, choices=PRECISIONS,
                   help="fp32, or autocast to bf16 / fp16 (fp16 with a gradient scaler; GPU only)")
    g.add_argument("--load-in-4bit", action=argparse.BooleanOptionalAction, default=False,
                   help="quantize the base to NF4 (bitsandbytes): QLoRA / QDoRA; several processes with --strategy fsdp")
    g.add_argument("--load-in-8bit", action=argparse.BooleanOptionalAction, default=False,
                   help="quantize the base to int8 (bitsandbytes LLM.int8()): LoRA / DoRA over it; one process")
    g.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False,
                   help="recompute activations in the backward: less memory, more compute")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the model (fewer launches: the eager GPU step is host-bound); compiling takes "
                   "a minute or more at the start and again for new sequence lengths")
    g.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=d.cuda_graph,
                   help="replay each micro-batch's forward + backward from a CUDA graph (one GPU; sequences padded "
                   "to a bucket width, one graph per width): the eager GPU step is host-bound")


def _run_dir_flags(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    g = p.add_argument_group("run directory")
    g.add_argument("--output-dir", required=True,
                   help="run directory: run.json, metrics.jsonl, checkpoints/, final/ (the adapter or model)")
    g.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its last checkpoint")
    g.add_argument("--log-every", type=integer(1, 10), default=d.log_every,
                   help="write a metrics line every N steps")
    g.add_argument("--eval-every", type=integer(0, 200), default=d.eval_every,
                   help="evaluate --eval-data every N steps (0: only at the end)")
    g.add_argument("--save-every", type=integer(0, 200), default=d.save_every,
                   help="write a checkpoint every N steps (0: only at the end and on Ctrl-C)")
    g.add_argument("--keep-checkpoints", type=integer(1, 2), default=d.keep_checkpoints,
                   help="keep the newest N checkpoints, delete older ones (the one `latest` names is always kept)")
    g.add_argument("--record-deltas", type=integer(0, 10), default=0,
                   help="record the paper's ΔM / ΔD every N steps into <output-dir>/deltas.json (0: off)")
    g.add_argument("--report-to", nargs="+", action=ReportTo, default="jsonl", metavar="TRACKER",
                   help="where metrics go, comma-separated: jsonl (<output-dir>/metrics.jsonl, always written), "
                   "tensorboard (<output-dir>/tensorboard), wandb (<output-dir>/wandb; WANDB_MODE etc. apply)")


def _finetune_parser(sub: argparse._SubParsersAction) -> None:
    p = _add(sub, "finetune", "Fine-tune a local model directory on instruction data (LLM-Adapters JSON, JSONL or a "
             "datasets directory) or classification data ({text, label}).\nWithout --max-steps or --epochs a run "
             "takes 100 optimizer steps; the adapter (or model) is saved in <output-dir>/final.")
    _finetune_flags(p)


def _sweep_parser(sub: argparse._SubParsersAction) -> None:
    p = _add(sub, "sweep", "Runs finetune for every --methods × --ranks (alpha = --alpha-per-rank × rank) into "
             "<output-dir>/<method>-r<rank> and writes sweep.md/.csv/.json/.png there; the paper's DoRA† is DoRA "
             "at half LoRA's rank. Takes every finetune flag.")
    _finetune_flags(p)
    g = p.add_argument_group("sweep")
    g.add_argument("--methods", nargs="+", default=["lora", "dora"], choices=["lora", "dora", "vera", "dvora"],
                   help="methods to compare")
    g.add_argument("--ranks", nargs="+", type=integer(1, 8), default=[4, 8, 16, 32, 64], help="ranks to run")
    g.add_argument("--alpha-per-rank", type=number(0, "2", above=True), default=2.0,
                   help="each run's alpha is this × its rank (replaces --alpha)")
    g.add_argument("--seeds", nargs="+", type=integer(0, 0), default=[],
                   help="run the whole sweep once per seed into <output-dir>/seed<S> (replaces --seed) and write "
                   "sweep_seeds.md/.json/.png: mean ± 95%% interval per rank, DoRA − LoRA paired by seed")


def _params_parser(sub: argparse._SubParsersAction) -> None:
    p = _add(sub, "params")
    p.add_argument("--model", required=True, help="a preset (llama-7b, llama2-7b, llama3-8b, llama2-70b) or a local "
                   "model directory (only its config.json is read)")
    _adapter_flags(p)
    g = p.add_argument_group("memory (with --memory)")
    g.add_argument("--memory", action="store_true", help="also estimate the per-GPU memory of a training run")
    g.add_argument("--base", default="bf16", choices=("fp32", "bf16", "int8", "nf4"),
                   help="precision of the frozen base (int8: LLM.int8(), nf4: QLoRA with double quantization)")
    g.add_argument("--batch-size", type=integer(1, 1), default=1, help="sequences per micro-batch on one GPU")
    g.add_argument("--seq-len", type=integer(1, 512), default=512, help="tokens per sequence")
    g.add_argument("--precision", default="bf16", choices=("fp32", "bf16"), help="activation dtype")
    g.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False,
                   help="keep only each decoder layer's input for backward")
    g.add_argument("--gpus", type=integer(1, 1), default=1, help="GPUs FSDP shards the base and optimizer over")


def _eval_parser(sub: argparse._SubParsersAction) -> None:
    p = _add(sub, "eval", "Accuracy of a causal LM (optionally with an adapter) on one or more commonsense test "
             "files; prints a table like the paper's Table 1.")
    p.add_argument("--model", required=True, help="local transformers causal LM directory")
    p.add_argument("--adapter", default=None, help="adapter directory (PEFT format) to load first")
    p.add_argument("--data", nargs="+", required=True, help="test files; the task is read from the parent "
                   "directory name (boolq, piqa, social_i_qa, hellaswag, winogrande, ARC-Easy, ARC-Challenge, openbookqa)")
    p.add_argument("--method", default="loglik", choices=["loglik", "generate", "both"],
                   help="loglik: the answer with the highest log-likelihood; generate: parse the generated answer")
    p.add_argument("--limit", type=integer(0, 100), default=0, help="first N records per task (0: all)")
    p.add_argument("--batch-size", type=integer(1, 8), default=8, help="records per forward pass")
    p.add_argument("--max-new-tokens", type=integer(1, 32), default=32, help="generation length for --method generate")
    p.add_argument("--num-beams", type=integer(1, 4), default=1, help="beam search for --method generate (the DoRA "
                   "repository's commonsense_evaluate.py uses 4; 1 is greedy)")
    p.add_argument("--device", type=device, default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--output", default=None, help="also write the results as JSON here")


def _merge_parser(sub: argparse._SubParsersAction) -> None:
    p = _add(sub, "merge", "Fold an adapter into its base (W0 + ΔW, with DoRA's magnitude) and save a plain model "
             "directory that transformers loads without dorakit or PEFT.")
    p.add_argument("--model", required=True, help="local base model directory")
    p.add_argument("--adapter", required=True, help="adapter directory (PEFT format)")
    p.add_argument("--output", required=True, help="new directory for the merged model")
    p.add_argument("--task", default="auto", choices=["auto", "causal", "classify"],
                   help="auto: read it from the model's config.json (causal LM, or sequence classification)")


def _demo_parser(sub: argparse._SubParsersAction) -> None:
    p = _add(sub, "demo", "Full fine-tuning vs LoRA vs DoRA on all-MiniLM-L6-v2 and Rotten Tomatoes (from PyPI "
             "packages), offline on a CPU. Its first line names the output folder; running it again replaces "
             "that folder's previous demo output (and nothing else).")
    p.add_argument("--output-dir", default=None, help="where runs, metrics and the report go (default: "
                   "$XDG_CACHE_HOME/dorakit/demo, or ~/.cache/dorakit/demo)")
    p.add_argument("--methods", nargs="+", default=["full", "lora", "dora"], choices=["full", "lora", "dora"],
                   help="methods to compare")
    p.add_argument("--max-steps", type=integer(0, 100), default=0,
                   help="override the demo's step count (0: one epoch)")
    p.add_argument("--train-size", type=integer(0, 200), default=0,
                   help="override the number of training examples (0: the demo's 960)")
    p.add_argument("--test-size", type=integer(0, 200), default=0,
                   help="override the number of test examples (0: the demo's 500)")
    p.add_argument("--seed", type=integer(0, 0), default=0, help="seeds the split, the init and the data order")
    p.add_argument("--keep-full-model", action="store_true",
                   help="keep the full fine-tune's checkpoints and model (hundreds of MB; deleted by default)")


def _analyze_parser(sub: argparse._SubParsersAction) -> None:
    p = _add(sub, "analyze", "Reads <run>/deltas.json of each run (dorakit finetune --record-deltas N) and writes "
             "deltas.png (ΔD on x, ΔM on y, colour = layer, marker = step, one panel per method, slope and "
             "Pearson r per panel), deltas.csv and fits.json.")
    p.add_argument("--runs", nargs="+", required=True, help="run directories (or deltas.json files)")
    p.add_argument("--output-dir", required=True, help="where deltas.png, deltas.csv and fits.json go")
    p.add_argument("--module-type", default=None, help="only this module type, e.g. q_proj or query (the "
                   "paper plots the query projection)")
    g = p.add_argument_group("slopes", "the ΔD–ΔM slope: pooled over layers and steps (the paper's Fig. 2), or "
                             "per checkpoint over the layers; bootstrap 95% intervals")
    g.add_argument("--view", choices=("pooled", "per-checkpoint"), default="pooled",
                   help="pooled: one slope per method over every layer and step; per-checkpoint: also one "
                   "slope per recorded step over the layers (checkpoint_fits.json)")
    g.add_argument("--normalize", choices=("none", "layer", "step"), default="none",
                   help="divide ΔM and ΔD by their mean per module over steps (layer) or per step over "
                   "modules (step: removes the growth common to all layers) before fitting")
    g.add_argument("--checkpoints", type=integer(0, 4), default=0,
                   help="keep this many evenly spaced recorded steps (0: all; the paper shows 4)")
    g.add_argument("--bootstrap", type=integer(0, 1000), default=1000,
                   help="bootstrap resamples for the slopes' 95%% intervals (0: no intervals)")


def _generate_parser(sub: argparse._SubParsersAction) -> None:
    p = _add(sub, "generate", "Generate text with a local causal LM, optionally with an adapter (unmerged, or folded "
             "in with --merge), streaming tokens to the terminal. --prompt TEXT answers once; --chat reads one "
             "message per line from stdin until end of input or /exit, keeping the conversation. Chat messages, "
             "and --prompt when the tokenizer has a chat template, are rendered with the tokenizer's chat template "
             "(or --chat-template FILE); otherwise --prompt is fed as plain text. Several adapters load by name "
             "(--adapter NAME=DIR, repeated) onto one base: --use NAME picks the one --prompt / --chat run, and a "
             "--prompt-file JSONL batch names one per record, all generated together in mixed batches.")
    p.add_argument("--model", required=True, help="local transformers causal LM directory")
    p.add_argument("--adapter", type=adapter_spec, action="append", default=None, metavar="[NAME=]DIR",
                   help="adapter directory (PEFT format), e.g. <finetune output>/final; repeat as NAME=DIR to load "
                   "several adapters by name onto one base (a bare DIR is the adapter named default)")
    p.add_argument("--use", default=None, metavar="NAME", help="the adapter --prompt and --chat run, and the one of "
                   "--prompt-file records without an \"adapter\" key (default: 'default' if loaded, else the first "
                   "--adapter)")
    p.add_argument("--merge", action="store_true", help="fold the adapter into the base weights before generating "
                   "(one adapter; not with --prompt-file)")
    p.add_argument("--prompt-file", type=prompt_file, default=None, metavar="JSONL",
                   help="a batch: one JSON record per line, {\"prompt\": TEXT} or {\"messages\": [...]}, with an "
                   "optional \"adapter\": NAME (null: the base model); each record runs its own adapter in one mixed "
                   "batch, and each answer is printed as the record plus \"output\", one JSON line each (instead of "
                   "--prompt / --chat)")
    g = p.add_mutually_exclusive_group()  # one of them, or --prompt-file: checked in _check_generate
    g.add_argument("--prompt", default=None, help="the text to continue (or the one user message, with a template)")
    g.add_argument("--chat", action="store_true", help="interactive: one message per stdin line; /exit or end of "
                   "input stops")
    p.add_argument("--chat-template", type=existing_file, default=None,
                   help="a Jinja chat template file to use instead of the tokenizer's")
    p.add_argument("--plain", action="store_true", help="feed --prompt (and --prompt-file's \"prompt\" records) as "
                   "plain text even if there is a chat template")
    p.add_argument("--batch-size", type=integer(1, 8), default=None,
                   help="--prompt-file records per generate() call (default: 8)")
    s = p.add_argument_group("sampling")
    s.add_argument("--max-new-tokens", type=integer(1, 128), default=128, help="tokens to generate per answer")
    s.add_argument("--temperature", type=number(0, "0.7"), default=0.0,
                   help="sampling temperature; 0: greedy decoding (deterministic)")
    s.add_argument("--top-p", type=unit_interval, default=None,
                   help="nucleus sampling: the smallest set of tokens whose probability reaches P (needs "
                   "--temperature > 0; default: off)")
    s.add_argument("--top-k", type=integer(1, 50), default=None,
                   help="sample among the K most likely tokens (needs --temperature > 0; default: off)")
    s.add_argument("--seed", type=integer(0, 0), default=0, help="seeds the sampling")
    p.add_argument("--device", type=device, default="auto", help="auto, cpu, cuda, cuda:N or mps")


def _check_generate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """generate's flags that only work together: checked at parse time, exit 2 with one line."""
    sub = parser._subparsers._group_actions[0].choices["generate"]  # type: ignore[union-attr]
    given = [flag for flag, on in (("--prompt", args.prompt is not None), ("--chat", args.chat),
                                   ("--prompt-file", args.prompt_file)) if on]
    if not given:
        sub.error("one of the arguments --prompt --chat is required (or --prompt-file JSONL, a batch)")
    if args.prompt_file and len(given) > 1:
        sub.error(f"--prompt-file is a batch of its own; leave out {given[0]}")
    if args.batch_size is not None and not args.prompt_file:
        sub.error("--batch-size applies to --prompt-file (--prompt and --chat answer one prompt at a time)")
    if args.merge and not args.adapter:
        sub.error("--merge needs --adapter (the adapter to fold in)")
    names = [name for name, _ in args.adapter or []]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        sub.error(f"--adapter names {duplicated} more than once (a bare DIR is named 'default'); give each adapter "
                  "its own NAME=DIR")
    if args.merge and (len(names) > 1 or args.prompt_file):
        sub.error("--merge folds one adapter into the base for --prompt / --chat; with several --adapter or "
                  "--prompt-file, leave --merge out (adapters run unmerged, exactly)")
    if args.use is not None and args.use not in names:
        sub.error(f"--use {args.use!r} is not one of the --adapter names {names}; e.g. --adapter "
                  f"{args.use}=DIR --use {args.use}")
    if args.temperature == 0:
        given = [flag for flag, value in (("--top-p", args.top_p), ("--top-k", args.top_k)) if value is not None]
        if given:
            sub.error(f"{' and '.join(given)} apply to sampling; set --temperature > 0 (0 is greedy decoding)")
    if args.plain and (args.chat or args.chat_template):
        sub.error("--plain applies to --prompt without --chat-template (it skips the chat template)")


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; ``args.command`` names the subcommand."""
    parser = _Parser(prog="dorakit", description=DESCRIPTION, formatter_class=_Formatter)
    sub = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")
    for add in (_finetune_parser, _eval_parser, _merge_parser, _analyze_parser, _demo_parser, _sweep_parser,
                _params_parser, _generate_parser):
        add(sub)
    for p in sub.choices.values():
        g = p.add_argument_group("every command")
        g.add_argument("--config", default=None, help="YAML or TOML file whose keys are this command's flags "
                       "(the command line wins)")
        g.add_argument("--verbose", action="store_true",
                       help="also show transformers' own messages (load reports, progress bars)")
    return parser


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
    args = parser.parse_args(argv)
    if args.command == "generate":
        _check_generate(parser, args)
    if getattr(args, "load_in_4bit", False) and getattr(args, "load_in_8bit", False):
        subs[args.command].error("--load-in-4bit and --load-in-8bit: the base is quantized one way; pass one of them")
    return args
