"""Fashion-MNIST's IDX files: reading them, the project's image names, and full-set LMDBs."""
from __future__ import annotations

import gzip
import os
import time
from pathlib import Path

import numpy as np

from caffe_compat.formats.errors import DataError
from experiments.defaults import CLASSES

FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally .gz) as a uint8 array."""
    for candidate in (path, path.with_name(path.name + ".gz")):
        if candidate.is_file():
            opener = gzip.open if candidate.suffix == ".gz" else open
            with opener(candidate, "rb") as f:
                raw = f.read()
            break
    else:
        raise DataError(f"{path}(.gz): IDX file does not exist (apt-get install "
                        "dataset-fashion-mnist, or pass --idx-dir)")
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path}: truncated IDX file")
    return data.reshape(dims)


def load(idx_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images_name, labels_name = FILES[split]
    images = read_idx(idx_dir / images_name)
    labels = read_idx(idx_dir / labels_name)
    if len(images) != len(labels):
        raise DataError(f"{idx_dir}: {len(images)} {split} images but {len(labels)} labels")
    return images, labels


def rel_name(index: int, label: int, prefix: str = "") -> str:
    return f"{prefix}{CLASSES[label]}/{index:05d}.png"


def build_lmdbs(idx_dir: Path, db: Path, size: int, color: bool,
                exclude_train: frozenset[int] = frozenset(), pad: int = 0) -> float:
    """Train/test LMDBs with landmarks and the train mean; returns seconds (0 if present).

    ``pad``: each image is resized to size - 2·pad and framed by ``pad`` black pixels (the
    Fashion-MNIST background), so that a crop of size - 2·pad sees the whole garment at the
    centre and random crops shift it by up to ±pad, as CIFAR-style padded records do.

    ``exclude_train``: training-set indices left out of the train LMDB (the images of
    data/fashion50, for pretraining that never sees a fine-tuning image). Record keys keep
    each image's IDX index, so what went in can be checked afterwards.
    """
    import cv2

    from caffe_compat.formats.blob_io import write_blobproto
    from caffe_compat.data.convert import compute_mean, progress
    from caffe_compat.data.db import DBWriter
    from caffe_compat.data.landmarks import resize_landmarks, silhouette_landmarks
    from caffe_compat.proto import caffe_pb2
    if (db / "mean.binaryproto").is_file():
        return 0.0
    start = time.perf_counter()
    db.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        images, labels = load(idx_dir, split)
        keep = [n for n in range(len(images)) if split != "train" or n not in exclude_train]
        if not keep:
            raise ValueError(f"{idx_dir}: no {split} image left to write (the IDX set holds "
                             f"{len(images)}, {len(images) - len(keep)} of them left out)")
        with DBWriter(db / split, "lmdb", overwrite=True) as out:
            for n in progress(keep, total=len(keep), desc=split):
                img, label = images[n], labels[n]
                inner = size - 2 * pad
                lm = resize_landmarks(silhouette_landmarks(img), img.shape, (inner, inner))
                lm[:, :2] += pad                           # x, y move with the frame
                big = cv2.resize(img, (inner, inner))      # bilinear, as convert_imageset
                big = cv2.copyMakeBorder(big, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
                chw = np.repeat(big[None], 3, axis=0) if color else big[None]
                datum = caffe_pb2.Datum(channels=chw.shape[0], height=size, width=size,
                                        data=chw.tobytes(), label=int(label), encoded=False)
                datum.float_data.extend(lm.ravel().tolist())
                out.put(f"{n:08d}_{rel_name(n, int(label), split + '/')}",
                        datum.SerializeToString())
        print(f"wrote {db / split} ({len(keep)} records, {chw.shape[0]}×{size}×{size}, "
              f"{pad}-pixel frame, landmarks)")
    write_blobproto(db / "mean.binaryproto", compute_mean(os.fspath(db / "train")))
    return time.perf_counter() - start
