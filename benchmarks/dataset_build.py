"""Seconds ``caffe dataset`` takes on a folder of camera-sized JPEG photos.

Makes --classes class folders of --per-class JPEGs (quality 90, 1024×768 by default): random
crops, flips and scalings of scikit-image's sample photographs (astronaut, cat, coffee,
rocket, retina, ...), then times ``build_dataset`` (scan, split, train/val LMDBs at 72×72,
mean, contact sheet) --repeat times into fresh output folders. Decoding the photos dominates,
so the figure shows how many times each photo is decoded.

    python benchmarks/dataset_build.py [--per-class 100] [--classes 3] [--repeat 3]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from caffe_compat.commands.dataset import build_dataset  # noqa: E402

PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "retina.jpg",
          "motorcycle_left.png", "hubble_deep_field.jpg", "immunohistochemistry.png")


def _sources() -> list[np.ndarray]:
    import skimage.data
    folder = Path(skimage.data.__file__).parent
    found = [cv2.imread(str(folder / name)) for name in PHOTOS if (folder / name).is_file()]
    return [image for image in found if image is not None]


def make_photos(dest: Path, classes: int, per_class: int, size=(1024, 768), seed=0) -> Path:
    rng = np.random.default_rng(seed)
    sources = _sources()
    width, height = size
    for c in range(classes):
        (dest / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            src = sources[(c + i) % len(sources)]
            h, w = src.shape[:2]
            ch, cw = int(h * rng.uniform(0.5, 1)), int(w * rng.uniform(0.5, 1))
            y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            photo = cv2.resize(src[y:y + ch, x:x + cw], (width, height))
            if rng.random() < 0.5:
                photo = photo[:, ::-1]
            cv2.imwrite(str(dest / f"class{c}" / f"photo_{i:04d}.jpg"), photo,
                        [cv2.IMWRITE_JPEG_QUALITY, 90])
    return dest


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--classes", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory() as tmp:
        photos = make_photos(Path(tmp) / "photos", args.classes, args.per_class)
        n = args.classes * args.per_class
        times = []
        for r in range(args.repeat):
            out = Path(tmp) / f"ds{r}"
            start = time.perf_counter()
            build_dataset(photos, out, seed=r)
            times.append(time.perf_counter() - start)
            shutil.rmtree(out)
        print(f"caffe dataset, {n} JPEG photos 1024×768 → 72×72: "
              + ", ".join(f"{t:.2f} s" for t in times)
              + f" (best {min(times):.2f} s, {n / min(times):.0f} photos/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
