"""AdapterConfig: validation (ConfigError naming the field), immutability, per-module rank/alpha, scaling."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import pickle
import re

import numpy as np
import pytest
from torch import nn

import dorakit as dk
from dorakit.adapters.config import ConfigError


def test_defaults_are_valid_and_documented_values() -> None:
    cfg = dk.AdapterConfig()
    assert (cfg.method, cfg.rank, cfg.alpha, cfg.targets) == ("dora", 8, 16.0, "all-linear")
    assert (cfg.dropout, cfg.use_rslora, cfg.init, cfg.norm_grad, cfg.bias) == (
        0.0, False, "kaiming", "detach", "none")
    assert cfg.magnitude_only == () and cfg.modules_to_save == ()
    assert dict(cfg.rank_pattern) == {} and dict(cfg.alpha_pattern) == {}


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)
    assert dk.ConfigError is ConfigError


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"rank": 0}, "rank"),
    ({"rank": -4}, "rank"),
    ({"rank": True}, "rank"),
    ({"rank": 8.0}, "rank"),
    ({"rank": "8"}, "rank"),
    ({"alpha": 0}, "alpha"),
    ({"alpha": -1.0}, "alpha"),
    ({"alpha": math.inf}, "alpha"),
    ({"alpha": math.nan}, "alpha"),
    ({"alpha": True}, "alpha"),
    ({"alpha": "16"}, "alpha"),
    ({"method": "loha"}, "method"),
    ({"method": "DoRA"}, "method"),
    ({"dropout": -0.1}, "dropout"),
    ({"dropout": 1.0}, "dropout"),
    ({"dropout": math.nan}, "dropout"),
    ({"dropout": True}, "dropout"),
    ({"dropout": "0.1"}, "dropout"),
    ({"use_rslora": 1}, "use_rslora"),
    ({"init": "xavier"}, "init"),
    ({"init": "pissa"}, "init"),
    ({"norm_grad": "none"}, "norm_grad"),
    ({"bias": "some"}, "bias"),
    ({"bias": None}, "bias"),
    ({"targets": []}, "targets"),
    ({"targets": ()}, "targets"),
    ({"targets": ""}, "targets"),
    ({"targets": ["q_proj", ""]}, "targets"),
    ({"targets": ["q_proj", 3]}, "targets"),
    ({"targets": {"q_proj": 1}}, "targets"),
    ({"targets": "(q|v_proj"}, "targets"),              # a whole-string regex that does not compile
    ({"targets": ["q_proj", "re:[qv_proj"]}, "targets"),  # a "re:" item that does not compile
    ({"magnitude_only": "o_proj"}, "magnitude_only"),  # only `targets` may be a single string
    ({"magnitude_only": ["re:(o_proj"]}, "magnitude_only"),
    ({"modules_to_save": "classifier"}, "modules_to_save"),
    ({"modules_to_save": ["re:*head"]}, "modules_to_save"),
    ({"rank_pattern": {"q_proj": 0}}, "rank_pattern"),
    ({"rank_pattern": {"q_proj": 4.0}}, "rank_pattern"),
    ({"rank_pattern": {"q_proj": True}}, "rank_pattern"),
    ({"rank_pattern": {"(q_proj": 4}}, "rank_pattern"),     # key is not a valid regex
    ({"rank_pattern": [("q_proj", 4)]}, "rank_pattern"),
    ({"alpha_pattern": {"q_proj": 0.0}}, "alpha_pattern"),
    ({"alpha_pattern": {"q_proj": math.inf}}, "alpha_pattern"),
    ({"alpha_pattern": {"q_proj": math.nan}}, "alpha_pattern"),
    ({"alpha_pattern": {"[v_proj": 8}}, "alpha_pattern"),
])
def test_invalid_field_raises_config_error_naming_it(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(field)):
        dk.AdapterConfig(**kwargs)


def test_rank_pattern_error_names_the_offending_key() -> None:
    with pytest.raises(ConfigError, match=r"rank_pattern\['v_proj'\]"):
        dk.AdapterConfig(rank_pattern={"q_proj": 4, "v_proj": -2})


@pytest.mark.parametrize("kwargs", [
    {"rank": 1, "alpha": 1e-3},
    {"alpha": 7},                        # an int alpha is fine
    {"dropout": 0.0}, {"dropout": 0.999},
    {"method": "lora", "init": "gaussian", "norm_grad": "exact", "bias": "lora_only", "use_rslora": True},
    {"targets": r"model\.layers\.\d+\.self_attn\.(q|v)_proj"},
    {"targets": ["q_proj", "layers.*.mlp.up_proj", "re:.*\\.v_proj"]},
    {"rank_pattern": {r"layers\.0\..*": 4}, "alpha_pattern": {"q_proj": 2.5}},
])
def test_valid_configs_construct(kwargs: dict[str, object]) -> None:
    cfg = dk.AdapterConfig(**kwargs)
    for key, value in kwargs.items():
        if isinstance(value, dict):
            assert dict(getattr(cfg, key)) == value
        elif key == "targets" and isinstance(value, list):
            assert cfg.targets == tuple(value)
        else:
            assert getattr(cfg, key) == value


def test_lists_become_tuples_and_equal_configs_compare_equal() -> None:
    cfg = dk.AdapterConfig(targets=["q_proj", "v_proj"], magnitude_only=["o_proj"],
                           modules_to_save=["lm_head"])
    assert cfg.targets == ("q_proj", "v_proj") and type(cfg.targets) is tuple
    assert cfg.magnitude_only == ("o_proj",) and type(cfg.magnitude_only) is tuple
    assert cfg.modules_to_save == ("lm_head",) and type(cfg.modules_to_save) is tuple
    assert cfg == dk.AdapterConfig(targets=("q_proj", "v_proj"), magnitude_only=("o_proj",),
                                   modules_to_save=("lm_head",))


def test_config_is_frozen() -> None:
    cfg = dk.AdapterConfig(targets=["q_proj"], rank_pattern={"q_proj": 4})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.rank = 16  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.targets = ("v_proj",)  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.rank_pattern["v_proj"] = 2  # type: ignore[index]
    assert cfg.rank == 8 and cfg.targets == ("q_proj",) and dict(cfg.rank_pattern) == {"q_proj": 4}


def test_config_does_not_alias_the_callers_mappings() -> None:
    ranks = {"q_proj": 4}
    cfg = dk.AdapterConfig(rank_pattern=ranks)
    ranks["q_proj"] = 2
    ranks["v_proj"] = 1
    assert dict(cfg.rank_pattern) == {"q_proj": 4}


@pytest.mark.parametrize(("alpha", "rank", "rslora", "expected"), [
    (16, 8, False, 2.0),
    (16, 8, True, 16 / math.sqrt(8)),
    (8, 16, False, 0.5),
    (8, 16, True, 2.0),
    (1, 1, True, 1.0),
])
def test_scaling(alpha: float, rank: int, rslora: bool, expected: float) -> None:
    cfg = dk.AdapterConfig(rank=rank, alpha=alpha, use_rslora=rslora)
    assert cfg.scaling == pytest.approx(expected, rel=1e-12)


NAMES = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.v_proj",
    "model.layers.1.self_attn.q_proj",
    "model.layers.1.mlp.down_proj",
    "q_proj",
    "lm_head",
]


def _peft_rank_alpha(pattern: dict[str, float], name: str, default: float) -> float:
    """PEFT's semantics, written out: key k matches n iff re.match(rf"(.*\\.)?({k})$", n); first key wins."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


