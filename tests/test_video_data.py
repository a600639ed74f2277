"""VideoData (SSD fork): frames of a small MJPG video in order, skip_frames, the transform,
the batch and label shapes, the end of the file, and the errors for a missing file or camera."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from caffe_compat.data.video_data import EndOfVideo
from caffe_compat.engine.layers import TEST
from caffe_compat.engine.layers.base import LayerError
from caffe_compat.formats.errors import CaffeCompatError
from layer_utils import make_layer

FRAMES, H, W = 12, 48, 64


def _frame(i: int) -> np.ndarray:
    """Frame i: blue level 20·i, a bright bar whose row says i, red/green gradients."""
    img = np.zeros((H, W, 3), np.uint8)
    img[..., 0] = 20 * i
    img[..., 1] = np.linspace(0, 200, W, dtype=np.uint8)[None, :]
    img[..., 2] = np.linspace(0, 200, H, dtype=np.uint8)[:, None]
    img[4 * i:4 * i + 4, :, :] = 255
    return img


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (W, H))
    assert writer.isOpened()
    for i in range(FRAMES):
        writer.write(_frame(i))
    writer.release()
    cap = cv2.VideoCapture(str(path))
    decoded = []
    while True:
        ok, img = cap.read()
        if not ok:
            break
        decoded.append(img)
    cap.release()
    assert len(decoded) == FRAMES
    return path, decoded


def _layer(path, batch=2, skip=0, transform="", tops=("data",)):
    top = " ".join(f'top: "{t}"' for t in tops)
    return make_layer(f"""name: "v" type: "VideoData" {top}
        data_param {{ batch_size: {batch} }}
        transform_param {{ {transform} }}
        video_data_param {{ video_type: VIDEO video_file: "{path}" skip_frames: {skip} }}""",
                      [], TEST)


def _index(img_chw: np.ndarray) -> int:
    """Which frame a (3, H, W) output shows: its bright bar's row."""
    return int(np.argmax(img_chw[0, :, W // 2] > 240)) // 4


def test_frames_in_order_with_labels(video):
    path, decoded = video
    layer = _layer(path, batch=3, tops=("data", "label"))
    try:
        assert layer.top_shapes([]) == [(3, 3, H, W), (3,)]
        seen = []
        for _ in range(FRAMES // 3):
            data, label = layer()
            assert tuple(data.shape) == (3, 3, H, W)
            assert label.tolist() == [0.0, 0.0, 0.0]
            seen += [_index(d) for d in data.numpy()]
            for d, j in zip(data.numpy(), seen[-3:]):
                np.testing.assert_array_equal(d, decoded[j].transpose(2, 0, 1).astype(np.float32))
    finally:
        layer.close()
    assert seen == list(range(FRAMES))


def test_skip_frames_keeps_every_third(video):
    path, decoded = video
    layer = _layer(path, batch=2, skip=2)
    try:
        seen = [_index(d) for _ in range(2) for d in layer().numpy()]
    finally:
        layer.close()
    assert seen == [2, 5, 8, 11]


def test_seek_resumes_at_the_batch(video):
    path, _ = video
    layer = _layer(path, batch=2, skip=1)
    try:
        layer()
        layer()
        layer.seek(1)       # a resumed run: batch 1 again (frames 5 and 7)
        assert [_index(d) for d in layer().numpy()] == [5, 7]
    finally:
        layer.close()


def test_resize_and_mean_as_opencv(video):
    path, decoded = video
    transform = ("mean_value: 104 mean_value: 117 mean_value: 123 scale: 0.5 "
                 "resize_param { prob: 1 resize_mode: WARP height: 30 width: 40 "
                 "interp_mode: LINEAR }")
    layer = _layer(path, batch=2, skip=1, transform=transform)
    try:
        assert layer.top_shapes([]) == [(2, 3, 30, 40)]
        data = layer().numpy()
    finally:
        layer.close()
    mean = np.array([104, 117, 123], np.float32).reshape(3, 1, 1)
    for d, j in zip(data, (1, 3)):
        want = cv2.resize(decoded[j], (40, 30), interpolation=cv2.INTER_LINEAR)
        want = (want.transpose(2, 0, 1).astype(np.float32) - mean) * np.float32(0.5)
        np.testing.assert_allclose(d, want, atol=1e-5)


def test_end_of_file_is_a_clear_error(video):
    path, _ = video
    layer = _layer(path, batch=5)
    try:
        layer()
        layer()             # frames 0-9
        with pytest.raises(EndOfVideo, match=r"^layer 'v' \(VideoData\): video_file "
                           r"'.*clip.avi' ended after 12 frames"):
            layer()
    finally:
        layer.close()
    assert issubclass(EndOfVideo, LayerError)


def test_missing_file_and_field(tmp_path):
    with pytest.raises(CaffeCompatError, match=r"layer 'v' \(VideoData\): video_file "
                       r"'.*nothing.avi' does not exist"):
        _layer(tmp_path / "nothing.avi")
    with pytest.raises(CaffeCompatError, match="video_file is required"):
        make_layer('name: "v" type: "VideoData" top: "d" data_param { batch_size: 1 } '
                   'video_data_param { video_type: VIDEO }', [], TEST)
    (tmp_path / "junk.avi").write_bytes(b"not a video at all")
    with pytest.raises(CaffeCompatError, match="junk.avi"):
        _layer(tmp_path / "junk.avi")


def test_absent_camera_is_one_line_error():
    with pytest.raises(CaffeCompatError) as info:
        make_layer('name: "cam" type: "VideoData" top: "d" data_param { batch_size: 1 } '
                   'video_data_param { video_type: WEBCAM device_id: 97 }', [], TEST)
    message = str(info.value)
    assert "\n" not in message
    assert "layer 'cam' (VideoData)" in message and "device_id 97" in message


def test_distortion_is_refused(video):
    path, _ = video
    with pytest.raises(CaffeCompatError, match="distort_param is not applied"):
        _layer(path, transform="distort_param { brightness_prob: 0.5 }")


def test_camera_that_never_answers_times_out(monkeypatch):
    import sys
    import threading
    from caffe_compat.data import video_data
    release = threading.Event()
    monkeypatch.setattr(sys, "platform", "darwin")     # no /dev/video check: open is tried
    monkeypatch.setattr(video_data, "OPEN_SECONDS", 0.2)
    monkeypatch.setattr(video_data, "_quiet_capture", lambda source: release.wait(5))
    try:
        with pytest.raises(CaffeCompatError, match=r"layer 'cam' \(VideoData\): camera "
                           r"device_id 3 did not answer within 0.2 s"):
            make_layer('name: "cam" type: "VideoData" top: "d" data_param { batch_size: 1 } '
                       'video_data_param { video_type: WEBCAM device_id: 3 }', [], TEST)
    finally:
        release.set()
