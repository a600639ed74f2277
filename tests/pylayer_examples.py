"""Example Python layers for tests/test_python_layer.py, written the way pycaffe layers are.

Like real ones, they subclass ``caffe.Layer`` (the Python layer accepts nothing else).
"""
import numpy as np

import caffe_compat as caffe


class ScaleLayer(caffe.Layer):
    """top = bottom * float(param_str)."""

    def setup(self, bottom, top):
        if len(bottom) != 1:
            raise Exception("ScaleLayer takes exactly one bottom")
        self.scale = float(self.param_str)

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        top[0].data[...] = bottom[0].data * self.scale

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff[...] = top[0].diff * self.scale


class EuclideanLossLayer(caffe.Layer):
    """sum((a - b)^2) / (2 N), like Caffe's examples/pycaffe/layers/pyloss.py (scaled by the
    top diff, so any loss weight works)."""

    def setup(self, bottom, top):
        if len(bottom) != 2:
            raise Exception("Need two inputs to compute distance.")

    def reshape(self, bottom, top):
        if bottom[0].count != bottom[1].count:
            raise Exception("Inputs must have the same dimension.")
        self.diff = np.zeros_like(bottom[0].data)
        top[0].reshape(1)

    def forward(self, bottom, top):
        self.diff[...] = bottom[0].data - bottom[1].data
        top[0].data[...] = np.sum(self.diff ** 2) / bottom[0].num / 2.0

    def backward(self, top, propagate_down, bottom):
        for i in range(2):
            if propagate_down[i]:
                sign = 1 if i == 0 else -1
                bottom[i].diff[...] = sign * top[0].diff[0] * self.diff / bottom[i].num


class NoBackwardLayer(caffe.Layer):
    """top = 2 * bottom, with no backward: gradients are zero."""

    def setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].shape)

    def forward(self, bottom, top):
        top[0].data[...] = 2 * bottom[0].data


class PhaseDataLayer(caffe.Layer):
    """A data layer (no bottoms): top 0 of shape param_str ("2,3") filled with the phase + 1,
    top 1 counting the forwards."""

    def __init__(self, layer_param):
        self.layer_param = layer_param  # Caffe hands the LayerParameter to the constructor
        self.calls = 0

    def setup(self, bottom, top):
        self.shape = tuple(int(s) for s in self.param_str.split(","))

    def reshape(self, bottom, top):
        top[0].reshape(*self.shape)
        top[1].reshape(1)

    def forward(self, bottom, top):
        self.calls += 1
        top[0].data[...] = self.phase + 1
        top[1].data[0] = self.calls

    def backward(self, top, propagate_down, bottom):
        pass


class FailingSetupLayer(caffe.Layer):
    def setup(self, bottom, top):
        raise Exception("bad param_str: " + self.param_str)

    def reshape(self, bottom, top):
        pass


class DoubleLayer(caffe.Layer):
    """Subclasses pycaffe's base class the way real user layers do: top = 2 * bottom."""

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        top[0].data[...] = 2 * bottom[0].data

    def backward(self, top, propagate_down, bottom):
        bottom[0].diff[...] = 2 * top[0].diff
