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

    @classmethod
    def from_bundle(cls, folder, allow_missing_weights: bool = False) -> "BundleClassifier":
        """A classifier from a model bundle folder (``caffe fit`` / ``caffe bundle``): its
        deploy net and weights, its labels, and exactly the training's TEST preprocessing.
        Weights that leave a layer with parameters unfilled are an error unless
        ``allow_missing_weights``."""
        return BundleClassifier(folder, allow_missing_weights)


class BundleClassifier(Classifier):
    """``Classifier.from_bundle(B)``: ``top_k(image)`` → [(label, probability), ...];
    ``probabilities(images)``; ``predict`` keeps pycaffe's input (caffe.io.load_image's RGB
    floats in [0, 1]). Images are files (read as the data set read them) or OpenCV uint8
    arrays (H×W×3 BGR or H×W grey); every one gets the bundle's preprocessing, the centre
    crop of the TEST phase (no ten-crop oversampling: the training never saw one)."""

    def __init__(self, folder, allow_missing_weights: bool = False):
        from caffe_compat.data.bundle import Preprocess, bundle_files, read_labels_file
        from caffe_compat.engine import weights
        files = bundle_files(folder)
        self.preprocess = Preprocess.load(folder)
        Net.__init__(self, files["deploy"], TEST)
        weights.copy_from(self.module, str(files["weights"]),
                          require_all=not allow_missing_weights)
        self.folder = folder
        name = self.preprocess.spec["input_blob"]
        if name not in self.inputs:
            raise ValueError(f"{files['deploy']}: no input blob '{name}' (preprocess.json "
                             f"names it; the net's inputs are {', '.join(self.inputs)})")
        shape = tuple(self.blobs[name].data.shape[1:])
        if shape != tuple(self.preprocess.spec["input_shape"][1:]):
            raise ValueError(f"{files['deploy']}: input '{name}' is {shape} but "
                             f"preprocess.json gives {tuple(self.preprocess.spec['input_shape'])}")
        self.input_name = name
        self.output_name = self.preprocess.spec.get("output_blob") or self.outputs[0]
        classes = int(np.prod(self.blobs[self.output_name].data.shape[1:]))
        self.labels = read_labels_file(files["labels"], classes)[:classes]
        spec = self.preprocess.spec
        mean = self.preprocess.transformer.mean
        self.transformer = configure_transformer(
            self, None if mean is None and not spec.get("mean_values") else
            (mean if mean is not None else np.asarray(spec["mean_values"], np.float32)),
            float(spec["scale"]), 255.0, (2, 1, 0) if self.preprocess.channels == 3 else None)
        self.crop_dims = np.array(shape[1:])
        self.image_dims = np.array(self.preprocess.resize)

    def blob(self, image) -> np.ndarray:
        """The C×H×W float32 input for one image file or OpenCV uint8 array."""
        if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
            return self.preprocess.blob_from_file(image)
        return self.preprocess.blob_from_array(image)

    def probabilities(self, images, batch_size: int = 64) -> np.ndarray:
        """(N, classes) for N image files or arrays, ``batch_size`` at a time."""
        images = list(images)
        chunks = [self.forward_blobs(np.stack([self.blob(i) for i in
                                               images[start:start + batch_size]]))
                  for start in range(0, len(images), max(1, batch_size))]
        return np.concatenate(chunks) if chunks else np.zeros((0, len(self.labels)), np.float32)

    def forward_blobs(self, batch: np.ndarray) -> np.ndarray:
        """(N, classes) for an N×C×H×W batch of preprocessed blobs."""
        return self._forward(batch, [self.output_name])[0].reshape(len(batch), -1)

    def _forward(self, batch: np.ndarray, names: list[str]) -> list[np.ndarray]:
        self.blobs[self.input_name].reshape(*batch.shape)
        self.reshape()
        out = self.forward(blobs=names, **{self.input_name: batch})
        return [np.array(out[name], copy=True) for name in names]

    @property
    def heatmap_blob(self) -> str | None:
        """A landmark model's heatmap blob (preprocess.json ``heatmap_blob``), else None."""
        return self.preprocess.spec.get("heatmap_blob")

    def probabilities_and_heatmaps(self, images, batch_size: int = 64):
        """(N, classes) probabilities and (N, K, H', W') heatmaps of a landmark bundle, one
        forward pass per batch; ValueError for a bundle without a heatmap branch."""
        name = self.heatmap_blob
        if not name or name not in self.blobs:
            raise ValueError(f"{self.folder}: not a landmark model (preprocess.json names no "
                             "heatmap_blob of the deploy net)")
        images, probs, maps = list(images), [], []
        for start in range(0, len(images), max(1, batch_size)):
            batch = np.stack([self.blob(i) for i in images[start:start + batch_size]])
            p, m = self._forward(batch, [self.output_name, name])
            probs.append(p.reshape(len(batch), -1))
            maps.append(m)
        return np.concatenate(probs), np.concatenate(maps)

    def top_k(self, image, k: int = 5) -> list[tuple[str, float]]:
        """The ``k`` most probable (label, probability) pairs for one image file or array."""
        probs = self.probabilities([image])[0]
        order = np.argsort(-probs, kind="stable")[:k]
        return [(self.labels[i], float(probs[i])) for i in order]

    def predict(self, inputs, oversample: bool = False) -> np.ndarray:
        """pycaffe's input: (H, W, K) RGB floats in [0, 1] (caffe.io.load_image). They are
        turned back into the 0..255 BGR bytes of the file and preprocessed as the bundle says;
        ``oversample`` is ignored (the training tested on the centre crop)."""
        arrays = []
        for image in inputs:
            pixels = np.clip(np.rint(np.asarray(image, np.float32) * 255.0), 0, 255)
            pixels = pixels.astype(np.uint8)
            arrays.append(pixels[:, :, ::-1] if pixels.ndim == 3 and pixels.shape[2] == 3
                          else pixels)
        return self.probabilities(arrays)
