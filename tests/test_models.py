"""Every models/*/*.prototxt: builds, trains one step, and its solver and readme agree with it.

Parametrised over the files, so a new model folder is checked without touching this file.
Data layers are replaced by Input layers of the same shapes (caffe_compat.engine.analysis), so the
nets run without the databases; one test also reads a tiny LMDB through the real Data layer.
"""
from __future__ import annotations

import glob
import os
import re

import cv2
import numpy as np
import pytest
import torch

from caffe_compat.engine import analysis
from caffe_compat.formats.blob_io import read_text_proto, write_blobproto
from caffe_compat.engine.layers.base import TEST, TRAIN, layer_types
from caffe_compat.engine.net.module import build_net
from layer_utils import zero_fillers
from caffe_compat.proto import caffe_pb2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = sorted(d for d in glob.glob(os.path.join(ROOT, "models", "*"))
                if os.path.isfile(os.path.join(d, "train_val.prototxt")))
NETS = sorted(p for d in MODELS for p in glob.glob(os.path.join(d, "*.prototxt"))
              if not os.path.basename(p).startswith("solver"))   # solver*.prototxt are solvers
SMALL = [d for d in MODELS if re.search(r"_(32|64)(_bn)?$", d)]
# the paper's 40/10 protocol models (the full-Fashion-MNIST variant has only solver_full)
PROTOCOL = [d for d in MODELS if os.path.isfile(os.path.join(d, "solver.prototxt"))]
TRAIN_IMAGES, TEST_IMAGES = 400, 100


def _id(path: str) -> str:
    return os.path.relpath(path, os.path.join(ROOT, "models"))


def _net_param(path: str) -> caffe_pb2.NetParameter:
    return read_text_proto(path, caffe_pb2.NetParameter)


@pytest.fixture
def cheap_fillers(monkeypatch):
    """Zero-filled blobs: the 224 nets hold 10^8 weights, and building is all we test here."""
    zero_fillers(monkeypatch)


@pytest.mark.parametrize("path", NETS, ids=_id)
def test_builds(path, cheap_fillers):
    param = _net_param(path)
    types = {lp.type for lp in param.layer}
    assert types <= set(layer_types()), f"unregistered layer types {types - set(layer_types())}"
    if path.endswith("deploy.prototxt"):
        net = build_net(param, TEST, source=path)
        assert net.output_names == ["prob"] and net.blob_shapes["prob"] == (1, 10)
        return
    classifier = "fc8_fashion50" if "_finetune" in path else "fc8"   # renamed to re-learn it
    for phase in (TRAIN, TEST):
        net = build_net(analysis.data_as_input(param), phase, source=path)
        assert net.blob_shapes[classifier][1] == 10
        assert "loss" in net.loss_weights
        assert ("accuracy" in net.output_names) == (phase == TEST)
        if "landmarks" in net.blob_shapes:
            assert net.blob_shapes["heatmaps"] == net.blob_shapes["heatmap_target"]
            if path.endswith("_lw0/train_val.prototxt"):   # the ablation: output, weight 0
                assert "landmark_loss" in net.output_names
                assert "landmark_loss" not in net.loss_weights
            else:
                assert "landmark_loss" in net.loss_weights


@pytest.mark.parametrize("model", MODELS, ids=_id)
def test_deploy_matches_train_val(model, cheap_fillers):
    """Same learnable layers, names and shapes, so a trained snapshot loads into deploy."""
    def blobs(net):
        return {n: [tuple(p.shape) for p in layer.blobs] for n, layer in net.named_layers()
                if len(layer.blobs)}
    train = build_net(analysis.data_as_input(_net_param(os.path.join(model, "train_val.prototxt"))),
                      TEST)
    deploy = build_net(_net_param(os.path.join(model, "deploy.prototxt")), TEST)
    assert blobs(train) == blobs(deploy)


@pytest.mark.parametrize("model", SMALL, ids=_id)
def test_cpu_variant_trains_one_step(model):
    torch.manual_seed(0)
    net = analysis.load_net(os.path.join(model, "train_val.prototxt"), TRAIN)
    shapes = net.blob_shapes
    n, _, h, w = shapes["data"]
    feed = {"data": torch.randn(shapes["data"]) * 0.5,
            "label": torch.randint(0, 10, (n,)).float()}
    if "landmarks" in shapes:
        lm = torch.rand(shapes["landmarks"]) * (w - 1)
        lm[..., 2] = 1
        feed["landmarks"] = lm
    loss, outputs = net.forward_loss(**feed)
    assert torch.isfinite(loss)
    assert 1.0 < float(outputs["loss"].detach()) < 4.0        # ~ln 10 at initialisation
    if "landmark_loss" in outputs:                   # weighted, comparable to the softmax loss
        weighted = net.loss_weights["landmark_loss"] * float(outputs["landmark_loss"].detach())
        # per unit of target peak²: the targets are scaled ×10 (lm_target_scale), which
        # multiplies the loss by 100 but the gradient at the landmarks only by 10
        names = [layer.param.name for layer in net.layers]
        peak = (net.layers[names.index("lm_target_scale")].param.power_param.scale
                if "lm_target_scale" in names else 1.0)
        assert 0.05 < weighted / peak ** 2 < 3
    loss.backward()
    for p in net.learnable_params:
        if p.lr_mult:
            assert p.tensor.grad is not None and torch.isfinite(p.tensor.grad).all(), p.name
    assert net.layers[net.layer_index("conv1_1" if "vgg" in model else "conv1")].blobs[0] \
        .grad.abs().sum() > 0


