"""Issue 12's promises, one by one: hostile files, bad commands and untrusted nets fail with
one clean line (the project's CaffeCompatError) and leave nothing half-written."""
from __future__ import annotations

import os
import struct
from pathlib import Path

import h5py
import numpy as np
import pytest

import caffe_compat as caffe
from caffe_compat.data import db as dbmod
from caffe_compat.data.db import DBWriter, open_db
from caffe_compat.data.db_guard import check_lmdb_meta
from caffe_compat.data.image_list import read_image_list
from caffe_compat.engine.layers.base import LayerError
from caffe_compat.engine.solver.params import SolverParamError, validate
from caffe_compat.engine.solver.snapshot import SnapshotError, latest_snapshot, read_state
from caffe_compat.engine.weights import WeightsError
from caffe_compat.formats.blob_io import array_to_datum
from caffe_compat.formats.budget import check_shape
from caffe_compat.formats.errors import CaffeCompatError, DataError, ResourceError
from caffe_compat.formats.image_header import check_encoded_size, image_size
from caffe_compat.proto import caffe_pb2


def _lmdb(path, n=5):
    with DBWriter(path, "lmdb") as w:
        for i in range(n):
            w.put(f"{i:08d}", array_to_datum(np.full((3, 4, 4), i, np.uint8), i).SerializeToString())
    return path


# ---------------------------------------------------------------------------- databases


def test_truncated_data_mdb_is_a_clean_error_not_sigbus(tmp_path):
    db = _lmdb(tmp_path / "db")
    data = (db / "data.mdb").read_bytes()
    (db / "data.mdb").write_bytes(data[: len(data) - 4096])
    with pytest.raises(DataError, match="truncated LMDB.*last is page"):
        open_db(db)


def test_meta_page_fields_are_checked(tmp_path):
    db = _lmdb(tmp_path / "db")
    check_lmdb_meta(db)                       # the valid file passes
    raw = bytearray((db / "data.mdb").read_bytes())
    raw[16:20] = b"\0\0\0\0"                  # magic of meta page 0
    (db / "data.mdb").write_bytes(bytes(raw))
    with pytest.raises(DataError, match="not an LMDB database"):
        check_lmdb_meta(db)
    raw[16:20] = struct.pack("<I", 0xBEEFC0DE)
    struct.pack_into("<I", raw, 16 + 24, 3000)  # page size of meta page 0
    (db / "data.mdb").write_bytes(bytes(raw))
    with pytest.raises(DataError, match="page size 3000"):
        check_lmdb_meta(db)


@pytest.mark.parametrize("name", ["inplace_corruption_sigabrt.mdb",
                                  "inplace_corruption_sigbus.mdb"])
def test_in_place_corruption_that_kills_liblmdb_is_caught_in_the_child(tmp_path, name):
    """Reproducers from the fuzz corpus: walked by a plain cursor, liblmdb aborts (SIGABRT)
    or faults (SIGBUS) on them; here this process survives with one line naming the
    database (the child's walk dies, or liblmdb reports the corruption first)."""
    corpus = Path(__file__).resolve().parent / "fuzz_corpus" / "data_mdb" / name
    (tmp_path / "db").mkdir()
    (tmp_path / "db" / "data.mdb").write_bytes(corpus.read_bytes())
    with pytest.raises(DataError, match="db: corrupt lmdb database"):
        open_db(tmp_path / "db")


def test_a_reader_killed_by_a_signal_becomes_a_clean_error(tmp_path, monkeypatch):
    """The walk runs in a child; its death by signal is reported naming the database."""
    db = _lmdb(tmp_path / "db")
    script = tmp_path / "dies.py"
    script.write_text("import os, signal\nos.kill(os.getpid(), signal.SIGBUS)\n")
    monkeypatch.setattr(dbmod, "probe", lambda path, backend: _probe_with(script, path))
    with pytest.raises(DataError, match=r"db: corrupt lmdb database .*SIGBUS"):
        open_db(db)


def _probe_with(script, path):
    import subprocess
    import sys
    from caffe_compat.data import db_guard
    done = subprocess.run([sys.executable, str(script)], capture_output=True)
    assert done.returncode < 0
    real = db_guard.subprocess.run
    try:
        db_guard.subprocess.run = lambda *a, **k: done
        db_guard._run_child(path, "lmdb", True, timeout=10)
    finally:
        db_guard.subprocess.run = real


