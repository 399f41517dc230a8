"""The matplotlib charts: PNG files with their data beside them as JSON."""
import json

import numpy as np
import pytest
from PIL import Image

from flowgrpo_jax import plot


def _pixels_of(path, color: str) -> int:
    rgb = tuple(int(color[i:i + 2], 16) for i in (1, 3, 5))
    image = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return int((np.abs(image - rgb).sum(-1) == 0).sum())


def test_line_chart_writes_png_and_its_data(tmp_path):
    path = tmp_path / "curve.png"
    plot.line_chart({"reward": ([0, 1, 2], np.array([0.1, 0.3, 0.2]))},
                    points={"eval": ([0, 2], [0.2, 0.4])}, title="t", xlabel="epoch",
                    ylabel="reward").save(str(path))
    assert Image.open(path).format == "PNG"
    assert _pixels_of(path, plot.COLORS[0]) > 50 and _pixels_of(path, plot.COLORS[1]) > 20
    data = json.loads((tmp_path / "curve.data.json").read_text())
    assert data["lines"]["reward"] == {"x": [0.0, 1.0, 2.0], "y": [0.1, 0.3, 0.2]}
    assert data["points"]["eval"]["y"] == [0.2, 0.4] and data["xlabel"] == "epoch"
    with pytest.raises(ValueError, match="nothing to plot"):
        plot.line_chart({"empty": ([], [])})


def test_bar_chart_writes_png_and_its_data(tmp_path):
    path = tmp_path / "bars.png"
    plot.bar_chart(["colors", "counting"], {"base": [0.25, 0.5], "trained": [0.75, 1.0]},
                   title="strict", ylabel="accuracy", ylim=(0, 1)).save(str(path))
    assert _pixels_of(path, plot.COLORS[0]) > 500 and _pixels_of(path, plot.COLORS[1]) > 500
    data = json.loads((tmp_path / "bars.data.json").read_text())
    assert data["categories"] == ["colors", "counting"]
    assert data["series"] == {"base": [0.25, 0.5], "trained": [0.75, 1.0]}
    with pytest.raises(ValueError, match="2 categories"):
        plot.bar_chart(["a", "b"], {"base": [1.0]})
