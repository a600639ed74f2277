"""VideoData (weiliu89/caffe, SSD): frames from a video file or a camera, read with OpenCV.

Tops: data (N, C, H, W), N = ``data_param.batch_size``, and optionally a label (N,) of zeros
(the fork outputs dummy labels so a net written for Data runs unchanged). Frames are OpenCV's
BGR bytes; each goes through the fork's image transform (``AnnotatedTransformer.final``:
``resize_param``, ``noise_param``, crop, mirror, mean, scale), so ``crop_size`` crops randomly
in TRAIN and centrally in TEST as for every Caffe data layer. The fork's transform of a frame
never distorts or expands it: ``distort_param``/``expand_param`` here are an error, not
silently ignored.

``skip_frames`` s: before every kept frame s frames are read and dropped, so the kept frames
are s, 2s+1, 3s+2, ...: batch k holds frames (k·N + i)(s+1) + s. (The fork meant this; its
loop as written also copies every dropped frame over the slot before it.)

End of a video file: the fork logs "finished" and raises SIGINT, which stops ``caffe`` after
the iteration in progress. Here the forward() of the first batch that cannot be filled raises
``EndOfVideo`` (a LayerError: the run stops with one line naming the layer, the file and how
many frames it had; a script catches it to end its loop); that partial batch is dropped. A
camera that does not exist or gives no frame is an error at net construction, never a hang
(on Linux a missing /dev/video<id> is reported at once; any open waits at most OPEN_SECONDS).
"""
from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Sequence

import cv2
import numpy as np

from caffe_compat.data.annotated_transform import AnnotatedTransformer
from caffe_compat.data.bbox import Boxes
from caffe_compat.data.source_layer import _BATCH_STREAM, _DataLayer
from caffe_compat.engine.layers.base import LayerError, Shape, register
from caffe_compat.engine.layers.ssd import SSD
from caffe_compat.formats.errors import DataError, with_context

log = logging.getLogger(__name__)

WEBCAM, VIDEO = 0, 1
OPEN_SECONDS = 10.0      # a camera that has not opened (or given a frame) by then is an error
_NO_BOXES = Boxes(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 4), np.float32),
                  np.zeros(0, bool))


class EndOfVideo(LayerError, DataError):
    """The video file has no frames left for the next batch (raised by forward(); catch it
    to treat the end of the file as the end of the stream)."""


def _with_timeout(fn, what: str):
    """``fn()`` on a helper thread; DataError if it has not returned in OPEN_SECONDS."""
    box: dict = {}
    thread = threading.Thread(target=lambda: box.setdefault("v", fn()), daemon=True)
    thread.start()
    thread.join(OPEN_SECONDS)
    if thread.is_alive():
        raise DataError(f"{what} did not answer within {OPEN_SECONDS:g} s")
    return box.get("v")


def _quiet_capture(source):
    """cv2.VideoCapture(source) without OpenCV's own warnings on stderr (our error says it)."""
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    try:
        return cv2.VideoCapture(source)
    finally:
        cv2.utils.logging.setLogLevel(level)


def open_camera(device_id: int):
    """(capture, first frame) of camera ``device_id``; DataError if there is none."""
    where = f"camera device_id {device_id}"
    if sys.platform.startswith("linux") and not os.path.exists(f"/dev/video{device_id}"):
        raise DataError(f"{where}: no such camera (/dev/video{device_id} does not exist)")
    cap = _with_timeout(lambda: _quiet_capture(device_id), where)
    if cap is None or not cap.isOpened():
        raise DataError(f"{where}: OpenCV could not open it")
    ok, frame = _with_timeout(cap.read, where)
    if not ok or frame is None:
        cap.release()
        raise DataError(f"{where}: opened but gave no frame")
    return cap, frame


def open_video(path: str):
    """(capture, first frame, frame count) of a video file, positioned at frame 0."""
    if not path:
        raise DataError("video_data_param.video_file is required with video_type VIDEO")
    if not os.path.isfile(path):
        raise DataError(f"video_file '{path}' does not exist")
    cap = _quiet_capture(path)
    if not cap.isOpened():
        raise DataError(f"video_file '{path}': OpenCV cannot open it as a video")
    ok, frame = cap.read()
    if not ok or frame is None:
        cap.release()
        raise DataError(f"video_file '{path}' has no frames")
    cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
    return cap, frame, int(cap.get(cv2.CAP_PROP_FRAME_COUNT))


