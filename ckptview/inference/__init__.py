"""
Does the checkpoint run, and what does it output? Build the model, load the weights, run it on
the best device, compare precisions and checkpoints. Pure: no pandas, plotly or ipywidgets at
import time (`to_frame()` imports pandas when called).
"""

from __future__ import annotations

from ckptview.inference.devices import DeviceInfo, available_devices, default_device
from ckptview.inference.inputs import InputSpec, make_input, suggest_input
from ckptview.inference.loading import LoadedModel, WeightsReport, load_model
from ckptview.inference.precision import (
    ALL_PRECISIONS,
    CheckpointComparison,
    Deviation,
    Precision,
    PrecisionComparison,
    PrecisionRow,
    compare_checkpoints,
    compare_precisions,
    deviation_between,
)
from ckptview.inference.run import ForwardError, InferenceResult, OutputInfo, Timing, TopK, run_inference, run_model

__all__ = [
    "DeviceInfo",
    "available_devices",
    "default_device",
    "InputSpec",
    "make_input",
    "suggest_input",
    "LoadedModel",
    "WeightsReport",
    "load_model",
    "ForwardError",
    "InferenceResult",
    "OutputInfo",
    "Timing",
    "TopK",
    "run_inference",
    "run_model",
    "ALL_PRECISIONS",
    "Precision",
    "PrecisionRow",
    "PrecisionComparison",
    "Deviation",
    "deviation_between",
    "compare_precisions",
    "CheckpointComparison",
    "compare_checkpoints",
]
