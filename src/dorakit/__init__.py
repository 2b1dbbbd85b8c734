"""dorakit: exact, fast weight-decomposed low-rank adaptation (DoRA, Liu et al., ICML 2024) and its family.

    import dorakit as dk
    cfg = dk.AdapterConfig(method="dora", rank=16, alpha=32, targets=["q_proj", "v_proj"])
    report = dk.apply_adapters(model, cfg)
    print(dk.trainable_summary(model))
    dk.merge_adapters(model); dk.unmerge_adapters(model)
    plain = dk.merge_and_unload(model)

Importing ``dorakit`` itself is light: each public name below is imported from its submodule on first
use (PEP 562 ``__getattr__``), so the command line's ``--help`` never loads torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_SOURCES: dict[str, tuple[str, ...]] = {
    ".adapters": ("functional", "kernels"),
    ".adapters.config": ("AdapterConfig", "ConfigError"),
    ".adapters.inject": ("AdapterPlan", "InjectionReport", "TargetError", "WrappedModule", "adapter_config",
                         "adapter_layers", "adapters_disabled", "apply_adapters", "install_adapters",
                         "merge_adapters", "merge_and_unload", "plan_adapters", "remove_adapters",
                         "unmerge_adapters"),
    ".formats.dispatch": ("load_adapter", "save_adapter"),
    ".formats.multi_io": ("hot_swap_adapter",),
    ".adapters.multi": ("active_adapter", "adapter_routing", "add_adapter", "delete_adapter", "generate",
                        "list_adapters", "set_adapter"),
    ".adapters.slots": ("RoutingError",),
    ".adapters.weighted": ("add_weighted_adapter",),
    ".formats.io": ("AdapterFiles", "convert_bin_adapter", "peft_state_dict", "read_adapter"),
    ".adapters.layers": ("AdapterLayer", "AdapterStateError", "Conv1DAdapter", "ConvAdapter", "EmbeddingAdapter",
                         "LinearAdapter", "cached_norms"),
    ".adapters.params": ("adapter_parameters", "adapter_state_dict", "count_parameters", "trainable_parameters",
                         "trainable_summary"),
    ".formats.peft_format": ("AdapterFileError",),
    ".adapters.quant": ("Linear4bitAdapter", "Linear8bitAdapter", "quantize_linear", "quantize_model"),
    ".adapters.vera": ("VeraAdapter",),
    ".training.hf_trainer": ("AdapterTrainerMixin", "TrainerSetupError", "AdapterTrainer", "AdapterSFTTrainer"),
}
_SOURCE_OF = {name: module for module, names in _SOURCES.items() for name in names}

__all__ = [
    "AdapterConfig",
    "AdapterSFTTrainer",
    "AdapterTrainer",
    "AdapterTrainerMixin",
    "AdapterFileError",
    "AdapterFiles",
    "AdapterLayer",
    "AdapterPlan",
    "AdapterStateError",
    "RoutingError",
    "active_adapter",
    "adapter_routing",
    "add_adapter",
    "add_weighted_adapter",
    "delete_adapter",
    "generate",
    "hot_swap_adapter",
    "list_adapters",
    "set_adapter",
    "ConfigError",
    "Conv1DAdapter",
    "ConvAdapter",
    "EmbeddingAdapter",
    "InjectionReport",
    "Linear4bitAdapter",
    "Linear8bitAdapter",
    "LinearAdapter",
    "TargetError",
    "TrainerSetupError",
    "VeraAdapter",
    "WrappedModule",
    "adapter_config",
    "adapter_layers",
    "adapter_parameters",
    "adapter_state_dict",
    "adapters_disabled",
    "apply_adapters",
    "cached_norms",
    "convert_bin_adapter",
    "count_parameters",
    "functional",
    "install_adapters",
    "kernels",
    "load_adapter",
    "merge_adapters",
    "merge_and_unload",
    "peft_state_dict",
    "plan_adapters",
    "quantize_linear",
    "quantize_model",
    "read_adapter",
    "remove_adapters",
    "save_adapter",
    "trainable_parameters",
    "trainable_summary",
    "unmerge_adapters",
]


def __getattr__(name: str) -> object:
    """A public name, imported from its submodule on first use and then kept as a module attribute."""
    module = _SOURCE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    source = importlib.import_module(module, __name__)
    if not hasattr(source, name):  # a submodule (functional, kernels) is an attribute once imported
        importlib.import_module(f"{module}.{name}", __name__)
    value = getattr(source, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # type checkers and IDEs see the names eagerly
    from .adapters import functional, kernels
    from .adapters.config import AdapterConfig, ConfigError
    from .adapters.inject import (AdapterPlan, InjectionReport, TargetError, WrappedModule, adapter_config,
                                  adapter_layers, adapters_disabled, apply_adapters, install_adapters,
                                  merge_adapters, merge_and_unload, plan_adapters, remove_adapters,
                                  unmerge_adapters)
    from .adapters.layers import (AdapterLayer, AdapterStateError, Conv1DAdapter, ConvAdapter, EmbeddingAdapter,
                                  LinearAdapter, cached_norms)
    from .adapters.params import (adapter_parameters, adapter_state_dict, count_parameters, trainable_parameters,
                                  trainable_summary)
    from .adapters.quant import Linear4bitAdapter, Linear8bitAdapter, quantize_linear, quantize_model
    from .adapters.vera import VeraAdapter
    from .adapters.multi import (active_adapter, adapter_routing, add_adapter, delete_adapter, generate,
                                 list_adapters, set_adapter)
    from .adapters.slots import RoutingError
    from .adapters.weighted import add_weighted_adapter
    from .formats.dispatch import load_adapter, save_adapter
    from .formats.multi_io import hot_swap_adapter
    from .formats.io import AdapterFiles, convert_bin_adapter, peft_state_dict, read_adapter
    from .formats.peft_format import AdapterFileError
    from .training.hf_trainer import AdapterSFTTrainer, AdapterTrainer, AdapterTrainerMixin, TrainerSetupError
