"""A seeded, time-bounded property-based fuzzer over the adapter reader (issue 17).

Random mutations of a valid saved adapter (its adapter_config.json fields, its safetensors header and
bytes, dorakit's metadata entries): dk.load_adapter either loads or raises dk.AdapterFileError, never
another exception, never hangs, and leaves the model unchanged on error. derandomize=True makes every
run draw the same examples; max_examples keeps it to ~10 s per method on a 2-core CPU.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

import dorakit as dk

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
FIELDS = ["r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_dora", "bias", "peft_type",
          "modules_to_save", "lora_dropout", "use_rslora", "init_lora_weights", "projection_prng_key",
          "save_projection", "d_initial", "vera_dropout", "vera_A_shape", "vera_B_shape", "projection_sha256",
          "dorakit_format"]
META = ["dorakit_peft_fields", "dorakit_variants", "dorakit_config", "dorakit_projections", "format"]
PATTERNS = ["(.*.*)*X", r"(.*?){20}X", "[", ".*", "projX_a", "blockX\\.projX_b", "(?:x{65535}){65535}", ""]
JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
                    | st.sampled_from(PATTERNS) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(PATTERNS), inner,
                                                                                 max_size=3), max_leaves=8)


def _model() -> nn.Module:
    torch.manual_seed(0)
    inner = nn.Sequential(OrderedDict(projX_a=nn.Linear(6, 5), act=nn.Tanh(), projX_b=nn.Linear(5, 4)))
    return nn.Sequential(OrderedDict(blockX=inner, head=nn.Linear(4, 3)))


def _saved(root: Path, method: str) -> tuple[bytes, bytes]:
    model = _model()
    dk.apply_adapters(model, dk.AdapterConfig(method=method, rank=2, targets=["projX_a", "projX_b"], bias="all",
                                              **({"vera_save_projection": True} if method == "vera" else {})))
    directory = dk.save_adapter(model, root / f"{method}-original")
    return (directory / CONFIG).read_bytes(), (directory / WEIGHTS).read_bytes()


def _split(weights: bytes) -> tuple[dict, bytes] | None:
    """(header, body), or None once an earlier mutation broke the header."""
    size = int.from_bytes(weights[:8], "little")
    try:
        header = json.loads(weights[8:8 + size])
    except ValueError:
        return None
    return (header, weights[8 + size:]) if isinstance(header, dict) and len(header) > 1 else None


def _parsed(config: bytes) -> dict | None:
    try:
        raw = json.loads(config)
    except ValueError:
        return None
    return raw if isinstance(raw, dict) else None


def _join(header: dict, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + body


@st.composite
def mutations(draw: st.DrawFn, config: bytes, weights: bytes) -> tuple[bytes, bytes]:
    """One to three mutations of (config, weights)."""
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["config field", "config bytes", "header entry", "metadata", "weight bytes",
                                     "truncate"]))
        if kind == "config field" and (raw := _parsed(config)) is not None:
            key = draw(st.sampled_from(FIELDS))
            if draw(st.booleans()):
                raw.pop(key, None)
            else:
                raw[key] = draw(JSON)
            config = json.dumps(raw).encode()
        elif kind == "config bytes" and config:
            at = draw(st.integers(0, len(config) - 1))
            config = config[:at] + draw(st.binary(min_size=1, max_size=4)) + config[at + 1:]
        elif kind in ("header entry", "metadata") and (split := _split(weights)) is not None:
            header, body = split
            header.setdefault("__metadata__", {})
            if kind == "metadata":
                header["__metadata__"][draw(st.sampled_from(META))] = draw(
                    st.sampled_from(["3", "[]", "{}", '"x"', "[" * 3000 + "]" * 3000, "{", '{"r": 99}'])
                    | JSON.map(json.dumps))
            else:
                key = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
                field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
                header[key][field] = draw(st.sampled_from(["F8_E4M3", "C64", "I32", "BOOL", "F64", "U64", "X"])
                                          if field == "dtype" else st.lists(st.integers(-1, 2**40), max_size=3))
            weights = _join(header, body)
        elif kind == "weight bytes" and weights:
            at = draw(st.integers(0, len(weights) - 1))
            weights = weights[:at] + draw(st.binary(min_size=1, max_size=8)) + weights[at + 1:]
        elif kind == "truncate":
            weights = weights[:draw(st.integers(0, len(weights)))]
    return config, weights


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _load_in_time(model: nn.Module, directory: Path, seconds: float = 20.0) -> BaseException | None:
    outcome: list[BaseException | None] = []

    def load() -> None:
        try:
            dk.load_adapter(model, directory)
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 - inspected below
            outcome.append(e)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"load_adapter did not return within {seconds} s"
    return outcome[0]


@pytest.mark.parametrize("method", ["dora", "vera"])
def test_mutated_adapters_load_or_raise_adapter_file_error(tmp_path: Path, method: str) -> None:
    config, weights = _saved(tmp_path, method)
    counter = iter(range(10**6))

    @settings(max_examples=500, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(mutations(config, weights))
    def check(files: tuple[bytes, bytes]) -> None:
        directory = tmp_path / f"case-{next(counter)}"
        directory.mkdir()
        (directory / CONFIG).write_bytes(files[0])
        (directory / WEIGHTS).write_bytes(files[1])
        model = _model()
        before = {n: type(m) for n, m in model.named_modules()}, _state(model)
        error = _load_in_time(model, directory)
        if error is None:
            return
        assert isinstance(error, dk.AdapterFileError), f"{type(error).__name__}: {error}"
        assert "\n" not in str(error)
        assert {n: type(m) for n, m in model.named_modules()} == before[0]
        after = _state(model)
        assert all(torch.equal(v, after[k]) for k, v in before[1].items())

    check()
