"""Caffe's ten-crop test (classify.py's default ``--oversample``) on a run's test LMDB.

pycaffe's ``Classifier.predict`` scores each image as the mean of the class probabilities of
ten crops: the four corners and the centre, and the same five mirrored (``caffe.io.
oversample``). A run's own test sees only the centre crop. Here each record is transformed
as the TEST Data layer does it (mean image of the records subtracted, then ``scale``), the
ten crops are cut from it in pycaffe's order, and a fresh float32 deploy net with the
caffemodel scores them, so that the centre-crop figure equals the Data-layer test's.
"""
from __future__ import annotations

import os
import time

import numpy as np

CROPS = 10
CENTRE, CENTRE_MIRRORED = 4, 9        # positions in caffe.io.oversample's order


def eval_transform(net_param) -> tuple[float, int]:
    """(scale, crop_size) of the TEST-phase Data layer of a train_val NetParameter."""
    from caffe_compat.proto import caffe_pb2
    for lp in net_param.layer:
        phases = {r.phase for r in lp.include if r.HasField("phase")}
        if lp.type == "Data" and (not phases or caffe_pb2.TEST in phases):
            tp = lp.transform_param
            if tp.crop_size:
                return (tp.scale if tp.HasField("scale") else 1.0), tp.crop_size
    raise ValueError("no TEST-phase Data layer with a crop_size: ten crops need one")


def read_records(db: str | os.PathLike, mean: np.ndarray, scale: float
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Every record of ``db`` as float32 (N, H, W, C) after mean and scale, and the labels."""
    from caffe_compat.data.db import open_db
    from caffe_compat.formats.blob_io import datum_to_array
    from caffe_compat.proto import caffe_pb2
    images, labels = [], []
    with open_db(db) as reader:
        for _, value in reader.items():
            datum = caffe_pb2.Datum.FromString(value)
            images.append(((datum_to_array(datum) - mean) * scale).astype(np.float32))
            labels.append(datum.label)
    return np.stack(images).transpose(0, 2, 3, 1), np.asarray(labels)


def probabilities(deploy: str, model: str, images: np.ndarray, crop: int, batch: int = 20,
                  progress=None) -> np.ndarray:
    """(N, 10, classes): the float32 deploy net's output for each image's ten crops, in
    caffe.io.oversample's order (corners, centre, then the same mirrored)."""
    import caffe
    net = caffe.Net(deploy, model, caffe.TEST)
    out = net.outputs[-1]
    probs = []
    for first in range(0, len(images), batch):
        crops = caffe.io.oversample(list(images[first:first + batch]), (crop, crop))
        x = np.ascontiguousarray(crops.transpose(0, 3, 1, 2))
        net.blobs["data"].reshape(*x.shape)
        net.blobs["data"].data[...] = x
        probs.append(net.forward()[out].reshape(len(x) // CROPS, CROPS, -1).copy())
        if progress:
            progress(min(first + batch, len(images)), len(images))
    return np.concatenate(probs)


def score(deploy: str, model: str, db: str, mean_file: str, scale: float, crop: int,
          progress=None) -> dict:
    """Accuracy of ``model`` on every record of ``db``: centre crop, centre + its mirror,
    and all ten crops (mean of the probabilities), with the seconds it took."""
    from caffe_compat.formats.blob_io import read_blobproto
    start = time.perf_counter()
    mean = read_blobproto(mean_file)
    mean = mean.reshape(mean.shape[-3:])            # (1, C, H, W) as compute_mean writes it
    images, labels = read_records(db, mean, scale)
    p = probabilities(deploy, model, images, crop, progress=progress)

    def accuracy(scores):
        return float((scores.argmax(1) == labels).mean())
    return {"model": model, "images": len(labels), "crop": crop,
            "centre": accuracy(p[:, CENTRE]),
            "centre_mirror": accuracy(p[:, CENTRE] + p[:, CENTRE_MIRRORED]),
            "ten_crop": accuracy(p.mean(1)), "seconds": time.perf_counter() - start}


def markdown_row(check: dict) -> str:
    """One row for the full-run report's Measured table."""
    return (f"| the same caffemodel, Caffe's ten-crop test (classify.py's oversampling: "
            f"corners + centre, mirrored; probabilities averaged; float32) | "
            f"**{check['ten_crop'] * 100:.2f}%** (centre crop {check['centre'] * 100:.2f}%, "
            f"centre + mirror {check['centre_mirror'] * 100:.2f}%) |")


__all__ = ["eval_transform", "read_records", "probabilities", "score", "markdown_row"]
