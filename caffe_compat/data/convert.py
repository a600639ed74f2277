"""The work of Caffe's ``convert_imageset`` and ``compute_image_mean``, as library functions.

``convert_imageset`` writes the same keys and Datum bytes as Caffe's tool; ``compute_mean``
sums in float32 in database order and divides by the count, as Caffe does, so the mean file
matches Caffe's bit for bit.
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field

import numpy as np

from caffe_compat.formats import images
from caffe_compat.data.db import DBWriter, open_db
from caffe_compat.formats.errors import DataError
from caffe_compat.data.image_list import read_image_list
from caffe_compat.data.landmarks import read_landmarks, resize_landmarks

log = logging.getLogger(__name__)


def progress(iterable, total=None, desc=None, enable: bool | None = None):
    """A tqdm bar on stderr, shown only when stderr is a terminal."""
    from tqdm import tqdm
    if enable is None:
        enable = sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, disable=not enable, unit="img",
                dynamic_ncols=True)


# ---------------------------------------------------------------------------- Datum


def make_datum(path: str, label: int, resize_height: int = 0, resize_width: int = 0,
               is_color: bool = True, encoding: str = "", landmarks: np.ndarray | None = None,
               where: str | None = None):
    """Caffe's ReadImageToDatum (+ landmarks in float_data). DataError if unreadable."""
    img = images.read_image(path, 0, 0, is_color, where)
    return image_datum(img, path, label, resize_height, resize_width, is_color, encoding,
                       landmarks)


def image_datum(img: np.ndarray, path: str, label: int, resize_height: int = 0,
                resize_width: int = 0, is_color: bool = True, encoding: str = "",
                landmarks: np.ndarray | None = None, rescaled: bool = False):
    """The Datum ``make_datum`` builds from the image file ``path``, decoded as ``img``
    (``rescaled``: ``img`` was already resized, so the file's own bytes cannot stand in)."""
    from caffe_compat.proto import caffe_pb2
    src_hw = img.shape[:2]
    if resize_height > 0 and resize_width > 0:
        import cv2
        img = cv2.resize(img, (resize_width, resize_height))
    datum = caffe_pb2.Datum()
    if encoding:
        same_colour = (img.ndim == 3) == is_color
        unchanged = not (resize_height or resize_width or rescaled)
        if same_colour and unchanged and _match_ext(path, encoding):
            with open(path, "rb") as f:   # Caffe's ReadFileToDatum: the file bytes as they are
                datum.data = f.read()
        else:
            datum.data = images.encode_image(img, encoding)
        datum.label = label
        datum.encoded = True
    else:
        chw = images.hwc_to_chw(img)
        datum.channels, datum.height, datum.width = chw.shape
        datum.data = chw.tobytes()
        datum.label = label
        datum.encoded = False
    if landmarks is not None:
        lm = resize_landmarks(landmarks, src_hw, img.shape[:2])
        datum.float_data.extend(lm.ravel().tolist())
    return datum


def _match_ext(path: str, encoding: str) -> bool:
    ext, enc = images.file_extension(path), encoding.lower()
    return ext == enc or (enc == "jpg" and ext == "jpeg")


# ---------------------------------------------------------------------------- convert


@dataclass
class ConvertReport:
    written: int = 0
    skipped: list[str] = field(default_factory=list)   # "list.txt:5: image ... (reason)"


