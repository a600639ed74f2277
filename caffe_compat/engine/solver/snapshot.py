"""Snapshot files: ``<prefix>_iter_N.caffemodel`` and ``.solverstate`` (or their ``.h5`` forms).

A solverstate is Caffe's ``SolverState`` message: ``iter`` (updates done), ``learned_net``
(the caffemodel path written with it, as given, so usually relative to the working directory
of the run), ``history`` (one BlobProto per history blob, ``shape`` + float ``data``) and
``current_step``. The HDF5 form has datasets ``iter``, ``learned_net``, ``current_step`` and a
group ``history`` with datasets ``0``, ``1``, … (sgd_solver.cpp SnapshotSolverStateToHDF5).
Every file is written to a temporary name and renamed, so a killed run never leaves a torn one.
"""
from __future__ import annotations

from caffe_compat.formats.errors import CaffeCompatError

import os
from dataclasses import dataclass, field

import numpy as np
import torch

from caffe_compat.formats.atomic import atomic_path
from caffe_compat.engine import weights
from caffe_compat.formats.blob_io import blobproto_to_array, read_proto, write_proto_atomic
from caffe_compat.engine.weights import tensor_to_blobproto
from caffe_compat.proto import caffe_pb2

BINARYPROTO = caffe_pb2.SolverParameter.BINARYPROTO
HDF5 = caffe_pb2.SolverParameter.HDF5


class SnapshotError(CaffeCompatError):
    """A solverstate that cannot be read or does not fit the solver."""


class LearnedNetMissing(SnapshotError, FileNotFoundError):
    """The caffemodel a solverstate names is not there (both a SnapshotError and, as before,
    a FileNotFoundError)."""


@dataclass
class SolverStateData:
    iter: int = 0
    learned_net: str = ""
    history: list[np.ndarray] = field(default_factory=list)
    current_step: int = 0


def snapshot_filename(prefix: str, iteration: int, extension: str) -> str:
    """Caffe's SnapshotFilename: ``prefix + "_iter_" + iter + extension`` (no zero padding)."""
    return f"{prefix}_iter_{int(iteration)}{extension}"


def model_extension(fmt: int) -> str:
    return ".caffemodel.h5" if fmt == HDF5 else ".caffemodel"


def state_extension(fmt: int) -> str:
    return ".solverstate.h5" if fmt == HDF5 else ".solverstate"


def write_model(module, path: str, write_diff: bool = False) -> None:
    """The caffemodel (``.h5`` path → Caffe's HDF5 layout), written atomically."""
    weights.save(module, path, write_diff)


def write_state(path: str, state: SolverStateData, history: list[torch.Tensor]) -> None:
    """Write a solverstate (HDF5 when ``path`` ends in ``.h5``) atomically."""
    if path.endswith(".h5"):
        _write_state_h5(path, state, history)
        return
    msg = caffe_pb2.SolverState(iter=int(state.iter), learned_net=state.learned_net,
                                current_step=int(state.current_step))
    msg.history.extend(tensor_to_blobproto(h) for h in history)
    write_proto_atomic(path, msg)


def _write_state_h5(path: str, state: SolverStateData, history: list[torch.Tensor]) -> None:
    import h5py
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("iter", data=np.array([state.iter], np.int32))
        f.create_dataset("learned_net", data=np.bytes_(state.learned_net.encode()))
        f.create_dataset("current_step", data=np.array([state.current_step], np.int32))
        group = f.create_group("history")
        for i, h in enumerate(history):
            group.create_dataset(str(i), data=h.detach().to("cpu", torch.float32).numpy())


