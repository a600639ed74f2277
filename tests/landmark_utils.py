"""Shared by the landmark tests: a few fashion50 photos with their landmarks, a tiny net with
a heatmap branch (the shape of vgg16_landmark_64's, small enough to train in seconds)."""
from __future__ import annotations

import shutil
from pathlib import Path

FASHION50 = Path(__file__).resolve().parents[1] / "data" / "fashion50"
CLASSES = ("trouser", "tshirt_top")


def landmark_folder(root: Path, per_class: int = 10, name: str = "clothes") -> Path:
    """``root/name/<class>/*.png`` and ``root/name/list_landmarks.txt`` (their lines only)."""
    folder = root / name
    lines = (FASHION50 / "list_landmarks.txt").read_text().splitlines()
    kept = []
    for cls in CLASSES:
        (folder / cls).mkdir(parents=True, exist_ok=True)
        for photo in sorted((FASHION50 / cls).glob("*.png"))[:per_class]:
            shutil.copyfile(photo, folder / cls / photo.name)
            kept.append(f"{cls}/{photo.name}")
    wanted = set(kept)
    body = [l for l in lines[2:] if l.split()[0] in wanted]
    (folder / "list_landmarks.txt").write_text("\n".join([str(len(body)), lines[1], *body]) + "\n")
    return folder


def _data_layer(phase: str, batch: int) -> str:
    return f'''layer {{ name: "data" type: "Data" top: "data" top: "label" top: "landmarks"
  include {{ phase: {phase} }}
  transform_param {{ crop_size: 28 scale: 0.0078125 mean_file: "mean.binaryproto"
                    mirror: {"true" if phase == "TRAIN" else "false"} }}
  data_param {{ source: "x" backend: LMDB batch_size: {batch} num_landmarks: 8 }} }}
'''


TINY_LANDMARK_NET = 'name: "tiny_landmark"\n' + _data_layer("TRAIN", 8) + \
    _data_layer("TEST", 4) + '''
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 8 kernel_size: 3 pad: 1 weight_filler { type: "msra" } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "lm_heatmap" type: "Convolution" bottom: "conv1" top: "heatmaps"
  convolution_param { num_output: 8 kernel_size: 1 weight_filler { type: "gaussian" std: 0.01 } } }
layer { name: "lm_target" type: "LandmarkHeatmap" bottom: "landmarks" bottom: "data"
  top: "heatmap_target" }
layer { name: "landmark_loss" type: "EuclideanLoss" bottom: "heatmaps"
  bottom: "heatmap_target" top: "landmark_loss" loss_weight: 0.01 }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "fc" type: "InnerProduct" bottom: "pool1" top: "fc"
  inner_product_param { num_output: 2 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
layer { name: "accuracy" type: "Accuracy" bottom: "fc" bottom: "label" top: "accuracy"
  include { phase: TEST } }
'''
