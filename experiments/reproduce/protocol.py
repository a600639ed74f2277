"""One run of the paper's protocol: a seeded 40/10 split, fresh LMDBs, train E epochs.

A run (model, seed) does, in a work folder:
  1. split ``data/fashion50`` 40/10 per class with ``seed`` (``make_split``) and build that
     split's train/test LMDBs (silhouette landmarks in every record) and training mean, at the
     stored size the model's train_val reads (72 for the 64×64 crops, 256 for 224/227);
     shared by every model at that size;
  2. build the solver from ``models/<model>/solver.prototxt`` with the train_val net edited in
     memory: each Data layer's ``source`` and ``mean_file`` point at the run's databases,
     ``random_seed`` = seed, no periodic test/snapshot/display (the loop below does them);
  3. train ``epochs`` × (train images / batch / iter_size) iterations; after every epoch record
     the train loss (mean of that epoch's iteration classification losses), and the test
     loss and accuracy from one pass of the test net over the test images.

Resumable: after every epoch the solver is snapshotted together with torch's RNG state and the
records so far; a restarted run restores that snapshot and fast-forwards the data layers to the
same batch, so it continues bit for bit where it stopped (on the CPU).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


from caffe_compat.formats.atomic import atomic_path, write_text
from caffe_compat.formats.blob_io import read_text_proto
from caffe_compat.proto import caffe_pb2

TRAIN, TEST = caffe_pb2.TRAIN, caffe_pb2.TEST
NEVER = 2 ** 31 - 1            # a test_interval that never comes (int32, as in Caffe)


class ProtocolError(RuntimeError):
    """A model folder or data set the protocol cannot run; the message says what to fix."""


@dataclass(frozen=True)
class SplitData:
    """One seed's databases: what a train_val's Data layers are pointed at."""
    train_db: Path
    test_db: Path
    mean: Path
    n_train: int
    n_test: int


# ------------------------------------------------------------------------------ files


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and rename (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, text)


def write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


def _sha1(path: Path) -> str:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


# ------------------------------------------------------------------------------- data


def stored_size(net: caffe_pb2.NetParameter, where: str) -> int:
    """Side of the default database the net's TRAIN Data layer reads (72, 256, ...)."""
    from experiments.defaults import DEFAULT_SIZE
    for lp in _data_layers(net, where):
        if _phase_of(lp, where) != TRAIN:
            continue
        folder = Path(lp.data_param.source).parent.name
        if folder == "fashion50_lmdb":
            return DEFAULT_SIZE
        if folder.startswith("fashion50_lmdb_") and folder[15:].isdigit():
            return int(folder[15:])
        raise ProtocolError(f"{where}: TRAIN Data layer '{lp.name}' reads '{lp.data_param.source}',"
                            " not one of the default data/fashion50_lmdb* databases, so the "
                            "stored image size of a split is unknown")
    raise ProtocolError(f"{where}: no TRAIN Data layer")


def prepare_split(work: Path, seed: int, size: int, images: Path | None = None,
                  train_per_class: int = 40, test_per_class: int = 10,
                  report: Callable[[str], None] = lambda m: None) -> SplitData:
    """The seed's split, LMDBs (with landmarks) and mean under ``work/data/size<S>/seed<k>``.

    Built once into a temporary folder and renamed, so an interrupted build is redone.
    """
    from caffe_compat.formats.blob_io import write_blobproto
    from caffe_compat.data.convert import compute_mean, convert_imageset
    from experiments.defaults import DefaultPaths, ensure_landmarks
    from caffe_compat.data.image_list import read_image_list
    from caffe_compat.data.split import make_split
    repo = Path(__file__).resolve().parents[2]
    defaults = DefaultPaths(repo)
    images = Path(images) if images is not None else defaults.images
    landmarks = images / "list_landmarks.txt"
    if images == defaults.images:
        ensure_landmarks(defaults, report)
    final = Path(work) / "data" / f"size{size}" / f"seed{seed}"
    if not (final / "mean.binaryproto").is_file():
        final.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(final, is_dir=True) as tmp:
            make_split(images, tmp, train_per_class, test_per_class, seed)
            for split in ("train", "test"):
                convert_imageset(os.fspath(images) + os.sep, os.fspath(tmp / f"{split}.txt"),
                                 os.fspath(tmp / split), resize_height=size, resize_width=size,
                                 landmark_file=os.fspath(landmarks) if landmarks.is_file() else None,
                                 show_progress=False)
            write_blobproto(tmp / "mean.binaryproto", compute_mean(os.fspath(tmp / "train"),
                                                                   show_progress=False))
        report(f"built split seed {seed} at {size}×{size}: {final}")
    return SplitData(final / "train", final / "test", final / "mean.binaryproto",
                     len(read_image_list(final / "train.txt")),
                     len(read_image_list(final / "test.txt")))


