"""Valid seed inputs of every reader, and the public call that reads each (the fuzz tier).

``make_seeds(folder)`` writes the fixtures readers need (a net, images, a caffemodel) into
``folder`` and returns ``{format: [seed bytes, ...]}``. ``READERS[format](path, folder)``
loads one (mutated) input written at ``path`` the way a user would: a net is built and run
forward, a database is read through a Data layer, a solverstate is restored and stepped.
"""
from __future__ import annotations

import os
import shutil

import numpy as np

NET = """name: "fz"
input: "data" input_shape { dim: 2 dim: 3 dim: 8 dim: 8 }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 weight_filler { type: "xavier" } } }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "relu" type: "ReLU" bottom: "pool" top: "pool" }
layer { name: "ip" type: "InnerProduct" bottom: "pool" top: "ip" inner_product_param { num_output: 5 } }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
"""
TRAIN_NET = """name: "fzt"
layer { name: "d" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } shape { dim: 2 }
                     data_filler { type: "constant" value: 0.5 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 weight_filler { type: "xavier" } } }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip" type: "InnerProduct" bottom: "pool" top: "ip" inner_product_param { num_output: 5 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""
SOLVER = """net: "train_net.prototxt"
base_lr: 0.01
momentum: 0.9
lr_policy: "multistep"
stepvalue: 5
gamma: 0.5
max_iter: 10
type: "SGD"
snapshot_prefix: "snap/fz"
"""
DATA_NET = """layer { name: "data" type: "Data" top: "data" top: "label"
  data_param { source: "%s" backend: %s batch_size: 2 } }"""
IMAGE_NET = """layer { name: "data" type: "ImageData" top: "data" top: "label"
  image_data_param { source: "%s" root_folder: "%s/" batch_size: 2 new_height: 8 new_width: 8 } }"""
HDF5_NET = """layer { name: "data" type: "HDF5Data" top: "data" top: "label"
  hdf5_data_param { source: "%s" batch_size: 2 } }"""


def _lmdb_folder(folder: str, records: list[bytes], backend: str = "lmdb") -> str:
    from caffe_compat.data.db import DBWriter
    if os.path.exists(folder):
        shutil.rmtree(folder)
    with DBWriter(folder, backend) as w:
        for i, value in enumerate(records):
            w.put(f"{i:08d}", value)
    return folder


def _datums(folder: str) -> list[bytes]:
    import cv2
    from caffe_compat.formats.blob_io import array_to_datum
    rng = np.random.default_rng(0)
    raw = array_to_datum(rng.integers(0, 255, (3, 8, 8), dtype=np.uint8), label=1)
    enc = array_to_datum(rng.integers(0, 255, (3, 8, 8), dtype=np.uint8), label=2)
    enc.channels = enc.height = enc.width = 0
    img = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
    enc.data, enc.encoded = cv2.imencode(".png", img)[1].tobytes(), True
    jpg = array_to_datum(np.zeros((3, 8, 8), np.uint8), label=3)
    jpg.channels = jpg.height = jpg.width = 0
    jpg.data, jpg.encoded = cv2.imencode(".jpg", img)[1].tobytes(), True
    return [d.SerializeToString() for d in (raw, enc, jpg)]


def make_seeds(folder: str) -> dict[str, list[bytes]]:
    """Write the fixtures into ``folder``; return the seed inputs of every format."""
    import cv2
    import h5py
    import caffe_compat as caffe
    from caffe_compat.engine import weights
    from caffe_compat.formats.blob_io import write_blobproto
    from caffe_compat.proto import caffe_pb2
    os.makedirs(os.path.join(folder, "snap"), exist_ok=True)
    put = lambda name, data: open(os.path.join(folder, name), "wb").write(data)  # noqa: E731
    put("net.prototxt", NET.encode())
    put("train_net.prototxt", TRAIN_NET.encode())
    put("solver.prototxt", SOLVER.encode())
    net = caffe.Net(os.path.join(folder, "net.prototxt"), caffe.TEST)
    weights.save(net.module, os.path.join(folder, "w.caffemodel"))
    weights.save(net.module, os.path.join(folder, "w.caffemodel.h5"))
    train = caffe.Net(os.path.join(folder, "train_net.prototxt"), caffe.TRAIN)
    weights.save(train.module, os.path.join(folder, "snap/fz_iter_3.caffemodel"))
    state = caffe_pb2.SolverState(iter=3, learned_net="snap/fz_iter_3.caffemodel", current_step=0)
    for p in train.module.learnable_params:
        state.history.add().CopyFrom(weights.tensor_to_blobproto(p.tensor.detach() * 0 + 0.1))
    write_blobproto(os.path.join(folder, "mean.binaryproto"),
                    np.arange(3 * 8 * 8, dtype=np.float32).reshape(3, 8, 8))
    for i in range(3):
        cv2.imwrite(os.path.join(folder, f"im{i}.png"), np.full((9, 7, 3), 40 * i, np.uint8))
    datums = _datums(folder)
    _lmdb_folder(os.path.join(folder, "seed_lmdb"), datums)
    _lmdb_folder(os.path.join(folder, "seed_leveldb"), datums, "leveldb")
    with h5py.File(os.path.join(folder, "seed.h5"), "w") as f:
        f["data"] = np.ones((4, 3, 4, 4), np.float32)
        f["label"] = np.arange(4, dtype=np.float32)
    rd = lambda name: open(os.path.join(folder, name), "rb").read()  # noqa: E731
    marks = ("3\nimage_name clothes_type variation_type landmark_visibility_1 ...\n"
             "im0.png 1 1 0 10 12 0 20 12 1 5 30 0 25 30 0 8 50 2 22 50\n"
             "im1.png 2 1 0 10 40 0 30 40 0 9 70 0 31 70\n"
             "im2.png 3 2 " + " ".join(f"0 {i} {2 * i}" for i in range(8)) + "\n")
    return {
        "net_prototxt": [NET.encode()],
        "solver_prototxt": [SOLVER.encode(), SOLVER.replace('"SGD"', '"Adam"').encode()],
        "caffemodel": [rd("w.caffemodel")],
        "caffemodel_h5": [rd("w.caffemodel.h5")],
        "solverstate": [state.SerializeToString()],
        "binaryproto": [rd("mean.binaryproto")],
        "datum": datums,
        "lmdb_record": datums,
        "data_mdb": [rd("seed_lmdb/data.mdb")],
        "leveldb": [rd(os.path.join("seed_leveldb", _leveldb_table(folder)))],
        "image_list": [b"im0.png 0\nim1.png 1\nim2.png 2\n"],
        "landmark_list": [marks.encode()],
        "hdf5": [rd("seed.h5")],
    }


def _leveldb_table(folder: str) -> str:
    """The file of the seed LevelDB that holds the records (its largest one)."""
    names = os.listdir(os.path.join(folder, "seed_leveldb"))
    return max(names, key=lambda n: os.path.getsize(os.path.join(folder, "seed_leveldb", n)))


# ---------------------------------------------------------------------------- readers


def _net_forward(text: str, folder: str, name: str):
    import caffe_compat as caffe
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        f.write(text)
    net = caffe.Net(path, caffe.TRAIN)
    try:
        net.forward()
        net.forward()
    finally:
        for layer in net.module.layers:      # stop prefetch threads, close databases
            getattr(layer, "close", lambda: None)()


def read_net(path, folder):
    import caffe_compat as caffe
    net = caffe.Net(path, caffe.TEST)   # Python layers allowed: only layer classes run
    net.forward()


def read_solver(path, folder):
    from caffe_compat.engine.solver.params import read_solver_param
    read_solver_param(path)


def read_caffemodel(path, folder):
    import caffe_compat as caffe
    caffe.Net(os.path.join(folder, "net.prototxt"), caffe.TEST).copy_from(path)


def read_solverstate(path, folder):
    from caffe_compat.pycaffe_solver import get_solver
    solver = get_solver(os.path.join(folder, "solver.prototxt"))
    solver.restore(path)
    solver.step(1)


def read_binaryproto(path, folder):
    from caffe_compat.formats.blob_io import read_blobproto
    read_blobproto(path)


def read_datum(path, folder):
    from caffe_compat.formats.datum import decode_datum
    decode_datum(open(path, "rb").read(), where=path)


def read_lmdb_record(path, folder):
    db = os.path.join(folder, "rec_lmdb")
    seeds = _datums(folder)
    _lmdb_folder(db, [seeds[0], open(path, "rb").read(), seeds[1]])
    _net_forward(DATA_NET % (db, "LMDB"), folder, "data_net.prototxt")


def read_data_mdb(path, folder):
    db = os.path.join(folder, "mut_lmdb")
    os.makedirs(db, exist_ok=True)
    shutil.copyfile(path, os.path.join(db, "data.mdb"))
    _net_forward(DATA_NET % (db, "LMDB"), folder, "data_net.prototxt")


def read_leveldb(path, folder):
    db = os.path.join(folder, "mut_leveldb")
    if os.path.exists(db):
        shutil.rmtree(db)
    shutil.copytree(os.path.join(folder, "seed_leveldb"), db)
    shutil.copyfile(path, os.path.join(db, _leveldb_table(folder)))
    _net_forward(DATA_NET % (db, "LEVELDB"), folder, "data_net.prototxt")


def read_image_list(path, folder):
    _net_forward(IMAGE_NET % (path, folder), folder, "image_net.prototxt")


def read_landmark_list(path, folder):
    from caffe_compat.data.landmarks import read_landmarks
    read_landmarks(path)


def read_hdf5(path, folder):
    listing = os.path.join(folder, "h5list.txt")
    with open(listing, "w") as f:
        f.write(path + "\n")
    _net_forward(HDF5_NET % listing, folder, "hdf5_net.prototxt")


READERS = {
    "net_prototxt": read_net, "solver_prototxt": read_solver, "caffemodel": read_caffemodel,
    "caffemodel_h5": read_caffemodel, "solverstate": read_solverstate,
    "binaryproto": read_binaryproto, "datum": read_datum, "lmdb_record": read_lmdb_record,
    "data_mdb": read_data_mdb, "leveldb": read_leveldb, "image_list": read_image_list,
    "landmark_list": read_landmark_list, "hdf5": read_hdf5,
}
SUFFIX = {"caffemodel_h5": ".caffemodel.h5", "hdf5": ".h5", "caffemodel": ".caffemodel",
          "solverstate": ".solverstate", "net_prototxt": ".prototxt",
          "solver_prototxt": ".prototxt", "binaryproto": ".binaryproto"}
TEXT_FORMATS = {"net_prototxt", "solver_prototxt", "image_list", "landmark_list"}
