"""A second engine: OpenCV DNN's Caffe importer (written independently of Caffe and of us).

Each test builds a small random-weight net of one model family, saves it with our own
``net.save`` (prototxt + caffemodel), loads both files in ``cv2.dnn.readNetFromCaffe`` and
compares the outputs with ours within 1e-4. Fork layers OpenCV lacks (SegNet's BN and
Upsample, PSPNet's Interp, Fast R-CNN's ROIPooling, SENet's Axpy) are compared with a numpy
float64 computation of the same net instead.
"""
import numpy as np
import pytest

import caffe_compat as caffe

cv2 = pytest.importorskip("cv2")
if not hasattr(cv2, "dnn") or not hasattr(cv2.dnn, "readNetFromCaffe"):
    pytest.skip("this OpenCV has no Caffe importer (removed in 5.0; setup.cfg pins <5)",
                allow_module_level=True)

TOL = dict(rtol=1e-4, atol=1e-4)
rng = np.random.default_rng(0)
G = 'weight_filler { type: "gaussian" std: 0.2 } bias_filler { type: "gaussian" std: 0.2 }'


def inp(name, *dims):
    shape = " ".join(f"dim: {d}" for d in dims)
    return f'layer {{ name: "{name}" type: "Input" top: "{name}" input_param {{ shape {{ {shape} }} }} }}\n'


def conv(name, bottom, n, k, pad=0, stride=1, group=1, extra=""):
    return (f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}" '
            f'convolution_param {{ num_output: {n} kernel_size: {k} pad: {pad} stride: {stride} '
            f'group: {group} {G} {extra} }} }}\n')


def relu(name, bottom):
    return f'layer {{ name: "{name}" type: "ReLU" bottom: "{bottom}" top: "{bottom}" }}\n'


def bn_scale(name, bottom):
    return (f'layer {{ name: "{name}_bn" type: "BatchNorm" bottom: "{bottom}" top: "{bottom}" }}\n'
            f'layer {{ name: "{name}_sc" type: "Scale" bottom: "{bottom}" top: "{bottom}" scale_param '
            '{ bias_term: true filler { type: "gaussian" } bias_filler { type: "gaussian" } } }\n')


def random_bn_stats(net):
    """BatchNorm blobs as after training: mean, positive variance, a scale factor."""
    for name, layer in zip(net._layer_names, net.layers):
        if layer.type == "BatchNorm":
            c = net.params[name][0].data.shape[0]
            net.params[name][0].data[...] = rng.normal(size=c) * 2
            net.params[name][1].data[...] = rng.uniform(0.5, 2, size=c) * 4
            net.params[name][2].data[...] = 4


def run_both(tmp_path, text, feeds, outputs, setup=None):
    """Our outputs and OpenCV's for the same prototxt and caffemodel (OpenCV names outputs
    by layer: each compared blob is the top of a layer of the same name)."""
    proto, model = tmp_path / "net.prototxt", tmp_path / "net.caffemodel"
    proto.write_text('name: "second_engine"\n' + text)
    net = caffe.Net(str(proto), caffe.TEST)
    if setup:
        setup(net)
    net.save(str(model))
    net = caffe.Net(str(proto), str(model), caffe.TEST)
    for name, value in feeds.items():
        net.blobs[name].data[...] = value
    net.forward()
    cv = cv2.dnn.readNetFromCaffe(str(proto), str(model))
    cv.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    cv.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
    for name, value in feeds.items():
        cv.setInput(value, name)
    theirs = cv.forward(outputs)
    return {name: (net.blobs[name].data.copy(), np.asarray(t)) for name, t in zip(outputs, theirs)}


def assert_same(results):
    for name, (ours, theirs) in results.items():
        np.testing.assert_allclose(theirs.reshape(ours.shape), ours, err_msg=f"blob {name}", **TOL)


def image(*shape):
    return rng.normal(size=shape).astype(np.float32)


