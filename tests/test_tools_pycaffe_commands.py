"""The pycaffe companion commands: classify (report, .npy output, inputs of every kind),
extract_features (Datum records, Caffe's keys, LMDB and LevelDB) and the proto upgrades."""
import json

import cv2
import numpy as np
import pytest
from google.protobuf import text_format

from caffe_compat.data.db import open_db
from caffe_compat.formats.blob_io import datum_to_array, write_blobproto
from caffe_compat.proto import caffe_pb2
from tool_utils import load_tool



DEPLOY = """input: 'data' input_shape { dim: 2 dim: 3 dim: 6 dim: 6 }
layer { name: 'gap' type: 'Pooling' bottom: 'data' top: 'gap' pooling_param { pool: AVE global_pooling: true } }
layer { name: 'prob' type: 'Softmax' bottom: 'gap' top: 'prob' }
"""


@pytest.fixture
def model(tmp_path):
    (tmp_path / "deploy.prototxt").write_text(DEPLOY)
    (tmp_path / "empty.caffemodel").write_bytes(b"")
    return str(tmp_path / "deploy.prototxt"), str(tmp_path / "empty.caffemodel")


def _images(folder, n=3):
    folder.mkdir()
    rng = np.random.RandomState(0)
    paths = []
    for i in range(n):
        img = np.zeros((8, 8, 3), np.uint8)
        img[..., i % 3] = 200 + i               # one dominant channel (RGB order i % 3)
        img += rng.randint(0, 10, img.shape).astype(np.uint8)
        paths.append(folder / f"im{i}.png")
        cv2.imwrite(str(paths[-1]), img[:, :, ::-1])
    return paths


def test_classify_folder_json_labels_and_npy(model, tmp_path, capsys):
    tool = load_tool("classify")
    paths = _images(tmp_path / "imgs")
    (tmp_path / "labels.txt").write_text("red\ngreen\nblue\n")
    args = [str(tmp_path / "imgs"), str(tmp_path / "out"), "--model_def", model[0],
            "--pretrained_model", model[1], "--ext", "png", "--images_dim", "8,8",
            "--labels", str(tmp_path / "labels.txt"), "--top_k", "2", "--format", "json",
            "--batch_size", "2", "--channel_swap", "0,1,2", "--raw_scale", "1"]
    assert tool.main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in report] == [str(p) for p in paths]
    assert [r["top"][0]["label"] for r in report] == ["red", "green", "blue"]
    probs = np.load(tmp_path / "out.npy")
    assert probs.shape == (3, 3)
    assert report[0]["top"][0]["probability"] == pytest.approx(float(probs[0].max()), rel=1e-6)