def read_state(path: str) -> SolverStateData:
    """Read a solverstate written by Caffe or by us (``.h5`` → HDF5); its counters checked."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such solverstate file")
    state = _read_state_h5(path) if path.endswith(".h5") else _read_state_proto(path)
    if state.iter < 0:
        raise SnapshotError(f"{path}: iter is {state.iter}; a solverstate counts iterations "
                            "done, from 0")
    if state.current_step < 0:
        raise SnapshotError(f"{path}: current_step is {state.current_step}; it must be >= 0")
    if "\0" in state.learned_net:
        raise SnapshotError(f"{path}: learned_net contains a NUL byte")
    return state


def _read_state_proto(path: str) -> SolverStateData:
    msg = read_proto(path, caffe_pb2.SolverState)
    try:
        history = [blobproto_to_array(b).astype(np.float32, copy=False) for b in msg.history]
    except ValueError as exc:
        raise SnapshotError(f"{path}: bad history blob: {exc}") from None
    learned = msg.learned_net
    if isinstance(learned, bytes):   # proto2 hands back bytes when the string is not UTF-8
        raise SnapshotError(f"{path}: learned_net is not UTF-8 text")
    return SolverStateData(msg.iter, learned, history, msg.current_step)


def _read_state_h5(path: str) -> SolverStateData:
    import h5py
    from caffe_compat.formats.hdf5 import dataset, open_hdf5, read_dataset
    with open_hdf5(path, "HDF5 solverstate") as f:
        for key in ("iter", "history"):
            if key not in f:
                raise SnapshotError(f"{path}: no '{key}' in this HDF5 file; not a Caffe "
                                    "solverstate")
        learned = ""
        if "learned_net" in f:
            raw = dataset(f, "learned_net", path)[()]
            learned = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
        step = _h5_int(f, "current_step", path) if "current_step" in f else 0
        group = f["history"]
        if not isinstance(group, h5py.Group):
            raise SnapshotError(f"{path}: 'history' is not a group")
        history = [read_dataset(dataset(group, str(i), f"{path}: history"),
                                f"{path}: history/{i}") for i in range(len(group))]
        return SolverStateData(_h5_int(f, "iter", path), learned, history, step)


def _h5_int(f, name: str, path: str) -> int:
    from caffe_compat.formats.hdf5 import dataset, read_dataset
    values = read_dataset(dataset(f, name, path), f"{path}: {name}", np.float64).reshape(-1)
    if values.size != 1 or not np.isfinite(values[0]) or values[0] != int(values[0]):
        raise SnapshotError(f"{path}: '{name}' must hold one integer")
    return int(values[0])


def resolve_learned_net(learned_net: str, state_path: str) -> str:
    """Where the caffemodel a solverstate names lives.

    Caffe stores the path as written (relative to the working directory of the run that
    wrote it). Tried in order: the absolute path; relative to the solverstate's folder;
    relative to the current directory; the bare file name in the solverstate's folder (a
    snapshot folder that was moved or copied).
    """
    if os.path.isabs(learned_net):
        candidates = [learned_net]
    else:
        folder = os.path.dirname(os.path.abspath(state_path))
        candidates = [os.path.join(folder, learned_net), os.path.abspath(learned_net),
                      os.path.join(folder, os.path.basename(learned_net))]
    for c in candidates:
        if os.path.isfile(c):
            return c
    raise LearnedNetMissing(f"{state_path}: learned_net '{learned_net}' not found (tried "
                            f"{', '.join(dict.fromkeys(candidates))})")


# ---------------------------------------------------------------------------- resuming


_STATE_SUFFIXES = (".solverstate", ".solverstate.h5")


def _snapshot_candidates(prefix: str) -> list[tuple[int, str, str]]:
    """(iteration, solverstate, caffemodel) for every state under ``prefix``, newest first."""
    folder = os.path.dirname(prefix) or "."
    stem = os.path.basename(prefix) + "_iter_"
    found = []
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    for name in names:
        if not name.startswith(stem):
            continue
        for suffix in _STATE_SUFFIXES:
            number = name[len(stem):-len(suffix)] if name.endswith(suffix) else ""
            if number.isascii() and number.isdigit():
                model_ext = ".caffemodel.h5" if suffix.endswith(".h5") else ".caffemodel"
                found.append((int(number), os.path.join(folder, name),
                              snapshot_filename(prefix, int(number), model_ext)))
    return sorted(found, reverse=True)


def latest_snapshot(prefix: str) -> str | None:
    """The newest COMPLETE snapshot under ``prefix``: its solverstate path, or None.

    Complete means the solverstate reads and passes its checks and the caffemodel it names
    exists. Writers are atomic, so a killed run leaves at worst a caffemodel without its
    solverstate (the model is written first) — that iteration is skipped, as is one whose
    state does not read; the next older pair is used.
    """
    for _, state_path, _model in _snapshot_candidates(prefix):
        try:
            state = read_state(state_path)
            if state.learned_net:
                resolve_learned_net(state.learned_net, state_path)
            elif not os.path.isfile(_model):
                continue
        except (OSError, ValueError):
            continue
        return state_path
    return None
