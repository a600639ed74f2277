"""The work of SSD's ``convert_annoset`` (weiliu89/caffe): images and box annotations into an
LMDB/LevelDB of AnnotatedDatum records, the input of the AnnotatedData layer.

The list file has one ``image_path annotation_path`` per line, both relative to the root
folder (``--anno-type classification``: ``image_path label``, as convert_imageset's lists).
Annotations are PASCAL VOC XML files (``label_type`` "xml": each ``object``'s ``name`` looked
up in a LabelMap prototxt, its integer ``bndbox`` and ``difficult``) or text files ("txt":
``label xmin ymin xmax ymax`` per line, pixel coordinates, labels used as they are). Boxes
are stored normalised by the image size the XML states (the image's own size when it
states none), grouped by label in order of first appearance, with instance ids counting
up within each group. An image whose annotation file is missing is stored without boxes,
as the fork does, and reported.
"""
from __future__ import annotations

import logging
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import numpy as np

from caffe_compat.data.convert import ConvertReport, image_datum, progress
from caffe_compat.data.db import DBWriter
from caffe_compat.data.image_list import parse_label, read_image_list
from caffe_compat.formats import images
from caffe_compat.formats.errors import DataError

log = logging.getLogger(__name__)

ANNO_TYPES = ("detection", "classification")
LABEL_TYPES = ("xml", "txt")


@dataclass(frozen=True)
class AnnoEntry:
    path: str
    anno: str           # annotation file (detection) or label text (classification)
    line: int


# ------------------------------------------------------------------------ inputs


def read_label_map(path: str, strict: bool = False) -> dict[str, int]:
    """name → label of a LabelMap prototxt; ``strict`` (--check-label) refuses a name
    listed twice (otherwise the last one wins, as in the fork)."""
    from google.protobuf import text_format
    from caffe_compat.proto import caffe_pb2
    try:
        with open(path, encoding="utf-8") as f:
            label_map = text_format.Parse(f.read(), caffe_pb2.LabelMap())
    except OSError as exc:
        raise DataError(f"{path}: cannot read the label map ({exc.strerror})") from None
    except text_format.ParseError as exc:
        raise DataError(f"{path}: not a LabelMap prototxt ({exc})") from None
    names: dict[str, int] = {}
    for item in label_map.item:
        if strict and item.name in names:
            raise DataError(f"{path}: name '{item.name}' is listed twice (--check-label)")
        names[item.name] = item.label
    if not names:
        raise DataError(f"{path}: the label map has no items")
    return names


