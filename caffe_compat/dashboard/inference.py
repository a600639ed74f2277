"""Classify uploaded images with a job's bundle (``caffe.Classifier.from_bundle``).

Classifiers are kept per bundle (the weights file's modification time is part of the key, so
a resumed job's new bundle is picked up).
"""
from __future__ import annotations

import threading
from pathlib import Path

import cv2
import numpy as np

from caffe_compat.dashboard import overlay
from caffe_compat.dashboard.safety import Refused
from caffe_compat.formats.errors import DataError
from caffe_compat.formats.image_header import image_size

_CACHE: dict[tuple[str, float], object] = {}
_LOCK = threading.Lock()
MAX_PIXELS = 40_000_000


def decode_image(data: bytes, name: str) -> np.ndarray:
    """An uploaded file decoded as the data set's images were: OpenCV's BGR bytes."""
    try:
        width, height, _ = image_size(data)      # before OpenCV allocates anything
    except DataError as exc:
        raise Refused(400, f"'{name}': {exc}") from None
    if width * height > MAX_PIXELS:
        raise Refused(413, f"'{name}' is {width}x{height}; at most {MAX_PIXELS:,} pixels")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise Refused(400, f"'{name}' could not be decoded as an image")
    return image


def classifier_for(bundle: Path):
    from caffe_compat import Classifier
    weights = bundle / "weights.caffemodel"
    if not weights.is_file():
        raise Refused(409, f"{bundle}: the bundle has no {weights.name}")
    key = (str(bundle), weights.stat().st_mtime)
    with _LOCK:
        if key not in _CACHE:
            _CACHE.clear()
            _CACHE[key] = Classifier.from_bundle(str(bundle))
        return _CACHE[key]


def classify(bundle: Path, images: list[tuple[str, np.ndarray]], top_k: int = 5) -> list[dict]:
    """Per image: the top-k labels with their probabilities, best first (the bundle's own
    preprocessing: resize, mean, centre crop, scale). A landmark model's results also carry
    ``landmarks`` (name, x, y in the photo's pixels, peak) and ``overlay``, a PNG data URL of
    its heatmaps over the photo."""
    classifier = classifier_for(bundle)
    arrays = [image for _, image in images]
    with _LOCK:
        if classifier.heatmap_blob:
            probabilities, maps = classifier.probabilities_and_heatmaps(arrays)
        else:
            probabilities, maps = classifier.probabilities(arrays), None
    out = []
    for n, ((name, image), probs) in enumerate(zip(images, probabilities)):
        order = np.argsort(-probs, kind="stable")[:max(1, top_k)]
        out.append({"image": name, "top": [
            {"label": classifier.labels[i], "index": int(i), "probability": float(probs[i])}
            for i in order]})
        if maps is not None:
            out[-1].update(_landmarks(classifier.preprocess.spec, image, maps[n]))
    return out


def _landmarks(spec: dict, image: np.ndarray, maps: np.ndarray) -> dict:
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    points = overlay.landmark_points(maps, spec, image.shape[:2],
                                     spec.get("landmark_names") or [])
    return {"landmarks": points,
            "overlay": overlay.data_url(overlay.overlay_png(image, maps, spec, points))}


__all__ = ["decode_image", "classify", "classifier_for"]