def test_vgg_style(tmp_path):
    text = (inp("data", 2, 3, 16, 16) + conv("c1", "data", 8, 3, 1) + relu("r1", "c1")
            + 'layer { name: "p1" type: "Pooling" bottom: "c1" top: "p1" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }\n'
            + conv("c2", "p1", 8, 3, 1) + relu("r2", "c2")
            + 'layer { name: "p2" type: "Pooling" bottom: "c2" top: "p2" pooling_param { pool: MAX kernel_size: 3 stride: 2 } }\n'
            + f'layer {{ name: "fc1" type: "InnerProduct" bottom: "p2" top: "fc1" inner_product_param {{ num_output: 10 {G} }} }}\n'
            + relu("r3", "fc1")
            + 'layer { name: "drop" type: "Dropout" bottom: "fc1" top: "fc1" dropout_param { dropout_ratio: 0.5 } }\n'
            + f'layer {{ name: "fc2" type: "InnerProduct" bottom: "fc1" top: "fc2" inner_product_param {{ num_output: 5 {G} }} }}\n'
            + 'layer { name: "prob" type: "Softmax" bottom: "fc2" top: "prob" }\n')
    assert_same(run_both(tmp_path, text, {"data": image(2, 3, 16, 16)}, ["prob", "fc2"]))


def test_resnet_block_batchnorm_scale_eltwise(tmp_path):
    text = (inp("data", 2, 4, 8, 8) + conv("a", "data", 4, 3, 1, extra="bias_term: false")
            + bn_scale("a", "a") + relu("ra", "a") + conv("b", "a", 4, 3, 1, extra="bias_term: false")
            + bn_scale("b", "b")
            + 'layer { name: "sum" type: "Eltwise" bottom: "data" bottom: "b" top: "sum" }\n'
            + 'layer { name: "out" type: "ReLU" bottom: "sum" top: "out" }\n'
            + 'layer { name: "prod" type: "Eltwise" bottom: "out" bottom: "a" top: "prod" eltwise_param { operation: PROD } }\n')
    assert_same(run_both(tmp_path, text, {"data": image(2, 4, 8, 8)}, ["out", "prod"],
                         setup=random_bn_stats))


def test_inception_concat(tmp_path):
    text = (inp("data", 1, 6, 9, 9) + conv("b1", "data", 4, 1) + conv("b3r", "data", 3, 1)
            + conv("b3", "b3r", 4, 3, 1) + conv("b5r", "data", 2, 1) + conv("b5", "b5r", 3, 5, 2)
            + 'layer { name: "pool" type: "Pooling" bottom: "data" top: "pool" pooling_param { pool: MAX kernel_size: 3 stride: 1 pad: 1 } }\n'
            + conv("pp", "pool", 2, 1) + relu("r", "b3")
            + 'layer { name: "cat" type: "Concat" bottom: "b1" bottom: "b3" bottom: "b5" bottom: "pp" top: "cat" }\n'
            + 'layer { name: "gap" type: "Pooling" bottom: "cat" top: "gap" pooling_param { pool: AVE global_pooling: true } }\n')
    assert_same(run_both(tmp_path, text, {"data": image(1, 6, 9, 9)}, ["cat", "gap"]))


def test_mobilenet_depthwise_block(tmp_path):
    text = (inp("data", 1, 4, 10, 10) + conv("dw", "data", 4, 3, 1, 2, group=4, extra="bias_term: false")
            + bn_scale("dw", "dw") + relu("r1", "dw") + conv("pw", "dw", 6, 1, extra="bias_term: false")
            + bn_scale("pw", "pw")
            + 'layer { name: "r6" type: "ReLU6" bottom: "pw" top: "r6" }\n'
            + f'layer {{ name: "dw2" type: "ConvolutionDepthwise" bottom: "r6" top: "dw2" convolution_param {{ num_output: 6 kernel_size: 3 pad: 1 {G} }} }}\n'
            + 'layer { name: "shuf" type: "ShuffleChannel" bottom: "dw2" top: "shuf" shuffle_channel_param { group: 2 } }\n')
    data = image(1, 4, 10, 10) * 3
    assert_same(run_both(tmp_path, text, {"data": data}, ["r6", "dw2", "shuf"], setup=random_bn_stats))