# ------------------------------------------------------------------------------- nets


def _phase_of(lp: caffe_pb2.LayerParameter, where: str) -> int:
    phases = {r.phase for r in lp.include if r.HasField("phase")}
    if len(phases) != 1:
        raise ProtocolError(f"{where}: Data layer '{lp.name}' needs exactly one "
                            "include { phase: TRAIN|TEST } so its source can be rewritten")
    return phases.pop()


def _data_layers(net: caffe_pb2.NetParameter, where: str) -> list[caffe_pb2.LayerParameter]:
    bad = [lp.name for lp in net.layer if lp.type in ("ImageData", "HDF5Data", "WindowData")]
    if bad:
        raise ProtocolError(f"{where}: layer(s) {', '.join(bad)} are not Data (LMDB) layers; "
                            "the protocol rewrites Data layers only")
    return [lp for lp in net.layer if lp.type == "Data"]


def rewrite_sources(net: caffe_pb2.NetParameter, data: SplitData, where: str) -> dict[int, int]:
    """Point every Data layer at ``data`` (in place); returns {phase: batch size}."""
    batch = {}
    for lp in _data_layers(net, where):
        phase = _phase_of(lp, where)
        lp.data_param.source = os.fspath(data.train_db if phase == TRAIN else data.test_db)
        lp.data_param.backend = caffe_pb2.DataParameter.LMDB
        lp.transform_param.mean_file = os.fspath(data.mean)
        lp.transform_param.ClearField("mean_value")
        batch[phase] = lp.data_param.batch_size
    if set(batch) != {TRAIN, TEST}:
        raise ProtocolError(f"{where}: needs one TRAIN and one TEST Data layer")
    return batch


def output_of(net: caffe_pb2.NetParameter, layer_type: str, where: str) -> str:
    """The top of the net's first ``layer_type`` layer (Accuracy: the top-1 one)."""
    for lp in net.layer:
        if lp.type == layer_type and lp.top and not (
                layer_type == "Accuracy" and lp.accuracy_param.top_k != 1):
            return lp.top[0]
    raise ProtocolError(f"{where}: no {layer_type} layer (the protocol reports its output)")


def model_files(model_dir: Path) -> tuple[Path, Path]:
    """(solver.prototxt, the train_val it names) of a models/<name> folder.

    The ``net`` path is read as ``caffe train`` run from the checkout reads it, falling back
    to the solver file's folder.
    """
    solver = Path(model_dir) / "solver.prototxt"
    if not solver.is_file():
        raise ProtocolError(f"{solver}: missing (every models/<name> folder needs a "
                            "solver.prototxt naming its train_val.prototxt with 'net:')")
    param = read_text_proto(solver, caffe_pb2.SolverParameter)
    if not param.HasField("net"):
        raise ProtocolError(f"{solver}: the protocol needs 'net: \"...train_val.prototxt\"' "
                            "(one net with TRAIN and TEST Data layers)")
    net, tried = resolve_like_caffe(param.net, solver)
    if net is None:
        raise ProtocolError(f"{solver}: net file '{param.net}' not found (tried "
                            f"{' and '.join(map(str, tried))})")
    return solver, net


def resolve_like_caffe(entry: str, solver_path: Path) -> tuple[Path | None, list[Path]]:
    """A path a solver file names (``net:``, ``weights:``) as ``caffe train`` run from the
    checkout reads it, falling back to the solver file's folder: (the existing file or None,
    the candidates tried)."""
    from caffe_compat.commands.model_library import resolve_path
    repo = Path(__file__).resolve().parents[2]
    return resolve_path(entry, [repo, Path(solver_path).resolve().parent])


def embed_net(sp: caffe_pb2.SolverParameter, solver_path: Path, data: SplitData,
              train_batch: int, test_batch: int) -> Path:
    """Read the net ``sp`` names, point its Data layers at ``data`` with these batch sizes
    and put it into ``sp.net_param`` (in memory; the file is untouched). Returns its path."""
    net_path, _ = resolve_like_caffe(sp.net, solver_path)
    if net_path is None:
        raise ProtocolError(f"{solver_path}: net file '{sp.net}' not found")
    net = read_text_proto(net_path, caffe_pb2.NetParameter)
    rewrite_sources(net, data, os.fspath(net_path))
    for lp in net.layer:
        if lp.type == "Data":
            lp.data_param.batch_size = train_batch if _phase_of(lp, "") == TRAIN else test_batch
    sp.ClearField("net")
    sp.net_param.CopyFrom(net)
    return net_path


@dataclass
class RunPlan:
    """Everything a run needs, fixed before training: the edited solver and its numbers."""
    model: str
    seed: int
    epochs: int
    solver_param: caffe_pb2.SolverParameter
    iters_per_epoch: int
    test_iter: int
    data: SplitData
    loss_top: str
    accuracy_top: str
    key: dict          # what must match for saved records/snapshots to be reused
    precision: str = "fp32"     # fp32 (Caffe's arithmetic) or bf16 autocast of the passes
    layout: str = "nchw"        # the train net's convolution weights: nchw or nhwc


