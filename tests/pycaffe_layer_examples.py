"""Python layers written against pycaffe's ``caffe.Layer``, as BVLC's test_python_layer.py
defines them (times-ten, a failing setup, a learnable blob, the phase), and in the style of
BVLC's pyloss.py and NVIDIA/DIGITS' examples (occlusion by a blank square, a Dice metric)."""
import random

import numpy as np

import caffe
from pylayer_examples import EuclideanLossLayer as WeightedEuclideanLoss   # setup, forward


class TimesTenLayer(caffe.Layer):
    def setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        top[0].data[...] = 10 * bottom[0].data

    def backward(self, top, propagate_down, bottom):
        bottom[0].diff[...] = 10 * top[0].diff


class FailingSetupLayer(caffe.Layer):
    def setup(self, bottom, top):
        raise RuntimeError("setup refused")


class OneBlobLayer(caffe.Layer):
    def setup(self, bottom, top):
        self.blobs.add_blob(1)
        self.blobs[0].data[0] = 0

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        pass

    def backward(self, top, propagate_down, bottom):
        self.blobs[0].diff[0] = 1


class PhaseLayer(caffe.Layer):
    def setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        top[0].reshape()

    def forward(self, bottom, top):
        top[0].data[()] = self.phase


class MultilabelDataLayer(caffe.Layer):
    """The PASCAL notebook's synchronous data layer on synthetic data: image k lights up the
    channels of its labels; ``param_str`` is a dict literal with batch_size and im_shape."""

    def setup(self, bottom, top):
        import ast
        params = ast.literal_eval(self.param_str)
        self.batch_size, self.im_shape = params["batch_size"], params["im_shape"]
        self.classes = params.get("classes", 4)
        self.rng = __import__("numpy").random.RandomState(params.get("seed", 0))
        top[0].reshape(self.batch_size, 3, *self.im_shape)
        top[1].reshape(self.batch_size, self.classes)

    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        labels = (self.rng.rand(self.batch_size, self.classes) < 0.5).astype("float32")
        top[1].data[...] = labels
        top[0].data[...] = 0
        for i in range(self.batch_size):
            for c in range(self.classes):
                if labels[i, c]:
                    top[0].data[i, c % 3, c:c + 2, :] = 1.0

    def backward(self, top, propagate_down, bottom):
        pass


class EuclideanLossLayer(WeightedEuclideanLoss):
    """Half the mean squared distance, as examples/pycaffe/layers/pyloss.py writes it: its
    backward never reads top[0].diff, so a loss_weight does not scale its gradients."""

    def backward(self, top, propagate_down, bottom):
        for i in range(2):
            if not propagate_down[i]:
                continue
            sign = 1 if i == 0 else -1
            bottom[i].diff[...] = sign * self.diff / bottom[i].num


class BlankSquareLayer(caffe.Layer):
    """DIGITS' occlusion layer: zeroes a random square, 1/fraction of each side
    (``param_str`` a dict literal, read with eval as such layers do)."""

    def setup(self, bottom, top):
        assert len(bottom) == 1, 'requires a single layer.bottom'
        assert bottom[0].data.ndim >= 3, 'requires image data'
        self.fraction = eval(self.param_str)['fraction']

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        top[0].data[...] = bottom[0].data[...]
        height, width = top[0].data.shape[-2:]
        h_offset = random.randrange(height // self.fraction)
        w_offset = random.randrange(width // self.fraction)
        top[0].data[..., h_offset:h_offset + height // self.fraction,
                    w_offset:w_offset + width // self.fraction] = 0

    def backward(self, top, propagate_down, bottom):
        pass


class Dice(caffe.Layer):
    """DIGITS' medical-imaging metric: the Dice coefficient of argmax(score) and the label."""

    def setup(self, bottom, top):
        if len(bottom) != 2:
            raise Exception("Need two inputs to compute Dice coefficient.")
        self.sum_axes = tuple(range(1, bottom[0].data.ndim - 1))

    def reshape(self, bottom, top):
        if bottom[0].count != 2 * bottom[1].count:
            raise Exception("Prediction must have twice the number of elements of the input.")
        top[0].reshape(1)

    def forward(self, bottom, top):
        label = bottom[1].data[:, 0, :, :]
        prediction = np.argmax(bottom[0].data, axis=1)
        a_p = np.sum(prediction, axis=self.sum_axes)
        a_l = np.sum(label, axis=self.sum_axes)
        a_pl = np.sum(prediction * label, axis=self.sum_axes)
        top[0].data[...] = np.mean(2. * a_pl / (a_p + a_l))

    def backward(self, top, propagate_down, bottom):
        pass