def convert_imageset(root_folder: str, list_file: str, db_name: str, *, gray: bool = False,
                     shuffle: bool = False, backend: str = "lmdb", resize_height: int = 0,
                     resize_width: int = 0, check_size: bool = False, encoded: bool = False,
                     encode_type: str = "", landmark_file: str | None = None,
                     seed: int | None = None, overwrite: bool = False,
                     show_progress: bool | None = None, datums=None,
                     on_record=None) -> ConvertReport:
    """Build a Datum database from an image list, exactly as Caffe's convert_imageset.

    Keys are ``%08d_<path>`` with the index of the line (after the optional shuffle);
    unreadable images are reported and skipped but still use up their index. The database
    appears at ``db_name`` only when complete; DataError if no image could be written.
    ``datums(entry)``, when given, supplies each entry's Datum from images decoded earlier
    (``caffe dataset`` decodes every photo once, while it checks them) instead of reading it;
    with ``landmark_file`` it must carry the entry's landmarks (every entry must still have
    some in the file). ``on_record(done, total)`` is called after each list entry (written or skipped).
    """
    _check_convert_options(resize_height, resize_width, encode_type)
    entries = read_image_list(list_file)
    if shuffle:
        order = np.random.default_rng(seed).permutation(len(entries))
        entries = [entries[i] for i in order]
    marks = read_landmarks(landmark_file) if landmark_file else None
    report = ConvertReport()
    data_size = None
    with DBWriter(db_name, backend, overwrite=overwrite) as writer:
        for index, entry in enumerate(progress(entries, desc=os.path.basename(db_name),
                                               enable=show_progress)):
            where = f"{list_file}:{entry.line}"
            lm = None
            if marks is not None:
                if entry.path not in marks:
                    raise DataError(f"{landmark_file}: no landmarks for '{entry.path}' "
                                    f"(listed at {where})")
                lm = marks[entry.path]
            enc = encode_type
            if encoded and not enc:
                enc = images.file_extension(entry.path)
            try:
                datum = datums(entry) if datums else make_datum(
                    root_folder + entry.path, entry.label, resize_height, resize_width,
                    not gray, enc, lm, where)
            except DataError as exc:
                report.skipped.append(str(exc))
                log.warning("%s (skipped)", exc)
                if on_record is not None:
                    on_record(index + 1, len(entries))
                continue
            if check_size and not datum.encoded:
                if data_size is None:
                    data_size = len(datum.data)
                elif len(datum.data) != data_size:
                    raise DataError(f"{where}: image '{entry.path}' has {len(datum.data)} bytes, "
                                    f"the first had {data_size} (--check_size)")
            writer.put(f"{index:08d}_{entry.path}", datum.SerializeToString())
            report.written += 1
            if on_record is not None:
                on_record(index + 1, len(entries))
        if report.written == 0:
            raise DataError(f"{list_file}: no image could be read; database '{db_name}' "
                            "not written")
    return report


def _check_convert_options(resize_height: int, resize_width: int, encode_type: str) -> None:
    """Options Caffe would silently misuse are refused before anything is written."""
    for name, value in (("resize_height", resize_height), ("resize_width", resize_width)):
        if value < 0:
            raise DataError(f"--{name} must be >= 0 (0: keep the image size), got {value}")
    if encode_type and not images.can_encode(encode_type):
        raise DataError(f"--encode_type '{encode_type}': OpenCV has no encoder for it (try "
                        "png or jpg)")


# ---------------------------------------------------------------------------- mean


def _accumulate(arrays, where: str):
    """Caffe's sum: float32, element by element, in order; returns (sum, count)."""
    total, count = None, 0
    for name, arr in arrays:
        if total is None:
            total = np.zeros(arr.shape, dtype=np.float32)
        elif arr.shape != total.shape:
            raise DataError(f"{where}: record '{name}' is {'×'.join(map(str, arr.shape))} but the "
                            f"first was {'×'.join(map(str, total.shape))}; a mean needs one size")
        total += arr.astype(np.float32)
        count += 1
    if count == 0:
        raise DataError(f"{where}: no images to average")
    return total, count


def _db_images(db_path: str, backend, show_progress):
    from caffe_compat.formats.datum import decode_datum
    with open_db(db_path, backend) as db:
        for key, value in progress(db.items(), total=len(db), desc="mean", enable=show_progress):
            img, _, _ = decode_datum(value, where=f"{db_path}: record {key.decode(errors='replace')}")
            yield key.decode(errors="replace"), img


def _list_images(list_file: str, root_folder: str, gray: bool, resize_height: int,
                 resize_width: int, show_progress):
    entries = read_image_list(list_file)
    for entry in progress(entries, desc="mean", enable=show_progress):
        img = images.read_image(root_folder + entry.path, resize_height, resize_width, not gray,
                                where=f"{list_file}:{entry.line}")
        yield entry.path, images.hwc_to_chw(img)


def compute_mean(source: str, backend: str | None = None, *, root_folder: str = "",
                 gray: bool = False, resize_height: int = 0, resize_width: int = 0,
                 show_progress: bool | None = None) -> np.ndarray:
    """The float32 C×H×W mean of a database (or of an image list, read like ImageData)."""
    if os.path.isfile(source):
        arrays = _list_images(source, root_folder, gray, resize_height, resize_width,
                              show_progress)
    else:
        arrays = _db_images(source, backend, show_progress)
    total, count = _accumulate(arrays, source)
    return total / np.float32(count)


def channel_means(mean: np.ndarray) -> list[float]:
    """compute_image_mean's log line values: per channel, a float32 running sum / H·W."""
    planes = mean.reshape(mean.shape[0], -1).astype(np.float32)
    sums = np.cumsum(planes, axis=1, dtype=np.float32)[:, -1]   # sequential, like Caffe's loop
    return [float(s / np.float32(planes.shape[1])) for s in sums]
