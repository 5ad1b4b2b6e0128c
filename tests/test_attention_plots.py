"""Attention heatmaps draw exactly the maps they are given, masked above the diagonal."""

import math

import numpy as np
import pytest
import torch

from qtg.plots.attention import attention_heatmaps, gamma_bars


def test_heatmaps_show_the_maps_with_the_causal_triangle_blank(micro, ids):
    with torch.inference_mode():
        out = micro(ids[:, :12], return_internals=True)
    tokens = [f"t{i}" for i in range(12)]
    fig = attention_heatmaps(out.attention[1][0], tokens, gamma=out.gamma[1])
    assert len(fig.data) == micro.cfg.n_heads
    z = np.asarray(fig.data[2].z, dtype=float)
    lower = np.tril_indices(12)
    np.testing.assert_allclose(z[lower], out.attention[1][0, 2].numpy()[lower], atol=1e-7)
    assert np.isnan(z[np.triu_indices(12, k=1)]).all()
    assert f"gamma {out.gamma[1][2].item():.3g}" in fig.layout.annotations[2].text
    dist = attention_heatmaps(out.distances[1][0], tokens, kind="distance", heads=[0])
    assert len(dist.data) == 1 and dist.layout.coloraxis.cmax == pytest.approx(math.pi / 2)
    assert list(gamma_bars(out.gamma).data[0].y) == pytest.approx(out.gamma[0].tolist())


@pytest.mark.parametrize("kwargs, message", [
    (dict(maps=np.zeros((2, 3, 4))), "must be"),
    (dict(maps=np.zeros((2, 3, 3)), heads=[5]), "out of range"),
    (dict(maps=np.zeros((2, 3, 3)), tokens=["a"]), "1 token strings"),
    (dict(maps=np.zeros((2, 3, 3)), kind="energy"), "kind must be"),
])
def test_heatmaps_refuse_what_they_cannot_draw(kwargs, message):
    with pytest.raises(ValueError, match=message):
        attention_heatmaps(**kwargs)
