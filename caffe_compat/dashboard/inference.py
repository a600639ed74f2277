"""Classify uploaded images with a job's bundle (``caffe.Classifier.from_bundle``).

Classifiers are kept per bundle (the weights file's modification time is part of the key, so
a resumed job's new bundle is picked up).
"""
from __future__ import annotations

import threading
from pathlib import Path

import cv2
import numpy as np

from caffe_compat.dashboard.safety import Refused

_CACHE: dict[tuple[str, float], object] = {}
_LOCK = threading.Lock()
MAX_PIXELS = 40_000_000


def decode_image(data: bytes, name: str) -> np.ndarray:
    """An uploaded file as pycaffe's ``caffe.io.load_image`` gives it: RGB float in [0, 1]."""
    array = np.frombuffer(data, np.uint8)
    image = cv2.imdecode(array, cv2.IMREAD_COLOR) if data else None
    if image is None:
        raise Refused(400, f"'{name}' is not an image OpenCV can read (JPEG, PNG, BMP, ...)")
    if image.shape[0] * image.shape[1] > MAX_PIXELS:
        raise Refused(413, f"'{name}' is {image.shape[1]}x{image.shape[0]}; at most "
                           f"{MAX_PIXELS:,} pixels")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0


def classifier_for(bundle: Path):
    from caffe_compat import Classifier
    weights = bundle / "weights.caffemodel"
    if not weights.is_file():
        raise Refused(409, "this job has no bundle yet (it is written when training ends or "
                           "stops)")
    key = (str(bundle), weights.stat().st_mtime)
    with _LOCK:
        if key not in _CACHE:
            _CACHE.clear()
            _CACHE[key] = Classifier.from_bundle(str(bundle))
        return _CACHE[key]


def labels_of(bundle: Path) -> list[str]:
    path = bundle / "labels.txt"
    return path.read_text(encoding="utf-8").splitlines() if path.is_file() else []


def classify(bundle: Path, images: list[tuple[str, np.ndarray]], top_k: int = 5) -> list[dict]:
    """Per image: the top-k labels with their probabilities, best first."""
    classifier = classifier_for(bundle)
    labels = labels_of(bundle)
    with _LOCK:
        probabilities = classifier.predict([image for _, image in images], oversample=False)
    out = []
    for (name, _), probs in zip(images, probabilities):
        order = np.argsort(-probs)[:max(1, top_k)]
        out.append({"image": name, "top": [
            {"label": labels[i] if i < len(labels) else str(i), "index": int(i),
             "probability": float(probs[i])} for i in order]})
    return out


__all__ = ["decode_image", "classify", "classifier_for", "labels_of"]
