"""The DoRA paper's magnitude / direction diagnostic (Liu et al. 2024, §2.2, Eq. 3-4, Fig. 2).

Per output row n (the paper's column) of a weight, between W0 and a tuned Wt:

    ΔM = mean_n | ||W_t,n|| − ||W_0,n|| |,    ΔD = mean_n (1 − cos(W_t,n, W_0,n)).

    from dorakit import analysis
    records = analysis.model_deltas(model)                        # live adapters, factored
    records = analysis.compare_state_dicts(base_sd, tuned_sd,     # merged or fully fine-tuned
                                           transposed=analysis.transposed_keys(model))
    recorder = analysis.DeltaRecorder(every=50)                    # callback(step, model) in training
    analysis.plot_deltas(recorder.records, "fig2.png")             # needs the [plot] extra

A leaf of the package: it imports ``dorakit.adapters.layers`` and nothing in dorakit imports it (but the CLI).
The plotting module imports matplotlib only when ``plot_deltas`` is called.
"""

from __future__ import annotations

from .metrics import (
    LineFit,
    RowStats,
    adapter_magnitude_direction,
    adapter_tensor_stats,
    fit_line,
    magnitude_direction,
    module_weight_2d,
)
from .plot import plot_deltas
from .recorder import DeltaRecorder
from .records import (
    DeltaRecord,
    adapter_checkpoint_series,
    checkpoint_series,
    compare_state_dicts,
    layer_index,
    model_deltas,
    read_json,
    records_json,
    summarize,
    to_rows,
    transposed_keys,
    write_csv,
    write_json,
)

__all__ = [
    "DeltaRecord", "DeltaRecorder", "LineFit", "RowStats", "adapter_checkpoint_series", "adapter_magnitude_direction",
    "adapter_tensor_stats", "checkpoint_series", "compare_state_dicts", "fit_line", "layer_index",
    "magnitude_direction", "model_deltas", "module_weight_2d", "plot_deltas", "read_json", "records_json", "summarize",
    "to_rows", "transposed_keys", "write_csv", "write_json",
]
