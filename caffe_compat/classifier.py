"""pycaffe's ``caffe.Classifier``: a TEST-phase Net that classifies (H, W, K) images by
resizing, then centre-cropping or oversampling (ten crops, predictions averaged)."""
from __future__ import annotations

import numpy as np

from caffe_compat import io as caffe_io
from caffe_compat.engine.layers.base import TEST
from caffe_compat.pycaffe import Net


def configure_transformer(net: Net, mean=None, input_scale=None, raw_scale=None,
                          channel_swap=None) -> caffe_io.Transformer:
    """The Transformer Classifier and Detector share: HWC -> CHW, then the given options."""
    name = net.inputs[0]
    transformer = caffe_io.Transformer({name: net.blobs[name].data.shape})
    transformer.set_transpose(name, (2, 0, 1))
    if mean is not None:
        transformer.set_mean(name, mean)
    if input_scale is not None:
        transformer.set_input_scale(name, input_scale)
    if raw_scale is not None:
        transformer.set_raw_scale(name, raw_scale)
    if channel_swap is not None:
        transformer.set_channel_swap(name, channel_swap)
    return transformer


class Classifier(Net):
    """``Classifier(model_file, pretrained_file, image_dims=None, mean=None,
    input_scale=None, raw_scale=None, channel_swap=None)``.

    ``image_dims`` is the size images are resized to before cropping (default: the net's
    input size, i.e. the whole image). ``engine``: as ``caffe.Net``'s (a keyword of ours).
    """

    def __init__(self, model_file, pretrained_file, image_dims=None, mean=None,
                 input_scale=None, raw_scale=None, channel_swap=None, engine=None):
        super().__init__(model_file, TEST, weights=pretrained_file, engine=engine)
        self.transformer = configure_transformer(self, mean, input_scale, raw_scale,
                                                 channel_swap)
        self.crop_dims = np.array(self.blobs[self.inputs[0]].data.shape[2:])
        self.image_dims = self.crop_dims if image_dims is None or not len(image_dims) \
            else image_dims

    def predict(self, inputs, oversample: bool = True) -> np.ndarray:
        """(N, C) class probabilities for N (H, W, K) images: the mean over ten crops, or
        the centre crop only with ``oversample=False``."""
        resized = np.zeros((len(inputs), self.image_dims[0], self.image_dims[1],
                            inputs[0].shape[2]), dtype=np.float32)
        for ix, image in enumerate(inputs):
            resized[ix] = caffe_io.resize_image(image, self.image_dims)
        if oversample:
            crops = caffe_io.oversample(resized, self.crop_dims)
        else:
            center = np.array(self.image_dims) / 2.0
            box = np.concatenate([center - self.crop_dims / 2.0,
                                  center + self.crop_dims / 2.0]).astype(int)
            crops = resized[:, box[0]:box[2], box[1]:box[3], :]
        name = self.inputs[0]
        caffe_in = np.zeros(np.array(crops.shape)[[0, 3, 1, 2]], dtype=np.float32)
        for ix, crop in enumerate(crops):
            caffe_in[ix] = self.transformer.preprocess(name, crop)
        predictions = self.forward_all(**{name: caffe_in})[self.outputs[0]]
        if oversample:
            predictions = predictions.reshape((len(predictions) // 10, 10, -1)).mean(1)
        return predictions
