"""Python layers written against pycaffe's ``caffe.Layer``, as BVLC's test_python_layer.py
defines them (times-ten, a failing setup, a learnable blob, the phase)."""
import caffe


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