def test_full_disk_leaves_no_database_and_no_temporary(tmp_path, monkeypatch):
    import lmdb

    def full(self):
        raise lmdb.DiskError("mdb_txn_commit: No space left on device")
    monkeypatch.setattr(DBWriter, "_commit_pending", full)
    with pytest.raises(DataError, match="out.*cannot write the lmdb database.*No space"):
        _lmdb(tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_library_errors_while_reading_are_wrapped(tmp_path):
    import lmdb
    import plyvel
    for exc, backend in ((lmdb.CorruptedError("mdb_get: MDB_CORRUPTED"), "lmdb"),
                         (plyvel.CorruptionError("bad block"), "leveldb")):
        with pytest.raises(DataError, match=f"db: cannot read the {backend} database"):
            with dbmod.library_errors(str(tmp_path / "db"), backend):
                raise exc


# ---------------------------------------------------------------------------- declared sizes


def test_huge_or_negative_input_dims_fail_at_build(tmp_path):
    for dims, message in (("dim: 2147483647 dim: 3 dim: 224 dim: 224", "memory budget"),
                          ("dim: -1 dim: 3", "negative dimension")):
        path = tmp_path / "net.prototxt"
        path.write_text(f'input: "data" input_shape {{ {dims} }}')
        with pytest.raises(LayerError, match=f"net.prototxt: layer 'input'.*{message}"):
            caffe.Net(str(path), caffe.TEST)


def test_pooling_huge_stride_is_refused_before_padding(tmp_path, monkeypatch):
    monkeypatch.setenv("CAFFE_COMPAT_MEMORY_BUDGET", "64M")
    path = tmp_path / "net.prototxt"
    path.write_text('input: "data" input_shape { dim: 8 dim: 8 dim: 30 dim: 30 }\n'
                    'layer { name: "p" type: "Pooling" bottom: "data" top: "p" '
                    'pooling_param { pool: MAX kernel_size: 3 stride: 100000 } }')
    net = caffe.Net(str(path), caffe.TEST)
    with pytest.raises(LayerError, match="layer 'p' \\(Pooling\\): padded input.*budget"):
        net.forward()


def test_budget_env_and_shape_check(monkeypatch):
    monkeypatch.setenv("CAFFE_COMPAT_MEMORY_BUDGET", "1K")
    assert check_shape((16, 16), "x") == (16, 16)          # exactly 1 KiB of float32
    with pytest.raises(ResourceError, match="x: shape \\[16, 17\\] needs"):
        check_shape((16, 17), "x")


def test_png_header_bigger_than_its_bytes_is_refused_before_decoding():
    import cv2
    png = bytearray(cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1].tobytes())
    assert image_size(bytes(png)) == (8, 8, 3)
    png[16] ^= 0x40                                          # width 8 → 2^30 + 8
    with pytest.raises(DataError, match="more than its"):
        check_encoded_size(bytes(png))
    with pytest.raises(DataError, match="not a PNG, JPEG"):
        check_encoded_size(b"\x00\x00\x01\x00" + bytes(40))  # ICO: size not checkable


def test_hdf5_dataset_declaring_more_than_the_file_holds(tmp_path):
    from caffe_compat.engine import weights
    path = tmp_path / "w.caffemodel.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("data/conv/0", shape=(1 << 14, 1 << 14), dtype="f4")
    with pytest.raises(DataError, match="w.caffemodel.h5: /data/conv/0: declares shape"):
        weights._read_h5_layers(str(path))


