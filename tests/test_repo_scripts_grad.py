"""Gradient, optimisation and net-surgery scripts of other repositories, in their style, run
unchanged through ``import caffe``: google/deepdream's dream.ipynb, fzliu/style-transfer's
style.py, BVLC's net_surgery.ipynb and 02-fine-tuning.ipynb, and the introspection and
parameter surgery of visualisation, pruning and compression scripts; float64 references."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as nd
import torch
import torch.nn.functional as F
from google.protobuf import text_format
from scipy.optimize import minimize
from scipy.signal import correlate2d
from scipy.special import softmax

import caffe
from caffe import layers as L, params as P
from caffe.proto import caffe_pb2

GAUSS = 'weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "constant" value: 0.1 }'
INPUT = 'layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ {} }} }} }}\n'


def _conv(name, bottom, n, k, pad=0, fill=""):
    return (f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}"\n'
            f'  convolution_param {{ num_output: {n} kernel_size: {k} pad: {pad} {fill} }} }}\n')


def _layer(name, kind, bottom, top=None, extra=""):
    return (f'layer {{ name: "{name}" type: "{kind}" bottom: "{bottom}" top: "{top or bottom}"'
            f' {extra} }}\n')


def _trained(folder, name: str, text: str, seed: int, bn=None) -> tuple[str, str]:
    """``name``.prototxt and a .caffemodel of random weights (``bn``: a BatchNorm's)."""
    proto, weights = str(folder / f"{name}.prototxt"), str(folder / f"{name}.caffemodel")
    open(proto, "w").write(text)
    net, rng = caffe.Net(proto, caffe.TEST), np.random.RandomState(seed)
    for blob in (b for blobs in net.params.values() for b in blobs):
        blob.data[...] = rng.randn(*blob.data.shape) * 0.3
    if bn:
        net.params[bn][1].data[...] = np.abs(net.params[bn][1].data) + 0.5   # variances
        net.params[bn][2].data[...] = 1                                      # their scale
    net.save(weights)
    return proto, weights


def _w(net, layer: str, i: int = 0) -> torch.Tensor:
    return torch.from_numpy(net.params[layer][i].data.astype(np.float64))


# -- google/deepdream: dream.ipynb ------------------------------------------------------
DREAM = ('name: "tiny_inception"\ninput: "data"\ninput_dim: 1 input_dim: 3 input_dim: 12 '
         'input_dim: 12\n' + _conv("conv1/3x3", "data", 4, 3, 1)
         + _layer("conv1/relu", "ReLU", "conv1/3x3") + _conv("mix/1x1", "conv1/3x3", 2, 1)
         + _layer("mix/relu_1x1", "ReLU", "mix/1x1") + _conv("mix/3x3", "conv1/3x3", 3, 3, 1)
         + _layer("mix/relu_3x3", "ReLU", "mix/3x3")
         + _layer("mix/output", "Concat", 'mix/1x1" bottom: "mix/3x3', "mix/output")
         + _layer("prob", "Softmax", "mix/output", "prob"))           # past end: never run


def _dream_ref(net, x: torch.Tensor) -> torch.Tensor:
    """mix/output of the tiny net for one 3xHxW float64 image, differentiable."""
    c1 = F.relu(F.conv2d(x[None], _w(net, "conv1/3x3"), _w(net, "conv1/3x3", 1), padding=1))
    a = F.relu(F.conv2d(c1, _w(net, "mix/1x1"), _w(net, "mix/1x1", 1)))
    b = F.relu(F.conv2d(c1, _w(net, "mix/3x3"), _w(net, "mix/3x3", 1), padding=1))
    return torch.cat([a, b], 1)[0]


def _dream_grad(net, x: np.ndarray, objective) -> np.ndarray:
    """d objective(mix/output) / d image, float64 by autograd."""
    leaf = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    objective(_dream_ref(net, leaf)).backward()
    return leaf.grad.numpy()


def preprocess(net, img):
    return np.float32(np.rollaxis(img, 2)[::-1]) - net.transformer.mean["data"]


def deprocess(net, img):
    return np.dstack((img + net.transformer.mean["data"])[::-1])


def objective_L2(dst):
    dst.diff[:] = dst.data


def make_step(net, step_size=1.5, end="mix/output", jitter=2, clip=True,
              objective=objective_L2):
    src, dst = net.blobs["data"], net.blobs[end]
    ox, oy = np.random.randint(-jitter, jitter + 1, 2)
    src.data[0] = np.roll(np.roll(src.data[0], ox, -1), oy, -2)
    net.forward(end=end)
    objective(dst)
    net.backward(start=end)
    g = src.diff[0]
    src.data[:] += step_size / np.abs(g).mean() * g
    src.data[0] = np.roll(np.roll(src.data[0], -ox, -1), -oy, -2)
    if clip:
        bias = net.transformer.mean["data"]
        src.data[:] = np.clip(src.data, -bias, 255 - bias)


def test_deepdream_l2_and_guided_steps_and_octaves(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    net_fn, param_fn = _trained(tmp_path, "deploy", DREAM, 0)
    model = caffe.io.caffe_pb2.NetParameter()               # patched to get gradients
    text_format.Merge(open(net_fn).read(), model)
    model.force_backward = True
    open("tmp.prototxt", "w").write(str(model))
    net = caffe.Classifier("tmp.prototxt", param_fn,
                           mean=np.float32([104.0, 116.0, 122.0]), channel_swap=(2, 1, 0))
    src, rng = net.blobs["data"], np.random.RandomState(1)
    img = rng.uniform(0, 255, (9, 11, 3)).astype(np.float32)
    src.reshape(1, 3, 9, 11)
    src.data[0] = x0 = preprocess(net, img)
    make_step(net, jitter=0, clip=False)
    # conv1 feeds both branches through a Split: its diff sums them
    g = _dream_grad(net, x0, lambda y: 0.5 * (y ** 2).sum())
    np.testing.assert_allclose(src.diff[0], g, rtol=1e-4, atol=1e-4 * np.abs(g).max())
    np.testing.assert_allclose(src.data[0], x0 + 1.5 / np.abs(g).mean() * g, rtol=1e-4,
                               atol=1e-3)

    end, dst = "mix/output", net.blobs["mix/output"]          # guided by another image
    guide = rng.uniform(0, 255, (8, 10, 3)).astype(np.float32)
    src.reshape(1, 3, 8, 10)
    src.data[0] = preprocess(net, guide)
    net.forward(end=end)
    guide_features = dst.data[0].copy()

    def objective_guide(dst):
        x, y = dst.data[0].copy(), guide_features
        ch = x.shape[0]
        x, y = x.reshape(ch, -1), y.reshape(ch, -1)
        dst.diff[0].reshape(ch, -1)[:] = y[:, x.T.dot(y).argmax(1)]

    img = rng.uniform(0, 255, (12, 9, 3)).astype(np.float32)
    src.reshape(1, 3, 12, 9)
    src.data[0] = x0 = preprocess(net, img)
    make_step(net, jitter=0, clip=False, objective=objective_guide)
    chosen = dst.diff[0].copy()          # backward(start=end) leaves end's diff as set
    feats = _dream_ref(net, torch.from_numpy(x0.astype(np.float64))).numpy().reshape(5, -1)
    y = guide_features.reshape(5, -1)
    np.testing.assert_array_equal(chosen.reshape(5, -1), y[:, (feats.T @ y).argmax(1)])
    g = _dream_grad(net, x0, lambda out: (out * torch.from_numpy(chosen.astype(float))).sum())
    np.testing.assert_allclose(src.diff[0], g, rtol=1e-4, atol=1e-4 * np.abs(g).max())

    np.random.seed(0)
    for h, w in ((6, 5), (12, 9)):          # deepdream()'s octaves: no net.reshape()
        src.reshape(1, 3, h, w)
        src.data[0] = nd.zoom(x0, (1, h / 12, w / 9), order=1)
        for _ in range(2):
            make_step(net, objective=objective_guide)
    frame = deprocess(net, src.data[0])
    assert frame.shape == img.shape and np.isfinite(frame).all()
    assert frame.min() >= -1e-3 and frame.max() <= 255 + 1e-3       # clipped to pixels
    assert np.abs(frame - img).mean() > 1                            # and dreamed on


# -- fzliu/style-transfer: style.py ----------------------------------------------------
VGG = ('name: "tiny_vgg"\ninput: "data"\nforce_backward: true\n'
       'input_shape { dim: 1 dim: 3 dim: 16 dim: 16 }\n' + _conv("conv1_1", "data", 4, 3, 1)
       + _layer("relu1_1", "ReLU", "conv1_1") + _layer(
           "pool1", "Pooling", "conv1_1", "pool1",
           "pooling_param { pool: MAX kernel_size: 2 stride: 2 }")
       + _conv("conv2_1", "pool1", 5, 3, 1) + _layer("relu2_1", "ReLU", "conv2_1"))
STYLE_WEIGHTS = {"content": {"conv2_1": 1}, "style": {"conv1_1": 0.5, "conv2_1": 0.5}}


def _compute_reprs(net_in, net, layers_style, layers_content):
    repr_s, repr_c = {}, {}
    net.blobs["data"].data[0] = net_in
    net.forward()
    for layer in set(layers_style) | set(layers_content):
        feats = net.blobs[layer].data[0].copy()
        feats.shape = (feats.shape[0], -1)
        repr_c[layer] = feats
        if layer in layers_style:
            repr_s[layer] = feats.dot(feats.T)
    return repr_s, repr_c


def style_optfn(x, net, weights, layers, reprs, ratio):
    """style.py's objective: the loss, and the input's gradient by backward layer to layer
    (diffs added to the features' blobs in place, ReLU masks applied by hand)."""
    G_style, F_content = reprs
    G, Fs = _compute_reprs(x.reshape(net.blobs["data"].data.shape[1:]), net,
                           weights["style"].keys(), weights["content"].keys())
    loss = 0
    net.blobs[layers[-1]].diff[:] = 0
    for i, layer in enumerate(reversed(layers)):
        next_layer = None if i == len(layers) - 1 else layers[-i - 2]
        grad, Fl = net.blobs[layer].diff[0], Fs[layer]
        if layer in weights["style"]:
            c = Fl.shape[0] ** -2 * Fl.shape[1] ** -2
            El = G[layer] - G_style[layer]
            loss += weights["style"][layer] * c / 4 * (El ** 2).sum() * ratio
            grad += (weights["style"][layer] * ratio * c * El.dot(Fl) * (Fl > 0)
                     ).reshape(grad.shape)
        if layer in weights["content"]:
            El = Fl - F_content[layer]
            loss += weights["content"][layer] * (El ** 2).sum() / 2
            grad += (weights["content"][layer] * El * (Fl > 0)).reshape(grad.shape)
        net.backward(start=layer, end=next_layer)
        grad = net.blobs["data" if next_layer is None else next_layer].diff[0]
    return loss, grad.flatten().astype(np.float64)


def _style_loss_ref(net, x, reprs, ratio):
    """The same loss in float64 torch, straight from its definition."""
    c1 = F.relu(F.conv2d(x[None], _w(net, "conv1_1"), _w(net, "conv1_1", 1), padding=1))
    c2 = F.relu(F.conv2d(F.max_pool2d(c1, 2, 2), _w(net, "conv2_1"), _w(net, "conv2_1", 1),
                         padding=1))
    feats = {"conv1_1": c1[0].reshape(4, -1), "conv2_1": c2[0].reshape(5, -1)}
    G_style, F_content = ({k: torch.from_numpy(v.astype(float)) for k, v in r.items()}
                          for r in reprs)
    loss = sum(wl * ratio / 4 * ((feats[l] @ feats[l].T - G_style[l]) ** 2).sum()
               / feats[l].numel() ** 2 for l, wl in STYLE_WEIGHTS["style"].items())
    return loss + sum(wl * 0.5 * ((feats[l] - F_content[l]) ** 2).sum()
                      for l, wl in STYLE_WEIGHTS["content"].items())


def test_style_transfer_layerwise_gradient_and_lbfgs(tmp_path):
    proto, weights = _trained(tmp_path, "vgg", VGG, 3)
    net = caffe.Net(str(proto), str(weights), caffe.TEST)
    transformer = caffe.io.Transformer({"data": net.blobs["data"].data.shape})
    transformer.set_mean("data", np.array([[[104.0]], [[117.0]], [[123.0]]]).mean(1).mean(1))
    transformer.set_channel_swap("data", (2, 1, 0))
    transformer.set_transpose("data", (2, 0, 1))
    transformer.set_raw_scale("data", 255)
    layers = [b for b in net.blobs if b in {*STYLE_WEIGHTS["style"], *STYLE_WEIGHTS["content"]}]

    def rescale_net(img):                    # style.py's _rescale_net: no net.reshape()
        new_dims = (1, img.shape[2]) + img.shape[:2]
        net.blobs["data"].reshape(*new_dims)
        transformer.inputs["data"] = new_dims

    rng = np.random.RandomState(4)
    img_style, img_content = rng.rand(10, 10, 3), rng.rand(8, 12, 3)
    rescale_net(img_style)
    G_style = _compute_reprs(transformer.preprocess("data", img_style), net,
                             STYLE_WEIGHTS["style"].keys(), [])[0]
    assert G_style["conv2_1"].shape == (5, 5) and net.blobs["conv2_1"].data.shape[2:] == (5, 5)
    rescale_net(img_content)
    F_content = _compute_reprs(transformer.preprocess("data", img_content), net, [],
                               STYLE_WEIGHTS["content"].keys())[1]
    reprs, ratio = (G_style, F_content), 1e2
    img0 = 0.9 * transformer.preprocess("data", img_content) + \
        0.1 * transformer.preprocess("data", rng.rand(8, 12, 3))
    loss, grad = style_optfn(img0.flatten(), net, STYLE_WEIGHTS, layers, reprs, ratio)
    leaf = torch.tensor(img0, dtype=torch.float64, requires_grad=True)
    expected = _style_loss_ref(net, leaf, reprs, ratio)
    expected.backward()
    np.testing.assert_allclose(loss, expected.item(), rtol=1e-4)
    g = leaf.grad.numpy().ravel()
    np.testing.assert_allclose(grad, g, rtol=1e-3, atol=1e-4 * np.abs(g).max())

    data_min = -transformer.mean["data"][:, 0, 0]
    data_max = data_min + transformer.raw_scale["data"]
    bounds = sum(([(data_min[c], data_max[c])] * int(img0.size / 3) for c in range(3)), [])
    res = minimize(style_optfn, img0.flatten(), args=(net, STYLE_WEIGHTS, layers, reprs, ratio),
                   method="L-BFGS-B", jac=True, bounds=bounds, options={"maxiter": 6})
    assert res.nit >= 2 and res.fun < 0.8 * loss
    final = _style_loss_ref(net, torch.from_numpy(res.x.reshape(img0.shape)), reprs, ratio)
    np.testing.assert_allclose(res.fun, final.item(), rtol=1e-3)


# -- BVLC/caffe examples/net_surgery.ipynb: editing a filter -----------------------------
def test_net_surgery_edited_filters_and_live_blob_views(tmp_path):
    open(tmp_path / "conv.prototxt", "w").write(
        'name: "convolution"\n' + INPUT.format("dim: 1 dim: 1 dim: 100 dim: 100") + _conv(
            "conv", "data", 3, 5, fill='weight_filler { type: "gaussian" std: 0.01 }'))
    caffe.set_mode_cpu()
    net = caffe.Net(str(tmp_path / "conv.prototxt"), caffe.TEST)
    assert list(net.blobs.keys()) == ["data", "conv"] and list(net.params.keys()) == ["conv"]
    im_input = (im := np.random.RandomState(5).rand(17, 23).astype(np.float32))[None, None]
    net.blobs["data"].reshape(*im_input.shape)
    net.blobs["data"].data[...] = im_input
    net.forward()
    conv0 = net.blobs["conv"].data[0, 0]          # a view the notebook reads again later
    before = conv0.mean()
    net.params["conv"][1].data[0] = 1.
    net.forward()
    np.testing.assert_allclose(conv0.mean(), before + 1, rtol=1e-5)

    ksize = net.params["conv"][0].data.shape[2:]
    y, x = np.mgrid[-ksize[0] // 2 + 1:ksize[0] // 2 + 1, -ksize[1] // 2 + 1:ksize[1] // 2 + 1]
    g = np.exp(-((x ** 2 + y ** 2) / 2.0))
    net.params["conv"][0].data[0] = (g / g.sum()).astype(np.float32)
    net.params["conv"][0].data[1:] = 0.
    sobel = np.array((-1, -2, -1, 0, 0, 0, 1, 2, 1), dtype=np.float32).reshape((3, 3))
    net.params["conv"][0].data[1, 0, 1:-1, 1:-1] = sobel
    net.params["conv"][0].data[2, 0, 1:-1, 1:-1] = sobel.T
    net.forward()
    expected = np.stack([correlate2d(im.astype(float), f, "valid") for f in
                         (g / g.sum(), np.pad(sobel, 1), np.pad(sobel.T, 1))])
    expected[0] += 1                                             # the bias set above
    assert net.blobs["conv"].data.shape == (1, 3, 13, 19)
    np.testing.assert_allclose(net.blobs["conv"].data[0], expected, atol=1e-5)
    np.testing.assert_allclose(conv0, expected[0], atol=1e-5)


# -- BVLC/caffe examples/02-fine-tuning.ipynb: frozen layers, a Python-built solver ------
learned_param = [dict(lr_mult=1, decay_mult=1), dict(lr_mult=2, decay_mult=0)]
frozen_param = [dict(lr_mult=0)] * 2


def tiny_caffenet(path, data, label=None, classifier_name="fc8"):
    n = caffe.NetSpec()
    n.data = data
    n.conv1 = L.Convolution(n.data, kernel_size=3, num_output=4, param=frozen_param,
                            weight_filler=dict(type="gaussian", std=0.3))
    n.relu1 = L.ReLU(n.conv1, in_place=True)
    n.pool1 = L.Pooling(n.relu1, pool=P.Pooling.MAX, kernel_size=2, stride=2)
    fc8 = L.InnerProduct(n.pool1, num_output=5, param=learned_param,
                         weight_filler=dict(type="gaussian", std=0.3))
    n.__setattr__(classifier_name, fc8)
    if label is not None:
        n.label = label
        n.loss = L.SoftmaxWithLoss(fc8, n.label)
        n.acc = L.Accuracy(fc8, n.label)
    open(path, "w").write(str(n.to_proto()))
    return path


def _pool1(net, x):
    """conv1 -> ReLU -> 2x2 max pool of the tiny CaffeNet, flattened, float64 numpy."""
    w, b = (p.data.astype(np.float64) for p in net.params["conv1"])
    win = np.lib.stride_tricks.sliding_window_view(x.astype(np.float64), (3, 3), (2, 3))
    conv = np.maximum(np.einsum("ncyxij,ocij->noyx", win, w) + b[:, None, None], 0)
    n, c, h, wd = conv.shape
    return conv.reshape(n, c, h // 2, 2, wd // 2, 2).max((3, 5)).reshape(n, -1)


def test_fine_tuning_solver_step_and_partial_forward(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    deploy = tiny_caffenet("deploy.prototxt", L.DummyData(shape=dict(dim=[1, 3, 8, 8])))
    caffe.Net(deploy, caffe.TEST).save("weights.caffemodel")
    data, label = L.DummyData(shape=[dict(dim=[6, 3, 8, 8]), dict(dim=[6])], ntop=2,
                              data_filler=[dict(type="gaussian", std=1),
                                           dict(type="uniform", min=0, max=4.99)])
    train = tiny_caffenet("train.prototxt", data, label, classifier_name="fc8_flickr")
    s = caffe_pb2.SolverParameter()
    s.train_net, s.test_interval, s.iter_size, s.max_iter, s.type = train, 1000, 1, 100, "SGD"
    s.test_net.append(train)
    s.test_iter.append(2)
    s.lr_policy, s.gamma, s.stepsize, s.momentum, s.weight_decay = "step", 0.1, 20000, 0.9, 5e-4
    s.display, s.snapshot, s.snapshot_prefix, s.base_lr = 1000, 10000, "finetune_style", 0.01
    s.solver_mode = caffe_pb2.SolverParameter.GPU        # pycaffe leaves the mode to Python
    open("solver.prototxt", "w").write(str(s))
    solver = caffe.get_solver("solver.prototxt")
    solver.net.copy_from("weights.caffemodel")
    conv_w = solver.net.params["conv1"][0].data.copy()
    w0, b0 = (p.data.astype(np.float64) for p in solver.net.params["fc8_flickr"])
    solver.step(1)
    net = solver.net
    loss, acc = (net.blobs[b].data.copy() for b in ("loss", "acc"))
    pool = _pool1(net, net.blobs["data"].data)  # the blobs keep the step's forward,
    labels = net.blobs["label"].data.astype(int)
    scores = pool @ w0.T + b0                  # which ran before the update
    p = softmax(scores, 1)
    np.testing.assert_allclose(loss, -np.log(p[np.arange(6), labels]).mean(), rtol=1e-5)
    np.testing.assert_allclose(acc, (scores.argmax(1) == labels).mean())
    dscore = (p - np.eye(5)[labels]) / 6
    w1, b1 = (prm.data for prm in net.params["fc8_flickr"])
    np.testing.assert_allclose(w1, w0 - 0.01 * (dscore.T @ pool + 5e-4 * w0), atol=1e-6)
    np.testing.assert_allclose(b1, b0 - 2 * 0.01 * dscore.sum(0), atol=1e-6)
    np.testing.assert_array_equal(net.params["conv1"][0].data, conv_w)      # frozen
    assert not net.params["conv1"][0].diff.any() and solver.iter == 1     # never backpropagated
    test_net = solver.test_nets[0]             # shares the trained weights once tested
    image = np.random.RandomState(6).randn(3, 8, 8).astype(np.float32)
    test_net.blobs["data"].data[0, ...] = image
    assert set(test_net.forward(start="conv1")) == {"loss", "acc"}   # DummyData not re-run
    np.testing.assert_allclose(test_net.blobs["fc8_flickr"].data[0],
                               _pool1(test_net, image[None])[0] @ w1.T + b1, rtol=1e-5)


# -- introspection and parameter surgery (visualisation, pruning, compression scripts) --
INTRO = ('name: "intro"\nlayer { name: "data" type: "Input" top: "data" top: "label"\n'
         '  input_param { shape { dim: 2 dim: 2 dim: 5 dim: 5 } shape { dim: 2 } } }\n'
         + _conv("conv1", "data", 3, 3, fill=GAUSS) + _layer("bn1", "BatchNorm", "conv1")
         + _layer("relu1", "ReLU", "conv1") + _layer("ip", "InnerProduct", "conv1", "ip",
                                                     "inner_product_param { num_output: 5 }")
         + _layer("loss", "SoftmaxWithLoss", 'ip" bottom: "label', "loss", "loss_weight: 2")
         + _layer("acc", "Accuracy", 'ip" bottom: "label', "acc"))


def test_net_introspection_and_param_surgery(tmp_path):
    proto, weights = _trained(tmp_path, "intro", INTRO, 7, bn="bn1")
    net = caffe.Net(proto, caffe.TEST, weights=weights)
    # insert_splits.cpp: one Split per blob read twice, right after the layer making it
    assert list(net._layer_names) == ["data", "label_data_1_split", "conv1", "bn1", "relu1",
                                      "ip", "ip_ip_0_split", "loss", "acc"]
    assert [(layer.type, len(layer.blobs)) for layer in net.layers] == [
        ("Input", 0), ("Split", 0), ("Convolution", 2), ("BatchNorm", 3), ("ReLU", 0),
        ("InnerProduct", 2), ("Split", 0), ("SoftmaxWithLoss", 0), ("Accuracy", 0)]
    assert list(net._blob_names) == list(net.blobs) == [
        "data", "label", "label_data_1_split_0", "label_data_1_split_1", "conv1", "ip",
        "ip_ip_0_split_0", "ip_ip_0_split_1", "loss", "acc"]
    assert net.inputs == ["data", "label"] and net.outputs == ["acc", "loss"]   # a std::set
    assert net.top_names["bn1"] == net.bottom_names["bn1"] == ["conv1"]
    assert net.bottom_names["loss"] == ["ip_ip_0_split_0", "label_data_1_split_0"]
    assert list(net.blob_loss_weights.values()) == [0] * 8 + [2, 0]
    assert [(k, [b.data.shape for b in v]) for k, v in net.params.items()] == [
        ("conv1", [(3, 2, 3, 3), (3,)]), ("bn1", [(3,), (3,), (1,)]), ("ip", [(5, 27), (5,)])]
    legacy = [(b.count, b.num, b.channels, b.height, b.width) for b in
              (net.blobs["conv1"], net.blobs["label"], net.blobs["loss"], net.params["ip"][0])]
    assert legacy == [(54, 2, 3, 3, 3), (2, 2, 1, 1, 1), (1, 1, 1, 1, 1), (135, 5, 27, 1, 1)]
    net.blobs["data"].reshape(3, 2, 5, 5)
    net.blobs["label"].reshape(3)
    net.reshape()
    assert net.blobs["ip_ip_0_split_1"].data.shape == (3, 5) and net.blobs["conv1"].num == 3

    # channel-padding and compression scripts: reshape parameter blobs, write them, add a
    # blob, save; the caffemodel then serves a definition of the new shapes
    net = caffe.Net(network_file=proto, phase=caffe.TEST, weights=weights)
    x = np.random.RandomState(8).rand(2, 2, 5, 5).astype(np.float32)
    ip_of = lambda n: n.forward(["ip"], data=x, label=np.zeros(2))["ip"].copy()  # noqa: E731
    before = ip_of(net)
    conv, bn, ip = net.params["conv1"], net.params["bn1"], net.params["ip"]
    edits = [(bn[0], np.insert(bn[0].data, 3, 0)), (bn[1], np.insert(bn[1].data, 3, 1)),
             (conv[0], np.insert(conv[0].data, 3, 0, axis=0)),
             (conv[1], np.insert(conv[1].data, 3, 0)),
             (ip[0], np.insert(ip[0].data.reshape(5, 3, 9), 3, 0, axis=1).reshape(5, 36))]
    for i, (blob, value) in enumerate(edits):
        blob.reshape(*value.shape)
        blob.data[...] = value
        if i == 1:               # a BatchNorm of 4 channels after a conv of 3: named
            with pytest.raises(Exception, match=r"intro.prototxt: layer 'bn1' param 0 was "
                                                r"reshaped from \[3\] to \[4\]"):
                ip_of(net)
    assert net.params["ip"][0].count == 180 and ip[0].diff.shape == (5, 36)
    assert not ip[0].diff.any()
    grown = str(tmp_path / "grown")
    net.save(grown + ".caffemodel")
    open(grown + ".prototxt", "w").write(INTRO.replace("num_output: 3", "num_output: 4"))
    bigger = caffe.Net(grown + ".prototxt", grown + ".caffemodel", caffe.TEST)
    np.testing.assert_allclose(ip_of(bigger), before, rtol=1e-5)
    ip.add_blob()
    net.params["ip"][2].reshape(2, 5)
    net.params["ip"][2].data[...] = np.arange(10).reshape(2, 5)
    net.save(str(tmp_path / "coded.caffemodel"))
    saved = caffe_pb2.NetParameter()
    saved.ParseFromString(open(tmp_path / "coded.caffemodel", "rb").read())
    blobs = {layer.name: layer.blobs for layer in saved.layer}
    assert [list(b.shape.dim) for b in blobs["ip"]] == [[5, 36], [5], [2, 5]]
    assert list(blobs["ip"][2].data) == list(range(10))
