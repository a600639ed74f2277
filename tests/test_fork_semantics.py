"""What the forks' fields do where a layer uses them: SegNet's class weighting, Bayesian
SegNet's Monte-Carlo dropout, Fast R-CNN's unscaled dropout and SmoothL1Loss, the
channel-pruning fork's ``new_dim``, and labels outside [0, C) as a release Caffe build runs
them. References are float64 formulas written from the forks' C++ (docs/forks.md)."""
from __future__ import annotations

import logging

import cv2
import numpy as np
import pytest
import torch

import caffe_compat as caffe
from layer_utils import make_layer

TRAIN, TEST = caffe.TRAIN, caffe.TEST
WEIGHTS = [0.5, 2.0, 4.0]


def _scores(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# -- SegNet: class_weighting in SoftmaxWithLoss -----------------------------------------
def _segnet_loss(x, labels, weights, ignore=None):
    """SegNet's forward: -sum w[l] log p_l over counted pixels / number of counted pixels."""
    logp = torch.log_softmax(x, 1)
    total, count = 0.0, 0
    for n in range(x.shape[0]):
        for h in range(x.shape[2]):
            for w in range(x.shape[3]):
                label = int(labels[n, h, w])
                if label == ignore:
                    continue
                total -= weights[label] * float(logp[n, label, h, w])
                count += 1
    return total / count


@pytest.mark.parametrize("ignore", [None, 2])
def test_segnet_class_weighting_scales_each_pixel_by_its_label(ignore):
    body = "weight_by_label_freqs: true " + " ".join(f"class_weighting: {w}" for w in WEIGHTS)
    if ignore is not None:
        body += f" ignore_label: {ignore}"
    layer = make_layer(f'name: "loss" type: "SoftmaxWithLoss" loss_param {{ {body} }}',
                       [(2, 3, 4, 5), (2, 1, 4, 5)])
    x = _scores(2, 3, 4, 5).requires_grad_()
    labels = torch.randint(0, 3, (2, 4, 5), generator=torch.Generator().manual_seed(3)).double()
    loss = layer(x, labels.unsqueeze(1))
    assert loss.item() == pytest.approx(_segnet_loss(x.detach(), labels, WEIGHTS, ignore))
    loss.backward()
    # SegNet's backward: w[label] * (p - onehot) / count at each counted pixel, 0 elsewhere
    p = torch.softmax(x.detach(), 1)
    onehot = torch.nn.functional.one_hot(labels.long(), 3).permute(0, 3, 1, 2).double()
    w = torch.tensor(WEIGHTS, dtype=torch.float64)[labels.long()].unsqueeze(1)
    counted = (labels != ignore).unsqueeze(1) if ignore is not None else torch.ones_like(w).bool()
    expected = torch.where(counted, w * (p - onehot), 0.0) / counted.sum()
    torch.testing.assert_close(x.grad, expected)


def test_class_weighting_without_the_switch_is_ignored_and_a_wrong_count_is_refused():
    plain = make_layer('name: "l" type: "SoftmaxWithLoss"', [(4, 3), (4,)])
    off = make_layer('name: "l" type: "SoftmaxWithLoss" loss_param { class_weighting: 9 '
                     'class_weighting: 9 class_weighting: 9 }', [(4, 3), (4,)])
    x, labels = _scores(4, 3), torch.tensor([0.0, 1.0, 2.0, 1.0])
    assert off(x, labels).item() == plain(x, labels).item()      # SegNet reads them only when on
    with pytest.raises(caffe.engine.layers.LayerError, match="one class_weighting per class"):
        make_layer('name: "l" type: "SoftmaxWithLoss" loss_param { weight_by_label_freqs: true '
                   'class_weighting: 1 }', [(4, 3), (4,)])


# -- Dropout: Bayesian SegNet and Fast R-CNN -------------------------------------------
def _dropout(params: str, phase: int):
    return make_layer(f'name: "drop" type: "Dropout" dropout_param {{ {params} }}',
                      [(4, 1000)], phase)


def test_bayesian_segnet_samples_masks_at_test():
    layer = _dropout("dropout_ratio: 0.5 sample_weights_test: true", TEST)
    assert not layer.is_alias
    x = torch.ones(4, 1000)
    a, b = layer(x), layer(x)
    assert set(torch.unique(a).tolist()) == {0.0, 2.0}          # kept units scaled by 1/(1-p)
    assert not torch.equal(a, b)                                   # a new mask every forward
    assert abs(a.mean().item() - 1.0) < 0.1
    plain = _dropout("dropout_ratio: 0.5", TEST)
    assert plain.is_alias and torch.equal(plain(x), x)


def test_fast_rcnn_scale_train_false_keeps_units_unscaled_and_scales_at_test():
    train = _dropout("dropout_ratio: 0.25 scale_train: false", TRAIN)
    x = torch.full((4, 1000), 3.0)
    assert set(torch.unique(train(x)).tolist()) == {0.0, 3.0}
    test = _dropout("dropout_ratio: 0.25 scale_train: false", TEST)
    assert not test.is_alias
    torch.testing.assert_close(test(x), torch.full((4, 1000), 3.0 * 0.75))


def _dropout_net(tmp_path, params: str) -> caffe.Net:
    path = tmp_path / "drop.prototxt"
    path.write_text('input: "data" input_shape { dim: 2 dim: 500 }\n'
                    'layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" '
                    'inner_product_param { num_output: 500 weight_filler { type: "xavier" } } }\n'
                    'layer { name: "drop" type: "Dropout" bottom: "fc" top: "fc" '
                    f'dropout_param {{ {params} }} }}\n')
    return caffe.Net(str(path), caffe.TEST)


def test_the_deployed_nets_keep_both_fork_behaviours(tmp_path):
    """Through caffe.Net's own forward (its fused plan aliases plain TEST dropout away)."""
    x = np.random.default_rng(0).standard_normal((2, 500)).astype(np.float32)
    mc = _dropout_net(tmp_path, "dropout_ratio: 0.5 sample_weights_test: true")
    first = mc.forward(data=x)["fc"].copy()
    second = mc.forward(data=x)["fc"].copy()
    assert not np.array_equal(first, second) and (first == 0).mean() > 0.3
    frcnn = _dropout_net(tmp_path, "dropout_ratio: 0.5 scale_train: false")
    out = frcnn.forward(data=x)["fc"].copy()
    fc = x @ frcnn.params["fc"][0].data.T + frcnn.params["fc"][1].data
    np.testing.assert_allclose(out, fc * 0.5, rtol=1e-5, atol=1e-6)


# -- Fast R-CNN: SmoothL1Loss ----------------------------------------------------------
def test_smooth_l1_loss_matches_the_fork_formula():
    layer = make_layer('name: "l" type: "SmoothL1Loss" smooth_l1_loss_param { sigma: 3 }',
                       [(2, 8)] * 4, TRAIN)
    pred, target = _scores(2, 8), _scores(2, 8, seed=1)
    inside, outside = _scores(2, 8, seed=2).abs(), _scores(2, 8, seed=3).abs()
    d = (inside * (pred - target)).numpy()
    s2 = 9.0
    f = np.where(np.abs(d) < 1 / s2, 0.5 * d * d * s2, np.abs(d) - 0.5 / s2)
    expected = (outside.numpy() * f).sum() / 2
    assert layer(pred, target, inside, outside).item() == pytest.approx(expected)
    # three bottoms are R-FCN's (inside weights only): tests/test_fork_layers_face_ohem.py


# -- labels outside [0, C): a release build's tolerance --------------------------------
def test_accuracy_counts_void_labels_as_wrong_and_says_so_once(caplog):
    layer = make_layer('name: "accuracy" type: "Accuracy" top: "a" top: "per_class"',
                       [(1, 3, 2, 2), (1, 1, 2, 2)])
    scores = torch.tensor([[[[5.0, 0.0], [0.0, 0.0]], [[0.0, 5.0], [0.0, 0.0]],
                            [[0.0, 0.0], [5.0, 5.0]]]])
    labels = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])          # 3 = SegNet-style void label
    with caplog.at_level(logging.WARNING):
        acc, per_class = layer(scores, labels)
        layer(scores, labels)
    assert acc.item() == pytest.approx(3 / 4)                     # counted, never correct
    torch.testing.assert_close(per_class, torch.ones(3))
    told = [r for r in caplog.records if "outside [0, 3)" in r.getMessage()]
    assert len(told) == 1 and "'accuracy'" in told[0].getMessage()


