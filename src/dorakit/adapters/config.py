"""AdapterConfig: what to adapt and how, as one frozen, validated dataclass."""

from __future__ import annotations

import math
import numbers
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields

import regex as regex_engine

from .functional import lora_scaling
from .kernels import BACKENDS

METHODS = ("lora", "dora", "vera", "dvora")
INITS = ("kaiming", "gaussian")
NORM_GRADS = ("detach", "exact")
BIAS_MODES = ("none", "all", "lora_only")
ALL_LINEAR = "all-linear"


class ConfigError(ValueError):
    """A field of AdapterConfig has a value dorakit cannot use."""


def _check_rank(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}; use e.g. rank=8.")
    return int(value)


def _check_alpha(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{what} must be a positive finite number, got {value!r}; use e.g. alpha=16.")
    return float(value)


def _check_patterns(value: object, what: str, allow_str: bool) -> str | tuple[str, ...]:
    if isinstance(value, str):
        if not allow_str:
            raise ConfigError(f"{what} must be a list of module-name patterns, got the string {value!r}; "
                              f"write [{value!r}].")
        if value != ALL_LINEAR:
            check_regex(value.removeprefix("re:"), what)
        return value
    if not isinstance(value, Sequence) or not all(isinstance(p, str) and p for p in value):
        raise ConfigError(f"{what} must be a list of non-empty strings, got {value!r}.")
    for p in value:
        if p == ALL_LINEAR:
            raise ConfigError(f"{what}: {ALL_LINEAR!r} is a whole-config choice, not a module name; "
                              f"write targets={ALL_LINEAR!r} (a string, not a list).")
        if p.startswith("re:"):
            check_regex(p[3:], what)
    return tuple(value)


# ---- bounded regular expressions ------------------------------------------------------------------
# Patterns come from adapter files and flags, so a crafted one must not hang the process: PEFT's
# re.fullmatch backtracks exponentially on e.g. "(.*.*)*X". Patterns are validated with `re` (what
# PEFT runs, so the same patterns are valid) and matched with the `regex` engine (same syntax and
# results for re's patterns) under a time limit.

MATCH_TIMEOUT_S = 1.0
"""The longest one pattern may take on one module name (normal patterns take microseconds)."""
MATCH_BUDGET_S = 2.0
SLOW_MATCH_S = 1e-3
"""A pattern that has spent MATCH_BUDGET_S in all, at more than SLOW_MATCH_S per name on average, is refused."""
MAX_EXPANSION = 100_000
"""Counted repeats (x{1000}) are unrolled when compiled: their unrolled size beyond the pattern's own length is bounded."""


class PatternError(ConfigError):
    """A module-name pattern that is not a valid regular expression, or too costly to compile or match."""


@dataclass
class _Guarded:
    compiled: regex_engine.Pattern
    spent: float = 0.0
    calls: int = 0
    refused: str | None = None


_GUARDED: dict[str, _Guarded] = {}


def _unrolled_size(items: object, limit: int) -> int:
    """Nodes of a parsed pattern once its counted repeats are unrolled (stops counting past ``limit``)."""
    total = 0
    for op, av in items:  # type: ignore[attr-defined]
        kind = str(op)
        if kind in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            low, high, sub = av
            total += max(1, low if high == re._constants.MAXREPEAT else high) * _unrolled_size(sub, limit)
        elif kind == "SUBPATTERN":
            total += _unrolled_size(av[3], limit)
        elif kind == "BRANCH":
            total += sum(_unrolled_size(sub, limit) for sub in av[1])
        elif kind in ("ASSERT", "ASSERT_NOT"):
            total += _unrolled_size(av[1], limit)
        elif kind == "ATOMIC_GROUP":
            total += _unrolled_size(av, limit)
        elif kind == "GROUPREF_EXISTS":
            total += _unrolled_size(av[1], limit) + (_unrolled_size(av[2], limit) if av[2] else 0)
        else:
            total += 1
        if total > limit:
            return total
    return total


def _guarded(pattern: str, what: str) -> _Guarded:
    found = _GUARDED.get(pattern)
    if found is not None:
        return found
    try:
        re.compile(pattern)
        size = _unrolled_size(re._parser.parse(pattern), len(pattern) + MAX_EXPANSION)  # type: ignore[attr-defined]
    except (re.error, RecursionError, OverflowError) as e:
        raise PatternError(f"{what}: {pattern!r} is not a valid regular expression ({e}).") from None
    if size > len(pattern) + MAX_EXPANSION:
        raise PatternError(f"{what}: {pattern!r} is refused: its counted repeats (x{{n}}) unroll to more than "
                           f"{MAX_EXPANSION:,} steps; write .* or + instead of large counts.")
    try:
        compiled = regex_engine.compile(pattern)
    except (regex_engine.error, RecursionError, OverflowError) as e:
        raise PatternError(f"{what}: {pattern!r} cannot be compiled by the bounded matcher ({e}).") from None
    if len(_GUARDED) >= 1024:
        _GUARDED.clear()
    _GUARDED[pattern] = found = _Guarded(compiled)
    return found


def check_regex(pattern: str, what: str) -> None:
    """Raise PatternError unless ``pattern`` is a valid regular expression (re's syntax) of bounded size."""
    _guarded(pattern, what)


def regex_fullmatch(pattern: str, name: str, what: str, *, whole: bool = True) -> bool:
    """re.fullmatch(pattern, name) (``whole=False``: re.match), bounded in time.

    Raises:
        PatternError: the pattern is invalid, or too slow (more than MATCH_TIMEOUT_S on one name, or
            MATCH_BUDGET_S in all at more than SLOW_MATCH_S per name): it is named in the message.
    """
    g = _guarded(pattern, what)
    if g.refused is not None:
        raise PatternError(g.refused)
    start = time.perf_counter()
    try:
        found = (g.compiled.fullmatch if whole else g.compiled.match)(name, timeout=MATCH_TIMEOUT_S)
    except TimeoutError:
        g.refused = (f"{what}: {pattern!r} is refused: matching it against module name {name!r} took more than "
                     f"{MATCH_TIMEOUT_S:g} s (nested repeats such as (.*.*)* backtrack exponentially); write a "
                     "simpler pattern, e.g. '.*\\.(q_proj|v_proj)'.")
        raise PatternError(g.refused) from None
    g.spent += time.perf_counter() - start
    g.calls += 1
    if g.spent > MATCH_BUDGET_S and g.spent / g.calls > SLOW_MATCH_S:
        g.refused = (f"{what}: {pattern!r} is refused: it took {g.spent:.1f} s over {g.calls} module names "
                     f"({1e3 * g.spent / g.calls:.0f} ms each; normal patterns take microseconds); write a simpler "
                     "pattern, e.g. '.*\\.(q_proj|v_proj)'.")
        raise PatternError(g.refused)
    return found is not None


def peft_pattern_matches(key: str, name: str, what: str) -> bool:
    """PEFT's rank_pattern / alpha_pattern rule, bounded: re.match(rf"(.*\\.)?({key})$", name)."""
    return regex_fullmatch(rf"(.*\.)?({key})$", name, what, whole=False)


class FrozenMap(Mapping):
    """A read-only mapping that, unlike MappingProxyType, pickles and deep-copies."""

    def __init__(self, items: Mapping | None = None) -> None:
        self._items = dict(items or {})

    def __getitem__(self, key: str) -> object:
        return self._items[key]

    def __iter__(self):  # noqa: ANN204
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self.items()) == dict(other.items())

    def __hash__(self) -> int:
        return hash(tuple(self._items.items()))

    def __repr__(self) -> str:
        return repr(self._items)

    def __reduce__(self) -> tuple:
        return (FrozenMap, (self._items,))


