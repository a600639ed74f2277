"""Small scripts in the style of other repositories' pycaffe code, run unchanged through
``import caffe``: yahoo/open_nsfw's classify_nsfw.py, richzhang/colorization's deploy demo
(annealed-mean surgery) and its training-time Python layers, CSAILVision/places365's
Caffe deploy flow. Tiny nets inline, random weights, numpy float64 references. (Our own
code, written after reading what those scripts call.)"""
from __future__ import annotations

import io
import textwrap

import numpy as np
from PIL import Image
from skimage import color

import caffe


# -- numpy float64 references ----------------------------------------------------------
def conv_ref(x, w, b, stride=1, pad=0, dil=1):
    """Caffe's Convolution (NCHW, weights (O, C, kh, kw), one group)."""
    (n, _, h, wd), (o, _, kh, kw) = x.shape, w.shape
    oh = (h + 2 * pad - (dil * (kh - 1) + 1)) // stride + 1
    ow = (wd + 2 * pad - (dil * (kw - 1) + 1)) // stride + 1
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    out = np.zeros((n, o, oh, ow)) + b[None, :, None, None]
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, :, i * dil:i * dil + stride * (oh - 1) + 1:stride,
                       j * dil:j * dil + stride * (ow - 1) + 1:stride]
            out += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
    return out


def deconv_ref(x, w, b, stride, pad):
    """Caffe's Deconvolution: weights (C_in, O, k, k); out = stride*(h-1) + k - 2*pad."""
    (n, _, h, wd), (_, o, k, _) = x.shape, w.shape
    full = np.zeros((n, o, stride * (h - 1) + k, stride * (wd - 1) + k))
    for i in range(k):
        for j in range(k):
            full[:, :, i:i + stride * (h - 1) + 1:stride, j:j + stride * (wd - 1) + 1:stride] += \
                np.einsum("nchw,co->nohw", x, w[:, :, i, j])
    return full[:, :, pad:full.shape[2] - pad, pad:full.shape[3] - pad] + b[None, :, None, None]