def test_softmax_loss_counts_an_out_of_range_label_without_loss_or_gradient():
    layer = make_layer('name: "loss" type: "SoftmaxWithLoss"', [(3, 4), (3,)])
    x = _scores(3, 4).requires_grad_()
    loss = layer(x, torch.tensor([1.0, 7.0, -2.0]))
    logp = torch.log_softmax(x.detach(), 1)
    assert loss.item() == pytest.approx(-logp[0, 1].item() / 3)   # normalizer counts all 3
    loss.backward()
    assert torch.all(x.grad[1:] == 0) and torch.any(x.grad[0] != 0)


def test_infogain_still_refuses_out_of_range_labels():
    layer = make_layer('name: "l" type: "InfogainLoss"', [(2, 3), (2,), (3, 3)])
    with pytest.raises(caffe.engine.layers.LayerError, match="out of range"):
        layer(_scores(2, 3), torch.tensor([0.0, 3.0]), torch.eye(3, dtype=torch.float64))


# -- the channel-pruning fork's ImageData new_dim --------------------------------------
@pytest.mark.parametrize("bicubic", [False, True])
def test_image_data_new_dim_resizes_the_shorter_side(tmp_path, monkeypatch, bicubic):
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(1)
    tall = rng.integers(0, 256, (50, 30, 3), dtype=np.uint8)
    cv2.imwrite("tall.png", tall)
    (tmp_path / "list.txt").write_text("tall.png 4\n")
    flag = "bicubic: true" if bicubic else ""
    layer = make_layer('name: "data" type: "ImageData" top: "data" top: "label" '
                       'image_data_param { source: "list.txt" batch_size: 1 new_dim: 12 '
                       f'{flag} }}',
                       [], TEST)
    data, label = layer()
    # shorter side 30 -> 12, the other round(12/30 * 50) = 20
    expected = cv2.resize(tall, (12, 20),
                          interpolation=cv2.INTER_CUBIC if bicubic else cv2.INTER_LINEAR)
    assert tuple(data.shape) == (1, 3, 20, 12) and label.item() == 4
    np.testing.assert_array_equal(data[0].numpy(), expected.transpose(2, 0, 1).astype(np.float32))


def test_new_dim_with_new_height_is_refused(tmp_path):
    (tmp_path / "list.txt").write_text("a.png 0\n")
    with pytest.raises(caffe.engine.layers.LayerError, match="new_dim"):
        make_layer('name: "data" type: "ImageData" top: "data" top: "label" image_data_param '
                   f'{{ source: "{tmp_path}/list.txt" new_dim: 8 new_height: 4 new_width: 4 }}',
                   [], TEST)
