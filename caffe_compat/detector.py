"""pycaffe's ``caffe.Detector``: classify windows (crops) of images, optionally with R-CNN
style context padding (the border outside the window is filled with the mean)."""
from __future__ import annotations

import os

import numpy as np

from caffe_compat import io as caffe_io
from caffe_compat.classifier import configure_transformer
from caffe_compat.engine.layers.base import TEST
from caffe_compat.pycaffe import Net


class Detector(Net):
    """``Detector(model_file, pretrained_file, mean=None, input_scale=None, raw_scale=None,
    channel_swap=None, context_pad=None)``; windows are (ymin, xmin, ymax, xmax)."""

    def __init__(self, model_file, pretrained_file, mean=None, input_scale=None,
                 raw_scale=None, channel_swap=None, context_pad=None):
        super().__init__(model_file, TEST, weights=pretrained_file)
        self.transformer = configure_transformer(self, mean, input_scale, raw_scale,
                                                 channel_swap)
        self.configure_crop(context_pad)

    def detect_windows(self, images_windows):
        """[{'window', 'prediction', 'filename'}] for each (filename, windows) pair."""
        images_windows = [(f, list(w)) for f, w in images_windows]
        crops = []
        for filename, windows in images_windows:
            image = caffe_io.load_image(filename).astype(np.float32)
            crops.extend(self.crop(image, window) for window in windows)
        name = self.inputs[0]
        caffe_in = np.zeros((len(crops), crops[0].shape[2]) + self.blobs[name].data.shape[2:],
                            dtype=np.float32)
        for ix, crop in enumerate(crops):
            caffe_in[ix] = self.transformer.preprocess(name, crop)
        predictions = self.forward_all(**{name: caffe_in})[self.outputs[0]]
        detections, ix = [], 0
        for filename, windows in images_windows:
            for window in windows:
                detections.append({"window": window, "prediction": predictions[ix],
                                   "filename": filename})
                ix += 1
        return detections

    def detect_selective_search(self, image_fnames):
        """detect_windows over Selective Search proposals, as pycaffe: the windows come from
        the selective_search_ijcv_with_python package (it runs MATLAB; caffe-compat does
        not ship it), given absolute paths so MATLAB finds the files."""
        try:
            import selective_search_ijcv_with_python as selective_search
        except ImportError as exc:
            raise ImportError("detect_selective_search needs the selective_search_ijcv_with_"
                              "python package (and MATLAB); install it, or compute windows "
                              f"yourself and call detect_windows ({exc})") from None
        image_fnames = [os.path.abspath(f) for f in image_fnames]
        windows_list = selective_search.get_windows(image_fnames, cmd="selective_search_rcnn")
        return self.detect_windows(zip(image_fnames, windows_list))

    def crop(self, im, window) -> np.ndarray:
        """The window of ``im``; with context_pad, enlarged so that a context_pad-pixel
        border of the net input is context, out-of-image parts filled with the mean."""
        window = np.asarray(window)
        crop = im[int(window[0]):int(window[2]), int(window[1]):int(window[3])]
        if not self.context_pad:
            return crop
        crop_size = self.blobs[self.inputs[0]].width          # assumes a square input
        scale = crop_size / (1.0 * crop_size - self.context_pad * 2)
        half_h = (window[2] - window[0] + 1) / 2.0
        half_w = (window[3] - window[1] + 1) / 2.0
        center = (window[0] + half_h, window[1] + half_w)
        box = np.round(np.tile(center, 2) + scale * np.array((-half_h, -half_w, half_h, half_w)))
        scale_h = crop_size / (box[2] - box[0] + 1)
        scale_w = crop_size / (box[3] - box[1] + 1)
        pad_y = int(round(max(0, -box[0]) * scale_h))
        pad_x = int(round(max(0, -box[1]) * scale_w))
        im_h, im_w = im.shape[:2]
        box = np.clip(box, 0.0, [im_h, im_w, im_h, im_w])
        clip_h, clip_w = box[2] - box[0] + 1, box[3] - box[1] + 1
        if clip_h <= 0 or clip_w <= 0:
            raise ValueError(f"window {list(window)} lies outside the {im_h}x{im_w} image")
        crop_h = min(int(round(clip_h * scale_h)), crop_size - pad_y)
        crop_w = min(int(round(clip_w * scale_w)), crop_size - pad_x)
        context = im[int(box[0]):int(box[2]), int(box[1]):int(box[3])]
        context = caffe_io.resize_image(context, (crop_h, crop_w))
        out = np.ones(self.crop_dims, dtype=np.float32) * self.crop_mean
        out[pad_y:pad_y + crop_h, pad_x:pad_x + crop_w] = context
        return out

    def configure_crop(self, context_pad) -> None:
        """Crop size from the net input; with context, the mean in image layout and scale."""
        name = self.inputs[0]
        transpose = self.transformer.transpose[name]
        inverse = [transpose[t] for t in transpose]
        self.crop_dims = np.array(self.blobs[name].data.shape[1:])[inverse]
        self.context_pad = context_pad
        if not context_pad:
            return
        mean = self.transformer.mean.get(name)
        if mean is None:
            self.crop_mean = np.zeros(self.crop_dims, dtype=np.float32)
            return
        crop_mean = np.broadcast_to(mean, self.blobs[name].data.shape[1:]).transpose(inverse)
        # at the mean's own precision (float64 stays float64), as pycaffe's copy of it
        crop_mean = np.array(crop_mean, dtype=np.result_type(crop_mean, np.float32))
        order = self.transformer.channel_swap.get(name)
        if order is not None:
            crop_mean = crop_mean[:, :, [list(order).index(i) for i in range(crop_mean.shape[2])]]
        raw_scale = self.transformer.raw_scale.get(name)
        if raw_scale is not None:
            crop_mean /= raw_scale
        self.crop_mean = crop_mean