def test_squeezenet_fire_module(tmp_path):
    text = (inp("data", 1, 3, 15, 15) + conv("c1", "data", 8, 3, 0, 2) + relu("r1", "c1")
            + 'layer { name: "p1" type: "Pooling" bottom: "c1" top: "p1" pooling_param { pool: MAX kernel_size: 3 stride: 2 } }\n'
            + conv("sq", "p1", 4, 1) + relu("rs", "sq") + conv("e1", "sq", 6, 1) + relu("re1", "e1")
            + conv("e3", "sq", 6, 3, 1) + relu("re3", "e3")
            + 'layer { name: "fire" type: "Concat" bottom: "e1" bottom: "e3" top: "fire" }\n'
            + conv("cls", "fire", 5, 1)
            + 'layer { name: "gap" type: "Pooling" bottom: "cls" top: "gap" pooling_param { pool: AVE global_pooling: true } }\n'
            + 'layer { name: "prob" type: "Softmax" bottom: "gap" top: "prob" }\n')
    assert_same(run_both(tmp_path, text, {"data": image(1, 3, 15, 15)}, ["fire", "prob"]))


def test_alexnet_lrn_group(tmp_path):
    # LRN keeps Caffe's default k = 1: OpenCV 4.14's importer gives a different result for
    # k = 2 (ours equals a float64 evaluation of Caffe's formula there, see test_lrn.py).
    text = (inp("data", 1, 3, 27, 27) + conv("c1", "data", 8, 5, 0, 2) + relu("r1", "c1")
            + 'layer { name: "n1" type: "LRN" bottom: "c1" top: "n1" lrn_param { local_size: 5 alpha: 0.1 beta: 0.75 } }\n'
            + 'layer { name: "p1" type: "Pooling" bottom: "n1" top: "p1" pooling_param { pool: MAX kernel_size: 3 stride: 2 } }\n'
            + conv("c2", "p1", 8, 3, 1, group=2) + relu("r2", "c2")
            + 'layer { name: "n2" type: "LRN" bottom: "c2" top: "n2" lrn_param { local_size: 3 alpha: 0.2 beta: 0.5 norm_region: WITHIN_CHANNEL } }\n'
            + f'layer {{ name: "fc" type: "InnerProduct" bottom: "n2" top: "fc" inner_product_param {{ num_output: 4 {G} }} }}\n')
    assert_same(run_both(tmp_path, text, {"data": image(1, 3, 27, 27) * 4}, ["n1", "n2", "fc"]))


def test_fcn_deconvolution_crop(tmp_path):
    text = (inp("data", 1, 3, 12, 12) + conv("c1", "data", 4, 3, 1) + relu("r1", "c1")
            + 'layer { name: "p1" type: "Pooling" bottom: "c1" top: "p1" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }\n'
            + conv("score", "p1", 3, 1)
            + 'layer { name: "up" type: "Deconvolution" bottom: "score" top: "up" convolution_param { num_output: 3 kernel_size: 4 stride: 2 group: 3 bias_term: false weight_filler { type: "bilinear" } } }\n'
            + f'layer {{ name: "up2" type: "Deconvolution" bottom: "score" top: "up2" convolution_param {{ num_output: 2 kernel_size: 3 stride: 2 pad: 1 {G} }} }}\n'
            + 'layer { name: "crop" type: "Crop" bottom: "up" bottom: "data" top: "crop" crop_param { axis: 2 offset: 1 } }\n')
    assert_same(run_both(tmp_path, text, {"data": image(1, 3, 12, 12)}, ["up2", "crop"]))


