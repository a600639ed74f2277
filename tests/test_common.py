"""Eltwise, Concat, Slice, Split, Flatten, Reshape, Crop, Tile, Softmax, ArgMax, Silence,
Reduction, Input, DummyData: Caffe goldens, float64 gradient checks, shapes and errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format

import caffe_compat.engine.layers.common  # noqa: F401  (registers the layers)
import caffe_compat.engine.layers.input  # noqa: F401
import caffe_compat.engine.layers.neuron  # noqa: F401  (ReLU, TanH in concat_slice_split)
from caffe_compat.engine.layers import TEST, TRAIN, LayerError, layer_class
from caffe_compat.proto import caffe_pb2
from layer_utils import as_tuple, gradcheck_layer, make_layer

GOLDENS = Path(__file__).parent / "goldens" / "layers"
FWD = dict(rtol=1e-4, atol=1e-5)
BWD = dict(rtol=1e-3, atol=1e-5)


def run_golden(case: str) -> None:
    """Run a golden net layer by layer and compare with Caffe, forward and backward.

    Inputs are fed from ``in/``; every layer is built for the shapes it sees, its top shapes
    checked against ``top_shapes`` and its outputs against ``blob/``. The backward objective
    is each output times its ``top_diff`` plus each loss top times its loss weight, so an
    input consumed by several layers gets the sum of their gradients, as in Caffe.
    """
    folder = GOLDENS / case
    net = text_format.Parse((folder / "net.prototxt").read_text(), caffe_pb2.NetParameter())
    g = np.load(folder / "golden.npz")
    phase = TRAIN if (folder / "phase.txt").read_text().strip() == "TRAIN" else TEST
    blobs: dict[str, torch.Tensor] = {}
    inputs: dict[str, torch.Tensor] = {}
    losses: list[torch.Tensor] = []
    for lp in net.layer:
        if lp.type == "Input":
            for name in lp.top:
                inputs[name] = blobs[name] = torch.from_numpy(g[f"in/{name}"].copy()).requires_grad_(
                    f"diff/{name}" in g.files)
            continue
        bottoms = [blobs[b] for b in lp.bottom]
        shapes = [tuple(b.shape) for b in bottoms]
        layer = layer_class(lp.type)(lp, shapes, phase)
        for i, p in enumerate(layer.blobs):
            with torch.no_grad():
                p.copy_(torch.from_numpy(g[f"param/{lp.name}/{i}"]))
        expected_shapes = layer.top_shapes(shapes)
        tops = as_tuple(layer(*bottoms))
        assert [tuple(t.shape) for t in tops] == expected_shapes, lp.name
        for i, (name, top) in enumerate(zip(lp.top, tops)):
            blobs[name] = top
            weight = lp.loss_weight[i] if i < len(lp.loss_weight) else float(layer.is_loss and i == 0)
            if weight and f"top_diff/{name}" not in g.files:
                losses.append(weight * top.sum())
    for key in g.files:
        if key.startswith("blob/") and key[5:] in blobs:
            got = blobs[key[5:]].detach().numpy()
            np.testing.assert_allclose(got, g[key], err_msg=key, **FWD)
    if not any(k.startswith("diff/") for k in g.files):
        return
    objective = sum(losses, torch.zeros(()))
    for key in g.files:
        if key.startswith("top_diff/"):
            objective = objective + (blobs[key[9:]] * torch.from_numpy(g[key])).sum()
    objective.backward()
    for name, x in inputs.items():
        if f"diff/{name}" in g.files:
            grad = x.grad if x.grad is not None else torch.zeros_like(x)
            np.testing.assert_allclose(grad.numpy(), g[f"diff/{name}"], err_msg=f"diff/{name}", **BWD)


@pytest.mark.parametrize("case", ["eltwise_ops", "concat_slice_split", "slice_equal_concat_axis2",
                                  "flatten_reshape", "reshape_axis_flatten_range", "crop",
                                  "tile_scale_axis", "argmax_topk"])
def test_golden(case):
    run_golden(case)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# -- Eltwise ---------------------------------------------------------------------------
@pytest.mark.parametrize("params", ["operation: SUM", "operation: SUM coeff: 0.5 coeff: -2 coeff: 3",
                                    "operation: PROD", "operation: PROD stable_prod_grad: false",
                                    "operation: MAX"])
def test_eltwise_gradcheck(params):
    layer = make_layer(f'type: "Eltwise" eltwise_param {{ {params} }}', [(2, 3, 4)] * 3)
    gradcheck_layer(layer, [_rand(2, 3, 4, seed=i) + 0.1 * i for i in range(3)])


def test_eltwise_max_ties_follow_caffe():
    layer = make_layer('type: "Eltwise" eltwise_param { operation: MAX }', [(4,)] * 3)
    a = torch.tensor([1.0, 2.0, 0.0, 5.0], requires_grad=True)
    b = torch.tensor([1.0, 1.0, 3.0, 4.0], requires_grad=True)
    c = torch.tensor([0.0, 2.0, 3.0, 5.0], requires_grad=True)
    top = layer(a, b, c)
    top.backward(torch.tensor([1.0, 10.0, 100.0, 1000.0]))
    torch.testing.assert_close(top.detach(), torch.tensor([1.0, 2.0, 3.0, 5.0]))
    # a == b goes to b; later bottoms take over only when strictly greater.
    torch.testing.assert_close(a.grad, torch.tensor([0.0, 10.0, 0.0, 1000.0]))
    torch.testing.assert_close(b.grad, torch.tensor([1.0, 0.0, 100.0, 0.0]))
    torch.testing.assert_close(c.grad, torch.zeros(4))


def test_eltwise_prod_division_gradient_at_zero_is_nan_like_caffe():
    layer = make_layer('type: "Eltwise" eltwise_param { operation: PROD stable_prod_grad: false }',
                       [(2,)] * 2)
    a = torch.tensor([0.0, 2.0], requires_grad=True)
    b = torch.tensor([3.0, 4.0], requires_grad=True)
    layer(a, b).sum().backward()
    assert torch.isnan(a.grad[0]) and a.grad[1] == 4.0
    torch.testing.assert_close(b.grad, torch.tensor([0.0, 2.0]))


@pytest.mark.parametrize("params, shapes, message", [
    ("operation: SUM coeff: 1", [(2, 3)] * 2, "one coeff per bottom"),
    ("operation: PROD coeff: 1 coeff: 2", [(2, 3)] * 2, "only allowed with operation: SUM"),
    ("operation: MAX", [(2, 3), (2, 4)], "same shape"),
])
def test_eltwise_errors(params, shapes, message):
    with pytest.raises(LayerError, match=message):
        make_layer(f'name: "e" type: "Eltwise" eltwise_param {{ {params} }}', shapes)


def test_eltwise_forward_rejects_broadcasting():
    layer = make_layer('name: "e" type: "Eltwise"', [(2, 3)] * 2)
    with pytest.raises(LayerError, match="same shape"):
        layer(torch.zeros(2, 3), torch.zeros(1, 3))


# -- Concat / Slice / Split ------------------------------------------------------------
@pytest.mark.parametrize("params, shapes, top", [
    ("", [(2, 3, 4), (2, 1, 4)], (2, 4, 4)),
    ("concat_param { axis: -1 }", [(2, 3, 4), (2, 3, 2)], (2, 3, 6)),
    ("concat_param { concat_dim: 0 }", [(2, 3), (5, 3), (1, 3)], (8, 3)),
])
def test_concat_shapes_and_gradcheck(params, shapes, top):
    layer = make_layer(f'type: "Concat" {params}', shapes)
    assert layer.top_shapes(shapes) == [top]
    bottoms = [_rand(*s, seed=i) for i, s in enumerate(shapes)]
    assert layer(*bottoms).shape == top
    gradcheck_layer(layer, bottoms)


def test_concat_single_bottom_is_a_distinct_node():
    layer = make_layer('type: "Concat"', [(2, 3)])
    x = _rand(2, 3)
    out = layer(x)
    assert out is not x and torch.equal(out, x)


@pytest.mark.parametrize("text, shapes, message", [
    ('type: "Concat"', [(2, 3, 4), (2, 3, 5)], "same shape except on axis 1"),
    ('type: "Concat" concat_param { axis: 3 }', [(2, 3, 4), (2, 3, 4)], "out of range"),
    ('type: "Concat" concat_param { axis: 1 concat_dim: 1 }', [(2, 3)] * 2, "not both"),
    ('type: "Slice" top: "a" top: "b" slice_param { slice_point: 1 slice_point: 2 }', [(2, 4)],
     "one slice_point fewer than tops"),
    ('type: "Slice" top: "a" top: "b" top: "c" slice_param { slice_point: 2 slice_point: 2 }',
     [(2, 4)], "strictly increasing"),
    ('type: "Slice" top: "a" top: "b" slice_param { slice_point: 4 }', [(2, 4)], "must be smaller"),
    ('type: "Slice" top: "a" top: "b" top: "c"', [(2, 4)], "evenly divide"),
])
def test_concat_slice_errors(text, shapes, message):
    with pytest.raises(LayerError, match=message):
        make_layer(f'name: "l" {text}', shapes)


@pytest.mark.parametrize("params, tops, shapes", [
    ("slice_param { slice_point: 1 slice_point: 3 }", 3, [(2, 1, 4), (2, 2, 4), (2, 2, 4)]),
    ("slice_param { axis: -1 }", 2, [(2, 5, 2), (2, 5, 2)]),
    ("slice_param { slice_dim: 0 slice_point: 1 }", 2, [(1, 5, 4), (1, 5, 4)]),
])
def test_slice_shapes_and_gradcheck(params, tops, shapes):
    top_text = " ".join(f'top: "t{i}"' for i in range(tops))
    layer = make_layer(f'type: "Slice" {top_text} {params}', [(2, 5, 4)])
    assert layer.top_shapes([(2, 5, 4)]) == shapes
    assert [tuple(t.shape) for t in layer(_rand(2, 5, 4))] == shapes
    gradcheck_layer(layer, [_rand(2, 5, 4)])


def test_split_tops_are_distinct_and_grads_sum():
    layer = make_layer('type: "Split" top: "a" top: "b" top: "c"', [(2, 3)])
    assert layer.top_shapes([(2, 3)]) == [(2, 3)] * 3
    x = torch.ones(2, 3, requires_grad=True)
    tops = layer(x)
    assert len({id(t) for t in tops}) == 3
    for t in tops:
        t.retain_grad()
    sum((i + 1) * t.sum() for i, t in enumerate(tops)).backward()
    torch.testing.assert_close(x.grad, torch.full((2, 3), 6.0))
    torch.testing.assert_close(tops[1].grad, torch.full((2, 3), 2.0))
    gradcheck_layer(layer, [_rand(2, 3)])


# -- Flatten / Reshape -----------------------------------------------------------------
@pytest.mark.parametrize("params, top", [
    ("", (2, 60)),
    ("flatten_param { axis: 2 }", (2, 3, 20)),
    ("flatten_param { axis: 0 end_axis: 1 }", (6, 4, 5)),
    ("flatten_param { axis: -2 end_axis: -1 }", (2, 3, 20)),
])
def test_flatten(params, top):
    layer = make_layer(f'type: "Flatten" {params}', [(2, 3, 4, 5)])
    assert layer.top_shapes([(2, 3, 4, 5)]) == [top]
    x = _rand(2, 3, 4, 5)
    torch.testing.assert_close(layer(x), x.reshape(top))


@pytest.mark.parametrize("params, top", [
    ("shape { dim: 0 dim: -1 dim: 10 }", (2, 6, 10)),
    ("shape { dim: -1 }", (120,)),
    ("shape { dim: 0 dim: 0 dim: 2 dim: 2 dim: 5 }", (2, 3, 2, 2, 5)),
    ("shape { dim: 2 dim: 2 } axis: 2 num_axes: 1", (2, 3, 2, 2, 5)),
    ("shape { dim: 1 } axis: -1 num_axes: 0", (2, 3, 4, 5, 1)),
    ("shape { dim: 1 } axis: 0 num_axes: 0", (1, 2, 3, 4, 5)),
    ("shape { dim: -1 } axis: 1 num_axes: 2", (2, 12, 5)),
    ("shape { } axis: 1 num_axes: 0", (2, 3, 4, 5)),
])
def test_reshape_shapes(params, top):
    layer = make_layer(f'type: "Reshape" reshape_param {{ {params} }}', [(2, 3, 4, 5)])
    assert layer.top_shapes([(2, 3, 4, 5)]) == [top]
    x = _rand(2, 3, 4, 5)
    torch.testing.assert_close(layer(x), x.reshape(top))


def test_flatten_reshape_gradcheck():
    gradcheck_layer(make_layer('type: "Flatten" flatten_param { axis: 1 end_axis: 2 }', [(2, 3, 2, 2)]),
                    [_rand(2, 3, 2, 2)])
    gradcheck_layer(make_layer('type: "Reshape" reshape_param { shape { dim: 0 dim: -1 } }',
                               [(2, 3, 2)]), [_rand(2, 3, 2)])


@pytest.mark.parametrize("text, message", [
    ('type: "Reshape" reshape_param { shape { dim: -1 dim: -1 } }', "more than one -1"),
    ('type: "Reshape" reshape_param { shape { dim: 7 dim: -1 } }', "not divisible"),
    ('type: "Reshape" reshape_param { shape { dim: 2 dim: 3 } }', "has 6 elements"),
    ('type: "Reshape" reshape_param { shape { dim: 0 dim: 0 dim: 0 dim: 0 dim: 0 } }', "no axis 4"),
    ('type: "Reshape" reshape_param { shape { dim: 1 } axis: 1 num_axes: 5 }', "exceeds"),
    ('type: "Reshape" reshape_param { shape { dim: -2 } }', "below -1"),
    ('type: "Flatten" flatten_param { axis: 2 end_axis: 1 }', "must not come before"),
    ('type: "Flatten" bottom: "x" top: "x"', "in place"),
])
def test_flatten_reshape_errors(text, message):
    with pytest.raises(LayerError, match=message):
        make_layer(f'name: "r" {text}', [(2, 3, 4, 5)])


# -- Crop / Tile -----------------------------------------------------------------------
ALL = slice(None)


@pytest.mark.parametrize("params, ref, expected", [
    ("crop_param { axis: 2 offset: 1 offset: 2 }", (2, 3, 2, 3), (ALL, ALL, slice(1, 3), slice(2, 5))),
    ("crop_param { axis: 1 offset: 1 }", (2, 2, 3, 3), (ALL, slice(1, 3), slice(1, 4), slice(1, 4))),
    ("", (1, 1, 4, 5), (ALL, ALL, slice(0, 4), slice(0, 5))),
])
def test_crop(params, ref, expected):
    layer = make_layer(f'type: "Crop" {params}', [(2, 3, 5, 6), ref])
    x = _rand(2, 3, 5, 6)
    out = layer(x, torch.zeros(ref, dtype=torch.float64))
    torch.testing.assert_close(out, x[expected])
    assert layer.top_shapes([(2, 3, 5, 6), ref]) == [tuple(out.shape)]
    gradcheck_layer(layer, [x, torch.zeros(ref)])


@pytest.mark.parametrize("params, ref, message", [
    ("crop_param { offset: 1 offset: 2 offset: 3 }", (2, 3, 2, 2), "one per cropped axis"),
    ("crop_param { offset: 4 }", (2, 3, 2, 2), "cannot crop axis 2"),
    ("", (2, 3, 2), "same number of axes"),
])
def test_crop_errors(params, ref, message):
    with pytest.raises(LayerError, match=message):
        make_layer(f'name: "c" type: "Crop" {params}', [(2, 3, 5, 5), ref])


def test_tile():
    layer = make_layer('type: "Tile" tile_param { axis: 1 tiles: 3 }', [(2, 2, 3)])
    assert layer.top_shapes([(2, 2, 3)]) == [(2, 6, 3)]
    x = _rand(2, 2, 3)
    out = layer(x)
    for t in range(3):
        torch.testing.assert_close(out[:, 2 * t:2 * t + 2], x)
    gradcheck_layer(layer, [x])
    gradcheck_layer(make_layer('type: "Tile" tile_param { axis: -1 tiles: 2 }', [(2, 3)]), [_rand(2, 3)])
    with pytest.raises(LayerError, match="tiles must be given and positive"):
        make_layer('name: "t" type: "Tile" tile_param { axis: 1 }', [(2, 3)])


# -- Softmax / ArgMax ------------------------------------------------------------------
@pytest.mark.parametrize("axis", [1, 2, -1, 0])
def test_softmax(axis):
    layer = make_layer(f'type: "Softmax" softmax_param {{ axis: {axis} }}', [(2, 3, 4)])
    x = _rand(2, 3, 4) * 5
    out = layer(x)
    e = (x - x.amax(axis, keepdim=True)).exp()
    torch.testing.assert_close(out, e / e.sum(axis, keepdim=True))
    gradcheck_layer(layer, [x])
    with pytest.raises(LayerError, match="out of range"):
        make_layer('name: "s" type: "Softmax" softmax_param { axis: 3 }', [(2, 3, 4)])


def test_argmax_ties_larger_index_first_and_shapes():
    x = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    layer = make_layer('type: "ArgMax" argmax_param { top_k: 2 out_max_val: true }', [(2, 4)])
    out = layer(x)
    assert out.shape == (2, 2, 2) and not out.requires_grad
    torch.testing.assert_close(out[:, 0], torch.tensor([[2.0, 1.0], [3.0, 2.0]]))
    torch.testing.assert_close(out[:, 1], torch.tensor([[3.0, 3.0], [2.0, 2.0]]))
    # No axis: each sample flattened, padded to the bottom's rank.
    layer4 = make_layer('type: "ArgMax" argmax_param { top_k: 3 }', [(2, 3, 2, 2)])
    assert layer4.top_shapes([(2, 3, 2, 2)]) == [(2, 1, 3, 1)]
    assert layer4(_rand(2, 3, 2, 2)).shape == (2, 1, 3, 1)
    # With axis: top_k replaces that axis; values if out_max_val else indices.
    x4 = _rand(2, 3, 2, 2)
    idx = make_layer('type: "ArgMax" argmax_param { axis: 1 }', [(2, 3, 2, 2)])(x4)
    torch.testing.assert_close(idx, x4.argmax(1, keepdim=True).double())
    val = make_layer('type: "ArgMax" argmax_param { axis: -1 top_k: 2 out_max_val: true }',
                     [(2, 3, 2, 2)])(x4)
    torch.testing.assert_close(val, x4.sort(-1, descending=True).values[..., :2])


@pytest.mark.parametrize("params, message", [
    ("top_k: 0", "at least 1"),
    ("top_k: 7", "number of classes"),
    ("axis: 1 top_k: 4", "size of axis 1"),
])
def test_argmax_errors(params, message):
    with pytest.raises(LayerError, match=message):
        make_layer(f'name: "a" type: "ArgMax" argmax_param {{ {params} }}', [(2, 3, 2)])


# -- Silence / Reduction ---------------------------------------------------------------
def test_silence_has_no_tops():
    layer = make_layer('type: "Silence" bottom: "a" bottom: "b"', [(2, 3), (4,)])
    assert layer.top_shapes([(2, 3), (4,)]) == []
    assert layer(torch.zeros(2, 3), torch.zeros(4)) == ()


@pytest.mark.parametrize("op", ["SUM", "ASUM", "SUMSQ", "MEAN"])
@pytest.mark.parametrize("axis, top", [(0, ()), (1, (2,)), (-1, (2, 3))])
def test_reduction(op, axis, top):
    text = f'type: "Reduction" reduction_param {{ operation: {op} axis: {axis} coeff: -1.5 }}'
    layer = make_layer(text, [(2, 3, 4)])
    assert layer.top_shapes([(2, 3, 4)]) == [top]
    x = _rand(2, 3, 4)
    flat = x.reshape(top + (-1,))
    expected = {"SUM": flat.sum(-1), "ASUM": flat.abs().sum(-1), "SUMSQ": (flat ** 2).sum(-1),
                "MEAN": flat.mean(-1)}[op] * -1.5
    torch.testing.assert_close(layer(x), expected)
    gradcheck_layer(layer, [x])


# -- Input / DummyData -----------------------------------------------------------------
def test_input_shapes_and_forward_error():
    layer = make_layer('name: "in" type: "Input" top: "a" top: "b" '
                       'input_param { shape { dim: 2 dim: 3 } shape { dim: 4 } }', [])
    assert layer.top_shapes([]) == [(2, 3), (4,)]
    one = make_layer('type: "Input" top: "a" top: "b" input_param { shape { dim: 5 } }', [])
    assert one.top_shapes([]) == [(5,), (5,)]
    with pytest.raises(LayerError, match="feeds their tops directly"):
        layer()
    with pytest.raises(LayerError, match="once per top"):
        make_layer('name: "in" type: "Input" top: "a" top: "b" top: "c" input_param { shape { dim: 1 } '
                   'shape { dim: 2 } }', [])


def test_dummy_data():
    layer = make_layer('type: "DummyData" top: "a" top: "b" dummy_data_param { '
                       'data_filler { type: "constant" value: 3 } '
                       'data_filler { type: "gaussian" std: 2 } '
                       'shape { dim: 2 dim: 3 } shape { dim: 1000 } }', [])
    assert layer.top_shapes([]) == [(2, 3), (1000,)]
    a, b = layer()
    torch.testing.assert_close(a, torch.full((2, 3), 3.0))
    assert b.dtype == torch.float32 and 1.7 < b.std() < 2.3
    a2, b2 = layer()
    assert not torch.equal(b, b2)  # refilled every forward
    assert layer.double()()[0].dtype == torch.float64


def test_dummy_data_legacy_dims_and_default_filler():
    layer = make_layer('type: "DummyData" top: "a" top: "b" dummy_data_param { num: 2 channels: 3 '
                       'channels: 1 height: 4 width: 5 }', [])
    assert layer.top_shapes([]) == [(2, 3, 4, 5), (2, 1, 4, 5)]
    a, b = layer()
    assert torch.equal(a, torch.zeros(2, 3, 4, 5)) and b.shape == (2, 1, 4, 5)


@pytest.mark.parametrize("params, message", [
    ("shape { dim: 1 } num: 2 channels: 1 height: 1 width: 1", "not both"),
    ("num: 1 num: 2 num: 3 channels: 1 height: 1 width: 1", "'num' once or once per top"),
    ("shape { dim: 1 } shape { dim: 1 } shape { dim: 1 }", "'shape' once or once per top"),
    ("shape { dim: 1 } data_filler { } data_filler { } data_filler { }", "data_filler once"),
])
def test_dummy_data_errors(params, message):
    with pytest.raises(LayerError, match=message):
        make_layer(f'name: "d" type: "DummyData" top: "a" top: "b" dummy_data_param {{ {params} }}', [])