def test_classify_list_center_only_table_and_binaryproto_mean(model, tmp_path, capsys):
    tool = load_tool("classify")
    paths = _images(tmp_path / "imgs")
    (tmp_path / "list.txt").write_text("\n".join(str(p) for p in paths) + "\n")
    write_blobproto(tmp_path / "mean.binaryproto", np.zeros((1, 3, 8, 8), np.float32))
    args = [str(tmp_path / "list.txt"), "--model_def", model[0], "--pretrained_model", model[1],
            "--center_only", "--images_dim", "8,8", "--mean_file",
            str(tmp_path / "mean.binaryproto"), "--top_k", "1"]
    assert tool.main(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == str(paths[0]) and out[1].strip().split()[1] == "2"   # BGR swap: R -> 2
    assert tool.main([str(tmp_path / "missing.png"), "--model_def", model[0],
                      "--pretrained_model", model[1]]) == 1
    assert "no such image" in capsys.readouterr().err


FEATURES = """layer { name: 'data' type: 'DummyData' top: 'data'
  dummy_data_param { shape { dim: 3 dim: 2 dim: 2 dim: 2 } data_filler { type: 'gaussian' } } }
layer { name: 'ip' type: 'InnerProduct' bottom: 'data' top: 'ip'
  inner_product_param { num_output: 4 weight_filler { type: 'gaussian' } } }
"""


@pytest.mark.parametrize("backend", ["lmdb", "leveldb"])
def test_extract_features_records(tmp_path, backend, capsys):
    tool = load_tool("extract_features")
    (tmp_path / "f.prototxt").write_text(FEATURES)
    (tmp_path / "w.caffemodel").write_bytes(b"")
    dbs = f"{tmp_path / 'data_db'},{tmp_path / 'ip_db'}"
    assert tool.main([str(tmp_path / "w.caffemodel"), str(tmp_path / "f.prototxt"), "data,ip",
                      dbs, "2", backend, "CPU"]) == 0
    err = capsys.readouterr().err
    assert "Extracted features of 6 query images for feature blob ip" in err
    assert "Successfully extracted the features!" in err
    with open_db(tmp_path / "ip_db", backend) as db:
        keys = db.keys()
        assert keys == [f"{i:010d}".encode() for i in range(6)]
        datum = caffe_pb2.Datum.FromString(db.get(keys[0]))
        assert (datum.channels, datum.height, datum.width) == (4, 1, 1) and not datum.label
        assert datum_to_array(datum).shape == (4, 1, 1)
    with open_db(tmp_path / "data_db", backend) as db:
        assert caffe_pb2.Datum.FromString(db.get(b"0000000005")).channels == 2


def test_extract_features_errors(tmp_path, capsys):
    tool = load_tool("extract_features")
    assert tool.main(["a", "b"]) == 1 and "Usage: extract_features" in capsys.readouterr().err
    (tmp_path / "f.prototxt").write_text(FEATURES)
    (tmp_path / "w.caffemodel").write_bytes(b"")
    assert tool.main([str(tmp_path / "w.caffemodel"), str(tmp_path / "f.prototxt"), "nope",
                      str(tmp_path / "x"), "1", "lmdb"]) == 1
    assert "Unknown feature blob name nope" in capsys.readouterr().err


V1 = """name: "old"
input: "data" input_dim: 1 input_dim: 3 input_dim: 4 input_dim: 4
layers { name: "conv" type: CONVOLUTION bottom: "data" top: "conv" blobs_lr: 1 blobs_lr: 2
         convolution_param { num_output: 2 kernel_size: 3 } }
layers { name: "relu" type: RELU bottom: "conv" top: "conv" }
"""


def test_upgrade_net_proto_text_and_binary(tmp_path, capsys):
    (tmp_path / "old.prototxt").write_text(V1)
    text_tool = load_tool("upgrade_net_proto_text")
    assert text_tool.main([str(tmp_path / "old.prototxt"), str(tmp_path / "new.prototxt")]) == 0
    new = text_format.Parse((tmp_path / "new.prototxt").read_text(), caffe_pb2.NetParameter())
    assert [(l.name, l.type) for l in new.layer] == [("input", "Input"), ("conv", "Convolution"),
                                                     ("relu", "ReLU")]
    assert list(new.layer[0].input_param.shape[0].dim) == [1, 3, 4, 4] and not new.layers
    assert [p.lr_mult for p in new.layer[1].param] == [1, 2]
    assert "Wrote upgraded NetParameter text proto to" in capsys.readouterr().err
    assert text_tool.main([str(tmp_path / "new.prototxt"), str(tmp_path / "again.prototxt")]) == 0
    assert "File already in latest proto format" in capsys.readouterr().err
    old_bin = text_format.Parse(V1, caffe_pb2.NetParameter())
    (tmp_path / "old.caffemodel").write_bytes(old_bin.SerializeToString())
    bin_tool = load_tool("upgrade_net_proto_binary")
    assert bin_tool.main([str(tmp_path / "old.caffemodel"), str(tmp_path / "new.caffemodel")]) == 0
    upgraded = caffe_pb2.NetParameter.FromString((tmp_path / "new.caffemodel").read_bytes())
    assert upgraded == new
    assert text_tool.main([str(tmp_path / "old.prototxt")]) == 1
    assert text_tool.main([str(tmp_path / "missing"), str(tmp_path / "o")]) == 2


def test_upgrade_solver_proto_text(tmp_path, capsys):
    (tmp_path / "s.prototxt").write_text('net: "n.prototxt" base_lr: 0.1 solver_type: ADAM\n')
    tool = load_tool("upgrade_solver_proto_text")
    assert tool.main([str(tmp_path / "s.prototxt"), str(tmp_path / "t.prototxt")]) == 0
    solver = text_format.Parse((tmp_path / "t.prototxt").read_text(), caffe_pb2.SolverParameter())
    assert solver.type == "Adam" and not solver.HasField("solver_type")
    assert "Wrote upgraded SolverParameter text proto to" in capsys.readouterr().err


def test_classify_through_an_engine_equals_torch(model, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    tool = load_tool("classify")
    _images(tmp_path / "imgs")
    probs = {}
    for engine in ("torch", "onnxruntime"):
        args = [str(tmp_path / "imgs"), str(tmp_path / engine), "--model_def", model[0],
                "--pretrained_model", model[1], "--ext", "png", "--images_dim", "8,8",
                "--engine", engine, "--threads", "1", "--allow-missing-weights"]
        assert tool.main(args) == 0
        err = capsys.readouterr().err
        assert engine == "torch" or "engine onnxruntime: requested" in err
        probs[engine] = np.load(tmp_path / f"{engine}.npy")
    np.testing.assert_allclose(probs["onnxruntime"], probs["torch"], rtol=1e-5, atol=1e-7)