SSD_HEAD = (inp("data", 2, 3, 20, 20) + conv("f1", "data", 4, 3, 1, 2) + relu("r1", "f1")
            + 'layer { name: "f1n" type: "Normalize" bottom: "f1" top: "f1n" norm_param { across_spatial: false channel_shared: false scale_filler { type: "constant" value: 2 } } }\n'
            + conv("f2", "f1", 4, 3, 1, 2) + relu("r2", "f2")
            + "".join(
                conv(f"{f}_loc", src, p * 4, 3, 1)
                + f'layer {{ name: "{f}_lp" type: "Permute" bottom: "{f}_loc" top: "{f}_lp" permute_param {{ order: 0 order: 2 order: 3 order: 1 }} }}\n'
                + f'layer {{ name: "{f}_lf" type: "Flatten" bottom: "{f}_lp" top: "{f}_lf" flatten_param {{ axis: 1 }} }}\n'
                + conv(f"{f}_conf", src, p * 3, 3, 1)
                + f'layer {{ name: "{f}_cp" type: "Permute" bottom: "{f}_conf" top: "{f}_cp" permute_param {{ order: 0 order: 2 order: 3 order: 1 }} }}\n'
                + f'layer {{ name: "{f}_cf" type: "Flatten" bottom: "{f}_cp" top: "{f}_cf" flatten_param {{ axis: 1 }} }}\n'
                + f'layer {{ name: "{f}_pb" type: "PriorBox" bottom: "{src}" bottom: "data" top: "{f}_pb" prior_box_param {{ {pb} }} }}\n'
                for f, src, p, pb in (
                    ("a", "f1n", 4, "min_size: 4 max_size: 9 aspect_ratio: 2 flip: true clip: false variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2"),
                    ("b", "f2", 3, "min_size: 9 aspect_ratio: 2 flip: true clip: true variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2 step: 8 offset: 0.5")))
            + 'layer { name: "loc" type: "Concat" bottom: "a_lf" bottom: "b_lf" top: "loc" concat_param { axis: 1 } }\n'
            + 'layer { name: "conf" type: "Concat" bottom: "a_cf" bottom: "b_cf" top: "conf" concat_param { axis: 1 } }\n'
            + 'layer { name: "prior" type: "Concat" bottom: "a_pb" bottom: "b_pb" top: "prior" concat_param { axis: 2 } }\n'
            + 'layer { name: "conf_r" type: "Reshape" bottom: "conf" top: "conf_r" reshape_param { shape { dim: 0 dim: -1 dim: 3 } } }\n'
            + 'layer { name: "conf_s" type: "Softmax" bottom: "conf_r" top: "conf_s" softmax_param { axis: 2 } }\n'
            + 'layer { name: "conf_f" type: "Flatten" bottom: "conf_s" top: "conf_f" }\n'
            + 'layer { name: "det" type: "DetectionOutput" bottom: "loc" bottom: "conf_f" bottom: "prior" top: "det" detection_output_param { num_classes: 3 share_location: true background_label_id: 0 nms_param { nms_threshold: 0.45 top_k: 40 } code_type: CENTER_SIZE keep_top_k: 15 confidence_threshold: 0.35 } }\n')


def test_ssd_head(tmp_path):
    results = run_both(tmp_path, SSD_HEAD, {"data": image(2, 3, 20, 20)},
                       ["f1n", "loc", "conf_f", "prior", "det"])
    det_ours, det_cv = results.pop("det")
    assert_same(results)
    ours = det_ours.reshape(-1, 7)
    theirs = det_cv.reshape(-1, 7)
    assert len(ours) >= 4, "the head should detect something"
    key = lambda rows: rows[np.lexsort((-rows[:, 2], rows[:, 1], rows[:, 0]))]   # noqa: E731
    np.testing.assert_allclose(key(theirs), key(ours), **TOL)


# -- fork layers OpenCV's importer lacks: the whole net against numpy float64 ----------------
from test_forks import _interp_reference, _roi_reference  # noqa: E402  (float64 references)


def _ours(tmp_path, text, feeds):
    proto = tmp_path / "net.prototxt"
    proto.write_text('name: "fork_net"\n' + text)
    net = caffe.Net(str(proto), caffe.TEST)
    for name, value in feeds.items():
        net.blobs[name].data[...] = value
    net.forward()
    return net


def _conv1x1(x, w, b):
    return np.einsum("oc,nchw->nohw", w.reshape(w.shape[0], -1), x) + b.reshape(1, -1, 1, 1)


