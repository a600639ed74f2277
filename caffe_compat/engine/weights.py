"""Read and write trained weights: ``.caffemodel`` (binary NetParameter) and ``.caffemodel.h5``.

Loading matches layers by name, as Caffe's CopyTrainedLayersFrom does: layers the net does
not have are skipped (reported once), a blob-count or shape mismatch is an error naming the
layer and both shapes. V1 files (``layers`` with legacy 4-D blob dims) load too.
"""
from __future__ import annotations

from caffe_compat.formats.errors import CaffeCompatError

import logging

import numpy as np
import torch

from caffe_compat.formats.atomic import atomic_path
from caffe_compat.engine.numerics import flush_subnormals_, keep_subnormals
from caffe_compat.formats.blob_io import blob_shape, write_proto_atomic
from caffe_compat.proto import caffe_pb2

log = logging.getLogger(__name__)


class WeightsError(CaffeCompatError):
    pass


def _shapes_match(source: tuple[int, ...], target: tuple[int, ...], legacy: bool) -> bool:
    """Caffe's Blob::ShapeEquals: legacy 4-D dims are compared with the target padded to 4-D."""
    if not legacy:
        return source == target
    if len(target) > 4:
        return False
    return tuple([1] * (4 - len(target)) + list(target)) == source


def _blob_values(blob: caffe_pb2.BlobProto) -> np.ndarray:
    if len(blob.double_data):
        return np.asarray(blob.double_data, dtype=np.float64)
    return np.asarray(blob.data, dtype=np.float32)


