"""Data layers: Data (LMDB/LevelDB), ImageData (image lists), HDF5Data, MemoryData.

They take no bottoms; each ``forward()`` returns the next batch: data (N, C, H, W) float32,
label (N,) float32 and, with a third top, landmarks (N, K, 3) as (x, y, visible) in the
pixel coordinates of the output image. Data and ImageData decode and transform batches in
background threads ``prefetch`` batches ahead; batch k's random draws (mirror, crop, shuffle)
come from a generator seeded by (solver random_seed, layer name, phase, k), so a seeded run
repeats exactly. Without a seed each run draws a fresh one.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import Sequence

import numpy as np

from caffe_compat.formats.datum import decode_datum
from caffe_compat.data.db import open_db
from caffe_compat.formats.errors import DataError
from caffe_compat.formats.hdf5 import check_dataset, dataset, open_hdf5, read_dataset
from caffe_compat.data.image_list import read_image_list
from caffe_compat.formats.images import hwc_to_chw, read_image
from caffe_compat.data.landmarks import NUM_LANDMARKS, read_landmarks, resize_landmarks
from caffe_compat.data.transformer import DataTransformer
from caffe_compat.engine import distributed
from caffe_compat.data.source_layer import (_BATCH_STREAM, _EPOCH_STREAM, _SKIP_STREAM,
                                            _DataLayer)
from caffe_compat.engine.layers.base import TRAIN, Shape, register

log = logging.getLogger(__name__)


class _Batcher:
    """Turns (image, label, landmarks) items into one transformed batch (no layer reference,
    so worker threads never keep the layer alive)."""

    def __init__(self, transformer: DataTransformer, num_landmarks: int, want_landmarks: bool):
        self.transformer = transformer
        self.k = num_landmarks
        self.want_landmarks = want_landmarks

    def __call__(self, items, rng: np.random.Generator, names):
        n = len(items)
        shape = self.transformer.output_shape(items[0][0].shape)
        data = np.empty((n,) + shape, dtype=np.float32)
        labels = np.empty((n,), dtype=np.float32)
        marks = np.zeros((n, self.k, 3), dtype=np.float32) if self.want_landmarks else None
        for i, (img, label, lm) in enumerate(items):
            out_shape = self.transformer.output_shape(img.shape)
            if out_shape != shape:
                raise DataError(f"{names[i]}: image is {'×'.join(map(str, img.shape))}, giving "
                                f"{'×'.join(map(str, out_shape))} where the batch is "
                                f"{'×'.join(map(str, shape))} (resize the data or set crop_size)")
            draw = self.transformer.draw(rng, img.shape)
            self.transformer.apply(img, draw, out=data[i])
            labels[i] = label
            if marks is not None:
                if lm is None or len(lm) != self.k:
                    got = 0 if lm is None else len(lm)
                    raise DataError(f"{names[i]}: has {got} landmarks, the layer needs {self.k}")
                marks[i] = self.transformer.apply_landmarks(lm, draw, img.shape)
        return (data, labels) + ((marks,) if marks is not None else ())


@register
class Data(_DataLayer):
    """Datum records from an LMDB or LevelDB, in key order, wrapping around at the end."""

    type = "Data"
    num_tops = (1, 3)

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        dp = param.data_param
        if dp.batch_size <= 0:
            raise self.error("data_param.batch_size must be positive")
        self.batch_size = dp.batch_size
        try:
            db = open_db(dp.source, dp.backend)
        except DataError as exc:
            raise self._wrap(exc) from None
        try:
            self._setup(dp, db, phase)
        except BaseException:
            db.close()
            raise

    def _setup(self, dp, db, phase):
        try:
            keys = db.keys()
            if not keys:
                raise DataError(f"{dp.source}: database is empty")
            tp = self._merged_transform(dp)
            if dp.force_encoded_color:
                tp.force_color = True
            transformer = DataTransformer(tp, phase, where=f"layer '{self.name}' (Data)")
            img, _, lm = self._decode(db, keys[0], transformer)
            out = transformer.output_shape(img.shape)
        except DataError as exc:
            raise self._wrap(exc) from None
        k = dp.num_landmarks or (len(lm) if lm is not None else NUM_LANDMARKS)
        if self.num_top == 3 and lm is None:
            raise self.error(f"a third (landmarks) top needs records with landmarks; "
                             f"'{dp.source}' has none (convert_imageset --landmarks)")
        if self.num_top == 3 and len(lm) != k:
            raise self.error(f"num_landmarks is {k} but the records of '{dp.source}' hold "
                             f"{len(lm)}")
        log.info("%s: output data size: %s", self.name, ",".join(map(str, (dp.batch_size,) + out)))
        self._shapes = [(self.batch_size,) + out, (self.batch_size,), (self.batch_size, k, 3)]
        produce = _DBBatches(db, keys, self.batch_size, _Batcher(transformer, k,
                                                                 self.num_top == 3),
                             self._seed, dp.source)
        if phase == TRAIN:
            produce.stride = (distributed.solver_count(), distributed.solver_rank())
        self._start(produce, dp.prefetch, on_exit=db.close)

    @staticmethod
    def _decode(db, key, transformer):
        return decode_datum(db.get(key), transformer.force_color, transformer.force_gray,
                            where=f"{db.path}: record {key.decode(errors='replace')}")


class _DBBatches:
    """produce(k) for Data: records k·N .. k·N+N−1 of the database, modulo its length."""

    def __init__(self, db, keys, batch_size, batcher, seed, source):
        self.db, self.keys, self.n, self.batcher = db, keys, batch_size, batcher
        self.seed, self.source = seed, source
        self.stride = (1, 0)        # (world size, rank); set for data-parallel TRAIN nets

    def __call__(self, k: int):
        count = len(self.keys)
        # Data-parallel TRAIN: rank r of W keeps records r, r+W, ... (Caffe's DataLayer::Skip).
        w, r = self.stride
        positions = [((k * self.n + i) * w + r) % count for i in range(self.n)]
        if k > 0 and (k * self.n) // count != ((k + 1) * self.n - 1) // count:
            log.debug("Restarting data prefetching from start (%s).", self.source)
        keys = [self.keys[p] for p in positions]
        names = [f"{self.source}: record {key.decode(errors='replace')}" for key in keys]
        items = [self.decode(v, name) for v, name in zip(self.db.get_many(keys), names)]
        rng = np.random.default_rng(self.seed + [_BATCH_STREAM, k])
        return self.batcher(items, rng, names)

    def decode(self, value: bytes, name: str):
        """One record as the batcher's item (AnnotatedData reads AnnotatedDatum instead)."""
        t = self.batcher.transformer
        return decode_datum(value, t.force_color, t.force_gray, where=name)


