"""Hostile adapter files and patterns (issue 17, classes 1-5): every one fails with dk.AdapterFileError
(or ConfigError / TargetError for a flag) naming the file and field, in bounded time, before anything
is allocated, leaving the model exactly as it was. The property-based fuzzer over the reader is in
tests/test_fuzz_adapter.py.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import dorakit as dk
from dorakit.adapters import config as dk_config
from dorakit.adapters.config import ConfigError, PatternError, peft_pattern_matches, regex_fullmatch
from dorakit.formats.io import FileReadError, read_regular_file

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
SLOW = r"(.*?){20}X"
"""Backtracks for > 60 s under re (and regex) on a name holding an X that the pattern cannot end on."""


def _model() -> nn.Module:
    torch.manual_seed(0)
    inner = nn.Sequential(OrderedDict(projX_a=nn.Linear(6, 5), act=nn.Tanh(), projX_b=nn.Linear(5, 4)))
    return nn.Sequential(OrderedDict(blockX=inner, head=nn.Linear(4, 3)))


def _snapshot(model: nn.Module) -> tuple:
    return ({n: type(m) for n, m in model.named_modules()},
            {k: v.detach().clone() for k, v in model.state_dict().items()})


def _unchanged(before: tuple, model: nn.Module) -> None:
    after = _snapshot(model)
    assert before[0] == after[0], "module types changed"
    assert before[1].keys() == after[1].keys()
    for key, value in before[1].items():
        assert torch.equal(value, after[1][key]), f"{key} changed"


def _saved(tmp_path: Path, method: str = "dora", **kw: object) -> Path:
    model = _model()
    dk.apply_adapters(model, dk.AdapterConfig(method=method, rank=2, targets=["projX_a", "projX_b"], **kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.1)
    return dk.save_adapter(model, tmp_path / "adapter")


def _refused(directory: Path, *fragments: str, seconds: float = 20.0) -> str:
    """load_adapter onto a fresh model raises AdapterFileError naming every fragment, within ``seconds``
    (run in a thread, so a hang fails the test instead of hanging it), and the model is unchanged."""
    model = _model()
    before = _snapshot(model)
    outcome: list[BaseException | None] = []

    def load() -> None:
        try:
            dk.load_adapter(model, directory)
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            outcome.append(e)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"load_adapter({directory}) did not return within {seconds} s"
    error = outcome[0]
    assert isinstance(error, dk.AdapterFileError), f"expected AdapterFileError, got {error!r}"
    message = str(error)
    assert "\n" not in message, "the CLI prints the message as one line"
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"
    _unchanged(before, model)
    return message


def _edit_config(directory: Path, **changes: object) -> None:
    path = directory / CONFIG
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _rewrite(directory: Path, edit: Callable[[dict[str, torch.Tensor]], None] | None = None,
             metadata: dict[str, str] | None = None) -> None:
    """Re-save the weights after ``edit``, with ``metadata`` (None: a PEFT-like file, no dorakit entries)."""
    tensors = load_file(directory / WEIGHTS)
    if edit is not None:
        edit(tensors)
    save_file(tensors, directory / WEIGHTS, {"format": "pt", **(metadata or {})})


B_KEY = "base_model.model.blockX.projX_a.lora_B.weight"


# ---- 1. values that slip past the checks --------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.complex64, torch.int32, torch.bool, torch.float8_e4m3fn,
                                   torch.float8_e5m2, torch.int64, torch.uint8])
def test_non_floating_adapter_tensor_is_named_with_its_dtype(tmp_path: Path, dtype: torch.dtype) -> None:
    directory = _saved(tmp_path)
    _rewrite(directory, lambda t: t.update({B_KEY: t[B_KEY].to(dtype)}),
             metadata=dict(load_file_metadata(directory)))
    message = _refused(directory, WEIGHTS, "blockX.projX_a")
    assert "dtype" in message


def load_file_metadata(directory: Path) -> dict[str, str]:
    from safetensors import safe_open
    with safe_open(str(directory / WEIGHTS), "pt") as f:
        return dict(f.metadata())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_every_floating_dtype_loads(tmp_path: Path, dtype: torch.dtype) -> None:
    directory = _saved(tmp_path)
    meta = load_file_metadata(directory)
    _rewrite(directory, lambda t: t.update({k: v.to(dtype) for k, v in t.items()}), metadata=meta)
    model = _model()
    dk.load_adapter(model, directory)
    got = dict(dk.adapter_layers(model))["blockX.projX_a"].lora_B
    assert torch.equal(got, load_file(directory / WEIGHTS)[B_KEY].to(got.dtype))


def test_integer_bias_onto_a_float_bias_is_refused(tmp_path: Path) -> None:
    directory = _saved(tmp_path, bias="all")
    key = "base_model.model.head.bias"
    _rewrite(directory, lambda t: t.update({key: t[key].to(torch.int32)}), metadata=load_file_metadata(directory))
    _refused(directory, "'head.bias'", "torch.int32", "torch.float32")


# ---- 2. reads that never end -------------------------------------------------------------------------

def _fifo(path: Path) -> None:
    path.unlink(missing_ok=True)
    os.mkfifo(path)


def _symlink(target: str) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        path.unlink()
        path.symlink_to(target)
    return make


def _directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
@pytest.mark.parametrize("name", [CONFIG, WEIGHTS])
@pytest.mark.parametrize("make,kind", [(_fifo, "FIFO"), (_symlink("/dev/zero"), "character device"),
                                       (_directory, "directory")], ids=["fifo", "dev-zero", "directory"])
def test_non_regular_adapter_files_are_refused_without_reading(tmp_path: Path, name: str, make: Callable,
                                                                 kind: str) -> None:
    directory = _saved(tmp_path)
    make(directory / name)
    _refused(directory, name, kind, "not a regular file", seconds=10)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_convert_bin_adapter_refuses_a_fifo(tmp_path: Path) -> None:
    _fifo(tmp_path / "adapter_model.bin")
    with pytest.raises(dk.AdapterFileError, match="FIFO"):
        dk.convert_bin_adapter(tmp_path)


def test_oversized_config_is_refused_before_reading(tmp_path: Path) -> None:
    directory = _saved(tmp_path)
    with open(directory / CONFIG, "r+b") as f:
        f.truncate(17 * 2**20)  # sparse: nothing is written, the size alone is over the limit
    _refused(directory, CONFIG, "limit")


def test_read_regular_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"abc")
    (tmp_path / "link").symlink_to(tmp_path / "f")
    assert read_regular_file(tmp_path / "link", 3, "test file") == b"abc"  # a symlink to a regular file is fine
    with pytest.raises(FileReadError, match="over its 2-byte limit"):
        read_regular_file(tmp_path / "f", 2, "test file")
    with pytest.raises(FileReadError, match="missing"):
        read_regular_file(tmp_path / "nope", None, "test file")
    with pytest.raises(FileReadError, match="a directory"):
        read_regular_file(tmp_path, None, "test file")
    with pytest.raises(KeyError, match="character device"):  # the caller's error type
        read_regular_file("/dev/zero", None, "test file", error=KeyError)


def test_safetensors_header_larger_than_the_file(tmp_path: Path) -> None:
    directory = _saved(tmp_path)
    data = bytearray((directory / WEIGHTS).read_bytes())
    data[:8] = (2**40).to_bytes(8, "little")
    (directory / WEIGHTS).write_bytes(bytes(data))
    _refused(directory, WEIGHTS, "truncated or corrupt")


# ---- 3. wrong exception types ------------------------------------------------------------------------

def _peft_like(directory: Path) -> None:
    """Drop dorakit's metadata: a PEFT-written file, whose config fields are then not bound to the weights."""
    _rewrite(directory)


