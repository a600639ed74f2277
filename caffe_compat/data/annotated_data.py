"""AnnotatedData (weiliu89/caffe, SSD): images with boxes from an LMDB/LevelDB of
AnnotatedDatum records (``tools/convert_annoset.py`` writes them), augmented for detection.

Tops: data (N, C, H, W) and, optionally, label. For records with an annotation type (boxes)
the label is (1, 1, G, 8): one row per box that survives augmentation, over the whole batch,
``[item_id, group_label, instance_id, xmin, ymin, xmax, ymax, difficult]`` with coordinates
normalised to the output image; a batch without any box gives one row of -1. Records
without a type (convert_annoset --anno-type classification) give the Datum labels as
(N, 1, 1, 1), as the fork does.

The augmentation is ``annotated_transform.AnnotatedTransformer``; it runs in whichever phase
the prototxt asks for (SSD's TEST nets simply set no sampler, distortion or expansion).
Records are read in key order, wrapping around; batch k draws its random numbers from a
generator seeded by (solver random_seed, layer name, phase, k), as the other data layers do.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import cv2
import numpy as np

from caffe_compat.data.annotated_transform import AnnotatedTransformer
from caffe_compat.data.bbox import Boxes
from caffe_compat.data.im_transforms import FIT_SMALL_SIZE
from caffe_compat.data.layers import Data, _DBBatches
from caffe_compat.engine import distributed
from caffe_compat.engine.layers.base import TRAIN, register
from caffe_compat.engine.layers.ssd import SSD
from caffe_compat.formats.errors import DataError
from caffe_compat.formats.images import decode_image

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Record:
    """One decoded AnnotatedDatum."""
    img: np.ndarray      # H×W×C uint8
    boxes: Boxes
    encoded: bool
    label: int           # the Datum's label (classification records)
    has_type: bool


def decode_record(value: bytes, force_color: bool, force_gray: bool, where: str) -> Record:
    """A serialized AnnotatedDatum as a Record; DataError naming ``where`` if it is not one."""
    from caffe_compat.proto import caffe_pb2
    msg = caffe_pb2.AnnotatedDatum()
    try:
        msg.ParseFromString(value)
    except Exception:
        raise DataError(f"{where}: not an AnnotatedDatum (convert_annoset writes them; "
                        "a Datum database is read by a Data layer)") from None
    d = msg.datum
    try:
        if d.encoded:
            img = decode_image(d.data, force_color, force_gray).transpose(1, 2, 0)
        elif len(d.data):
            shape = (d.channels, d.height, d.width)
            if min(shape) <= 0 or len(d.data) != shape[0] * shape[1] * shape[2]:
                raise DataError(f"{len(d.data)} bytes of data for shape "
                                f"{'×'.join(map(str, shape))}")
            img = np.frombuffer(d.data, dtype=np.uint8).reshape(shape).transpose(1, 2, 0)
        else:
            raise DataError("the record has no 8-bit image (float_data records cannot be "
                            "augmented: the fork's crops and expansions copy bytes)")
    except DataError as exc:
        raise DataError(f"{where}: {exc}") from None
    return Record(np.ascontiguousarray(img), Boxes.from_record(msg), bool(d.encoded),
                  int(d.label), msg.HasField("type"))


class _Batcher:
    """Records → (data, label) arrays for one batch (keeps no reference to the layer)."""

    def __init__(self, transformer: AnnotatedTransformer, has_type: bool, forced_type: bool,
                 free_shape: bool):
        self.transformer = transformer
        self.has_type, self.forced_type, self.free_shape = has_type, forced_type, free_shape

    def __call__(self, records: list[Record], rng: np.random.Generator, names):
        expected = self.transformer.output_shape(records[0].img.shape)
        data, rows = [], []
        for i, (rec, name) in enumerate(zip(records, names)):
            pixels, boxes = self._item(rec, name, rng)
            if pixels.shape != expected and not self.free_shape:
                raise DataError(f"{name}: augmented to {'×'.join(map(str, pixels.shape))} "
                                f"where the batch is {'×'.join(map(str, expected))} (give "
                                "transform_param a resize_param or crop_size)")
            data.append(pixels)
            rows.append(label_rows(i, boxes))
        if not self.has_type:
            labels = np.array([r.label for r in records], dtype=np.float32)
            return np.stack(data), labels.reshape(-1, 1, 1, 1)
        if not sum(map(len, rows)):        # no box left in the whole batch
            return np.stack(data), -np.ones((1, 1, 1, 8), np.float32)
        return np.stack(data), np.concatenate(rows).reshape(1, 1, -1, 8)

    def _item(self, rec: Record, name: str, rng: np.random.Generator):
        if self.has_type and not rec.has_type and not self.forced_type:
            raise DataError(f"{name}: record has no annotation type where the first had "
                            "one (set annotated_data_param.anno_type)")
        try:
            return self.transformer.item(rec.img, rec.boxes, rec.encoded, rng)
        except DataError as exc:
            raise DataError(f"{name}: {exc}") from None
        except cv2.error as exc:    # an option OpenCV cannot apply to this image
            reason = " ".join((exc.err or str(exc)).replace(">", " ").split())
            raise DataError(f"{name}: OpenCV could not augment its {rec.img.shape[2]}-channel "
                            f"image ({reason})") from None


def label_rows(item: int, boxes: Boxes) -> np.ndarray:
    """The label top's rows for one image: item, group label, instance, box, difficult."""
    rows = np.empty((len(boxes), 8), dtype=np.float32)
    rows[:, 0] = item
    rows[:, 1] = boxes.label
    rows[:, 2] = boxes.instance
    rows[:, 3:7] = boxes.xyxy
    rows[:, 7] = boxes.difficult
    return rows