@register
class ImageData(_DataLayer):
    """Images named in a list file, read with OpenCV; optional shuffle at every epoch."""

    type = "ImageData"
    num_tops = (1, 3)

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        ip = param.image_data_param
        if ip.batch_size <= 0:
            raise self.error("image_data_param.batch_size must be positive")
        if (ip.new_height > 0) != (ip.new_width > 0):
            raise self.error("new_height and new_width must be set together")
        if ip.new_dim > 0 and ip.new_height > 0:
            raise self.error("new_dim (shorter side) and new_height/new_width cannot both be set")
        self.batch_size = ip.batch_size
        try:
            entries = read_image_list(ip.source)
            if not entries:
                raise DataError(f"{ip.source}: list file has no images")
            marks = read_landmarks(ip.landmark_file) if ip.landmark_file else None
            transformer = DataTransformer(self._merged_transform(ip), phase,
                                          where=f"layer '{self.name}' (ImageData)")
            reader = _ImageReader(entries, ip, marks)
            skip = 0
            if ip.rand_skip:
                skip = int(self._seq(_SKIP_STREAM, 0).integers(ip.rand_skip))
            order = _Order(len(entries), ip.shuffle, self._seed, skip)
            img, _, _ = reader(order.index(0))
            out = transformer.output_shape(img.shape)
        except DataError as exc:
            raise self._wrap(exc) from None
        if self.num_top == 3 and marks is None:
            raise self.error("a third (landmarks) top needs image_data_param.landmark_file")
        k = ip.num_landmarks or NUM_LANDMARKS
        log.info("%s: output data size: %s", self.name, ",".join(map(str, (ip.batch_size,) + out)))
        self._shapes = [(self.batch_size,) + out, (self.batch_size,), (self.batch_size, k, 3)]
        batcher = _Batcher(transformer, k, self.num_top == 3)
        self._start(_ListBatches(reader, order, self.batch_size, batcher, self._seed),
                    param.data_param.prefetch)


