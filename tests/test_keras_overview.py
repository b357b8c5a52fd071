"""
The Overview of Keras files (the converter's fixtures, saved by Keras 2 and 3): the model config is a
line per layer with its class and what sets it apart (units, filters, kernel, activation), folded under
one summary line, and the training config is its loss, optimizer and metrics, not hundreds of flattened keys.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ckptview.ui import explore

FIXTURES = Path(__file__).parent / "fixtures" / "tf"

LAYERS = ("image: InputLayer, input (None, 8, 8, 3)\nconv: Conv2D, 4 filters, 3×3, stride 1×1\n"
          "bn: BatchNormalization, axis {axis}, momentum 0.99, epsilon 0.001\nrelu: ReLU\nflatten: Flatten\n"
          "dense_1: Dense, 8 units, relu\nlogits: Dense, 3 units")


@pytest.mark.parametrize("name, axis, training", [
    ("keras3_trained.keras", "-1", "loss SparseCategoricalCrossentropy, metrics accuracy"),
    ("keras3_trained.h5", "-1", None),
    ("keras2_trained.h5", "(3)", "loss SparseCategoricalCrossentropy, optimizer Adam (learning_rate 0.01), metrics accuracy"),
])
def test_keras_overview_shows_layers_not_flattened_config(name: str, axis: str, training: str | None) -> None:
    panel = explore(FIXTURES / name).select("Overview")
    panel.wait()
    html = panel.sections.value
    assert ("<details><summary>Functional &#x27;small_cnn&#x27;: 7 layers</summary>"
            f"<div style='white-space:pre-line'>{LAYERS.format(axis=axis)}</div></details>") in html
    assert "config.layers" not in html and "kernel_initializer" not in html
    if training is not None:
        assert f"<td data-label='contents'>{training}</td>" in html
