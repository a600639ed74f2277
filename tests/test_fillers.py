"""Caffe fillers: distributions with closed-form statistics, fan sizes, exact bilinear kernels, checks."""
from __future__ import annotations

from pathlib import Path

import math

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from caffe_compat.engine.fillers import FillerError, fill, filler_types
from caffe_compat.proto import caffe_pb2


def filler(text: str) -> caffe_pb2.FillerParameter:
    return text_format.Parse(text, caffe_pb2.FillerParameter())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


def test_known_types():
    assert filler_types() == ["bilinear", "constant", "gaussian", "msra", "positive_unitball",
                              "uniform", "xavier"]


def test_default_is_constant_zero():
    for p in (filler(""), None):
        w = fill(p, (3, 4))
        assert w.dtype == torch.float32 and w.shape == (3, 4) and not w.any()


def test_constant():
    w = fill(filler('type: "constant" value: 0.25'), (2, 3, 4))
    assert torch.equal(w, torch.full((2, 3, 4), 0.25))


def test_uniform_statistics():
    lo, hi = -2.0, 3.0
    w = fill(filler(f'type: "uniform" min: {lo} max: {hi}'), (1000, 1000))
    assert w.dtype == torch.float32
    assert w.min() >= lo and w.max() < hi
    assert abs(w.mean().item() - (lo + hi) / 2) < 0.01
    assert abs(w.std().item() - (hi - lo) / math.sqrt(12)) < 0.01


def test_uniform_default_is_unit_interval():
    w = fill(filler('type: "uniform"'), (100000,))
    assert w.min() >= 0 and w.max() < 1 and abs(w.mean().item() - 0.5) < 0.01


def test_gaussian_statistics_and_default_std():
    w = fill(filler('type: "gaussian" mean: 1.5 std: 0.5'), (1000, 1000))
    assert abs(w.mean().item() - 1.5) < 0.005
    assert abs(w.std().item() - 0.5) < 0.005
    w = fill(filler('type: "gaussian"'), (1000, 1000))  # std defaults to 1
    assert abs(w.std().item() - 1.0) < 0.01


def test_gaussian_sparse_fraction():
    # p(non-zero) = sparse / shape[0] = 5 / 20
    w = fill(filler('type: "gaussian" std: 2 sparse: 5'), (20, 50000))
    nz = w != 0
    assert abs(nz.float().mean().item() - 0.25) < 0.005
    assert abs(w[nz].std().item() - 2.0) < 0.02
    assert not fill(filler('type: "gaussian" sparse: 0'), (4, 100)).any()


def _fans(shape):
    count = math.prod(shape)
    return count // shape[0], (count // shape[1] if len(shape) > 1 else count)


@pytest.mark.parametrize("norm", ["FAN_IN", "FAN_OUT", "AVERAGE"])
@pytest.mark.parametrize("shape", [(64, 32, 3, 3), (300, 500), (4000,)])
def test_xavier_bounds_and_std(norm, shape):
    fan_in, fan_out = _fans(shape)
    n = {"FAN_IN": fan_in, "FAN_OUT": fan_out, "AVERAGE": (fan_in + fan_out) / 2}[norm]
    a = math.sqrt(3.0 / n)
    w = fill(filler(f'type: "xavier" variance_norm: {norm}'), shape)
    assert w.abs().max() <= a
    assert w.abs().max() > 0.99 * a
    # U(-a, a) has std a / sqrt(3) = sqrt(1 / n)
    assert abs(w.std().item() / math.sqrt(1.0 / n) - 1) < 0.05
    assert abs(w.mean().item()) < 0.05 * a


@pytest.mark.parametrize("norm", ["FAN_IN", "FAN_OUT", "AVERAGE"])
def test_msra_std(norm):
    shape = (128, 64, 3, 3)  # fan_in 576, fan_out 1152 (Caffe's stored-layout fans)
    n = {"FAN_IN": 576, "FAN_OUT": 1152, "AVERAGE": 864}[norm]
    w = fill(filler(f'type: "msra" variance_norm: {norm}'), shape)
    assert abs(w.std().item() / math.sqrt(2.0 / n) - 1) < 0.02
    assert abs(w.mean().item()) < 0.005


def test_msra_default_is_fan_in():
    w = fill(filler('type: "msra"'), (256, 200))
    assert abs(w.std().item() / math.sqrt(2.0 / 200) - 1) < 0.02


def _bilinear_reference(k: int) -> np.ndarray:
    f = math.ceil(k / 2)
    c = (k - 1) / (2 * f)
    out = np.zeros((k, k), np.float64)
    for y in range(k):
        for x in range(k):
            out[y, x] = (1 - abs(x / f - c)) * (1 - abs(y / f - c))
    return out


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 8])
def test_bilinear_matches_formula(k):
    w = fill(filler('type: "bilinear"'), (3, 2, k, k))
    ref = _bilinear_reference(k)
    for o in range(3):
        for i in range(2):
            np.testing.assert_allclose(w[o, i].numpy(), ref, rtol=1e-6, atol=1e-7)


def test_bilinear_k4_values():
    # f = 2, c = 0.75: profile (0.25, 0.75, 0.75, 0.25), the classic 2x upsampling kernel.
    w = fill(filler('type: "bilinear"'), (1, 1, 4, 4))
    p = torch.tensor([0.25, 0.75, 0.75, 0.25])
    torch.testing.assert_close(w[0, 0], p[:, None] * p[None, :])


def test_bilinear_matches_golden():
    z = np.load(Path(__file__).parent / "goldens/layers/deconv_bilinear_s2/golden.npz")
    np.testing.assert_array_equal(fill(filler('type: "bilinear"'), (3, 1, 4, 4)).numpy(),
                                  z["param/up/0"])


def test_positive_unitball():
    w = fill(filler('type: "positive_unitball"'), (7, 3, 4, 5))
    assert (w > 0).all()
    torch.testing.assert_close(w.reshape(7, -1).sum(1), torch.ones(7))


def test_seed_reproducible():
    p = filler('type: "gaussian" std: 0.1')
    torch.manual_seed(7)
    a = fill(p, (5, 6))
    torch.manual_seed(7)
    assert torch.equal(a, fill(p, (5, 6)))


@pytest.mark.parametrize("text,shape,message", [
    ('type: "nope"', (2, 2), "Unknown filler type: nope (known types: bilinear, constant"),
    ('type: "xavier" sparse: 3', (4, 4), "sparse is only allowed with type 'gaussian'"),
    ('type: "constant" sparse: 0', (4, 4), "does not support sparse"),
    ('type: "uniform" sparse: 2', (4, 4), "does not support sparse"),
    ('type: "msra" sparse: 2', (4, 4), "does not support sparse"),
    ('type: "positive_unitball" sparse: 2', (4, 4), "does not support sparse"),
    ('type: "bilinear" sparse: 2', (1, 1, 4, 4), "does not support sparse"),
    ('type: "bilinear"', (1, 4, 4), "4-D blob with a square kernel"),
    ('type: "bilinear"', (1, 1, 3, 4), "4-D blob with a square kernel"),
    ('type: "uniform" min: 2 max: 1', (4,), "min <= max"),
    ('type: "gaussian" std: 0', (4,), "std > 0"),
    ('type: "gaussian" sparse: 5', (4, 4), "must not exceed shape[0]"),
])
def test_errors(text, shape, message):
    with pytest.raises(FillerError) as e:
        fill(filler(text), shape)
    assert message in str(e.value)