def _lines(path: str, what: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().splitlines()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the {what} ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: the {what} is not UTF-8 text") from None


def read_anno_list(list_file: str) -> list[AnnoEntry]:
    """``image_path annotation_path`` lines (split at the last space; blank lines skipped)."""
    lines = _lines(list_file, "list file")
    entries = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        path, sep, anno = raw.strip().rpartition(" ")
        if not sep or not path.strip():
            raise DataError(f"{list_file}:{number}: expected 'image_path annotation_path', "
                            f"got {raw!r}")
        entries.append(AnnoEntry(path.strip(), anno, number))
    return entries


def voc_objects(path: str, names: dict[str, int], image_hw) -> tuple[list, tuple[int, int]]:
    """(objects, (height, width)) of a VOC XML file: (label, xmin, ymin, xmax, ymax,
    difficult) per ``object``, in file order."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        line, column = exc.position
        raise DataError(f"{path}:{line}:{column}: not valid XML ({exc.msg})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read the annotation ({exc.strerror})") from None
    if root.tag != "annotation":
        raise DataError(f"{path}: the root element is <{root.tag}>, not <annotation>")
    hw = (_int_or_none(root.findtext("size/height")), _int_or_none(root.findtext("size/width")))
    if hw[0] is None or hw[1] is None:
        hw = tuple(image_hw)
    if not hw[0] or not hw[1]:
        raise DataError(f"{path}: no valid image width/height")
    objects = []
    for index, obj in enumerate(root.findall("object"), start=1):
        objects.append(_voc_object(obj, path, index, names))
    return objects, hw


def _voc_object(obj, path: str, index: int, names: dict[str, int]):
    label, difficult = None, False
    for child in obj:   # in file order: a 'difficult' after the bndbox does not count
        if child.tag == "name":
            name = (child.text or "").strip()
            if name not in names:
                raise DataError(f"{path}: object {index}: unknown label name '{name}' (not in "
                                "the label map)")
            label = names[name]
        elif child.tag == "difficult":
            difficult = (child.text or "").strip() == "1"
        elif child.tag == "bndbox":
            if label is None:
                raise DataError(f"{path}: object {index}: bndbox before its name")
            corners = [_voc_coordinate(child, key, path, index)
                       for key in ("xmin", "ymin", "xmax", "ymax")]
            return (label, *corners, difficult)
    raise DataError(f"{path}: object {index} has no {'name' if label is None else 'bndbox'}")


def _voc_coordinate(box, key: str, path: str, index: int) -> int:
    text = (box.findtext(key) or "0").strip()
    value = _int_or_none(text)
    if value is None:
        raise DataError(f"{path}: object {index}: bndbox {key} '{text}' is not an integer")
    return value


def _int_or_none(text):
    try:
        return int(text.strip()) if text is not None else None
    except ValueError:
        return None


def txt_objects(path: str) -> list:
    """(label, xmin, ymin, xmax, ymax, False) per ``label xmin ymin xmax ymax`` line."""
    objects = []
    for number, line in enumerate(_lines(path, "annotation"), start=1):
        fields = line.split()
        if not fields:
            continue
        try:
            if len(fields) != 5:
                raise ValueError
            objects.append((parse_label(fields[0], f"{path}:{number}"),
                            *map(float, fields[1:]), False))
        except ValueError:
            raise DataError(f"{path}:{number}: expected 'label xmin ymin xmax ymax', "
                            f"got {line!r}") from None
    return objects


def fill_groups(anno_datum, objects, hw) -> None:
    """Add the objects to an AnnotatedDatum: grouped by label, boxes divided by the size."""
    height, width = np.float32(hw[0]), np.float32(hw[1])
    groups = {}
    for label, x0, y0, x1, y1, difficult in objects:
        if label not in groups:
            groups[label] = anno_datum.annotation_group.add(group_label=label)
        group = groups[label]
        anno = group.annotation.add(instance_id=len(group.annotation))
        b = anno.bbox
        b.xmin, b.ymin = float(np.float32(x0) / width), float(np.float32(y0) / height)
        b.xmax, b.ymax = float(np.float32(x1) / width), float(np.float32(y1) / height)
        b.difficult = bool(difficult)


# ------------------------------------------------------------------------ images


def read_scaled(path: str, is_color: bool, min_dim: int, max_dim: int, where: str):
    """The image, scaled up so its short side reaches ``min_dim`` and then down so its long
    side stays within ``max_dim`` (aspect kept; 0 = no bound), as the fork's reader."""
    img = images.read_image(path, 0, 0, is_color, where)
    if not (min_dim > 0 or max_dim > 0):
        return img
    short, long = min(img.shape[:2]), max(img.shape[:2])
    factor = np.float32(1)
    if min_dim > 0 and short < min_dim:
        factor = np.float32(min_dim) / np.float32(short)
    if max_dim > 0 and int(factor * np.float32(long)) > max_dim:
        factor = np.float32(max_dim) / np.float32(long)
    if factor == 1:
        return img
    import cv2
    return cv2.resize(img, (0, 0), fx=float(factor), fy=float(factor))


# ------------------------------------------------------------------------ convert


@dataclass
class AnnosetOptions:
    """convert_annoset's flags (the fork's names, with dashes in the tool)."""
    anno_type: str = "detection"
    label_type: str = "xml"
    label_map_file: str = ""
    check_label: bool = False
    min_dim: int = 0
    max_dim: int = 0
    resize_height: int = 0
    resize_width: int = 0
    gray: bool = False
    encoded: bool = False
    encode_type: str = ""
    check_size: bool = False


def _check_options(o: AnnosetOptions) -> None:
    if o.anno_type not in ANNO_TYPES:
        raise DataError(f"unknown --anno-type '{o.anno_type}' (known: {', '.join(ANNO_TYPES)})")
    if o.anno_type == "detection" and o.label_type not in LABEL_TYPES:
        raise DataError(f"unknown --label-type '{o.label_type}' (known: "
                        f"{', '.join(LABEL_TYPES)}; the fork's json is not supported)")
    if o.anno_type == "detection" and o.label_type == "xml" and not o.label_map_file:
        raise DataError("VOC XML annotations need --label-map-file (a LabelMap prototxt)")
    for name in ("min_dim", "max_dim", "resize_height", "resize_width"):
        if getattr(o, name) < 0:
            raise DataError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(o, name)}")
    if o.encode_type and not images.can_encode(o.encode_type):
        raise DataError(f"OpenCV cannot encode images as '{o.encode_type}' (--encode-type)")


