"""The protobuf schema (proto/caffe.proto), its generated module, and caffe_compat.formats.blob_io."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from caffe_compat.formats import blob_io
from caffe_compat.formats.blob_io import ProtoError, ProtoTextError
from caffe_compat.proto import caffe_pb2

ROOT = Path(__file__).resolve().parent.parent
GOLDENS = ROOT / "tests" / "goldens"
BINARY_KINDS = {".caffemodel": caffe_pb2.NetParameter, ".solverstate": caffe_pb2.SolverState,
                ".binaryproto": caffe_pb2.BlobProto}
BINARY_FILES = sorted(p for p in GOLDENS.rglob("*") if p.suffix in BINARY_KINDS)
PROTOTXT_FILES = sorted(GOLDENS.rglob("*.prototxt"))


def _rel(path: Path) -> str:
    return str(path.relative_to(GOLDENS))


# ---------------------------------------------------------------------------- generated code


def test_generated_module_is_current(tmp_path):
    if importlib.util.find_spec("grpc_tools") is None:
        pytest.skip("grpcio-tools is not installed, so caffe_pb2.py cannot be regenerated")
    cmd = [sys.executable, "-m", "grpc_tools.protoc", "-Iproto", f"--python_out={tmp_path}",
           "proto/caffe.proto"]
    subprocess.run(cmd, cwd=ROOT, check=True)
    committed = ROOT / "caffe_compat" / "proto" / "caffe_pb2.py"
    assert (tmp_path / "caffe_pb2.py").read_bytes() == committed.read_bytes(), (
        "caffe_compat/proto/caffe_pb2.py is stale: run `python tools/regenerate_proto.py`")


def test_regenerate_script_check_mode():
    if importlib.util.find_spec("grpc_tools") is None:
        pytest.skip("grpcio-tools is not installed")
    result = subprocess.run([sys.executable, "tools/regenerate_proto.py", "--check"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_package_exports_caffe_pb2():
    import caffe_compat.proto

    assert caffe_compat.proto.caffe_pb2 is caffe_pb2
    assert caffe_pb2.DESCRIPTOR.package == "caffe"


# ---------------------------------------------------------------------------- field numbers


def _number(message, field):
    return message.DESCRIPTOR.fields_by_name[field].number


@pytest.mark.parametrize("message, field, number", [
    (caffe_pb2.BlobProto, "shape", 7), (caffe_pb2.BlobProto, "double_data", 8),
    (caffe_pb2.BlobProto, "num", 1), (caffe_pb2.Datum, "encoded", 7),
    (caffe_pb2.NetParameter, "layer", 100), (caffe_pb2.NetParameter, "layers", 2),
    (caffe_pb2.NetParameter, "input_shape", 8),
    (caffe_pb2.SolverParameter, "net", 24), (caffe_pb2.SolverParameter, "type", 40),
    (caffe_pb2.SolverParameter, "layer_wise_reduce", 41),
    (caffe_pb2.SolverParameter, "weights", 42), (caffe_pb2.SolverParameter, "solver_type", 30),
    (caffe_pb2.SolverParameter, "snapshot_format", 37), (caffe_pb2.SolverState, "current_step", 4),
    (caffe_pb2.LayerParameter, "convolution_param", 106),
    (caffe_pb2.LayerParameter, "propagate_down", 11), (caffe_pb2.LayerParameter, "phase", 10),
    (caffe_pb2.LayerParameter, "input_param", 143), (caffe_pb2.LayerParameter, "crop_param", 144),
    (caffe_pb2.LayerParameter, "python_param", 130), (caffe_pb2.LayerParameter, "swish_param", 147),
    (caffe_pb2.LayerParameter, "clip_param", 148),
    (caffe_pb2.LayerParameter, "landmark_heatmap_param", 10001),
    (caffe_pb2.PoolingParameter, "round_mode", 13), (caffe_pb2.ConvolutionParameter, "dilation", 18),
    (caffe_pb2.DataParameter, "prefetch", 10), (caffe_pb2.DataParameter, "num_landmarks", 101),
    (caffe_pb2.ImageDataParameter, "root_folder", 12),
    (caffe_pb2.ImageDataParameter, "landmark_file", 101),
    (caffe_pb2.ImageDataParameter, "num_landmarks", 102),
    (caffe_pb2.V1LayerParameter, "blobs_lr", 7), (caffe_pb2.V1LayerParameter, "weight_decay", 8),
    (caffe_pb2.V1LayerParameter, "convolution_param", 10),
    (caffe_pb2.V1LayerParameter, "layer", 1), (caffe_pb2.V1LayerParameter, "param", 1001),
])
def test_field_numbers(message, field, number):
    assert _number(message, field) == number


def test_layer_parameter_covers_every_bvlc_layer_param():
    expected = {
        "transform_param": 100, "loss_param": 101, "accuracy_param": 102, "argmax_param": 103,
        "concat_param": 104, "contrastive_loss_param": 105, "convolution_param": 106,
        "data_param": 107, "dropout_param": 108, "dummy_data_param": 109, "eltwise_param": 110,
        "exp_param": 111, "hdf5_data_param": 112, "hdf5_output_param": 113,
        "hinge_loss_param": 114, "image_data_param": 115, "infogain_loss_param": 116,
        "inner_product_param": 117, "lrn_param": 118, "memory_data_param": 119,
        "mvn_param": 120, "pooling_param": 121, "power_param": 122, "relu_param": 123,
        "sigmoid_param": 124, "softmax_param": 125, "slice_param": 126, "tanh_param": 127,
        "threshold_param": 128, "window_data_param": 129, "python_param": 130,
        "prelu_param": 131, "spp_param": 132, "reshape_param": 133, "log_param": 134,
        "flatten_param": 135, "reduction_param": 136, "embed_param": 137, "tile_param": 138,
        "batch_norm_param": 139, "elu_param": 140, "bias_param": 141, "scale_param": 142,
        "input_param": 143, "crop_param": 144, "parameter_param": 145, "recurrent_param": 146,
        "swish_param": 147, "clip_param": 148}
    forks = {"permute_param", "prior_box_param", "detection_output_param", "norm_param",
             "shuffle_channel_param", "annotated_data_param", "multibox_loss_param",
             "detection_evaluate_param", "video_data_param", "region_param",
             "yolov3_detection_output_param", "mat_read_param", "bias_channel_param",
             "unique_label_param", "label_specific_add_param",
             "combined_margin_param", "resample_param", "flow_warp_param",
             "accum_param", "cosin_add_m_param", "detectnet_groundtruth_param",
             "detectnet_augmentation_param"}  # test_forks_proto.py
    actual = {f.name: f.number for f in caffe_pb2.LayerParameter.DESCRIPTOR.fields
              if f.number >= 100 and f.number < 10000 and f.name not in forks}
    assert actual == expected


def test_enums_and_defaults():
    P = caffe_pb2.PoolingParameter
    assert (P.CEIL, P.FLOOR) == (0, 1) and P().round_mode == P.CEIL
    assert caffe_pb2.DataParameter().backend == caffe_pb2.DataParameter.LEVELDB
    assert caffe_pb2.HingeLossParameter.L1 == 1 and caffe_pb2.HingeLossParameter.L2 == 2
    assert caffe_pb2.LossParameter().normalization == caffe_pb2.LossParameter.VALID
    assert caffe_pb2.SolverParameter.BINARYPROTO == 1 and caffe_pb2.SolverParameter.ADAM == 5
    assert caffe_pb2.V1LayerParameter.INNER_PRODUCT == 14
    assert caffe_pb2.V1LayerParameter.DECONVOLUTION == 39
    assert len(caffe_pb2.V1LayerParameter.LayerType.keys()) == 40  # NONE plus 0..39 all used
    s = caffe_pb2.SolverParameter()
    assert (s.type, s.regularization_type, s.solver_mode) == ("SGD", "L2", s.GPU)
    assert s.layer_wise_reduce and s.snapshot_after_train and s.test_initialization
    assert s.random_seed == -1 and s.clip_gradients == -1 and s.iter_size == 1
    assert caffe_pb2.NetState().phase == caffe_pb2.TEST
    assert caffe_pb2.ParamSpec().lr_mult == 1.0
    assert caffe_pb2.FillerParameter().type == "constant"
    assert caffe_pb2.ImageDataParameter().num_landmarks == 0
    assert caffe_pb2.LandmarkHeatmapParameter().sigma == 0


# ---------------------------------------------------------------------------- goldens


@pytest.mark.parametrize("path", BINARY_FILES, ids=_rel)
def test_golden_binary_files_parse_losslessly(path):
    msg = blob_io.read_proto(path, BINARY_KINDS[path.suffix])
    # Re-serializing reproduces Caffe's bytes: no unknown fields, no type mismatch.
    assert msg.SerializeToString() == path.read_bytes()


@pytest.mark.parametrize("path", PROTOTXT_FILES, ids=_rel)
def test_golden_prototxt_files_parse(path):
    if path.name == "solver.prototxt":
        msg = blob_io.read_text_proto(path, caffe_pb2.SolverParameter)
        assert msg.net or msg.train_net or msg.HasField("net_param")
    else:
        msg = blob_io.read_text_proto(path, caffe_pb2.NetParameter)
        assert len(msg.layer) + len(msg.layers) > 0


def test_golden_file_lists_are_not_empty():
    suffixes = {p.suffix for p in BINARY_FILES}
    assert suffixes == set(BINARY_KINDS) and len(PROTOTXT_FILES) > 40


def test_legacy_v1_files():
    net = blob_io.read_text_proto(GOLDENS / "legacy/v1_deploy/deploy_v1.prototxt",
                                  caffe_pb2.NetParameter)
    assert list(net.input) == ["data"] and list(net.input_dim) == [2, 3, 12, 12]
    conv = net.layers[0]
    assert conv.type == caffe_pb2.V1LayerParameter.CONVOLUTION
    assert list(conv.blobs_lr) == [1, 2] and list(conv.weight_decay) == [1, 0]
    weights = blob_io.read_proto(GOLDENS / "legacy/v1_deploy/weights_v1.caffemodel",
                                 caffe_pb2.NetParameter)
    fc6 = next(layer for layer in weights.layers if layer.name == "fc6")
    assert blob_io.blobproto_to_array(fc6.blobs[0]).shape == (1, 1, 6, 144)  # legacy 4-D IP weight


def test_mean_binaryproto_reads_legacy_shape():
    mean = blob_io.read_blobproto(GOLDENS / "data/mean_color32.binaryproto")
    assert mean.shape == (1, 3, 32, 32) and mean.dtype == np.float32
    assert blob_io.read_blobproto(GOLDENS / "data/mean_gray.binaryproto").shape == (1, 1, 28, 28)


def test_write_blobproto_matches_compute_image_mean_bytes(tmp_path):
    golden = GOLDENS / "data/mean_color32.binaryproto"
    mean = blob_io.read_blobproto(golden)
    out = tmp_path / "mean.binaryproto"
    blob_io.write_blobproto(out, mean[0])  # C×H×W in, num=1 written
    assert out.read_bytes() == golden.read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["mean.binaryproto"]  # no temp file left


# ---------------------------------------------------------------------------- BlobProto


def test_blobproto_legacy_dims_win_over_shape():
    blob = caffe_pb2.BlobProto(num=1, channels=2, height=1, width=3, data=range(6))
    blob.shape.dim.extend([6])  # ignored: a legacy dim is present
    assert blob_io.blobproto_to_array(blob).shape == (1, 2, 1, 3)
    only_width = caffe_pb2.BlobProto(width=4, data=range(4))  # HasField, not non-zero
    with pytest.raises(ProtoError):
        blob_io.blobproto_to_array(only_width)  # (0,0,0,4) holds no values, as in Caffe


def test_blobproto_shape_and_double_data():
    blob = caffe_pb2.BlobProto(data=[9] * 6, double_data=np.arange(6.0))
    blob.shape.dim.extend([2, 3])
    arr = blob_io.blobproto_to_array(blob)
    assert arr.dtype == np.float64 and arr.shape == (2, 3)
    np.testing.assert_array_equal(arr, np.arange(6.0).reshape(2, 3))
    with pytest.raises(ProtoError, match="0 diff values"):
        blob_io.blobproto_to_array(blob, return_diff=True)


def test_array_to_blobproto_round_trip():
    arr = np.random.default_rng(0).standard_normal((2, 3, 4, 5)).astype(np.float32)
    diff = -arr
    blob = blob_io.array_to_blobproto(arr, diff)
    assert list(blob.shape.dim) == [2, 3, 4, 5] and not blob.HasField("num")
    np.testing.assert_array_equal(blob_io.blobproto_to_array(blob), arr)
    np.testing.assert_array_equal(blob_io.blobproto_to_array(blob, return_diff=True), diff)


def test_blobproto_file_round_trips(tmp_path):
    arr = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    blob_io.write_blobproto(tmp_path / "legacy.binaryproto", arr)
    blob = blob_io.read_proto(tmp_path / "legacy.binaryproto", caffe_pb2.BlobProto)
    assert (blob.num, blob.channels, blob.height, blob.width) == (1, 2, 3, 4)
    assert not blob.HasField("shape")
    blob_io.write_blobproto(tmp_path / "nd.binaryproto", arr, legacy_4d=False)
    np.testing.assert_array_equal(blob_io.read_blobproto(tmp_path / "nd.binaryproto"), arr)
    blob_io.write_blobproto_vector(tmp_path / "vec.binaryproto", [arr, arr[0]])
    back = blob_io.read_blobproto_vector(tmp_path / "vec.binaryproto")
    assert [a.shape for a in back] == [(2, 3, 4), (3, 4)]


# ---------------------------------------------------------------------------- Datum


def test_datum_round_trip_uint8_and_float():
    img = np.random.default_rng(1).integers(0, 256, (3, 5, 7), dtype=np.uint8)
    datum = blob_io.array_to_datum(img, label=4)
    assert (datum.channels, datum.height, datum.width, datum.label) == (3, 5, 7, 4)
    assert datum.data == img.tobytes() and not datum.float_data
    parsed = caffe_pb2.Datum.FromString(datum.SerializeToString())
    np.testing.assert_array_equal(blob_io.datum_to_array(parsed), img)
    feats = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 2, 2)
    datum = blob_io.array_to_datum(feats)
    assert not datum.data and not datum.HasField("label")
    np.testing.assert_array_equal(blob_io.datum_to_array(datum), feats)
    with pytest.raises(ValueError):
        blob_io.array_to_datum(np.zeros((2, 2), np.uint8))


def test_encoded_datum_decodes_to_chw():
    cv2 = pytest.importorskip("cv2")
    img = np.random.default_rng(2).integers(0, 256, (6, 5, 3), dtype=np.uint8)  # H×W×BGR
    ok, png = cv2.imencode(".png", img)
    datum = caffe_pb2.Datum(data=png.tobytes(), encoded=True, label=1)
    np.testing.assert_array_equal(blob_io.datum_to_array(datum), img.transpose(2, 0, 1))
    ok, png = cv2.imencode(".png", img[:, :, 0])
    gray = blob_io.datum_to_array(caffe_pb2.Datum(data=png.tobytes(), encoded=True))
    assert gray.shape == (1, 6, 5)


def test_golden_encoded_lmdb_matches_gray_lmdb():
    lmdb = pytest.importorskip("lmdb")

    def first(name):
        env = lmdb.open(str(GOLDENS / "data" / name), readonly=True, lock=False)
        try:
            with env.begin() as txn:
                key, value = next(iter(txn.cursor()))
                return key, caffe_pb2.Datum.FromString(value)
        finally:
            env.close()

    key_e, enc = first("encoded_lmdb")
    key_g, raw = first("gray_lmdb")
    assert key_e == key_g and enc.encoded and not enc.HasField("channels")
    np.testing.assert_array_equal(blob_io.datum_to_array(enc), blob_io.datum_to_array(raw))


# ---------------------------------------------------------------------------- read/write helpers


def test_read_proto_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.caffemodel"
    with pytest.raises(FileNotFoundError, match="nope.caffemodel"):
        blob_io.read_proto(missing, caffe_pb2.NetParameter)
    garbage = tmp_path / "garbage.caffemodel"
    garbage.write_bytes(b"\xff\xff\xff\xff")
    with pytest.raises(ProtoError, match=r"garbage\.caffemodel.*caffe\.NetParameter"):
        blob_io.read_proto(garbage, caffe_pb2.NetParameter)


def test_write_proto_atomic_replaces(tmp_path):
    out = tmp_path / "state.solverstate"
    out.write_bytes(b"old")
    blob_io.write_proto_atomic(out, caffe_pb2.SolverState(iter=7))
    assert blob_io.read_proto(out, caffe_pb2.SolverState()).iter == 7
    assert [p.name for p in tmp_path.iterdir()] == ["state.solverstate"]


def test_read_text_proto_unknown_field_names_file_line_col(tmp_path):
    path = tmp_path / "bad.prototxt"
    path.write_text('name: "n"\nlayer {\n  name: "c"\n  convolution_param { num_outptu: 3 }\n}\n')
    with pytest.raises(ProtoTextError) as info:
        blob_io.read_text_proto(path, caffe_pb2.NetParameter)
    err = info.value
    assert str(err).startswith(f"{path}:4:23: ")
    assert "num_outptu" in str(err) and (err.line, err.column) == (4, 23)


def test_read_text_proto_from_string():
    text = 'layer { name: "d" type: "Data" data_param { num_landmarks: 5 } }'
    net = blob_io.read_text_proto(text, caffe_pb2.NetParameter)
    assert net.layer[0].data_param.num_landmarks == 5
    with pytest.raises(ProtoTextError, match=r"^train\.prototxt:1:17: .*multiple \"name\""):
        blob_io.read_text_proto('name: "a" name: "b"', caffe_pb2.NetParameter,
                                filename="train.prototxt")
    with pytest.raises(FileNotFoundError, match="missing.prototxt"):
        blob_io.read_text_proto("missing.prototxt", caffe_pb2.NetParameter)
