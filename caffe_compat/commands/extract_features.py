"""``extract_features``: features of named blobs into LMDB/LevelDB ``Datum`` records.

    extract_features pretrained_net_param feature_extraction_proto_file \\
        extract_feature_blob_name1[,name2,...] save_feature_dataset_name1[,name2,...] \\
        num_mini_batches db_type [CPU/GPU] [DEVICE_ID=0]

As Caffe's tools/extract_features.cpp: the net is built in the TEST phase and fed by its own
data layers; each of ``num_mini_batches`` forwards writes, per blob, one record per item of
the batch, keyed by its running index as ten zero-padded digits ("0000000000"). A record is
a Datum with the blob's legacy channels/height/width and the item's values as float_data
(no label). Blob names and database names pair up one to one; databases must not exist.
"""
from __future__ import annotations

import sys

import numpy as np

from caffe_compat.data.db import DBWriter, normalize_backend
from caffe_compat.engine import mode
from caffe_compat.engine.layers.base import TEST
from caffe_compat.formats import glog
from caffe_compat.formats.errors import DataError
from caffe_compat.proto import caffe_pb2
from caffe_compat.pycaffe import Net

USAGE = ("Usage: extract_features  pretrained_net_param  feature_extraction_proto_file  "
         "extract_feature_blob_name1[,name2,...]  save_feature_dataset_name1[,name2,...]  "
         "num_mini_batches  db_type  [CPU/GPU] [DEVICE_ID=0]\n"
         "Note: you can extract multiple features in one pass by specifying multiple feature "
         "blob names and dataset names separated by ','. The names cannot contain white space "
         "characters and the number of blobs and datasets must be equal.")
WHERE = "extract_features.cpp"


def item_datum(blob, n: int) -> caffe_pb2.Datum:
    """Item ``n`` of a blob as Caffe's extract_features stores it."""
    datum = caffe_pb2.Datum(channels=blob.channels, height=blob.height, width=blob.width)
    datum.float_data.extend(np.asarray(blob.data[n], np.float32).reshape(-1).tolist())
    return datum


def _select_device(argv: list[str]) -> None:
    if len(argv) > 6 and argv[6] == "GPU":
        glog.error("Using GPU", f"{WHERE}:52")
        device_id = int(argv[7]) if len(argv) > 7 else 0
        if device_id < 0:
            raise ValueError(f"DEVICE_ID must be >= 0, got {device_id}")
        glog.error(f"Using Device_id={device_id}", f"{WHERE}:58")
        mode.set_device(device_id)
        mode.set_mode_gpu()
    else:
        glog.error("Using CPU", f"{WHERE}:62")
        mode.set_mode_cpu()


def extract(weights: str, proto: str, blob_names: list[str], db_names: list[str],
            num_batches: int, backend: str) -> list[int]:
    """Run the extraction; returns the number of records written per database."""
    if len(blob_names) != len(db_names):
        raise ValueError(f"{len(blob_names)} blob names but {len(db_names)} dataset names: "
                         "the number of blob names and dataset names must be equal")
    net = Net(proto, TEST, weights=weights)
    for name in blob_names:
        if name not in net.blobs:
            raise ValueError(f"Unknown feature blob name {name} in the network {proto}")
    writers = []
    try:
        for name in db_names:
            glog.info(f"Opening dataset {name}", f"{WHERE}:125")
            writers.append(DBWriter(name, normalize_backend(backend)))
        glog.error("Extracting Features", f"{WHERE}:133")
        counts = [0] * len(blob_names)
        for _ in range(num_batches):
            net.forward()
            for i, name in enumerate(blob_names):
                blob = net.blobs[name]
                for n in range(blob.num):
                    writers[i].put(f"{counts[i]:010d}", item_datum(blob, n).SerializeToString())
                    counts[i] += 1
                    if counts[i] % 1000 == 0:
                        writers[i].commit()
                        glog.error(f"Extracted features of {counts[i]} query images for "
                                   f"feature blob {name}", f"{WHERE}:165")
        for i, name in enumerate(blob_names):
            glog.error(f"Extracted features of {counts[i]} query images for feature blob "
                       f"{name}", f"{WHERE}:176")
            writers[i].close()
        writers = []
    finally:
        for w in writers:
            w.abort()
    glog.error("Successfully extracted the features!", f"{WHERE}:181")
    return counts


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help", "-help", "--helpfull") for arg in argv):
        print(USAGE)             # asked for: usage on stdout, success
        return 0
    if len(argv) < 6:
        glog.error(USAGE, f"{WHERE}:35")
        return 1
    try:
        num_batches = int(argv[4])
        _select_device(argv)
        extract(argv[0], argv[1], argv[2].split(","), argv[3].split(","), num_batches, argv[5])
    except (ValueError, DataError, OSError, RuntimeError) as exc:
        print(f"error: extract_features: {exc}", file=sys.stderr)
        return 1
    return 0
