"""DeepLab v2's UniqueLabel and BiasChannel (deeplab-public-ver2) against per-pixel loops that
restate the fork's code (docs/forks.md)."""
import numpy as np
import pytest
import torch

from caffe_compat.engine.layers import LayerError
from layer_utils import gradcheck_layer, make_layer

UNIQUE = 'name: "u" type: "UniqueLabel" unique_label_param { max_labels: 4 %s }'
BIAS = 'name: "b" type: "BiasChannel" bias_channel_param { %s }'


def test_unique_label_lists_sorted_values_then_minus_ones():
    label = torch.tensor([[3, 0, 255, 3], [7, 7, 7, 7]], dtype=torch.float64).view(2, 1, 2, 2)
    layer = make_layer(UNIQUE % "ignore_label: 255 force_label: 0", [label.shape])
    out = layer(label)
    assert out.shape == (2, 4, 1, 1)
    assert out.view(2, 4).tolist() == [[0, 3, -1, -1], [0, 7, -1, -1]]


def test_unique_label_errors():
    with pytest.raises(LayerError, match=r"layer 'u' \(UniqueLabel\): image 0 holds 5 distinct "
                       r"labels, more than max_labels \(4\)"):
        make_layer(UNIQUE % "", [(1, 1, 1, 5)])(torch.arange(5.).view(1, 1, 1, 5))
    with pytest.raises(LayerError, match="max_labels must exceed the 4 force_label"):
        make_layer(UNIQUE % "force_label: 1 force_label: 2 force_label: 3 force_label: 4",
                   [(1, 1, 2, 2)])
    with pytest.raises(LayerError, match="must have one channel"):
        make_layer(UNIQUE % "", [(1, 2, 2, 2)])


def image_reference(score, labels, bg, fg, ignore):
    """The fork's IMAGE loop: each listed label adds its bias to its whole channel."""
    out = score.copy()
    for n in range(labels.shape[0]):
        for j in range(labels.shape[1]):
            label = int(labels[n, j])
            if label in ignore or label == -1:
                continue
            out[n, label] += bg if label == 0 else fg
    return out


def pixel_reference(score, labels, bg, fg, background):
    """The fork's PIXEL loop (``background`` None: no background label)."""
    out = score.copy()
    n_, c, h, w = score.shape
    for n in range(n_):
        for y in range(h):
            for x in range(w):
                label = int(labels[n, 0, y, x])
                if label in (-1, 255):
                    continue
                if background is not None:
                    out[n, background, y, x] += bg
                    if label == background:
                        continue
                out[n, label, y, x] += fg
    return out


def test_image_labels_bias_whole_channels():
    score = np.random.default_rng(0).normal(size=(2, 4, 2, 3))
    labels = np.array([[0, 2, 2, -1], [3, 9, -1, -1]], dtype=np.float64).reshape(2, 4, 1, 1)
    layer = make_layer(BIAS % "bg_bias: 0.5 fg_bias: 3 ignore_label: 9", [score.shape, labels.shape])
    out = layer(torch.from_numpy(score), torch.from_numpy(labels)).numpy()
    np.testing.assert_allclose(out, image_reference(score, labels[:, :, 0, 0], 0.5, 3, {9}))


@pytest.mark.parametrize("body, background", [("ignore_label: 255", None),
                                              ("background_label: 1 ignore_label: 255", 1),
                                              ("bg_bias: 0.25 ignore_label: 255", 0)])
def test_pixel_labels_bias_each_position(body, background):
    rng = np.random.default_rng(1)
    score = rng.normal(size=(2, 3, 2, 3))
    labels = rng.choice([0, 1, 2, 255, -1], size=(2, 1, 2, 3)).astype(np.float64)
    layer = make_layer(BIAS % f"label_type: PIXEL {body}", [score.shape, labels.shape])
    bg = 0.25 if "bg_bias" in body else 1.0
    out = layer(torch.from_numpy(score), torch.from_numpy(labels)).numpy()
    np.testing.assert_allclose(out, pixel_reference(score, labels, bg, 2.0, background))


def test_bias_channel_gradient_passes_to_the_scores():
    labels = torch.tensor([[0, 1, 2, 1]], dtype=torch.float64).view(1, 1, 2, 2)
    layer = make_layer(BIAS % "label_type: PIXEL", [(1, 3, 2, 2), labels.shape])
    gradcheck_layer(layer, [torch.randn(1, 3, 2, 2, dtype=torch.float64), labels])


def test_bias_channel_errors():
    with pytest.raises(LayerError, match=r"layer 'b' \(BiasChannel\): unexpected label 5"):
        make_layer(BIAS % "", [(1, 3, 1, 1), (1, 2, 1, 1)])(
            torch.zeros(1, 3, 1, 1), torch.tensor([1., 5.]).view(1, 2, 1, 1))
    with pytest.raises(LayerError, match=r"must be N×1×H×W \(label_type PIXEL\)"):
        make_layer(BIAS % "label_type: PIXEL", [(1, 3, 2, 2), (1, 1, 2, 3)])
    with pytest.raises(LayerError, match="must not be negative"):
        make_layer(BIAS % "fg_bias: -1", [(1, 3, 1, 1), (1, 2, 1, 1)])
    with pytest.raises(LayerError, match="background_label 3 is not a channel of 3"):
        make_layer(BIAS % "label_type: PIXEL background_label: 3", [(1, 3, 2, 2), (1, 1, 2, 2)])