class _ImageReader:
    """Reads list entry i as (C×H×W uint8, label, landmarks in the resized frame)."""

    def __init__(self, entries, ip, marks):
        self.entries, self.marks = entries, marks
        self.source, self.root = ip.source, ip.root_folder
        self.h, self.w, self.color = ip.new_height, ip.new_width, ip.is_color
        self.shorter_side, self.bicubic = ip.new_dim, ip.bicubic
        self.landmark_file = ip.landmark_file
        self.cwd = os.getcwd()   # relative paths stay relative to where the net was built

    def name(self, i: int) -> str:
        return f"{self.source}:{self.entries[i].line}"

    def __call__(self, i: int):
        e = self.entries[i]
        img = read_image(self.root + e.path, 0, 0, self.color, where=self.name(i), base=self.cwd)
        lm = None
        if self.marks is not None:
            if e.path not in self.marks:
                raise DataError(f"{self.landmark_file}: no landmarks for '{e.path}' "
                                f"(listed at {self.name(i)})")
            lm = self.marks[e.path]
        size = (self.h, self.w) if self.h > 0 and self.w > 0 else None
        if self.shorter_side > 0:
            size = shorter_side_size(img.shape[:2], self.shorter_side)
        if size is not None:
            import cv2
            if lm is not None:
                lm = resize_landmarks(lm, img.shape[:2], size)
            interpolation = cv2.INTER_CUBIC if self.bicubic and self.shorter_side else \
                cv2.INTER_LINEAR
            img = cv2.resize(img, size[::-1], interpolation=interpolation)
        return hwc_to_chw(img), e.label, lm


def shorter_side_size(hw: tuple[int, int], side: int) -> tuple[int, int]:
    """(height, width) with the shorter side ``side`` and the aspect ratio kept: the
    channel-pruning fork's ``new_dim`` (the factor is a float32, the long side rounded half
    away from zero as C's round())."""
    h, w = hw
    factor = np.float32(side) / np.float32(min(h, w))
    if h >= w:
        return int(np.floor(np.float32(factor * np.float32(h)) + 0.5)), side
    return side, int(np.floor(np.float32(factor * np.float32(w)) + 0.5))


class _Order:
    """Which list entry sits at stream position p: epochs of (optionally shuffled) lines."""

    def __init__(self, count: int, shuffle: bool, seed, skip: int = 0):
        self.count, self.shuffle, self.seed, self.skip = count, shuffle, seed, skip
        self._perms: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def _perm(self, epoch: int) -> np.ndarray:
        with self._lock:
            perm = self._perms.get(epoch)
            if perm is None:
                perm = np.random.default_rng(self.seed + [_EPOCH_STREAM, epoch]).permutation(
                    self.count)
                self._perms[epoch] = perm
                for old in [e for e in self._perms if e < epoch - 2]:
                    del self._perms[old]
            return perm

    def index(self, p: int) -> int:
        epoch, i = divmod(p + self.skip, self.count)
        return int(self._perm(epoch)[i]) if self.shuffle else i


class _ListBatches:
    """produce(k) for ImageData: stream positions k·N .. k·N+N−1."""

    def __init__(self, reader, order, batch_size, batcher, seed):
        self.reader, self.order, self.n, self.batcher, self.seed = (reader, order, batch_size,
                                                                    batcher, seed)

    def __call__(self, k: int):
        idx = [self.order.index(k * self.n + i) for i in range(self.n)]
        items = [self.reader(i) for i in idx]
        rng = np.random.default_rng(self.seed + [_BATCH_STREAM, k])
        return self.batcher(items, rng, [self.reader.name(i) for i in idx])
