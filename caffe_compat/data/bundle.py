"""A model bundle's preprocessing: the TEST data layer's work on one image file, exactly.

A bundle folder holds ``deploy.prototxt``, ``weights.caffemodel``, ``labels.txt``,
``preprocess.json`` and, when the training subtracted a mean image, ``mean.binaryproto``.
``preprocess.json`` records what made the training's TEST blobs from an image file:

- ``resize`` [H, W]: the size convert_imageset stored (OpenCV's bilinear ``cv2.resize``,
  ``resize_method``), ``color``: read as 3-channel BGR (``channel_order``) or grey;
- then the DataTransformer at TEST: the centre ``crop`` (0: none), ``mean_file`` (a file in
  the bundle) or ``mean_values``, ``scale`` — ``(pixel - mean) * scale`` in float32;
  ``raw_scale`` 255: the pixels are the file's 0..255 values.

``Preprocess.blob_from_file(path)`` gives the same float32 bytes the Data layer fed the net
for that image; an array in OpenCV's layout (H×W×C uint8 BGR) goes through
``blob_from_array``. Errors name the bundle file at fault.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from caffe_compat.data.transformer import TEST, DataTransformer, Draw, load_mean_file
from caffe_compat.formats import images
from caffe_compat.formats.errors import DataError

PREPROCESS = "preprocess.json"
DEPLOY, WEIGHTS, LABELS, MEAN = ("deploy.prototxt", "weights.caffemodel", "labels.txt",
                                 "mean.binaryproto")
RESIZE_METHOD = "cv2.resize INTER_LINEAR (convert_imageset)"


def read_labels_file(path: str | os.PathLike, outputs: int | None = None) -> list[str]:
    """Labels by class index, one a line; a file with fewer lines than the net has outputs
    is an error naming both counts."""
    try:
        labels = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    except OSError as exc:
        raise DataError(f"{path}: cannot read the labels file ({exc.strerror or exc})") from None
    while labels and not labels[-1]:
        labels.pop()
    if outputs is not None and len(labels) < outputs:
        raise DataError(f"{path}: {len(labels)} label(s) but the net has {outputs} outputs "
                        "(one label per line, line i naming class i)")
    return labels


@dataclass
class Preprocess:
    """The preprocessing of one bundle (see the module docstring for the fields)."""
    spec: dict
    folder: Path

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "Preprocess":
        folder = Path(folder)
        path = folder / PREPROCESS
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise DataError(f"{path}: cannot read the bundle's preprocessing "
                            f"({exc.strerror or exc}); is {folder} a model bundle?") from None
        except ValueError as exc:
            raise DataError(f"{path}: not valid JSON ({exc})") from None
        for key in ("resize", "input_shape", "scale", "input_blob"):
            if key not in spec:
                raise DataError(f"{path}: missing '{key}'")
        pre = cls(spec, folder)
        pre.transformer = pre._transformer()
        pre._check_mean()
        return pre

    @property
    def resize(self) -> tuple[int, int]:
        return int(self.spec["resize"][0]), int(self.spec["resize"][1])

    @property
    def channels(self) -> int:
        return int(self.spec["input_shape"][1])

    def _transformer(self) -> DataTransformer:
        from caffe_compat.proto import caffe_pb2
        param = caffe_pb2.TransformationParameter(scale=float(self.spec["scale"]),
                                                  crop_size=int(self.spec.get("crop") or 0))
        if self.spec.get("mean_file"):
            param.mean_file = os.fspath(self.folder / self.spec["mean_file"])
        param.mean_value.extend(self.spec.get("mean_values") or [])
        return DataTransformer(param, TEST, where=os.fspath(self.folder / PREPROCESS))

    def _check_mean(self) -> None:
        """The mean must be the stored image's size (the Data layer subtracts it before the
        crop); an error names both sizes."""
        mean = self.transformer.mean
        stored = (self.channels, *self.resize)
        if mean is not None and tuple(mean.shape) != stored:
            dims = "×".join
            raise DataError(f"{self.transformer.mean_file}: the mean is "
                            f"{dims(map(str, mean.shape))} but the images are "
                            f"{dims(map(str, stored))} (C×H×W) before the crop; use the mean "
                            "of the training database")
        out = self.transformer.output_shape(stored)
        want = tuple(int(d) for d in self.spec["input_shape"][1:])
        if out != want:
            raise DataError(f"{self.folder / PREPROCESS}: preprocessing gives {out} but the "
                            f"net's input is {want}")

    def read(self, path: str | os.PathLike) -> np.ndarray:
        """The image file as the data set stored it: H×W(×3) uint8 at ``resize``."""
        h, w = self.resize
        return images.read_image(os.fspath(path), h, w, self.channels == 3)

    def blob_from_array(self, image: np.ndarray) -> np.ndarray:
        """C×H×W float32 for an H×W×C uint8 BGR (or H×W grey) image in OpenCV's layout."""
        import cv2
        image = np.asarray(image)
        if image.dtype != np.uint8:
            raise DataError(f"expected a uint8 image as OpenCV reads it, got {image.dtype} "
                            "(for caffe.io.load_image's float RGB use Classifier.predict)")
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        if image.ndim == 2 and self.channels == 3:
            image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
        elif image.ndim == 3 and self.channels == 1:
            image = cv2.cvtColor(image[:, :, :3], cv2.COLOR_BGR2GRAY)
        elif image.ndim == 3 and image.shape[2] == 4:
            image = image[:, :, :3]
        if image.shape[:2] != self.resize:
            image = cv2.resize(image, (self.resize[1], self.resize[0]))
        chw = images.hwc_to_chw(image)
        c, h, w = chw.shape
        crop = self.transformer.crop_size
        draw = Draw(False, (h - crop) // 2 if crop else 0, (w - crop) // 2 if crop else 0)
        return self.transformer.apply(chw, draw)

    def blob_from_file(self, path: str | os.PathLike) -> np.ndarray:
        return self.blob_from_array(self.read(path))


def bundle_files(folder: str | os.PathLike) -> dict[str, Path]:
    """The bundle's deploy, weights and labels paths; a missing one is an error naming it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such model bundle folder")
    found = {"deploy": folder / DEPLOY, "weights": folder / WEIGHTS, "labels": folder / LABELS}
    for path in found.values():
        if not path.is_file():
            raise DataError(f"{path}: missing from the model bundle (make one with caffe "
                            "bundle or caffe fit)")
    return found


__all__ = ["Preprocess", "bundle_files", "read_labels_file", "load_mean_file", "PREPROCESS",
           "DEPLOY", "WEIGHTS", "LABELS", "MEAN", "RESIZE_METHOD"]
