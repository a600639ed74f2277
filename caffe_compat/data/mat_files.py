"""DeepLab v2's MatWrite and MatRead layers (deeplab-public-ver2 ``mat_write_layer.cpp``,
``mat_read_layer.cpp``, ``util/matio_io.cpp``): blobs to and from MATLAB ``.mat`` files.

A file holds one variable ``data``, class single, of MATLAB size ``[W H C N]``: the blob's
memory read column-major, which is what DeepLab's MATLAB scripts load (level 5 MAT-file,
uncompressed, as matio writes by default; scipy.io here). File names are
``prefix + name + "_blob_<i>.mat"`` for bottom/top ``i``, where ``name`` is the first word of
line k of ``source`` less ``strip`` trailing characters for the k-th forward (MatWrite) or
image (MatRead), or ``iter_<k>`` without a source (MatWrite only: DeepLab's MatRead needs one).
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch

from caffe_compat.data.source_layer import _DataLayer
from caffe_compat.engine.layers.base import Layer, Shape, legacy_shape, register
from caffe_compat.formats.atomic import atomic_path
from caffe_compat.formats.errors import DataError


def read_names(source: str, strip: int) -> list[str]:
    """The first word of every line of ``source`` less ``strip`` trailing characters."""
    if not os.path.isfile(source):
        raise DataError(f"{source}: no such list file")
    names = []
    with open(source, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            words = line.split()
            if not words or len(words[0]) <= strip:    # the fork's "Too much stripping"
                raise DataError(f"{source}:{number}: no name longer than strip ({strip}) "
                                f"characters in {line.rstrip()!r}")
            names.append(words[0][:len(words[0]) - strip])
    return names


def write_blob_mat(path: str, blob: np.ndarray) -> None:
    """``blob`` (up to 4-D, N×C×H×W) as variable ``data``, single, MATLAB size [W H C N]."""
    import scipy.io
    array = np.asarray(blob, dtype=np.float32).reshape(legacy_shape(blob.shape))
    with atomic_path(path) as tmp:
        scipy.io.savemat(str(tmp), {"data": array.transpose(3, 2, 1, 0)}, appendmat=False)


def read_blob_mat(path: str) -> np.ndarray:
    """Variable ``data`` of a MAT-file (single, at most 4-D [W H C N]) as N×C×H×W float32."""
    import scipy.io
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such MAT file")
    try:
        data = scipy.io.loadmat(path).get("data")
    except (ValueError, TypeError, OSError) as exc:
        raise DataError(f"{path}: not a readable MAT file ({exc})") from None
    if data is None:
        raise DataError(f"{path}: no variable 'data'")
    if data.dtype != np.float32:
        raise DataError(f"{path}: 'data' is {data.dtype}, DeepLab reads single (float32)")
    if data.ndim > 4:
        raise DataError(f"{path}: 'data' has {data.ndim} dimensions, at most 4")
    return np.ascontiguousarray(data.reshape(data.shape + (1,) * (4 - data.ndim)).transpose(3, 2, 1, 0))


def _names(layer: Layer, p, field: str) -> list[str] | None:
    """The list of names (``source``), None without one; checks prefix and strip."""
    if not p.HasField("prefix"):
        raise layer.error(f"{field}.prefix is required")
    if p.strip < 0:
        raise layer.error(f"strip ({p.strip}) cannot be negative")
    if not p.HasField("source"):
        return None
    try:
        return read_names(p.source, p.strip)
    except DataError as exc:
        raise layer.error(str(exc)) from None


@register
class MatWrite(Layer):
    """Writes every bottom to its own MAT-file on forwards 0, period, 2·period, ...; with a
    ``source`` the k-th forward is named by line k (more forwards than lines are an error, as
    in the fork). No tops, no backward."""

    type = "MatWrite"
    family = "data"
    origin = "DeepLab v2"
    num_bottoms = (1, None)
    num_tops = (0, 0)
    exports_to_onnx = False
    traceable = False

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        p = param.mat_write_param
        if p.period <= 0:
            raise self.error(f"mat_write_param.period ({p.period}) must be positive")
        self.names = _names(self, p, "mat_write_param")
        self.prefix, self.period, self.iter = p.prefix, p.period, 0
        self.top_shapes(bottom_shapes)

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        for i, shape in enumerate(bottom_shapes):
            if len(shape) > 4:
                raise self.error(f"bottom {i} has {len(shape)} axes; MatWrite writes 4-D blobs")
        return []

    def forward(self, *bottoms: torch.Tensor):
        if self.iter % self.period == 0:
            if self.names is not None and self.iter >= len(self.names):
                raise self.error(f"forward {self.iter + 1} but the source list names "
                                 f"{len(self.names)} files (DeepLab stops here too)")
            name = self.names[self.iter] if self.names is not None else f"iter_{self.iter}"
            for i, blob in enumerate(bottoms):
                path = f"{self.prefix}{name}_blob_{i}.mat"
                try:
                    write_blob_mat(path, blob.detach().float().cpu().numpy())
                except OSError as exc:
                    raise self.error(f"cannot write '{path}': {exc.strerror or exc}") from None
        self.iter += 1
        return ()


@register
class MatRead(_DataLayer):
    """One top of ``batch_size`` blobs read from MAT-files (each file's N must be 1 and its
    C, H, W those of the first file); the list wraps around at its end."""

    type = "MatRead"
    family = "data"
    origin = "DeepLab v2"
    num_tops = (1, 1)

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        p = param.mat_read_param
        if p.batch_size <= 0:
            raise self.error(f"mat_read_param.batch_size ({p.batch_size}) must be positive")
        names = _names(self, p, "mat_read_param")
        if not names:
            raise self.error("mat_read_param.source must name at least one file (DeepLab's "
                             "MatRead reads the first to learn the top's shape)")
        self.names, self.prefix, self.batch_size, self.iter = names, p.prefix, p.batch_size, 0
        first = self._read(0)
        self._shapes = [(self.batch_size,) + first.shape[1:]]

    def _read(self, k: int) -> np.ndarray:
        path = f"{self.prefix}{self.names[k]}_blob_0.mat"
        try:
            blob = read_blob_mat(path)
        except DataError as exc:
            raise self._wrap(exc) from None
        if blob.shape[0] != 1:
            raise self.error(f"{path}: holds {blob.shape[0]} blobs (N), MatRead reads one per file")
        if self._shapes and blob.shape[1:] != self._shapes[0][1:]:
            raise self.error(f"{path}: blob is {list(blob.shape[1:])}, the first file's "
                             f"{list(self._shapes[0][1:])}")
        return blob

    def forward(self):
        items = []
        for _ in range(self.batch_size):
            if self.iter >= len(self.names):
                self.iter = 0
            items.append(self._read(self.iter))
            self.iter += 1
        return self._tops((np.concatenate(items),))

    def seek(self, batch: int) -> None:
        self.iter = (batch * self.batch_size) % len(self.names)