def plan_run(model_dir: Path, seed: int, epochs: int, work: Path, weights: str | None = None,
             images: Path | None = None, report: Callable[[str], None] = lambda m: None,
             precision: str = "fp32", layout: str = "nchw") -> RunPlan:
    """Read the model folder, prepare the seed's data and edit the solver for this run.
    ``precision`` and ``layout`` are resolved choices (not ``auto``); other than fp32/nchw
    they enter the key, so a run never mixes epochs computed two ways."""
    from caffe_compat.engine.solver.params import read_solver_param
    model_dir = Path(model_dir)
    solver_path, net_path = model_files(model_dir)
    net = read_text_proto(net_path, caffe_pb2.NetParameter)
    size = stored_size(net, os.fspath(net_path))
    data = prepare_split(work, seed, size, images, report=report)
    batch = rewrite_sources(net, data, os.fspath(net_path))
    sp = read_solver_param(os.fspath(solver_path))
    sp.ClearField("net")
    sp.net_param.CopyFrom(net)
    per_iter = batch[TRAIN] * sp.iter_size
    iters_per_epoch = max(1, round(data.n_train / per_iter))
    test_iter = math.ceil(data.n_test / batch[TEST])
    del sp.test_iter[:]
    sp.test_iter.append(test_iter)
    sp.test_interval, sp.test_initialization = NEVER, False
    sp.display, sp.snapshot, sp.snapshot_after_train = 0, 0, False
    sp.random_seed = seed
    chosen = [Path(weights).resolve()] if weights else solver_weights(sp, solver_path)
    del sp.weights[:]
    sp.weights.extend(os.fspath(w) for w in chosen)
    key = {"model": model_dir.name, "seed": seed, "epochs": epochs,
           "solver_sha1": _sha1(solver_path), "net_sha1": _sha1(net_path),
           "stored_size": size, "weights": ",".join(w.name for w in chosen) or None}
    if precision != "fp32":
        key["precision"] = precision
    if layout != "nchw":
        key["layout"] = layout
    return RunPlan(model_dir.name, seed, epochs, sp, iters_per_epoch, test_iter, data,
                   output_of(net, "SoftmaxWithLoss", os.fspath(net_path)),
                   output_of(net, "Accuracy", os.fspath(net_path)), key, precision, layout)


def solver_weights(sp: caffe_pb2.SolverParameter, solver_path: Path,
                   must_exist: bool = True) -> list[Path]:
    """The caffemodels a solver's ``weights:`` names (comma lists allowed), as absolute paths.

    Relative paths are read as ``caffe train`` run from the checkout reads them, falling back
    to the solver file's folder.
    """
    found = []
    for entry in (w for field in sp.weights for w in field.split(",") if w):
        hit, tried = resolve_like_caffe(entry, solver_path)
        if hit is None and must_exist:
            raise ProtocolError(f"{solver_path}: weights '{entry}' not found (a pretrained "
                                "caffemodel: make it with tools/pretrain.py, or run "
                                "tools/reproduce_paper.py --pretrained)")
        found.append((hit or tried[0]).resolve())
    return found


def solver_summary_line(sp: caffe_pb2.SolverParameter) -> str:
    """Update rule, rate schedule and train batch of a solver with ``net_param``, in one line."""
    batch = next((lp.data_param.batch_size for lp in sp.net_param.layer
                  if lp.type == "Data" and _phase_of(lp, "") == TRAIN), 0)
    policy = sp.lr_policy + "".join(
        f" {f} {getattr(sp, f):g}" for f in ("gamma", "power", "stepsize")
        if sp.HasField(f) and sp.lr_policy != "fixed")
    if sp.stepvalue:
        policy += " stepvalue " + ",".join(map(str, sp.stepvalue))
    if sp.lr_policy in ("poly", "sigmoid") or sp.HasField("max_iter"):
        policy += f", max_iter {sp.max_iter}"
    clip = f", clip_gradients {sp.clip_gradients:g}" if sp.clip_gradients > 0 else ""
    return (f"{sp.type} base_lr {sp.base_lr:g} momentum {sp.momentum:g} weight_decay "
            f"{sp.weight_decay:g}{clip}, lr_policy {policy}, batch {batch}"
            f"{f' × iter_size {sp.iter_size}' if sp.iter_size > 1 else ''}")


def solver_summary(plan: RunPlan) -> str:
    """The solver line plus what one epoch is, for the results' header."""
    return (f"{solver_summary_line(plan.solver_param)} → {plan.iters_per_epoch} iterations per "
            f"epoch of {plan.data.n_train} images")


# ---------------------------------------------------------------------------- training