def softmax_ref(x, axis=1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def seeded(tmp_path, text, deploy, model, seed, edit=lambda net: None):
    """``text`` as ``deploy``, random weights (then ``edit``) as ``model``; float64 copies."""
    (tmp_path / deploy).write_text(text)
    net = caffe.Net(str(tmp_path / deploy), caffe.TEST)
    rng = np.random.RandomState(seed)
    for blobs in net.params.values():
        for blob in blobs:
            blob.data[...] = rng.uniform(-0.5, 0.5, blob.data.shape)
    edit(net)
    net.save(str(tmp_path / model))
    return {k: [b.data.astype(np.float64) for b in v] for k, v in net.params.items()}


# -- yahoo/open_nsfw: classify_nsfw.py -------------------------------------------------
NSFW_NET = """name: "ResNet_50_1by2_nsfw"
input: "data" input_shape { dim: 1 dim: 3 dim: 6 dim: 6 }
layer { name: "conv_1" type: "Convolution" bottom: "data" top: "conv_1"
  convolution_param { num_output: 4 kernel_size: 3 stride: 1 pad: 1 } }
layer { name: "relu_1" type: "ReLU" bottom: "conv_1" top: "conv_1" }
layer { name: "pool" type: "Pooling" bottom: "conv_1" top: "pool"
  pooling_param { pool: AVE global_pooling: true } }
layer { name: "fc_nsfw" type: "InnerProduct" bottom: "pool" top: "fc_nsfw"
  inner_product_param { num_output: 2 } }
layer { name: "prob" type: "Softmax" bottom: "fc_nsfw" top: "prob" }
"""


def resize_image(data, sz=(8, 8)):
    """classify_nsfw's own resize: PIL bilinear, re-encoded as JPEG in memory."""
    im = Image.open(io.BytesIO(bytes(data)))
    if im.mode != "RGB":
        im = im.convert("RGB")
    imr = im.resize(sz, resample=Image.BILINEAR)
    fh_im = io.BytesIO()
    imr.save(fh_im, format="JPEG")
    fh_im.seek(0)
    return bytearray(fh_im.read())


def caffe_preprocess_and_compute(pimg, caffe_transformer, caffe_net, output_layers):
    img_data_rs = resize_image(pimg, sz=(8, 8))
    image = caffe.io.load_image(io.BytesIO(img_data_rs))
    H, W, _ = image.shape
    _, _, h, w = caffe_net.blobs["data"].data.shape
    h_off = max((H - h) // 2, 0)
    w_off = max((W - w) // 2, 0)
    crop = image[h_off:h_off + h, w_off:w_off + w, :]
    transformed_image = caffe_transformer.preprocess("data", crop)
    transformed_image.shape = (1,) + transformed_image.shape
    input_name = caffe_net.inputs[0]
    all_outputs = caffe_net.forward_all(blobs=output_layers, **{input_name: transformed_image})
    return all_outputs, all_outputs[output_layers[0]][0].astype(float), img_data_rs


def test_open_nsfw_classify(tmp_path):
    p = seeded(tmp_path, NSFW_NET, "deploy.prototxt", "resnet_50_1by2_nsfw.caffemodel", 1)
    rng = np.random.RandomState(2)
    Image.fromarray(rng.randint(0, 256, (13, 11, 3)).astype(np.uint8)).save(tmp_path / "in.png")
    image_data = open(tmp_path / "in.png", "rb").read()

    nsfw_net = caffe.Net(str(tmp_path / "deploy.prototxt"),
                         str(tmp_path / "resnet_50_1by2_nsfw.caffemodel"), caffe.TEST)
    caffe_transformer = caffe.io.Transformer({"data": nsfw_net.blobs["data"].data.shape})
    caffe_transformer.set_transpose("data", (2, 0, 1))
    caffe_transformer.set_mean("data", np.array([104, 117, 123]))
    caffe_transformer.set_raw_scale("data", 255)
    caffe_transformer.set_channel_swap("data", (2, 1, 0))
    outs, scores, jpeg = caffe_preprocess_and_compute(
        image_data, caffe_transformer, nsfw_net, output_layers=["prob", "fc_nsfw"])
    assert list(outs) == ["prob", "fc_nsfw"] and outs["fc_nsfw"].shape == (1, 2)

    # reference: PIL decodes the same JPEG (decoders may differ by a grey level or two);
    # then crop, BGR, mean, CHW and the net in float64 from load_image's own pixels
    rgb = np.asarray(Image.open(io.BytesIO(bytes(jpeg))), np.float64)
    image = caffe.io.load_image(io.BytesIO(jpeg)).astype(np.float64) * 255
    assert image.shape == (8, 8, 3) and np.abs(image - rgb).max() <= 2
    x = (image[1:7, 1:7, ::-1] - [104, 117, 123]).transpose(2, 0, 1)[None]
    hidden = np.maximum(conv_ref(x, *p["conv_1"], pad=1), 0).mean(axis=(2, 3))
    logits = hidden @ p["fc_nsfw"][0].T + p["fc_nsfw"][1]
    np.testing.assert_allclose(outs["fc_nsfw"][0], logits[0], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(scores, softmax_ref(logits)[0], rtol=1e-4, atol=1e-6)


# -- richzhang/colorization: the deploy demo's annealed-mean surgery --------------------
COLOR_NET = """name: "LtoAB"
layer { name: "data_l" type: "Input" top: "data_l"
  input_param { shape { dim: 1 dim: 1 dim: 8 dim: 8 } } }
layer { name: "bw_conv1_1" type: "Convolution" bottom: "data_l" top: "conv1_1"
  convolution_param { num_output: 4 pad: 1 kernel_size: 3 stride: 2 } }
layer { name: "relu1_1" type: "ReLU" bottom: "conv1_1" top: "conv1_1" }
layer { name: "conv1_1norm" type: "BatchNorm" bottom: "conv1_1" top: "conv1_1norm"
  batch_norm_param{ }
  param {lr_mult: 0 decay_mult: 0} param {lr_mult: 0 decay_mult: 0}
  param {lr_mult: 0 decay_mult: 0} }
layer { name: "conv5_1" type: "Convolution" bottom: "conv1_1norm" top: "conv5_1"
  convolution_param { num_output: 4 kernel_size: 3 stride: 1 pad: 2 dilation: 2 } }
layer { name: "relu5_1" type: "ReLU" bottom: "conv5_1" top: "conv5_1" }
layer { name: "conv8_1" type: "Deconvolution" bottom: "conv5_1" top: "conv8_1"
  convolution_param { num_output: 3 kernel_size: 4 pad: 1 dilation: 1 stride: 2 } }
layer { name: "relu8_1" type: "ReLU" bottom: "conv8_1" top: "conv8_1" }
layer { name: "conv8_313" type: "Convolution" bottom: "conv8_1" top: "conv8_313"
  convolution_param { num_output: 6 kernel_size: 1 stride: 1 dilation: 1 } }
layer { name: "conv8_313_rh" type: "Scale" bottom: "conv8_313" top: "conv8_313_rh"
  scale_param { bias_term: False filler { type: 'constant' value: 2.606 } } }
layer { name: "class8_313_rh" type: "Softmax" bottom: "conv8_313_rh" top: "class8_313_rh" }
layer { name: "class8_ab" type: "Convolution" bottom: "class8_313_rh" top: "class8_ab"
  convolution_param { num_output: 2 kernel_size: 1 stride: 1 dilation: 1 } }
layer { name: "Silence" type: "Silence" bottom: "class8_ab" }
"""


def colorization_ref(l_in, p, pts_in_hull, reheat):
    """The demo's net in float64 with the annealed-mean weights given directly."""
    x = np.maximum(conv_ref(l_in, *p["bw_conv1_1"], stride=2, pad=1), 0)
    mean, var, factor = p["conv1_1norm"]
    x = (x - (mean / factor[0])[None, :, None, None]) / \
        np.sqrt(var / factor[0] + 1e-5)[None, :, None, None]
    x = np.maximum(conv_ref(x, *p["conv5_1"], pad=2, dil=2), 0)
    x = np.maximum(deconv_ref(x, *p["conv8_1"], stride=2, pad=1), 0)
    x = conv_ref(x, *p["conv8_313"]) * reheat
    prob = softmax_ref(x)
    return np.einsum("nqhw,qc->nchw", prob, pts_in_hull) + p["class8_ab"][1][None, :, None, None]


def test_colorization_deploy_annealed_mean(tmp_path):
    def batch_norm_stats(seed):
        bn = seed.params["conv1_1norm"]
        bn[1].data[...] = np.abs(bn[1].data) + 0.1
        bn[2].data[...] = 2.0
    p = seeded(tmp_path, COLOR_NET, "colorization_deploy_v2.prototxt",
               "colorization_release_v2.caffemodel", 3, batch_norm_stats)
    fresh = caffe.Net(str(tmp_path / "colorization_deploy_v2.prototxt"), caffe.TEST)
    assert np.all(fresh.params["conv8_313_rh"][0].data == np.float32(2.606))  # the filler
    assert fresh.outputs == []                                  # Silence eats class8_ab
    rng = np.random.RandomState(4)
    pts_in_hull = rng.uniform(-100, 100, (6, 2))
    np.save(tmp_path / "pts_in_hull.npy", pts_in_hull)
    Image.fromarray(rng.randint(0, 256, (20, 16, 3)).astype(np.uint8)).save(tmp_path / "in.png")

    net = caffe.Net(str(tmp_path / "colorization_deploy_v2.prototxt"),
                    str(tmp_path / "colorization_release_v2.caffemodel"), caffe.TEST)
    (H_in, W_in) = net.blobs["data_l"].data.shape[2:]
    (H_out, W_out) = net.blobs["class8_ab"].data.shape[2:]
    assert (H_in, W_in, H_out, W_out) == (8, 8, 8, 8)
    pts = np.load(str(tmp_path / "pts_in_hull.npy"))
    net.params["class8_ab"][0].data[:, :, 0, 0] = pts.transpose((1, 0))
    net.params["conv8_313_rh"][0].data[:] = 2.606

    img_rgb = caffe.io.load_image(str(tmp_path / "in.png"))
    img_rs = caffe.io.resize_image(img_rgb, (H_in, W_in))
    img_l_rs = color.rgb2lab(img_rs)[:, :, 0]
    net.blobs["data_l"].data[0, 0, :, :] = img_l_rs - 50
    assert net.forward() == {}
    ab_dec = net.blobs["class8_ab"].data[0, :, :, :].transpose((1, 2, 0))
    want = colorization_ref((img_l_rs - 50)[None, None].astype(np.float32).astype(np.float64),
                            p, pts_in_hull, 2.606)
    np.testing.assert_allclose(ab_dec, want[0].transpose(1, 2, 0), rtol=1e-4, atol=1e-3)

    # a larger input: reshape the input blob only; Caffe's forward reshapes every layer
    net.blobs["data_l"].reshape(1, 1, 12, 12)
    l_big = rng.uniform(-50, 50, (12, 12)).astype(np.float32)
    net.blobs["data_l"].data[0, 0] = l_big
    net.forward()
    assert net.blobs["class8_ab"].data.shape == (1, 2, 12, 12)
    want = colorization_ref(l_big[None, None].astype(np.float64), p, pts_in_hull, 2.606)
    np.testing.assert_allclose(net.blobs["class8_ab"].data, want, rtol=1e-4, atol=1e-3)


# -- CSAILVision/places365: the Caffe deploy flow ---------------------------------------
PLACES_NET = """name: "AlexNet-Places365"
input: "data" input_shape { dim: 10 dim: 3 dim: 7 dim: 7 }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 stride: 2 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "fc8a" type: "InnerProduct" bottom: "conv1" top: "fc8a"
  inner_product_param { num_output: 7 } }
layer { name: "prob" type: "Softmax" bottom: "fc8a" top: "prob" }
"""
CATEGORIES = ["/a/airfield 0", "/a/alley 1", "/b/beach 2", "/c/canyon 3", "/f/forest/broadleaf 4",
              "/m/marsh 5", "/o/ocean 6"]


def places_ref(x, p):
    hidden = np.maximum(conv_ref(x, *p["conv1"], stride=2), 0).reshape(len(x), -1)
    return softmax_ref(hidden @ p["fc8a"][0].T + p["fc8a"][1])


def test_places365_deploy_flow(tmp_path):
    p = seeded(tmp_path, PLACES_NET, "deploy_alexnet_places365.prototxt",
               "alexnet_places365.caffemodel", 5)
    rng = np.random.RandomState(6)
    mean_img = rng.uniform(90, 130, (1, 3, 7, 7))
    (tmp_path / "places365CNN_mean.binaryproto").write_bytes(
        caffe.io.array_to_blobproto(mean_img).SerializeToString())
    (tmp_path / "categories_places365.txt").write_text("\n".join(CATEGORIES) + "\n")
    Image.fromarray(rng.randint(0, 256, (7, 7, 3)).astype(np.uint8)).save(tmp_path / "12.jpg",
                                                                          quality=95)

    blob = caffe.proto.caffe_pb2.BlobProto()
    data = open(tmp_path / "places365CNN_mean.binaryproto", "rb").read()
    blob.ParseFromString(data)
    mu = np.array(caffe.io.blobproto_to_array(blob))[0]
    mu = mu.mean(1).mean(1)
    net = caffe.Net(str(tmp_path / "deploy_alexnet_places365.prototxt"),
                    str(tmp_path / "alexnet_places365.caffemodel"), caffe.TEST)
    transformer = caffe.io.Transformer({"data": net.blobs["data"].data.shape})
    transformer.set_transpose("data", (2, 0, 1))
    transformer.set_mean("data", mu)
    transformer.set_raw_scale("data", 255)
    transformer.set_channel_swap("data", (2, 1, 0))
    net.blobs["data"].reshape(1, 3, 7, 7)
    im = caffe.io.load_image(str(tmp_path / "12.jpg"))
    net.blobs["data"].data[...] = transformer.preprocess("data", im)
    out = net.forward()
    classes = []
    with open(tmp_path / "categories_places365.txt") as class_file:
        for line in class_file:
            classes.append(line.strip().split(" ")[0][3:])
    top_k = net.blobs["prob"].data[0].flatten().argsort()[-1:-6:-1]

    mean_bgr = mean_img[0].mean(axis=(1, 2))
    x = (im.astype(np.float64)[:, :, ::-1] * 255 - mean_bgr).transpose(2, 0, 1)[None]
    want = places_ref(x, p)
    np.testing.assert_allclose(out["prob"], want, rtol=1e-4, atol=1e-6)
    assert list(top_k) == list(np.argsort(-want[0])[:5])
    assert [classes[k] for k in top_k][0] == CATEGORIES[top_k[0]].split(" ")[0][3:]

    # the same image through caffe.Classifier (centre crop of the whole image)
    clf = caffe.Classifier(str(tmp_path / "deploy_alexnet_places365.prototxt"),
                           str(tmp_path / "alexnet_places365.caffemodel"), mean=mu,
                           channel_swap=(2, 1, 0), raw_scale=255, image_dims=(7, 7))
    np.testing.assert_allclose(clf.predict([im], oversample=False), want, rtol=1e-4, atol=1e-6)


# -- richzhang/colorization: resources/caffe_traininglayers.py --------------------------
TRAINING_LAYERS = '''
import os
import numpy as np
import caffe
from skimage import color


class BGR2LabLayer(caffe.Layer):
    def setup(self, bottom, top):
        self.N, _, self.X, self.Y = bottom[0].data.shape

    def reshape(self, bottom, top):
        top[0].reshape(self.N, 3, self.X, self.Y)

    def forward(self, bottom, top):
        rgb = bottom[0].data[:, ::-1, :, :].astype('uint8').transpose((2, 3, 0, 1))
        top[0].data[...] = color.rgb2lab(rgb).transpose((2, 3, 0, 1))

    def backward(self, top, propagate_down, bottom):
        pass


class NNEncLayer(BGR2LabLayer):
    """Soft-encodes ab into the NN nearest of the Q hull points (Gaussian weights)."""
    def setup(self, bottom, top):
        self.NN, self.sigma = 2, 5.
        self.cc = np.load(os.path.join('./resources/', 'pts_in_hull.npy'))
        self.N, _, self.X, self.Y = bottom[0].data.shape
        self.Q = self.cc.shape[0]

    def reshape(self, bottom, top):
        top[0].reshape(self.N, self.Q, self.X, self.Y)

    def forward(self, bottom, top):
        pts = bottom[0].data.transpose((0, 2, 3, 1)).reshape(-1, 2)
        d2 = ((pts[:, None, :] - self.cc[None, :, :]) ** 2).sum(axis=2)
        inds = np.argsort(d2, axis=1)[:, :self.NN]
        wts = np.exp(-np.take_along_axis(d2, inds, 1) / (2 * self.sigma ** 2))
        enc = np.zeros((pts.shape[0], self.Q))
        enc[np.arange(pts.shape[0])[:, None], inds] = wts / wts.sum(axis=1)[:, None]
        top[0].data[...] = enc.reshape(self.N, self.X, self.Y, self.Q).transpose((0, 3, 1, 2))


class PriorBoostLayer(BGR2LabLayer):
    def setup(self, bottom, top):
        prior = np.load(os.path.join('./resources/', 'prior_probs.npy'))
        factor = ((1 - .5) * prior + .5 / prior.size) ** -1.
        self.prior_factor = factor / np.sum(prior * factor)
        self.N, self.Q, self.X, self.Y = bottom[0].data.shape

    def reshape(self, bottom, top):
        top[0].reshape(self.N, 1, self.X, self.Y)

    def forward(self, bottom, top):
        top[0].data[...] = self.prior_factor[np.argmax(bottom[0].data[...], axis=1)][:, None]


class NonGrayMaskLayer(PriorBoostLayer):
    def setup(self, bottom, top):
        self.thresh = 5
        self.N, _, self.X, self.Y = bottom[0].data.shape

    def forward(self, bottom, top):
        big = np.sum(np.sum(np.sum(np.abs(bottom[0].data) > self.thresh, axis=1), axis=1), axis=1)
        top[0].data[...] = (big > 0)[:, None, None, None]


class ClassRebalanceMultLayer(BGR2LabLayer):
    def setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        top[0].data[...] = bottom[0].data[...]

    def backward(self, top, propagate_down, bottom):
        for i in range(len(bottom)):
            if not propagate_down[i]:
                continue
            bottom[0].diff[...] = top[0].diff[...] * bottom[1].data[...]
'''


def python_layer(name, bottoms, top, cls):
    return (f'layer {{ type: "Python" name: "{name}" '
            + " ".join(f'bottom: "{b}"' for b in bottoms)
            + f' top: "{top}" python_param {{ module: "caffe_traininglayers"'
            + f' layer: "{cls}" }} }}\n')


TRAIN_NET = ('name: "LtoAB"\ninput: "data" input_shape { dim: 2 dim: 3 dim: 8 dim: 8 }\n'
             + python_layer("img_lab", ["data"], "img_lab", "BGR2LabLayer") + """
layer { name: "img_slice" type: "Slice" bottom: "img_lab" top: "img_l" top: "data_ab"
  propagate_down: false slice_param { axis: 1 slice_point: 1 } }
layer { name: "data_l_meansub" type: "Scale" bottom: "img_l" top: "data_l"
  propagate_down: false param {lr_mult: 0 decay_mult: 0} param {lr_mult: 0 decay_mult: 0}
  scale_param { bias_term: True filler { type: 'constant' value: 1 }
    bias_filler { type: 'constant' value: -50 } } }
layer { name: 'data_ab_ss' type: 'Convolution' bottom: "data_ab" top: "data_ab_ss"
  param {lr_mult: 0 decay_mult: 0} param {lr_mult: 0 decay_mult: 0}
  convolution_param { num_output: 2 kernel_size: 1 stride: 4 group: 2
    weight_filler { type: 'constant' value: 1 } } }
""" + python_layer("ab_enc", ["data_ab_ss"], "gt_ab_313", "NNEncLayer")
             + python_layer("nongray_mask", ["data_ab_ss"], "nongray_mask", "NonGrayMaskLayer")
             + python_layer("prior_boost", ["gt_ab_313"], "prior_boost", "PriorBoostLayer") + """
layer { type: 'Eltwise' name: 'prior_boost_nongray' bottom: "prior_boost"
  bottom: "nongray_mask" top: "prior_boost_nongray" eltwise_param { operation: 0 } }
layer { name: "conv8_313" type: "Convolution" bottom: "data_l" top: "conv8_313"
  convolution_param { num_output: 5 kernel_size: 4 stride: 4
    weight_filler { type: "gaussian" std: 0.1 } } }
""" + python_layer("conv8_313_boost", ["conv8_313", "prior_boost_nongray"], "conv8_313_boost",
                   "ClassRebalanceMultLayer") + """
layer { name: "loss8_313" type: "EuclideanLoss" bottom: "conv8_313_boost" bottom: "gt_ab_313"
  top: "loss8_313" loss_weight: 1.0 }
""")


def test_colorization_training_layers(tmp_path, monkeypatch):
    (tmp_path / "caffe_traininglayers.py").write_text(textwrap.dedent(TRAINING_LAYERS))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    rng = np.random.RandomState(9)
    (tmp_path / "resources").mkdir()
    hull = np.array([[0., 0.], [40, 10], [-30, 20], [10, -50], [-20, -20]])
    prior = np.array([0.4, 0.1, 0.2, 0.2, 0.1])
    np.save("resources/pts_in_hull.npy", hull)
    np.save("resources/prior_probs.npy", prior)
    (tmp_path / "train_val.prototxt").write_text(TRAIN_NET)
    net = caffe.Net("train_val.prototxt", caffe.TRAIN)
    bgr = rng.randint(0, 256, (2, 3, 8, 8)).astype(np.float64)
    bgr[1] = bgr[1, :1]                                 # image 1 is grey: its mask is 0
    net.blobs["data"].data[...] = bgr
    loss = net.forward()["loss8_313"]
    net.backward()
    lab = color.rgb2lab(bgr[:, ::-1].astype(np.uint8).transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(net.blobs["data_l"].data, lab[:, :1] - 50, atol=1e-3)
    ab_ss = lab[:, 1:, ::4, ::4]
    np.testing.assert_allclose(net.blobs["data_ab_ss"].data, ab_ss, atol=1e-3)
    pts = ab_ss.transpose(0, 2, 3, 1).reshape(-1, 2)
    d2 = ((pts[:, None] - hull[None]) ** 2).sum(axis=2)
    near = np.argsort(d2, axis=1)[:, :2]
    w = np.exp(-np.take_along_axis(d2, near, 1) / 50.)
    enc = np.zeros((len(pts), 5))
    np.put_along_axis(enc, near, w / w.sum(axis=1, keepdims=True), 1)
    gt = enc.reshape(2, 2, 2, 5).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(net.blobs["gt_ab_313"].data, gt, atol=1e-4)
    mask = (np.abs(ab_ss) > 5).any(axis=(1, 2, 3)).astype(float)
    assert list(mask) == [1.0, 0.0]
    factor = 1 / (0.5 * prior + 0.1)
    factor /= (prior * factor).sum()
    boost = factor[gt.argmax(axis=1)][:, None] * mask[:, None, None, None]
    np.testing.assert_allclose(net.blobs["prior_boost_nongray"].data, boost, rtol=1e-5)

    scores = net.blobs["conv8_313"].data.astype(np.float64)
    np.testing.assert_allclose(net.blobs["conv8_313_boost"].data, scores)
    np.testing.assert_allclose(loss, ((scores - gt) ** 2).sum() / 2 / 2, rtol=1e-4)
    # the rebalancing is backward-only: the score diff is boosted, grey image 1 gets none
    want_diff = (scores - gt) / 2 * boost
    np.testing.assert_allclose(net.blobs["conv8_313"].diff, want_diff, rtol=1e-4, atol=1e-7)
    patches = net.blobs["data_l"].data.astype(np.float64).reshape(2, 1, 2, 4, 2, 4)
    want_w = np.einsum("nohw,nchiwj->ocij", want_diff, patches)
    np.testing.assert_allclose(net.params["conv8_313"][0].diff, want_w, rtol=1e-4, atol=1e-5)
    assert not net.params["data_ab_ss"][0].diff.any()       # lr_mult 0 and no path back
