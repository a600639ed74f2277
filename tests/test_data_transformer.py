"""DataTransformer against a literal transcription of Caffe's Transform(Datum) loop."""
from __future__ import annotations

import numpy as np
import pytest
from google.protobuf import text_format

from caffe_compat.formats.blob_io import write_blobproto
from caffe_compat.data import DataError, DataTransformer
from caffe_compat.data.transformer import TEST, TRAIN, Draw
from caffe_compat.proto import caffe_pb2


def tparam(text: str) -> caffe_pb2.TransformationParameter:
    return text_format.Parse(text, caffe_pb2.TransformationParameter())


def caffe_loop(img, crop, scale, mean, mean_values, d: Draw):
    """data_transformer.cpp Transform(const Datum&, Dtype*), element by element."""
    c_n, h_n, w_n = img.shape
    h_out = crop or h_n
    w_out = crop or w_n
    out = np.zeros((c_n, h_out, w_out), np.float32)
    for c in range(c_n):
        for h in range(h_out):
            for w in range(w_out):
                x = np.float32(img[c, d.h_off + h, d.w_off + w])
                top_w = w_out - 1 - w if d.mirror else w
                if mean is not None:
                    v = (x - mean[c, d.h_off + h, d.w_off + w]) * np.float32(scale)
                elif mean_values is not None:
                    mv = mean_values[0] if len(mean_values) == 1 else mean_values[c]
                    v = (x - np.float32(mv)) * np.float32(scale)
                else:
                    v = x * np.float32(scale)
                out[c, h, top_w] = v
    return out


@pytest.mark.parametrize("phase", [TRAIN, TEST])
@pytest.mark.parametrize("kind", ["none", "file", "values", "value"])
def test_matches_caffes_loop(tmp_path, phase, kind):
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (3, 9, 11), dtype=np.uint8)
    mean = rng.uniform(0, 255, (3, 9, 11)).astype(np.float32)
    text = "scale: 0.017 mirror: true crop_size: 5 "
    values = None
    if kind == "file":
        write_blobproto(tmp_path / "m.binaryproto", mean)
        text += f'mean_file: "{tmp_path}/m.binaryproto"'
    elif kind == "values":
        values = [104.0, 117.0, 123.5]
        text += "mean_value: 104 mean_value: 117 mean_value: 123.5"
    elif kind == "value":
        values = [99.5]
        text += "mean_value: 99.5"
    t = DataTransformer(tparam(text), phase)
    draws = set()
    for i in range(12):
        d = t.draw(np.random.default_rng(i), img.shape)
        draws.add(d)
        expected = caffe_loop(img, 5, 0.017, mean if kind == "file" else None, values, d)
        np.testing.assert_array_equal(t.apply(img, d), expected)
    offsets = {(d.h_off, d.w_off) for d in draws}
    assert {d.mirror for d in draws} == {False, True}          # random in both phases
    assert offsets == {(2, 3)} if phase == TEST else len(offsets) > 1


def test_draw_order_is_mirror_then_h_then_w():
    t = DataTransformer(tparam("mirror: true crop_size: 3"), TRAIN)
    rng, ref = np.random.default_rng(7), np.random.default_rng(7)
    d = t.draw(rng, (1, 10, 20))
    assert d == Draw(bool(ref.integers(2)), int(ref.integers(8)), int(ref.integers(18)))


def test_no_crop_no_mirror_is_identity_times_scale():
    img = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    t = DataTransformer(tparam("scale: 0.5"), TRAIN)
    np.testing.assert_array_equal(t(img, np.random.default_rng()), img.astype(np.float32) / 2)
    assert t.output_shape(img.shape) == (2, 3, 4)


def test_float_pixels_pass_through():
    img = np.linspace(-1, 1, 12, dtype=np.float32).reshape(1, 3, 4)
    t = DataTransformer(tparam("mean_value: 0.25 scale: 2"), TEST)
    np.testing.assert_array_equal(t(img, np.random.default_rng()), (img - np.float32(0.25)) * 2)


def test_landmarks_follow_crop_and_mirror():
    t = DataTransformer(tparam("crop_size: 4"), TRAIN)
    lm = np.array([[2, 3, 1], [5, 4, 1]], np.float32)
    np.testing.assert_array_equal(t.apply_landmarks(lm, Draw(False, 1, 2), (1, 8, 8)),
                                  [[0, 2, 1], [3, 3, 1]])
    # mirrored: x -> 3 - x, and the left/right pair swaps places
    np.testing.assert_array_equal(t.apply_landmarks(lm, Draw(True, 1, 2), (1, 8, 8)),
                                  [[0, 3, 1], [3, 2, 1]])


def test_errors(tmp_path):
    write_blobproto(tmp_path / "m.binaryproto", np.zeros((3, 32, 32), np.float32))
    t = DataTransformer(tparam(f'mean_file: "{tmp_path}/m.binaryproto"'), TEST)
    with pytest.raises(DataError, match=r"m.binaryproto: mean is 3×32×32 but the data is "
                                        r"1×28×28"):
        t.output_shape((1, 28, 28))
    with pytest.raises(DataError, match="mean file does not exist"):
        DataTransformer(tparam('mean_file: "nope.binaryproto"'), TEST)
    (tmp_path / "junk").write_bytes(b"\xff\xff\xff")
    with pytest.raises(DataError, match="junk: not a mean BlobProto"):
        DataTransformer(tparam(f'mean_file: "{tmp_path}/junk"'), TEST)
    with pytest.raises(DataError, match="at the same time"):
        DataTransformer(tparam(f'mean_file: "{tmp_path}/m.binaryproto" mean_value: 1'), TEST)
    with pytest.raises(DataError, match="1 mean_value or as many as channels: 3"):
        DataTransformer(tparam("mean_value: 1 mean_value: 2"), TEST).output_shape((3, 4, 4))
    with pytest.raises(DataError, match="crop_size 5 is larger"):
        DataTransformer(tparam("crop_size: 5"), TEST).output_shape((3, 4, 4))