@dataclass(frozen=True)
class AdapterConfig:
    """Which modules of a model get an adapter, and which adapter.

    Target patterns (``targets``, ``magnitude_only``, ``modules_to_save``) are matched against the
    dotted module names of ``model.named_modules()``. Each item of a list is one of:

    * an exact name or a dotted suffix: ``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``;
    * a glob (has ``*``, ``?`` or ``[``): ``"layers.*.self_attn.q_proj"``, matched against the whole
      name or any dotted suffix of it;
    * a regular expression prefixed with ``re:``, matched against the whole name.

    ``targets`` may also be a single string: ``"all-linear"`` (every ``nn.Linear`` / transformers
    ``Conv1D`` except output and classification heads (``get_output_embeddings()``, modules named
    ``lm_head``, ``classifier`` or ``score``), ``modules_to_save`` and ``nn.MultiheadAttention``'s
    projections) or a regular expression matched against the whole name (PEFT's convention for a
    string ``target_modules``; an optional ``re:`` prefix is accepted).
    """

    method: str = "dora"
    """"lora" (W0 + sBA) or "dora" (m ⊙ (W0 + sBA) / ||W0 + sBA||_c, Liu et al. 2024, Eq. 5); "vera"
    (W0 + Λ_b B Λ_d A, Kopiczko et al. 2024) or "dvora" (m ⊙ (W0 + Λ_b B Λ_d A) / ||.||_c), with A, B random, frozen
    and shared by all modules (see vera.py; they use rank and the vera_* fields, no alpha / rslora / init)."""
    rank: int = 8
    """r, the inner dimension of A (r, in) and B (out, r)."""
    alpha: float = 16.0
    """The scale numerator: s = alpha / r (or alpha / sqrt(r) with use_rslora)."""
    targets: str | tuple[str, ...] = ALL_LINEAR
    """Modules that get A, B (and a magnitude for DoRA). See the class docstring for the syntax."""
    dropout: float = 0.0
    """Dropout probability on the adapter branch's input (PEFT's lora_dropout; see layers.py)."""
    use_rslora: bool = False
    """Rank-stabilised scaling s = alpha / sqrt(r) (Kalajdzievski 2023)."""
    init: str = "kaiming"
    """A's init: "kaiming" (Kaiming-uniform, a=sqrt(5), as nn.Linear) or "gaussian" (normal, std 1/r). B = 0."""
    norm_grad: str = "detach"
    """DoRA only. "detach": ||W0 + sBA||_c is a constant in backward (paper §4.3, less memory);
    "exact": gradients flow through the norm."""
    backend: str = "auto"
    """DoRA on nn.Linear only. "torch": the eager reference path; "fused": one custom autograd Function in
    torch ops; "triton": that Function with Triton kernels (CUDA); "auto": triton on CUDA, else fused, and the
    eager path wherever the fast paths cannot run (norm_grad="exact", dropout while training, autocast,
    other layer types). An explicit "fused" / "triton" that cannot run a module or a call raises."""
    magnitude_only: tuple[str, ...] = ()
    """Modules that train only a magnitude vector m (no A, B): W' = m ⊙ W0 / ||W0||_c (paper §5)."""
    bias: str = "none"
    """Which biases train: "none", "all" (every bias in the model) or "lora_only" (adapted modules').
    Biases are never rescaled by m / ||W'||_c."""
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    """Per-module rank overrides, PEFT's convention: key k matches name n if re.match(rf"(.*\\.)?({k})$", n);
    the first matching key wins."""
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    """Per-module alpha overrides, same matching as rank_pattern."""
    modules_to_save: tuple[str, ...] = ()
    """Modules trained in full (e.g. a classification head); unfrozen in place."""
    vera_seed: int = 0
    """VeRA / DVoRA: seed of the shared random A, B (PEFT's projection_prng_key); they are regenerated from it."""
    vera_d_initial: float = 0.1
    """VeRA / DVoRA: initial value of every entry of d (PEFT's d_initial); b starts at 0, so ΔW = 0 at init."""
    vera_save_projection: bool = False
    """VeRA / DVoRA: also write the shared A, B into saved files (PEFT's save_projection). Off, a file holds the
    seed and a SHA-256 of A, B, and loading regenerates them and checks the checksum."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {self.method!r}.")
        object.__setattr__(self, "rank", _check_rank(self.rank, "rank"))
        _check_alpha(self.alpha, "alpha")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be a probability in [0, 1), got {self.dropout!r}.")
        if not isinstance(self.use_rslora, bool):
            raise ConfigError(f"use_rslora must be True or False, got {self.use_rslora!r}.")
        for name, allowed in (("init", INITS), ("norm_grad", NORM_GRADS), ("bias", BIAS_MODES),
                              ("backend", BACKENDS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}.")
        targets = _check_patterns(self.targets, "targets", allow_str=True)
        if not targets:
            raise ConfigError("targets is empty: name at least one module, e.g. targets=['q_proj', 'v_proj'].")
        # Lists become tuples so that the frozen config stays immutable; the meaning is unchanged.
        object.__setattr__(self, "targets", targets)
        object.__setattr__(self, "magnitude_only",
                           _check_patterns(self.magnitude_only, "magnitude_only", allow_str=False))
        object.__setattr__(self, "modules_to_save",
                           _check_patterns(self.modules_to_save, "modules_to_save", allow_str=False))
        for name, check in (("rank_pattern", _check_rank), ("alpha_pattern", _check_alpha)):
            pattern = getattr(self, name)
            if not isinstance(pattern, Mapping):
                raise ConfigError(f"{name} must be a mapping from module-name pattern to value, got {pattern!r}.")
            for key in pattern:
                check_regex(rf"(.*\.)?({key})$", f"{name} key {key!r}")
            # A read-only copy: the caller's later edits don't leak in, and the config stays picklable.
            object.__setattr__(self, name, FrozenMap({k: check(v, f"{name}[{k!r}]") for k, v in pattern.items()}))
        _check_vera(self)

    def to_dict(self) -> dict[str, object]:
        """Plain JSON-able values (lists and dicts), e.g. for logging; AdapterConfig(**d) rebuilds it."""
        out: dict[str, object] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = dict(value) if isinstance(value, Mapping) else list(value) if isinstance(value, tuple) else value
        return out

    @property
    def scaling(self) -> float:
        """s for the default rank and alpha."""
        return lora_scaling(self.alpha, self.rank, self.use_rslora)

    def rank_alpha_for(self, module_name: str) -> tuple[int, float]:
        """(rank, alpha) for one module, after rank_pattern / alpha_pattern overrides."""
        return (_pattern_value(self.rank_pattern, module_name, self.rank, "rank_pattern"),
                float(_pattern_value(self.alpha_pattern, module_name, self.alpha, "alpha_pattern")))


def _check_vera(cfg: AdapterConfig) -> None:
    """The vera_* fields, and the options that VeRA / DVoRA cannot honour."""
    if isinstance(cfg.vera_seed, bool) or not isinstance(cfg.vera_seed, numbers.Integral) \
            or not 0 <= cfg.vera_seed < 2**64:
        raise ConfigError(f"vera_seed must be an integer in [0, 2**64), got {cfg.vera_seed!r}.")
    d = cfg.vera_d_initial
    if isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d) or d == 0:
        raise ConfigError(f"vera_d_initial must be a nonzero finite number, got {d!r}; PEFT's default is 0.1.")
    if not isinstance(cfg.vera_save_projection, bool):
        raise ConfigError(f"vera_save_projection must be True or False, got {cfg.vera_save_projection!r}.")
    if cfg.method not in ("vera", "dvora"):
        return
    why = {"rank_pattern": "every module slices its A, B from one shared pair of rank r, so VeRA has one rank",
           "alpha_pattern": "VeRA has no alpha (ΔW = Λ_b B Λ_d A)", "use_rslora": "VeRA has no alpha scaling",
           "magnitude_only": "magnitude-only modules are a DoRA option"}
    for name, reason in why.items():
        if getattr(cfg, name):
            raise ConfigError(f"{name} is not supported with method={cfg.method!r}: {reason}.")
    if cfg.backend in ("fused", "triton"):
        raise ConfigError(f"backend={cfg.backend!r}: method={cfg.method!r} runs on the eager path only; use 'auto'.")


def _pattern_value(pattern: Mapping[str, float], module_name: str, default: float, what: str) -> float:
    for key, value in pattern.items():
        if peft_pattern_matches(key, module_name, f"{what} key {key!r}"):
            return value
    return default