def _tiny_lmdb(tmp_path, size: int = 72, count: int = 4) -> tuple[str, str]:
    """An LMDB of ``count`` 72×72 colour images with landmarks, and its mean file."""
    from caffe_compat.data.convert import compute_mean, convert_imageset
    from caffe_compat.data.landmarks import silhouette_landmarks, write_landmarks
    rng = np.random.default_rng(0)
    items, lines = [], []
    for i in range(count):
        img = np.zeros((size, size, 3), np.uint8)
        x0, y0 = rng.integers(5, 25, 2)
        cv2.rectangle(img, (int(x0), int(y0)), (int(x0) + 35, int(y0) + 40), (200, 180, 160), -1)
        cv2.imwrite(str(tmp_path / f"{i}.png"), img)
        items.append((f"{i}.png", silhouette_landmarks(img)))
        lines.append(f"{i}.png {i % 10}")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    write_landmarks(tmp_path / "landmarks.txt", items)
    db = str(tmp_path / "db")
    convert_imageset(str(tmp_path) + os.sep, str(tmp_path / "list.txt"), db,
                     landmark_file=str(tmp_path / "landmarks.txt"), show_progress=False)
    mean = str(tmp_path / "mean.binaryproto")
    write_blobproto(mean, compute_mean(db, show_progress=False))
    return db, mean


def test_landmark_model_reads_a_real_lmdb(tmp_path):
    """The train_val's Data layer settings (crop, mean file, landmarks) work on a real LMDB."""
    db, mean = _tiny_lmdb(tmp_path)
    param = _net_param(os.path.join(ROOT, "models", "vgg16_landmark_64", "train_val.prototxt"))
    for lp in param.layer:
        if lp.type == "Data":
            lp.data_param.source, lp.data_param.batch_size = db, 2
            lp.transform_param.mean_file = mean
    torch.manual_seed(0)
    net = build_net(param, TRAIN)
    loss, outputs = net.forward_loss()
    loss.backward()
    assert net.blob_shapes["landmarks"] == (2, 8, 3)
    assert torch.isfinite(loss) and float(outputs["landmark_loss"].detach()) > 0
    del net


# ---------------------------------------------------------------------------- closed forms


def test_alexnet_parameter_count_closed_form(cheap_fillers):
    net = build_net(_net_param(os.path.join(ROOT, "models", "alexnet", "deploy.prototxt")), TEST)
    convs = [(3, 96, 11, 1), (96, 256, 5, 2), (256, 384, 3, 1), (384, 384, 3, 2),
             (384, 256, 3, 2)]
    conv = sum(k * k * i // g * o + o for i, o, k, g in convs)
    fc = (9216 * 4096 + 4096) + (4096 * 4096 + 4096)
    assert conv + fc + 4096 * 1000 + 1000 == 60_965_224       # bvlc_alexnet's published count
    assert analysis.param_count(net) == conv + fc + 4096 * 10 + 10


# ---------------------------------------------------------------------------- solvers, readmes


@pytest.mark.parametrize("model", PROTOCOL, ids=_id)
def test_solver_follows_the_protocol(model):
    name = os.path.basename(model)
    solver = read_text_proto(os.path.join(model, "solver.prototxt"), caffe_pb2.SolverParameter)
    assert solver.net == f"models/{name}/train_val.prototxt"
    assert os.path.isfile(os.path.join(ROOT, solver.net))
    param = _net_param(os.path.join(model, "train_val.prototxt"))
    batch = {lp.include[0].phase: lp.data_param.batch_size for lp in param.layer
             if lp.type == "Data"}
    epoch = TRAIN_IMAGES // batch[caffe_pb2.TRAIN]
    assert TRAIN_IMAGES % batch[caffe_pb2.TRAIN] == 0
    assert solver.max_iter == 50 * epoch
    assert solver.test_interval == epoch and solver.display == epoch
    assert list(solver.test_iter) == [TEST_IMAGES // batch[caffe_pb2.TEST]]
    assert TEST_IMAGES % batch[caffe_pb2.TEST] == 0
    assert solver.type == "SGD" and solver.momentum == pytest.approx(0.9)
    assert solver.weight_decay == pytest.approx(5e-4) and solver.base_lr > 0
    assert solver.snapshot_prefix.startswith(f"runs/{name}/")
    assert solver.max_iter % solver.snapshot == 0 and solver.random_seed >= 0


@pytest.mark.parametrize("model", MODELS, ids=_id)
def test_readme_states_the_built_counts(model, cheap_fillers):
    text = open(os.path.join(model, "readme.md"), encoding="utf-8").read()
    net = build_net(_net_param(os.path.join(model, "deploy.prototxt")), TEST)
    params = analysis.param_count(net)
    gflops = 2 * analysis.total_macs(net) / 1e9
    assert f"{params:,}" in text, f"readme does not state the parameter count {params:,}"
    assert f"{gflops:.3f} GFLOPs" in text, f"readme does not state {gflops:.3f} GFLOPs/image"
    png = re.search(r"\]\(([^)]+\.png)\)", text)
    assert png and os.path.isfile(os.path.join(model, png.group(1))), "drawing missing"
    assert "reproduce_paper.py" in text or "full_fashion_mnist.py" in text, "no run command"


FULL_SOLVERS = sorted(glob.glob(os.path.join(ROOT, "models", "*", "solver_full.prototxt")))


@pytest.mark.parametrize("path", FULL_SOLVERS, ids=_id)
def test_full_fashion_mnist_solver_names_its_own_net(path):
    """tools/full_fashion_mnist.py embeds the net the solver names: it must be this folder's."""
    solver = read_text_proto(path, caffe_pb2.SolverParameter)
    name = os.path.basename(os.path.dirname(path))
    assert solver.net == f"models/{name}/train_val.prototxt"
    assert solver.snapshot_prefix.startswith("runs/") and solver.max_iter > 0
    assert solver.max_iter * 64 % 60000 < 64          # whole epochs of batch 64
