"""dorakit: exact, fast weight-decomposed low-rank adaptation (DoRA, Liu et al., ICML 2024) and its family.

    import dorakit as dk
    cfg = dk.AdapterConfig(method="dora", rank=16, alpha=32, targets=["q_proj", "v_proj"])
    report = dk.apply_adapters(model, cfg)
    print(dk.trainable_summary(model))
    dk.merge_adapters(model); dk.unmerge_adapters(model)
    plain = dk.merge_and_unload(model)
"""

from .adapters import functional, kernels
from .adapters.config import AdapterConfig, ConfigError
from .adapters.inject import (
    AdapterPlan,
    InjectionReport,
    TargetError,
    WrappedModule,
    adapter_config,
    adapter_layers,
    adapters_disabled,
    apply_adapters,
    install_adapters,
    merge_adapters,
    merge_and_unload,
    plan_adapters,
    remove_adapters,
    unmerge_adapters,
)
from .formats.dispatch import load_adapter, save_adapter
from .formats.io import AdapterFiles, convert_bin_adapter, peft_state_dict, read_adapter
from .adapters.layers import (
    AdapterLayer,
    AdapterStateError,
    Conv1DAdapter,
    ConvAdapter,
    EmbeddingAdapter,
    LinearAdapter,
    cached_norms,
)
from .adapters.params import (
    adapter_parameters,
    adapter_state_dict,
    count_parameters,
    trainable_parameters,
    trainable_summary,
)
from .formats.peft_format import AdapterFileError
from .adapters.quant import Linear4bitAdapter, quantize_linear, quantize_model
from .adapters.vera import VeraAdapter
from .training.hf_trainer import AdapterTrainerMixin, TrainerSetupError

__version__ = "0.1.0"

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
    "ConfigError",
    "Conv1DAdapter",
    "ConvAdapter",
    "EmbeddingAdapter",
    "InjectionReport",
    "Linear4bitAdapter",
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
    """``AdapterTrainer`` / ``AdapterSFTTrainer`` import transformers / trl, so they are built on first use."""
    if name in ("AdapterTrainer", "AdapterSFTTrainer"):
        from .training import hf_trainer

        return getattr(hf_trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