def image_record(root: str, entry: AnnoEntry, o: AnnosetOptions, where: str):
    """(AnnotatedDatum holding the entry's image, the image's original height and width);
    DataError if the image cannot be read."""
    from caffe_compat.proto import caffe_pb2
    img = read_scaled(root + entry.path, not o.gray, o.min_dim, o.max_dim, where)
    original_hw = images.read_image(root + entry.path, 0, 0, True, where).shape[:2] \
        if (o.min_dim or o.max_dim) else img.shape[:2]
    enc = o.encode_type or (images.file_extension(entry.path) if o.encoded else "")
    label = -1 if o.anno_type == "detection" else int(entry.anno)
    record = caffe_pb2.AnnotatedDatum()
    record.datum.CopyFrom(image_datum(img, root + entry.path, label, o.resize_height,
                                      o.resize_width, not o.gray, enc,
                                      rescaled=bool(o.min_dim or o.max_dim)))
    if record.datum.encoded:
        # The fork's reader records the stored image's shape even when encoded (BVLC's does
        # not), and its AnnotatedData reads that height and width to resize the boxes.
        h, w = (o.resize_height, o.resize_width) if o.resize_height and o.resize_width \
            else img.shape[:2]
        d = record.datum
        d.channels, d.height, d.width = (1 if o.gray else 3), h, w
    return record, original_hw


def add_boxes(record, root: str, entry: AnnoEntry, o: AnnosetOptions, names, original_hw,
              report: ConvertReport, where: str) -> None:
    """Type the record BBOX and add the boxes of the entry's annotation file."""
    from caffe_compat.proto import caffe_pb2
    record.type = caffe_pb2.AnnotatedDatum.BBOX
    anno_path = root + entry.anno
    if not os.path.exists(anno_path):
        report.skipped.append(f"{where}: annotation '{entry.anno}' does not exist (image "
                              "stored without boxes)")
        return
    if o.label_type == "xml":
        objects, hw = voc_objects(anno_path, names, original_hw)
    else:
        objects, hw = txt_objects(anno_path), original_hw
    fill_groups(record, objects, hw)


def convert_annoset(root_folder: str, list_file: str, db_name: str,
                    options: AnnosetOptions | None = None, *, backend: str = "lmdb",
                    shuffle: bool = False, seed: int | None = None, overwrite: bool = False,
                    show_progress: bool | None = None) -> ConvertReport:
    """Write the AnnotatedDatum database of a list file (the fork's convert_annoset).

    Keys are ``%08d_<image path>`` by line index after the optional shuffle. Unreadable
    images are reported and skipped (their index still counts); a bad annotation (invalid
    XML, unknown label name) stops the conversion with its file named. The database appears
    at ``db_name`` only when complete.
    """
    o = options or AnnosetOptions()
    _check_options(o)
    detection = o.anno_type == "detection"
    names = read_label_map(o.label_map_file, o.check_label) if o.label_map_file else {}
    entries = read_anno_list(list_file) if detection else [
        AnnoEntry(e.path, str(e.label), e.line) for e in read_image_list(list_file)]
    if shuffle:
        entries = [entries[i] for i in np.random.default_rng(seed).permutation(len(entries))]
    report, size = ConvertReport(), None
    with DBWriter(db_name, backend, overwrite=overwrite) as writer:
        for index, entry in enumerate(progress(entries, desc=os.path.basename(db_name),
                                               enable=show_progress)):
            where = f"{list_file}:{entry.line}"
            try:
                record, original_hw = image_record(root_folder, entry, o, where)
            except DataError as exc:      # an unreadable image is skipped, as in Caffe
                report.skipped.append(str(exc))
                log.warning("%s (skipped)", exc)
                continue
            if detection:                 # a bad annotation stops the conversion
                try:
                    add_boxes(record, root_folder, entry, o, names, original_hw, report, where)
                except DataError as exc:
                    raise DataError(f"{where}: {exc}") from None
            if o.check_size and not record.datum.encoded:
                size = size or len(record.datum.data)
                if len(record.datum.data) != size:
                    raise DataError(f"{where}: image '{entry.path}' has "
                                    f"{len(record.datum.data)} bytes, the first had {size} "
                                    "(--check-size)")
            writer.put(f"{index:08d}_{entry.path}", record.SerializeToString())
            report.written += 1
        if report.written == 0:
            raise DataError(f"{list_file}: no image could be read; database '{db_name}' "
                            "not written")
    return report