CONFIG_EDITS: dict[str, tuple[dict[str, object], tuple[str, ...]]] = {
    "target_modules not a regex": ({"target_modules": "(unclosed"}, ("target_modules", "(unclosed", "regular")),
    "rank_pattern key not a regex": ({"rank_pattern": {"[x": 2}}, ("rank_pattern key '[x'", "regular")),
    "alpha_pattern key not a regex": ({"alpha_pattern": {"a)": 2}}, ("alpha_pattern key 'a)'", "regular")),
    "rank_pattern a list": ({"rank_pattern": [1, 2]}, ("rank_pattern",)),
    "rank_pattern value a string": ({"rank_pattern": {"projX_a": "2"}}, ("rank_pattern['projX_a']",)),
    "alpha_pattern value a list": ({"alpha_pattern": {"projX_a": [1]}}, ("alpha_pattern['projX_a']",)),
    "huge lora_alpha": ({"lora_alpha": 10**400}, ("lora_alpha",)),
    "modules_to_save a dict": ({"modules_to_save": {"a": 1}}, ("modules_to_save",)),
}


@pytest.mark.parametrize("edit", list(CONFIG_EDITS))
def test_bad_config_field_names_file_and_field(tmp_path: Path, edit: str) -> None:
    directory = _saved(tmp_path)
    _peft_like(directory)
    changes, fragments = CONFIG_EDITS[edit]
    _edit_config(directory, **changes)
    _refused(directory, CONFIG, *fragments)


@pytest.mark.parametrize("text,fragment", [("[" * 100_000 + "]" * 100_000, "nested too deeply"),
                                           ('{"peft_type": "LORA", "r": NaN}', "NaN"),
                                           ('{"r": 1' + "0" * 5000 + "}", "not valid JSON"),
                                           (b"\xff\xfe{}", "not valid JSON")])
