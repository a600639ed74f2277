"""The base of every data layer (no bottoms; each ``forward()`` returns the next batch):
tops on the module's device and dtype, per-batch seeding, the prefetch workers' lifetime.

Data, ImageData (``layers``), HDF5Data, MemoryData (``array_layers``), WindowData and
DenseImageData derive from ``_DataLayer``; it declares them data sources (``is_source``).
"""
from __future__ import annotations

import secrets
import weakref
import zlib
from typing import Sequence

import numpy as np
import torch

from caffe_compat.data.prefetch import Prefetcher
from caffe_compat.formats.errors import DataError
from caffe_compat.engine.layers.base import Layer, Shape

_EPOCH_STREAM, _BATCH_STREAM, _SKIP_STREAM = 0, 1, 2


def _run_seed() -> int:
    from caffe_compat.engine import rng
    seed = rng.get_seed()
    return secrets.randbits(63) if seed is None or seed < 0 else int(seed)


class _DataLayer(Layer):
    """Shared plumbing: tops on the module's device/dtype, seeding, prefetch lifetime."""

    num_bottoms = (0, 0)
    is_source = True

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        # Follows .to(device) / .double() so the tops land where the net computes.
        self.register_buffer("_probe", torch.empty(0), persistent=False)
        self.num_top = len(param.top)
        self._seed = [_run_seed() % (1 << 63), zlib.crc32(self.name.encode()), int(phase)]
        self._prefetcher: Prefetcher | None = None
        self._shapes: list[Shape] = []

    def _seq(self, stream: int, k: int) -> np.random.Generator:
        return np.random.default_rng(self._seed + [stream, k])

    def _merged_transform(self, legacy):
        """transform_param, with the old data_param/image_data_param fields folded in."""
        tp = type(self.param.transform_param)()
        tp.CopyFrom(self.param.transform_param)
        for name in ("scale", "mean_file", "crop_size", "mirror"):
            if legacy.HasField(name) and not tp.HasField(name):
                setattr(tp, name, getattr(legacy, name))
        return tp

    def _wrap(self, exc: DataError):
        return self.error(str(exc))

    def _start(self, produce, depth: int, workers: int | None = None, on_exit=None) -> None:
        self._prefetcher = Prefetcher(produce, depth, workers, name=f"data-{self.name}",
                                      on_exit=on_exit)
        weakref.finalize(self, self._prefetcher.close)

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        return list(self._shapes[:self.num_top])

    def _tops(self, arrays):
        device, dtype = self._probe.device, self._probe.dtype
        tops = tuple(torch.from_numpy(a).to(device=device, dtype=dtype, non_blocking=True)
                     for a in arrays[:self.num_top])
        return tops if len(tops) > 1 else tops[0]

    def forward(self):
        try:
            arrays = self._prefetcher.next()
        except DataError as exc:
            raise self._wrap(exc) from None
        return self._tops(arrays)

    def seek(self, batch: int) -> None:
        """Make the next forward() deliver batch ``batch`` (used when a run is resumed)."""
        if self._prefetcher is not None:
            self._prefetcher.seek(batch)

    @property
    def wait_seconds(self) -> float:
        """Time forward() spent waiting for the background workers (0 = never waited)."""
        return self._prefetcher.wait_seconds if self._prefetcher else 0.0

    def close(self) -> None:
        """Stop the background workers (also done when the layer is garbage-collected)."""
        if self._prefetcher is not None:
            self._prefetcher.close()
