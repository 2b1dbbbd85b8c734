"""``import dorakit`` is light (PEP 562): every public name resolves on first use to its submodule's object."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import dorakit as dk


def test_every_public_name_resolves_to_its_submodule_object() -> None:
    assert len(dk.__all__) == len(set(dk.__all__)) > 40
    assert set(dk.__all__) == set(dk._SOURCE_OF)
    for name in dk.__all__:
        source = importlib.import_module(dk._SOURCE_OF[name], "dorakit")
        assert getattr(dk, name) is getattr(source, name), name
    assert set(dk.__all__) <= set(dir(dk))


def test_star_import_and_unknown_names() -> None:
    namespace: dict[str, object] = {}
    exec("from dorakit import *", namespace)  # noqa: S102
    assert namespace["apply_adapters"] is dk.apply_adapters and namespace["functional"] is dk.functional
    with pytest.raises(AttributeError, match="no attribute 'apply_adapter'"):
        dk.apply_adapter  # noqa: B018
    assert dk.__version__


def test_import_dorakit_loads_no_torch_until_a_name_is_used() -> None:
    probe = "import sys, dorakit as dk\nprint('torch' in sys.modules)\ndk.apply_adapters\nprint('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "True"]