def test_hostile_json_config(tmp_path: Path, text: str | bytes, fragment: str) -> None:
    directory = _saved(tmp_path)
    (directory / CONFIG).write_bytes(text.encode() if isinstance(text, str) else text)
    _refused(directory, CONFIG, fragment)


@pytest.mark.parametrize("key,value", [("dorakit_peft_fields", "3"), ("dorakit_peft_fields", "[1]"),
                                       ("dorakit_variants", '["a"]'), ("dorakit_variants", '{"blockX.projX_a": [1]}'),
                                       ("dorakit_config", '"x"'), ("dorakit_config", "[" * 50_000 + "]" * 50_000),
                                       ("dorakit_variants", "{not json")])
def test_malformed_metadata_names_file_and_entry(tmp_path: Path, key: str, value: str) -> None:
    directory = _saved(tmp_path)
    _rewrite(directory, metadata={**load_file_metadata(directory), key: value})
    _refused(directory, WEIGHTS, key)


@pytest.mark.parametrize("value", ['{"vera_A_shape": 3}', '{"vera_A_shape": [2, 6], "vera_B_shape": [5, "2"]}',
                                   "[]", '{"vera_A_shape": [2, 6], "vera_B_shape": [5, 2], "sha256": 7}'])
def test_malformed_vera_projection_metadata(tmp_path: Path, value: str) -> None:
    directory = _saved(tmp_path, method="vera")
    _rewrite(directory, metadata={**load_file_metadata(directory), "dorakit_projections": value})
    _refused(directory, str(directory))


# ---- 4. catastrophic regex ---------------------------------------------------------------------------

@pytest.mark.parametrize("field", ["target_modules", "rank_pattern"])
@pytest.mark.parametrize("pattern", [SLOW, "(.*.*)*X"])
def test_catastrophic_pattern_in_a_file_is_bounded(tmp_path: Path, field: str, pattern: str) -> None:
    """The issue's example "(.*.*)*X" hangs re for > 60 s; the bounded matcher answers it at once (PEFT's
    answer: no match, so the file's tensors are not selected) or, for SLOW, refuses it naming the pattern."""
    directory = _saved(tmp_path)
    _peft_like(directory)
    _edit_config(directory, **({"target_modules": pattern} if field == "target_modules"
                               else {"rank_pattern": {pattern: 2}}))
    start = time.perf_counter()
    model = _model()
    before = _snapshot(model)
    try:
        dk.load_adapter(model, directory)
    except dk.AdapterFileError as e:
        if pattern == SLOW:
            assert repr(pattern) in str(e) and "refused" in str(e) and field in str(e)
        _unchanged(before, model)
    else:
        assert field == "rank_pattern" and pattern != SLOW  # no module matches it: the default r applies
    assert time.perf_counter() - start < 15


def test_catastrophic_pattern_in_a_config_is_refused() -> None:
    model = _model()
    before = _snapshot(model)
    start = time.perf_counter()
    for cfg in (dk.AdapterConfig(targets="re:" + SLOW), dk.AdapterConfig(targets=["re:" + SLOW]),
                dk.AdapterConfig(targets=["projX_a"], rank_pattern={SLOW: 4})):
        with pytest.raises(ConfigError, match=re.escape(repr(SLOW))):
            dk.apply_adapters(model, cfg)
        _unchanged(before, model)
    assert time.perf_counter() - start < 20


def test_counted_repeats_that_unroll_huge_are_refused_at_once() -> None:
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="unroll"):
        dk.AdapterConfig(targets="re:(?:x{65535}){65535}")
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        dk.AdapterConfig(targets="re:(")
    assert time.perf_counter() - start < 1