class _VideoFrames:
    """Frame ``f`` of a file on demand: reads forward, seeks back (after a seek())."""

    def __init__(self, cap, path: str, total: int):
        self.cap, self.path, self.total, self.pos = cap, path, total, 0

    def frame(self, f: int) -> np.ndarray:
        if f < self.pos:
            self.cap.set(cv2.CAP_PROP_POS_FRAMES, f)
            self.pos = f
        while self.pos < f and self._within(self.pos) and self.cap.grab():
            self.pos += 1
        ok, img = self.cap.read() if self.pos == f and self._within(f) else (False, None)
        if not ok or img is None:
            raise EndOfVideo(f"video_file '{self.path}' ended after {self.pos} frames "
                             f"(the next batch needs frame {f})")
        self.pos += 1
        return img

    def _within(self, f: int) -> bool:
        return self.total <= 0 or f < self.total


class _CameraFrames:
    """The camera's next frames, whatever frame number is asked for."""

    def __init__(self, cap, device_id: int):
        self.cap, self.device_id = cap, device_id

    def frame(self, f: int) -> np.ndarray:
        ok, img = self.cap.read()
        if not ok or img is None:
            raise DataError(f"camera device_id {self.device_id} stopped giving frames")
        return img


class _VideoBatches:
    """produce(k): batch k's kept frames, transformed; one worker (a capture is sequential)."""

    def __init__(self, frames, batch_size: int, skip: int, transformer, seq):
        self.frames, self.n, self.step = frames, batch_size, skip + 1
        self.transformer, self.seq = transformer, seq
        self.lock = threading.Lock()

    def __call__(self, k: int):
        rng = self.seq(_BATCH_STREAM, k)
        with self.lock:
            imgs = [self.frames.frame((k * self.n + i) * self.step + self.step - 1)
                    for i in range(self.n)]
        data = np.stack([self.transformer.final(img, _NO_BOXES, rng)[0] for img in imgs])
        return data, np.zeros(self.n, np.float32)

    def release(self) -> None:
        with self.lock:
            self.frames.cap.release()


@register
class VideoData(_DataLayer):
    """SSD's video/webcam input: frames of ``video_data_param`` in order, every
    (skip_frames + 1)-th kept, through transform_param; label top all zeros."""

    type = "VideoData"
    num_tops = (1, 2)
    family = "data"
    origin = SSD

    def __init__(self, param, bottom_shapes: Sequence[Shape], phase: int):
        super().__init__(param, bottom_shapes, phase)
        self.batch_size = int(param.data_param.batch_size)
        if self.batch_size <= 0:
            raise self.error("data_param.batch_size must be positive")
        vp = param.video_data_param
        try:
            frames, first = self._open(vp)
        except DataError as exc:
            raise self._wrap(exc) from None
        try:
            self._setup(frames, first, vp, phase)
        except BaseException:
            frames.cap.release()
            raise

    def _wrap(self, exc: DataError):
        if isinstance(exc, EndOfVideo):    # keeps its type, so a caller can stop cleanly
            return EndOfVideo(with_context(str(exc), f"layer '{self.name}' ({self.type})"))
        return super()._wrap(exc)

    def _open(self, vp):
        if vp.video_type == VIDEO:
            cap, first, total = open_video(vp.video_file)
            return _VideoFrames(cap, vp.video_file, total), first
        if vp.video_type == WEBCAM:
            cap, first = open_camera(vp.device_id)
            return _CameraFrames(cap, vp.device_id), first
        raise DataError(f"unknown video_type {vp.video_type}")

    def _setup(self, frames, first: np.ndarray, vp, phase) -> None:
        tp = self.param.transform_param
        for field in ("distort_param", "expand_param"):
            if tp.HasField(field):
                raise self.error(f"transform_param.{field} is not applied to video frames "
                                 "(the fork's frame transform has no such step); remove it")
        try:
            transformer = AnnotatedTransformer(tp, [], phase, first.shape[2],
                                               f"layer '{self.name}' (VideoData)")
            out = transformer.output_shape(first.shape)
        except DataError as exc:
            raise self._wrap(exc) from None
        log.info("%s: output data size: %s", self.name,
                 ",".join(map(str, (self.batch_size,) + out)))
        self._shapes = [(self.batch_size,) + out, (self.batch_size,)]
        produce = _VideoBatches(frames, self.batch_size, int(vp.skip_frames), transformer,
                                self._seq)
        self._start(produce, self.param.data_param.prefetch, workers=1, on_exit=produce.release)