class _AnnoBatches(_DBBatches):
    """produce(k) for AnnotatedData: Data's record order, AnnotatedDatum decoding."""

    def decode(self, value: bytes, name: str) -> Record:
        tp = self.batcher.transformer.tp
        return decode_record(value, tp.force_color, tp.force_gray, name)


@register
class AnnotatedData(Data):
    """SSD's detection data layer: AnnotatedDatum records, batch samplers, distortion,
    expansion, resize, mirror; tops data and the (1, 1, G, 8) box label. Data's database
    handling, its own records and transforms."""

    type = "AnnotatedData"
    num_tops = (1, 2)
    family = "data"
    origin = SSD

    def _setup(self, dp, db, phase):
        tp, ap = self.param.transform_param, self.param.annotated_data_param
        free_shape = (tp.HasField("resize_param")
                      and tp.resize_param.resize_mode == FIT_SMALL_SIZE)
        if free_shape and dp.batch_size != 1:
            raise self.error("resize_param FIT_SMALL_SIZE needs data_param.batch_size 1 "
                             "(its images differ in size)")
        try:
            keys = db.keys()
            if not keys:
                raise DataError(f"{dp.source}: database is empty")
            first = decode_record(db.get(keys[0]), tp.force_color, tp.force_gray,
                                  f"{dp.source}: record {keys[0].decode(errors='replace')}")
            transformer = AnnotatedTransformer(tp, ap.batch_sampler, phase, first.img.shape[2],
                                               f"layer '{self.name}' (AnnotatedData)")
            out = transformer.output_shape(first.img.shape)
        except DataError as exc:
            raise self._wrap(exc) from None
        has_type = first.has_type or ap.HasField("anno_type")
        if first.has_type and ap.HasField("anno_type"):
            log.warning("%s: anno_type overrides the type stored in the records", self.name)
        label = (1, 1, max(len(first.boxes), 1), 8) if has_type else (self.batch_size, 1, 1, 1)
        log.info("%s: output data size: %s", self.name, ",".join(map(str, (dp.batch_size,) + out)))
        self._shapes = [(self.batch_size,) + out, label]
        batcher = _Batcher(transformer, has_type, ap.HasField("anno_type"), free_shape)
        produce = _AnnoBatches(db, keys, self.batch_size, batcher, self._seed, dp.source)
        if phase == TRAIN:
            produce.stride = (distributed.solver_count(), distributed.solver_rank())
        self._start(produce, dp.prefetch, on_exit=db.close)