def test_slow_on_average_patterns_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The second bound: a pattern under the per-name timeout but slow over many names."""
    monkeypatch.setattr(dk_config, "MATCH_BUDGET_S", 0.0)
    monkeypatch.setattr(dk_config, "SLOW_MATCH_S", 0.0)
    monkeypatch.setattr(dk_config, "_GUARDED", {})
    with pytest.raises(PatternError, match=re.escape("'ab+' is refused: it took")):
        regex_fullmatch("ab+", "abb", "targets")


NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.11.mlp.down_proj", "lm_head", "encoder.layer.3.attention.self.query",
         "q_proj", "transformer.h.0.attn.c_attn", "a\nb", "", "blockX.projX_a"]
PATTERNS = [r".*\.(q_proj|v_proj)", r"model\.layers\.\d+\.self_attn\.(q|k|v)_proj", "q_proj", r".*layers\.(0|1)\..*",
            r"^(?!.*lm_head).*", r"(?:.*\.)?(query|value)", r".*(\d)\.\w+\.\1.*", r"(?i)LM_HEAD", r"a$", r"[^.]+",
            r".*\b(attn|attention)\b.*", r".*_proj\Z", "", r"(?s).*"]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_bounded_matching_keeps_peft_semantics(pattern: str) -> None:
    """PEFT's rules are re.fullmatch (target_modules) and re.match(rf"(.*\\.)?({key})$") (rank/alpha
    patterns); the bounded matcher gives the same answer on every name."""
    def answer(match: Callable[[], object]) -> object:
        try:
            return bool(match())
        except (re.error, PatternError):  # a pattern PEFT's re refuses is refused here too
            return "invalid"

    for name in NAMES:
        assert answer(lambda: regex_fullmatch(pattern, name, "t")) == answer(lambda: re.fullmatch(pattern, name)), name
        assert answer(lambda: peft_pattern_matches(pattern, name, "k")) == \
            answer(lambda: re.match(rf"(.*\.)?({pattern})$", name)), name


# ---- 5. memory amplification -------------------------------------------------------------------------

def _no_building(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("adapters were built before the file's sizes were checked")
    monkeypatch.setattr("dorakit.formats.loading.plan_adapters", fail)
    monkeypatch.setattr("dorakit.formats.vera_io.plan_adapters", fail)


@pytest.mark.parametrize("method", ["vera", "dvora"])
def test_vera_with_a_huge_declared_rank_is_refused_before_allocating(tmp_path: Path, method: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    directory = _saved(tmp_path, method=method)
    _edit_config(directory, r=2**22)
    meta = load_file_metadata(directory)
    meta["dorakit_peft_fields"] = json.dumps({**json.loads(meta["dorakit_peft_fields"]), "r": 2**22})
    _rewrite(directory, metadata=meta)
    _no_building(monkeypatch)
    _refused(directory, "r=4194304", "blockX.projX_a")


def test_vera_stored_matrices_of_the_wrong_size_are_refused_before_allocating(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = _saved(tmp_path, method="vera", vera_save_projection=True)
    _rewrite(directory, lambda t: t.update({"base_model.vera_A": torch.zeros(2, 1)}),
             metadata=load_file_metadata(directory))
    _no_building(monkeypatch)
    _refused(directory, "(2, 1)", "(2, 6)")


@pytest.mark.parametrize("shape", [(2**20, 0), (2**16, 1)])
def test_lora_with_a_huge_rank_is_refused_before_allocating(tmp_path: Path, shape: tuple[int, int],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiny lora_A of 2**20 rows and a matching r: building it would allocate rank x (in + out)."""
    directory = _saved(tmp_path)
    _peft_like(directory)
    key = "base_model.model.blockX.projX_a"
    _rewrite(directory, lambda t: t.update({f"{key}.lora_A.weight": torch.zeros(shape),
                                            f"{key}.lora_B.weight": torch.zeros(5, 0)}))
    _edit_config(directory, rank_pattern={"blockX.projX_a": shape[0]})
    _no_building(monkeypatch)
    _refused(directory, "blockX.projX_a", f"lora_A is {shape}", f"needs ({shape[0]}, 6)")


# ---- the CLI: one line, exit 2 -------------------------------------------------------------------------

@pytest.mark.parametrize("break_it", ["float8", "bad regex", "fifo"])
def test_merge_of_a_hostile_adapter_prints_one_line_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                break_it: str) -> None:
    transformers = pytest.importorskip("transformers")
    from fixtures_text import word_tokenizer

    from dorakit.commands.cli import main
    tok = word_tokenizer(tmp_path / "model", ["yes", "no"])
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                                   bos_token_id=0, eos_token_id=1, pad_token_id=None)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(tmp_path / "model")
    dk.apply_adapters(model, dk.AdapterConfig(method="dora", rank=2, targets=["q_proj"]))
    directory = dk.save_adapter(model, tmp_path / "adapter")
    if break_it == "float8":
        _rewrite(directory, lambda t: t.update({k: v.to(torch.float8_e4m3fn) for k, v in t.items()}),
                 metadata=load_file_metadata(directory))
    elif break_it == "bad regex":
        _peft_like(directory)
        _edit_config(directory, target_modules="(")
    else:
        _fifo(directory / CONFIG)
    code = main(["merge", "--model", str(tmp_path / "model"), "--adapter", str(directory),
                 "--output", str(tmp_path / "merged")])
    full = capsys.readouterr().err
    err = full.splitlines()[-1]  # after transformers' progress bars
    assert code == 2 and "Traceback" not in full
    assert err.startswith("dorakit: error: ") and str(directory) in err, err
    assert not (tmp_path / "merged").exists()