@pytest.mark.parametrize("rank_pattern", [
    {"q_proj": 4},
    {"layers.0.self_attn.q_proj": 2},
    {r"model\.layers\.1\..*": 3, "q_proj": 5},   # first matching key wins
    {"q_proj": 5, r"model\.layers\.1\..*": 3},
    {"proj": 7},                                  # a key must match whole dotted components: no match
    {"_proj": 7},
    {"self_attn": 7},                             # a parent's name does not match its children
    {r".*_proj": 6},
    {"q_proj|v_proj": 2},
    {"layers.0": 7},
])
def test_rank_alpha_for_follows_peft_pattern_semantics(rank_pattern: dict[str, int]) -> None:
    alpha_pattern = {key: float(10 * value) for key, value in reversed(rank_pattern.items())}
    cfg = dk.AdapterConfig(rank=8, alpha=16, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    for name in NAMES:
        rank, alpha = cfg.rank_alpha_for(name)
        assert rank == _peft_rank_alpha(rank_pattern, name, 8), name
        assert alpha == _peft_rank_alpha(alpha_pattern, name, 16.0), name
        assert type(rank) is int and type(alpha) is float


def test_rank_alpha_for_examples() -> None:
    cfg = dk.AdapterConfig(rank=8, alpha=16, rank_pattern={"layers.1.self_attn.q_proj": 2, "q_proj": 4},
                           alpha_pattern={"v_proj": 3})
    assert cfg.rank_alpha_for("model.layers.0.self_attn.q_proj") == (4, 16.0)
    assert cfg.rank_alpha_for("model.layers.1.self_attn.q_proj") == (2, 16.0)
    assert cfg.rank_alpha_for("model.layers.1.self_attn.v_proj") == (8, 3.0)
    # "q_proj" is not a dotted suffix of "xq_proj".
    assert cfg.rank_alpha_for("model.layers.1.self_attn.xq_proj") == (8, 16.0)
    assert cfg.rank_alpha_for("lm_head") == (8, 16.0)


def test_rank_alpha_for_agrees_with_peft_get_pattern_key() -> None:
    from peft.utils.other import get_pattern_key

    rank_pattern = {r"layers\.1\..*": 3, "q_proj": 5, "down_proj": 2, "layers.0.self_attn.v_proj": 7}
    cfg = dk.AdapterConfig(rank=8, rank_pattern=rank_pattern)
    for name in NAMES:
        key = get_pattern_key(list(rank_pattern), name)
        assert cfg.rank_alpha_for(name)[0] == rank_pattern.get(key, 8), name


# ---- regressions from the independent review ------------------------------------------------

def test_config_pickles_copies_and_serialises() -> None:
    cfg = dk.AdapterConfig(rank=np.int64(4), targets=["q_proj"], rank_pattern={"v_proj": 2}, alpha_pattern={"k": 3})
    assert type(cfg.rank) is int and cfg.rank == 4
    assert pickle.loads(pickle.dumps(cfg)) == cfg and copy.deepcopy(cfg) == cfg
    assert dict(dataclasses.asdict(cfg)["rank_pattern"]) == {"v_proj": 2}
    assert dk.AdapterConfig(**json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(TypeError):
        cfg.rank_pattern["q_proj"] = 1  # type: ignore[index]


def test_target_syntax_errors_point_at_the_fix() -> None:
    with pytest.raises(dk.ConfigError, match="targets='all-linear'"):
        dk.AdapterConfig(targets=["all-linear"])
    model = nn.Sequential(nn.Linear(4, 4))
    assert dk.apply_adapters(model, dk.AdapterConfig(rank=2, targets="re:0")).names == ["0"]
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 4)))
    # One string is a whole-name regex: "0" names the inner Sequential, "proj"-like suffixes name nothing.
    with pytest.raises(dk.TargetError, match=r"targets=\['1'\]"):
        dk.apply_adapters(nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))),
                          dk.AdapterConfig(rank=2, targets="1"))
