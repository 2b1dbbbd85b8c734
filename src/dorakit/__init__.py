"""dorakit: exact, fast weight-decomposed low-rank adaptation (DoRA, Liu et al., ICML 2024) and its family.

    import dorakit as dk
    cfg = dk.AdapterConfig(method="dora", rank=16, alpha=32, targets=["q_proj", "v_proj"])
    report = dk.apply_adapters(model, cfg)
    print(dk.trainable_summary(model))
    dk.merge_adapters(model); dk.unmerge_adapters(model)
    plain = dk.merge_and_unload(model)
"""

from . import functional
from .config import AdapterConfig, ConfigError
from .inject import (
    InjectionReport,
    TargetError,
    WrappedModule,
    adapter_layers,
    adapters_disabled,
    apply_adapters,
    merge_adapters,
    merge_and_unload,
    remove_adapters,
    unmerge_adapters,
)
from .layers import (
    AdapterLayer,
    AdapterStateError,
    Conv1DAdapter,
    ConvAdapter,
    EmbeddingAdapter,
    LinearAdapter,
)
from .params import (
    adapter_parameters,
    adapter_state_dict,
    count_parameters,
    trainable_parameters,
    trainable_summary,
)

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig", "AdapterLayer", "AdapterStateError", "ConfigError", "Conv1DAdapter", "ConvAdapter",
    "EmbeddingAdapter", "InjectionReport", "LinearAdapter", "TargetError", "WrappedModule", "adapter_layers",
    "adapter_parameters", "adapter_state_dict", "adapters_disabled", "apply_adapters", "count_parameters",
    "functional", "merge_adapters", "merge_and_unload", "remove_adapters", "trainable_parameters", "trainable_summary", "unmerge_adapters",
]
