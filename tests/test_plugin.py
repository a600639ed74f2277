"""The plug-in example (examples/plugin_layer.py) used as a user would: import, build, train, save."""
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import caffe_compat as caffe
from caffe_compat.engine.layers import Layer, LayerError, register
from layer_utils import gradcheck_layer, make_layer

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "plugin_layer.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("plugin_layer", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["plugin_layer"] = module
    spec.loader.exec_module(module)
    return module


plugin = _load_example()

NET = '''name: "plugin"
force_backward: true
layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 dim: 2 dim: 2 } } }
layer { name: "act" type: "ScaledTanh" bottom: "x" top: "y"
        python_param { param_str: '{"alpha": 1.5, "beta": 0.5}' } }
'''


def test_example_layer_builds_runs_and_learns(tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_text(NET)
    net = caffe.Net(str(path), caffe.TEST)
    x = np.random.default_rng(0).normal(size=(2, 3, 2, 2)).astype(np.float32)
    net.blobs["x"].data[...] = x
    net.forward()
    np.testing.assert_allclose(net.blobs["y"].data, 1.5 * np.tanh(0.5 * x), rtol=1e-6)
    net.blobs["y"].diff[...] = 1.0
    net.backward()
    np.testing.assert_allclose(net.blobs["x"].diff, 1.5 * 0.5 * (1 - np.tanh(0.5 * x) ** 2),
                               rtol=1e-5)
    np.testing.assert_allclose(net.params["act"][0].diff, np.tanh(0.5 * x).sum(axis=(0, 2, 3)),
                               rtol=1e-5)
    net.params["act"][0].data[...] = [1, 2, 3]
    net.save(str(tmp_path / "w.caffemodel"))
    again = caffe.Net(str(path), str(tmp_path / "w.caffemodel"), caffe.TEST)
    np.testing.assert_array_equal(again.params["act"][0].data, [1, 2, 3])


def test_example_float64_gradient_and_bad_options():
    layer = make_layer('name: "a" type: "ScaledTanh" python_param { param_str: \'{"beta": 1.3}\' }',
                       [(2, 3, 2)])
    gradcheck_layer(layer, [torch.randn(2, 3, 2, dtype=torch.float64)])
    with pytest.raises(LayerError, match=r"layer 'a' \(ScaledTanh\): unknown option\(s\) \['gamma'\]"):
        make_layer('name: "a" type: "ScaledTanh" python_param { param_str: \'{"gamma": 1}\' }',
                   [(2, 3)])


def test_registering_another_class_under_a_taken_type_fails_but_reloading_the_file_works():
    with pytest.raises(TypeError, match="registered twice"):
        @register
        class Impostor(Layer):  # noqa: F811
            type = "ScaledTanh"
    _load_example()                     # same module and class name: replaces the entry
    assert "ScaledTanh" in caffe.layer_types()


def test_plugins_are_not_listed_in_readme_table():
    from caffe_compat.commands.layer_table import layer_table
    assert "ScaledTanh" not in layer_table()