def test_copy_from_checks_value_count(tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_text('input: "data" input_shape { dim: 1 dim: 4 }\nlayer { name: "ip" '
                    'type: "InnerProduct" bottom: "data" top: "ip" '
                    'inner_product_param { num_output: 2 } }')
    net = caffe.Net(str(path), caffe.TEST)
    model = caffe_pb2.NetParameter()
    layer = model.layer.add(name="ip", type="InnerProduct")
    for shape, count in (((2, 4), 5), ((2,), 2)):
        blob = layer.blobs.add()
        blob.shape.dim.extend(shape)
        blob.data.extend([0.5] * count)
    (tmp_path / "w.caffemodel").write_bytes(model.SerializeToString())
    with pytest.raises(WeightsError, match="param 0 of layer 'ip' has 5 values but shape"):
        net.copy_from(str(tmp_path / "w.caffemodel"))


# ---------------------------------------------------------------------------- solver state


@pytest.mark.parametrize("field,value", [("iter", -1), ("iter", -2**31), ("current_step", -1)])
def test_solverstate_counters_are_checked_at_load(tmp_path, field, value):
    state = caffe_pb2.SolverState(**{field: value})
    path = tmp_path / "s.solverstate"
    path.write_bytes(state.SerializeToString())
    with pytest.raises(SnapshotError, match=f"s.solverstate: {field} is {value}"):
        read_state(str(path))


@pytest.mark.parametrize("text,message", [
    ('type: "Adam" momentum2: 1', "Adam needs 0 <= momentum2 < 1"),
    ('snapshot_prefix: "a\\000b"', "snapshot_prefix contains a NUL byte"),
    ("base_lr: inf", "base_lr must be a finite number"),
    ("max_iter: -5", "max_iter must be >= 0")])
def test_solver_numbers_that_fail_mid_run_are_refused(text, message):
    from google.protobuf import text_format
    param = text_format.Parse('net: "n.prototxt" lr_policy: "fixed" ' + text, caffe_pb2.SolverParameter())
    with pytest.raises(SolverParamError, match=f"s.prototxt: {message}"):
        validate(param, "s.prototxt")


# ---------------------------------------------------------------------------- python layers


def _python_net(tmp_path, module, layer):
    path = tmp_path / "py.prototxt"
    path.write_text('input: "data" input_shape { dim: 1 }\nlayer { name: "evil" type: "Python" '
                    f'bottom: "data" top: "out" python_param {{ module: "{module}" layer: '
                    f'"{layer}" }} }}')
    return str(path)


@pytest.mark.parametrize("module,layer,reason", [
    ("os", "abort", "standard-library module"), ("sys", "exit", "standard-library module"),
    ("collections", "OrderedDict", "standard-library module"),
    ("numpy", "zeros", "not a layer class"), ("numpy", "ndarray", "not a layer class")])
def test_python_layer_must_be_a_layer_class(tmp_path, module, layer, reason):
    with pytest.raises(LayerError, match=reason):
        caffe.Net(_python_net(tmp_path, module, layer), caffe.TEST)


def test_python_layers_can_be_refused(tmp_path, monkeypatch):
    path = _python_net(tmp_path, "pylayer_examples", "ScaleLayer")
    with pytest.raises(LayerError, match="Python layers are refused"):
        caffe.Net(path, caffe.TEST, allow_python_layers=False)
    monkeypatch.setenv("CAFFE_COMPAT_PYTHON_LAYERS", "refuse")
    with pytest.raises(LayerError, match="was not imported"):
        caffe.Net(path, caffe.TEST)
    # The keyword beats the environment: the layer is built (and fails on its own terms,
    # ScaleLayer needs a param_str; user exceptions reach the caller unchanged, as in pycaffe).
    with pytest.raises(ValueError) as info:
        caffe.Net(path, caffe.TEST, allow_python_layers=True)
    assert "refused" not in str(info.value)
    assert any("setup of Python layer" in note for note in getattr(info.value, "__notes__", []))


# ---------------------------------------------------------------------------- lists, snapshots


@pytest.mark.parametrize("label", ["4294967296", "1_0", "\u0663", "+5", "0x10"])
def test_labels_must_be_ascii_int32(tmp_path, label):
    path = tmp_path / "list.txt"
    path.write_text(f"a.png {label}\n", encoding="utf-8")
    with pytest.raises(DataError, match="list.txt:1: label"):
        read_image_list(path)
    path.write_text("a.png -7\n")
    assert read_image_list(path)[0].label == -7


def test_latest_snapshot_skips_incomplete_pairs_and_cleans_temporaries(tmp_path):
    from caffe_compat.commands.train_checks import resolve_auto_snapshot
    prefix = str(tmp_path / "run")
    for it in (4, 8):
        (tmp_path / f"run_iter_{it}.caffemodel").write_bytes(b"")
        state = caffe_pb2.SolverState(iter=it, learned_net=f"run_iter_{it}.caffemodel")
        (tmp_path / f"run_iter_{it}.solverstate").write_bytes(state.SerializeToString())
    (tmp_path / "run_iter_12.caffemodel").write_bytes(b"")      # killed before its state
    (tmp_path / "run_iter_16.solverstate").write_bytes(b"\xff\xff")  # unreadable
    stale = tmp_path / ".run_iter_12.solverstate.tmp-999999999-abcd"
    stale.write_bytes(b"partial")
    assert latest_snapshot(prefix) == str(tmp_path / "run_iter_8.solverstate")
    assert resolve_auto_snapshot("auto", prefix) == str(tmp_path / "run_iter_8.solverstate")
    assert not stale.exists()
    assert latest_snapshot(str(tmp_path / "other")) is None
    assert resolve_auto_snapshot("given.solverstate", prefix) == "given.solverstate"


def test_cpu_procs_must_be_positive():
    from caffe_compat.commands.common import CliError
    from caffe_compat.commands.train_checks import check_cpu_procs
    assert check_cpu_procs(2) == 2
    for bad in (0, -3):
        with pytest.raises(CliError, match="--cpu-procs must be a process count"):
            check_cpu_procs(bad)


def test_every_project_error_is_a_caffe_compat_error():
    from caffe_compat.engine.net.assemble import NetDefinitionError
    from caffe_compat.formats.blob_io import ProtoError
    for cls in (DataError, ResourceError, LayerError, WeightsError, SnapshotError,
                SolverParamError, NetDefinitionError, ProtoError):
        assert issubclass(cls, CaffeCompatError)


def test_png_chunk_longer_than_the_record_is_refused_before_decoding():
    """A mutated chunk length (4 GiB) kept libpng's reader busy for seconds (a fuzz 'hang');
    the header walk refuses it first, naming the chunk."""
    from caffe_compat.formats.datum import decode_datum
    data = (Path(__file__).parent / "fuzz_corpus" / "datum" / "png_chunk_length_4gib.bin").read_bytes()
    with pytest.raises(DataError, match=r"chunk IDAT at byte 33 declares 4294967167 bytes"):
        decode_datum(data, where="record 7")