def read_net_weights(path: str) -> caffe_pb2.NetParameter:
    """Parse a binary caffemodel; errors name the file."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise WeightsError(f"cannot read weights file '{path}': {exc.strerror}") from None
    net = caffe_pb2.NetParameter()
    try:
        net.ParseFromString(raw)
    except Exception as exc:  # protobuf raises DecodeError, a plain Exception subclass
        raise WeightsError(f"'{path}' is not a binary caffemodel (NetParameter): {exc}") from None
    return net


def _text(name) -> str:
    """A layer name as text (proto2 hands back bytes when a name is not UTF-8)."""
    return name.decode("utf-8", errors="replace") if isinstance(name, bytes) else name


def _source_layers(net: caffe_pb2.NetParameter) -> list[tuple[str, list[caffe_pb2.BlobProto]]]:
    return [(_text(l.name), list(l.blobs)) for l in net.layer] + \
           [(_text(l.name), list(l.blobs)) for l in net.layers]


_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def is_hdf5(path: str) -> bool:
    """True when the file starts with HDF5's signature (Caffe's H5Fis_hdf5 test)."""
    try:
        with open(path, "rb") as f:
            return f.read(8) == _HDF5_SIGNATURE
    except OSError:
        return path.endswith(".h5")


def copy_from(module, path: str, hdf5: bool | None = None,
              require_all: bool = False) -> list[str]:
    """Copy weights from ``path`` (binary .caffemodel or HDF5) into ``module`` by layer name.

    HDF5 is recognised by its file signature, as Caffe's CopyTrainedLayersFrom does;
    ``hdf5=True`` forces it (pycaffe's ``load_hdf5``). Returns the names of source layers
    that were skipped because the net lacks them. Layers with parameters that the file does
    not fill keep their initial values with a warning, as in Caffe; with ``require_all`` they
    are a WeightsError instead (scoring a net whose classifier is random fillers).
    """
    return copy_all(module, [path], hdf5, require_all)


def copy_all(module, paths, hdf5: bool | None = None, require_all: bool = False) -> list[str]:
    """``copy_from`` for several files in order (``caffe test --weights A,B``); the check
    for layers left unfilled looks at all of them together."""
    skipped, sources = [], set()
    for path in paths:
        found = _copy(module, path, hdf5)
        skipped += found[0]
        sources |= found[1]
    missing = uninitialised_layers(module, sources)
    if require_all and missing:
        raise WeightsError(f"{', '.join(paths)}: {len(missing)} layer(s) with parameters are "
                           f"not in the weights and would run on random initial values: "
                           f"{', '.join(missing)} (the caffemodel of another net? "
                           "--allow-missing-weights runs anyway)")
    for name in skipped:
        log.info("Ignoring source layer %s", name)
    _report_missing(module, ", ".join(paths), missing, sources)
    return skipped


def _copy(module, path: str, hdf5: bool | None) -> tuple[list[str], set[str]]:
    """Copy one file; (source layers the net lacks, source layers with blobs)."""
    # Where a name repeats in the net, Caffe copies a binary caffemodel's layer into the
    # first layer of that name and an HDF5 file's into the last (layer_names_index_).
    named = list(module.named_layers())
    if hdf5 if hdf5 is not None else is_hdf5(path):
        layers = _read_h5_layers(path)
        ours = dict(named)
    else:
        net = read_net_weights(path)
        layers = [(name, [(blob_shape(b), _blob_values(b), _is_legacy(b)) for b in blobs])
                  for name, blobs in _source_layers(net)]
        ours = dict(reversed(named))
    skipped, flushed = [], 0
    flush = not keep_subnormals()
    for name, blobs in layers:
        layer = ours.get(name)
        if layer is None:
            if blobs:
                skipped.append(name)
            continue
        custom = getattr(layer, "copy_stored_blobs", None)
        if custom is not None and blobs:
            # the fork's CustomCopyBlobs: the layer adapts stored blobs to its own shapes
            for i, (shape, values, _) in enumerate(blobs):
                _check_values(path, name, i, shape, values)
            custom(path, [values.reshape(shape) for shape, values, _ in blobs])
            continue
        if len(blobs) != len(layer.blobs):
            if not blobs:
                continue
            raise WeightsError(f"{path}: layer '{name}' has {len(blobs)} blobs in the weights "
                               f"file but {len(layer.blobs)} in the net")
        for i, (shape, values, legacy) in enumerate(blobs):
            target = layer.blobs[i]
            tshape = tuple(target.shape)
            if not _shapes_match(shape, tshape, legacy):
                raise WeightsError(
                    f"{path}: cannot copy param {i} of layer '{name}': shape mismatch. Source "
                    f"shape is {shape} ({int(np.prod(shape))} values); target shape is {tshape} "
                    f"({target.numel()}). To learn this layer's parameters from scratch "
                    "instead, rename the layer.")
            _check_values(path, name, i, shape, values)
            with torch.no_grad():
                target.copy_(torch.from_numpy(values.reshape(tshape)).to(target.dtype))
            flushed += flush_subnormals_(target) if flush else 0
    if flushed:
        log.info("%s: %d subnormal weight value(s) (|w| < 1.2e-38) set to 0: they would slow "
                 "every multiply that reads them ~10-100x and change no output at float32 "
                 "precision (keep them: $CAFFE_COMPAT_KEEP_SUBNORMALS=1)", path, flushed)
    return skipped, {name for name, blobs in layers if blobs}


def uninitialised_layers(module, sources: set[str]) -> list[str]:
    """The module's layers with parameters whose names are not among ``sources``."""
    return [name for name, layer in module.named_layers()
            if len(layer.blobs) and name not in sources]


def _report_missing(module, path: str, missing: list[str], sources: set[str]) -> None:
    """A warning for layers left untouched."""
    if missing and len(missing) == sum(1 for _, l in module.named_layers() if len(l.blobs)):
        log.warning("%s: none of the layers of net '%s' is in this weights file, so every "
                    "parameter keeps its initial value (is it the caffemodel of another net?). "
                    "The file has: %s", path, module.name, ", ".join(sorted(sources)) or "nothing")
    elif missing:
        log.warning("%s: %d layer(s) with parameters are not in the weights file and keep their "
                    "initial values: %s", path, len(missing), ", ".join(missing))


def _check_values(path: str, layer: str, index: int, shape, values: np.ndarray) -> None:
    """A blob whose value count differs from its shape (or whose shape has a negative dim)
    is a corrupt file, not a reshape error deep in numpy."""
    if any(int(d) < 0 for d in shape):
        raise WeightsError(f"{path}: param {index} of layer '{layer}' has a negative "
                           f"dimension in shape {list(shape)}")
    expected = int(np.prod(shape, dtype=object)) if len(shape) else 1
    if values.size != expected:
        raise WeightsError(f"{path}: param {index} of layer '{layer}' has {values.size} values "
                           f"but shape {list(shape)} needs {expected}")


def _is_legacy(blob: caffe_pb2.BlobProto) -> bool:
    return any(blob.HasField(f) for f in ("num", "channels", "height", "width"))


def _read_h5_layers(path: str):
    """Caffe's /data/<layer>/<i> datasets; every declared shape checked before reading."""
    import h5py
    from caffe_compat.formats.hdf5 import dataset, open_hdf5, read_dataset
    with open_hdf5(path, "HDF5 caffemodel") as f:
        group = f.get("data")
        if not isinstance(group, h5py.Group):
            raise WeightsError(f"'{path}' has no 'data' group; not a Caffe HDF5 caffemodel")
        out = []
        for name in group:
            blobs = group[name]
            if not isinstance(blobs, h5py.Group):
                raise WeightsError(f"{path}: /data/{name} is not a group of blobs")
            arrays = [read_dataset(dataset(blobs, str(i), f"{path}: /data/{name}"),
                                   f"{path}: /data/{name}/{i}")
                      for i in range(len(blobs))]
            out.append((name, [(a.shape, a, False) for a in arrays]))
        return out


def net_to_proto(module, write_diff: bool = False) -> caffe_pb2.NetParameter:
    """The caffemodel message: every instantiated layer's parameter, with its blobs."""
    net = caffe_pb2.NetParameter(name=module.name)
    for name, layer in module.named_layers():
        lp = net.layer.add()
        lp.CopyFrom(layer.param)
        del lp.blobs[:]
        for blob in layer.blobs:
            grad = None
            if write_diff:
                grad = blob.grad if blob.grad is not None else torch.zeros_like(blob)
            lp.blobs.append(tensor_to_blobproto(blob, grad))
    return net


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _packed_floats(field: int, t: torch.Tensor) -> bytes:
    """Wire bytes of a packed repeated-float field: tag, length, little-endian float32s."""
    raw = np.ascontiguousarray(t.detach().cpu().float().numpy(), dtype="<f4").tobytes()
    return _varint(field << 3 | 2) + _varint(len(raw)) + raw if raw else b""


def tensor_to_blobproto(data: torch.Tensor, diff: torch.Tensor | None = None) -> caffe_pb2.BlobProto:
    """A BlobProto with ``shape``, float ``data`` (and ``diff``), encoded from raw bytes.

    Byte-identical to filling ``data.extend(...)``, without a Python float per element (a
    VGG16 caffemodel would otherwise need ~4 GB of Python floats and ~20 s).
    """
    bp = caffe_pb2.BlobProto()
    bp.shape.dim.extend(int(d) for d in data.shape)
    raw = _packed_floats(5, data) + (_packed_floats(6, diff) if diff is not None else b"")
    if raw:
        bp.MergeFromString(raw)
    return bp


def save(module, path: str, write_diff: bool = False) -> None:
    """Write the module's weights as a binary caffemodel, or HDF5 when ``path`` ends in .h5."""
    if path.endswith(".h5"):
        save_h5(module, path, write_diff)
        return
    write_proto_atomic(path, net_to_proto(module, write_diff))


def save_h5(module, path: str, write_diff: bool = False) -> None:
    """Caffe's HDF5 layout: /data/<layer>/<i> (and /diff/<layer>/<i>) datasets."""
    import h5py
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        data = f.create_group("data")
        diff = f.create_group("diff") if write_diff else None
        for name, layer in module.named_layers():
            g = data.create_group(name)
            for i, blob in enumerate(layer.blobs):
                g.create_dataset(str(i), data=blob.detach().cpu().float().numpy())
                if diff is not None:
                    grad = blob.grad if blob.grad is not None else torch.zeros_like(blob)
                    diff.require_group(name).create_dataset(
                        str(i), data=grad.detach().cpu().float().numpy())