def test_segnet_encoder_decoder_bn_upsample(tmp_path):
    text = (inp("data", 2, 3, 6, 8) + conv("c", "data", 4, 1)
            + 'layer { name: "bn" type: "BN" bottom: "c" top: "c" bn_param { scale_filler { type: "gaussian" mean: 1 } shift_filler { type: "gaussian" } } }\n'
            + relu("r", "c")
            + 'layer { name: "pool" type: "Pooling" bottom: "c" top: "pool" top: "mask" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }\n'
            + 'layer { name: "up" type: "Upsample" bottom: "pool" bottom: "mask" top: "up" upsample_param { scale: 2 } }\n')
    x = image(2, 3, 6, 8)
    net = _ours(tmp_path, text, {"data": x})
    p = {k: [b.data.astype(np.float64) for b in v] for k, v in net.params.items()}
    c = _conv1x1(x.astype(np.float64), *p["c"])
    mean = c.mean(axis=(0, 2, 3), keepdims=True)
    var = (c ** 2).mean(axis=(0, 2, 3), keepdims=True) - mean ** 2
    c = np.maximum(p["bn"][0] * (c - mean) / np.sqrt(var + 1e-9) + p["bn"][1], 0)
    windows = c.reshape(2, 4, 3, 2, 4, 2).transpose(0, 1, 2, 4, 3, 5).reshape(2, 4, 3, 4, 4)
    up = np.zeros_like(c)
    best = windows.argmax(axis=-1)
    for n, ch, i, j in np.ndindex(2, 4, 3, 4):
        dy, dx = divmod(best[n, ch, i, j], 2)
        up[n, ch, 2 * i + dy, 2 * j + dx] = windows[n, ch, i, j].max()
    np.testing.assert_allclose(net.blobs["up"].data, up, **TOL)


def test_pspnet_pyramid_interp(tmp_path):
    text = (inp("data", 1, 3, 9, 9)
            + 'layer { name: "p" type: "Pooling" bottom: "data" top: "p" pooling_param { pool: AVE kernel_size: 3 stride: 3 } }\n'
            + conv("c", "p", 2, 1)
            + 'layer { name: "i" type: "Interp" bottom: "c" top: "i" interp_param { height: 9 width: 9 } }\n'
            + 'layer { name: "cat" type: "Concat" bottom: "data" bottom: "i" top: "cat" }\n')
    x = image(1, 3, 9, 9)
    net = _ours(tmp_path, text, {"data": x})
    w, b = (blob.data.astype(np.float64) for blob in net.params["c"])
    pooled = x.astype(np.float64).reshape(1, 3, 3, 3, 3, 3).mean(axis=(3, 5))
    expected = np.concatenate([x, _interp_reference(_conv1x1(pooled, w, b), 9, 9)], axis=1)
    np.testing.assert_allclose(net.blobs["cat"].data, expected, **TOL)


def test_fast_rcnn_roi_head_and_senet_axpy(tmp_path):
    text = (inp("data", 1, 2, 8, 8) + inp("rois", 2, 5)
            + 'layer { name: "roi" type: "ROIPooling" bottom: "data" bottom: "rois" top: "roi" roi_pooling_param { pooled_h: 2 pooled_w: 2 spatial_scale: 0.5 } }\n'
            + 'layer { name: "gap" type: "Pooling" bottom: "roi" top: "gap" pooling_param { pool: AVE global_pooling: true } }\n'
            + 'layer { name: "gate" type: "Sigmoid" bottom: "gap" top: "gate" }\n'
            + 'layer { name: "se" type: "Axpy" bottom: "gate" bottom: "roi" bottom: "roi" top: "se" }\n')
    x, rois = image(1, 2, 8, 8), np.array([[0, 0, 0, 9, 9], [0, 4, 2, 15, 13]], np.float32)
    net = _ours(tmp_path, text, {"data": x, "rois": rois})
    roi = _roi_reference(x.astype(np.float64), rois.astype(np.float64), 2, 2, 0.5)
    gate = 1 / (1 + np.exp(-roi.mean(axis=(2, 3), keepdims=True)))
    np.testing.assert_allclose(net.blobs["se"].data, gate * roi + roi, **TOL)
