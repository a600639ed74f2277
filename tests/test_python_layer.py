"""The Python layer: user classes from tests/pylayer_examples.py, forward/backward values,
float64 gradient checks, data layers without bottoms, and errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import caffe_compat.engine.layers.python_layer  # noqa: F401  (registers the layer)
from caffe_compat.engine.layers import TEST, TRAIN, LayerError
from caffe_compat.engine.layers.python_layer import _PyBlob
from layer_utils import gradcheck_layer, make_layer


def _python(layer: str, param_str: str = "", tops: int = 1, extra: str = "") -> str:
    top_text = " ".join(f'top: "t{i}"' for i in range(tops))
    return (f'name: "py" type: "Python" {top_text} {extra} python_param {{ module: "pylayer_examples" '
            f'layer: "{layer}" param_str: "{param_str}" }}')


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_scale_layer_forward_backward_and_gradcheck():
    layer = make_layer(_python("ScaleLayer", "2.5"), [(2, 3)])
    assert layer.top_shapes([(2, 3)]) == [(2, 3)]
    assert layer.top_shapes([(4, 1, 5)]) == [(4, 1, 5)]  # reshape re-run for other shapes
    x = torch.randn(2, 3, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, x.detach() * 2.5)
    y.backward(torch.ones(2, 3) * 2)
    torch.testing.assert_close(x.grad, torch.full((2, 3), 5.0))
    gradcheck_layer(layer, [_rand(2, 3)])


def test_euclidean_loss_layer_matches_builtin_and_gradcheck():
    layer = make_layer(_python("EuclideanLossLayer"), [(3, 4), (3, 4)])
    assert layer.top_shapes([(3, 4), (3, 4)]) == [(1,)]
    a, b = _rand(3, 4), _rand(3, 4, seed=1)
    torch.testing.assert_close(layer(a.float(), b.float()),
                               (((a - b) ** 2).sum() / 6).float().reshape(1))
    gradcheck_layer(layer, [a, b])


def test_backward_without_need_runs_no_function_and_forward_twice_before_backward():
    layer = make_layer(_python("ScaleLayer", "3"), [(2,)])
    with torch.no_grad():
        torch.testing.assert_close(layer(torch.ones(2)), torch.full((2,), 3.0))
    x1 = torch.tensor([1.0, 2.0], requires_grad=True)
    x2 = torch.tensor([5.0, 6.0], requires_grad=True)
    y1, y2 = layer(x1), layer(x2)
    (y1.sum() + 10 * y2.sum()).backward()
    torch.testing.assert_close(x1.grad, torch.full((2,), 3.0))
    torch.testing.assert_close(x2.grad, torch.full((2,), 30.0))


def test_layer_without_backward_gives_zero_gradient():
    layer = make_layer(_python("NoBackwardLayer"), [(2, 2)])
    x = torch.ones(2, 2, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y, torch.full((2, 2), 2.0))
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.zeros(2, 2))


@pytest.mark.parametrize("phase", [TRAIN, TEST])
def test_data_layer_without_bottoms_sees_param_str_and_phase(phase):
    layer = make_layer(_python("PhaseDataLayer", "2,3", tops=2), [], phase=phase)
    assert layer.py.layer_param.name == "py"  # the class got the LayerParameter
    assert layer.top_shapes([]) == [(2, 3), (1,)]
    data, calls = layer()
    torch.testing.assert_close(data, torch.full((2, 3), float(phase + 1)))
    assert calls.item() == 1 and layer()[1].item() == 2
    assert layer.double()()[0].dtype == torch.float64


def test_pyblob_interface():
    blob = _PyBlob((2, 3))
    assert blob.shape == (2, 3) and blob.count == 6
    assert (blob.num, blob.channels, blob.height, blob.width) == (2, 3, 1, 1)
    assert blob.data.dtype == np.float32 and blob.data.flags.writeable
    blob.data[...] = 7
    blob.reshape(2, 3)
    assert (blob.data == 7).all()  # same shape keeps the contents
    blob.reshape(4, 1, 2, 5)
    assert blob.data.shape == blob.diff.shape == (4, 1, 2, 5) and blob.width == 5
    with pytest.raises(AttributeError):
        blob.data = np.zeros(3)


@pytest.mark.parametrize("text, message", [
    ('name: "py" type: "Python" top: "t" python_param { module: "no_such_module_xyz" layer: "L" }',
     "cannot import python_param.module 'no_such_module_xyz'"),
    (_python("NoSuchLayer"), "has no class 'NoSuchLayer'"),
    ('name: "py" type: "Python" top: "t"', "needs both 'module' and 'layer'"),
])
def test_definition_errors(text, message):
    with pytest.raises(LayerError, match=message):
        make_layer(text, [(2,)])


def _notes(exc) -> str:
    return " ".join(getattr(exc, "__notes__", []))


def test_user_setup_exception_reaches_the_caller_unchanged():
    with pytest.raises(Exception) as info:
        make_layer(_python("FailingSetupLayer", "oops"), [(2,)])
    assert type(info.value) is Exception and str(info.value) == "bad param_str: oops"
    if hasattr(info.value, "add_note"):
        assert "setup of Python layer 'py'" in _notes(info.value)


def test_user_forward_exception_reaches_the_caller_unchanged():
    layer = make_layer(_python("EuclideanLossLayer"), [(2, 3), (2, 3)])
    with pytest.raises(Exception, match="same dimension") as info:
        layer(torch.zeros(2, 3), torch.zeros(2, 4))
    assert not isinstance(info.value, LayerError)
    if hasattr(info.value, "add_note"):
        assert "reshape of Python layer 'py'" in _notes(info.value)


def test_subclass_of_caffe_layer_runs_in_a_net(tmp_path, monkeypatch):
    import caffe_compat as caffe
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    net_file = tmp_path / "net.prototxt"
    net_file.write_text(
        'force_backward: true\n'
        'layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }\n'
        'layer { name: "py" type: "Python" bottom: "x" top: "y" '
        'python_param { module: "pylayer_examples" layer: "DoubleLayer" param_str: "hi" } }\n')
    net = caffe.Net(str(net_file), caffe.TEST)
    assert net.layers[1].type == "Python"
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(net.forward(x=x)["y"], 2 * x)
    net.backward(y=np.ones((2, 3), np.float32))
    np.testing.assert_array_equal(net.blobs["x"].diff, np.full((2, 3), 2.0))
