"""The YOLO ports' deploy layers against float64 loop re-statements of the forks' C++
(eric612/MobileNet-YOLO's yolov3_detection_output_layer.cpp; training_toolbox_caffe's
region_layer.cpp), hand-computed boxes, and a MobileNet-YOLO style deploy tail in caffe.Net."""
import math

import numpy as np
import pytest
import torch

import caffe_compat as caffe
from caffe_compat.engine.layers import LayerError
from caffe_compat.formats.blob_io import ProtoTextError
from layer_utils import make_layer

BIASES = [10, 14, 23, 27, 37, 58, 81, 82, 135, 169, 344, 319]


def yolo_param(classes=2, threshold=0.3, nms=0.45, extra="", heads=2,
               mask="mask: [3, 4, 5, 0, 1, 2]", scales="anchors_scale: [32, 16]"):
    return ('name: "det" type: "Yolov3DetectionOutput" yolov3_detection_output_param { '
            f'num_classes: {classes} confidence_threshold: {threshold} nms_threshold: {nms} '
            f'biases: {BIASES} {scales} mask_group_num: {heads} {mask} {extra} }}')


def sigmoid(v):
    return 1.0 / (1.0 + math.exp(-v))


def iou(a, b):
    """The fork's box_iou on centre boxes, in float64."""
    def side(c1, s1, c2, s2):
        return min(c1 + s1 / 2, c2 + s2 / 2) - max(c1 - s1 / 2, c2 - s2 / 2)
    w, h = side(a[0], a[2], b[0], b[2]), side(a[1], a[3], b[1], b[3])
    inter = 0.0 if w < 0 or h < 0 else w * h
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def yolov3_reference(heads, classes, biases, masks, scales, threshold, nms):
    """Forward_cpu for one image: loops over head, cell, anchor, class; sort; ApplyNms."""
    found = []
    for t, head in enumerate(heads):
        channels, h, w = head.shape
        num = channels // (5 + classes)
        for s in range(h * w):
            y, x = divmod(s, w)
            for n in range(num):
                v = head[n * (5 + classes):(n + 1) * (5 + classes), y, x].astype(np.float64)
                obj = sigmoid(v[4])
                for c in range(classes):
                    score = sigmoid(v[5 + c]) * obj
                    if score > threshold:
                        m = masks[t][n]
                        box = ((x + sigmoid(v[0])) / w, (y + sigmoid(v[1])) / h,
                               math.exp(v[2]) * biases[2 * m] / (w * scales[t]),
                               math.exp(v[3]) * biases[2 * m + 1] / (h * scales[t]))
                        found.append((score, c, box))
    found.sort(key=lambda f: -f[0])
    struck = set()
    for i in range(len(found)):
        if i in struck:
            continue
        for j in range(i + 1, len(found)):
            if j not in struck and iou(found[i][2], found[j][2]) >= nms:
                struck.add(j)
    rows = [[0, c + 1, score, b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2]
            for k, (score, c, b) in enumerate(found) if k not in struck]
    return np.array(rows).reshape(-1, 7), len(struck)


def test_yolov3_matches_fork_loop_on_random_heads():
    g = torch.Generator().manual_seed(7)
    # non-square heads (3 x 4 and 6 x 8): rows and columns cannot be swapped unnoticed
    heads = [torch.randn(1, 21, 3, 4, generator=g) * 1.5,
             torch.randn(1, 21, 6, 8, generator=g) * 1.5]
    layer = make_layer(yolo_param(), [h.shape for h in heads])
    out = layer(*heads)[0, 0].numpy()
    expected, struck = yolov3_reference([h[0].numpy() for h in heads], 2, BIASES,
                                        [[3, 4, 5], [0, 1, 2]], [32, 16], 0.3, 0.45)
    assert struck > 5 and len(expected) > 10      # NMS and both heads are exercised
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=2e-6, atol=2e-6)


def test_yolov3_images_are_decoded_apart():
    g = torch.Generator().manual_seed(8)
    heads = [torch.randn(2, 21, 3, 3, generator=g), torch.randn(2, 21, 6, 6, generator=g)]
    layer = make_layer(yolo_param(), [h.shape for h in heads])
    out = layer(*heads)[0, 0].numpy()
    for i in range(2):
        alone = layer(*[h[i:i + 1] for h in heads])[0, 0].numpy()
        np.testing.assert_array_equal(out[out[:, 0] == i][:, 1:], alone[:, 1:])
        assert (alone[:, 0] == 0).all()


def single_cell_head(objectness):
    """One head [1, A·6, 2, 2] (one class): every objectness logit -20 except as given."""
    head = torch.zeros(1, len(objectness) * 6, 2, 2)
    for n, logit in enumerate(objectness):
        head[0, n * 6 + 4] = -20.0
        head[0, n * 6 + 4, 0, 1] = logit     # cell y = 0, x = 1
    return head


def test_yolov3_hand_computed_box():
    """σ(0) = 0.5 offsets, e^0 = 1 sizes: the box centre (1.5/2, 0.5/2), size 16/64, 32/64."""
    text = ('name: "det" type: "Yolov3DetectionOutput" yolov3_detection_output_param { '
            'num_classes: 1 num_box: 1 confidence_threshold: 0.1 biases: [16, 32] '
            'anchors_scale: 32 mask_group_num: 1 mask: 0 }')
    head = single_cell_head([0.0])
    out = make_layer(text, [head.shape])(head)
    expected = [[0, 1, 0.25, 0.625, 0.0, 0.875, 0.5]]
    assert out.tolist() == [[expected]]


@pytest.mark.parametrize("nms,kept", [(0.5, 1), (0.51, 2)])
def test_yolov3_nms_strikes_an_overlap_equal_to_the_threshold(nms, kept):
    """Two anchors in one cell: same centre and height, widths 0.25 and 0.5: IoU exactly 0.5,
    struck out at nms_threshold 0.5 (the fork's >=; SSD's NMS would keep it)."""
    text = ('name: "det" type: "Yolov3DetectionOutput" yolov3_detection_output_param { '
            f'num_classes: 1 num_box: 2 confidence_threshold: 0.1 nms_threshold: {nms} '
            'biases: [16, 32, 32, 32] anchors_scale: 32 mask_group_num: 1 mask: [0, 1] }')
    head = single_cell_head([0.0, 1.0])
    out = make_layer(text, [head.shape])(head)[0, 0]
    assert len(out) == kept
    assert out[0, 2].item() == pytest.approx(sigmoid(1.0) * 0.5)    # the better box first
    assert out[0, 5].item() - out[0, 3].item() == 0.5


def test_yolov3_no_detection_rows_per_image():
    head = single_cell_head([-20.0]).repeat(2, 1, 1, 1)
    text = ('name: "det" type: "Yolov3DetectionOutput" yolov3_detection_output_param { '
            'num_classes: 1 num_box: 1 biases: [16, 32] anchors_scale: 32 mask_group_num: 1 '
            'mask: 0 }')
    out = make_layer(text, [head.shape])(head)
    assert out.tolist() == [[[[0] + [-1] * 6, [1] + [-1] * 6]]]


DEPLOY_TAIL = '''name: "MobileNet-YOLO tail"
layer { name: "data" type: "Input" top: "data"
  input_param { shape { dim: 1 dim: 8 dim: 6 dim: 6 } } }
layer { name: "conv1/dw" type: "DepthwiseConvolution" bottom: "data" top: "conv1/dw"
  param { lr_mult: 1.0 decay_mult: 1.0 }
  convolution_param { num_output: 8 bias_term: true pad: 1 kernel_size: 3 group: 8
    weight_filler { type: "msra" } engine: CAFFE } }
layer { name: "conv1/dw/relu" type: "ReLU" bottom: "conv1/dw" top: "conv1/dw" }
layer { name: "yolo/conv4" type: "Convolution" bottom: "conv1/dw" top: "yolo/conv4"
  convolution_param { num_output: 75 kernel_size: 3 stride: 2 pad: 1
    weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "constant" value: 0.1 } } }
layer { name: "yolo/conv5" type: "Convolution" bottom: "conv1/dw" top: "yolo/conv5"
  convolution_param { num_output: 75 kernel_size: 1
    weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "constant" value: 0.1 } } }
layer {
  name: "detection_out"
  type: "Yolov3DetectionOutput"
  bottom: "yolo/conv4"
  bottom: "yolo/conv5"
  top: "detection_out"
  include { phase: TEST }
  yolov3_detection_output_param {
    num_classes: 20
    confidence_threshold: 0.0099999998
    nms_threshold: 0.44999999
    biases: 20.0 biases: 37.0 biases: 49.0 biases: 94.0 biases: 73.0 biases: 201.0
    biases: 143.0 biases: 265.0 biases: 153.0 biases: 121.0 biases: 280.0 biases: 279.0
    anchors_scale: 32
    anchors_scale: 16
    mask_group_num: 2
    mask: 3 mask: 4 mask: 5 mask: 0 mask: 1 mask: 2
  }
}
'''


def test_mobilenet_yolo_deploy_tail_runs_through_net(tmp_path):
    path = tmp_path / "deploy.prototxt"
    path.write_text(DEPLOY_TAIL)
    # the fillers' weights, seeded: drawn afresh each run, 7 runs of 50 put one or two box
    # coordinates past 2e-6 of the reference (not traced yet; the output is the fused
    # forward's, the heads compared with are the layer-by-layer recompute's)
    torch.manual_seed(0)
    net = caffe.Net(str(path), caffe.TEST)
    net.blobs["data"].data[...] = np.random.default_rng(0).standard_normal((1, 8, 6, 6))
    out = net.forward()["detection_out"]
    assert out.shape[:2] == (1, 1) and out.shape[3] == 7 and out.shape[2] > 1
    heads = [net.blobs[name].data[0] for name in ("yolo/conv4", "yolo/conv5")]
    expected, _ = yolov3_reference(heads, 20, [20, 37, 49, 94, 73, 201, 143, 265, 153, 121,
                                               280, 279], [[3, 4, 5], [0, 1, 2]], [32, 16],
                                   0.0099999998, 0.44999999)
    np.testing.assert_allclose(out[0, 0], expected, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("group,num_output", [(6, 6), (2, 4)])
def test_depthwise_convolution_is_caffes_grouped_convolution(group, num_output):
    """MobileNet-YOLO's CPU DepthwiseConvolution is BaseConvolutionLayer's grouped GEMM: the
    same numbers as Convolution with the same convolution_param (group and num_output as
    given, unlike ConvolutionDepthwise, which forces both to the channel count)."""
    body = (f'convolution_param {{ num_output: {num_output} group: {group} kernel_size: 3 '
            'stride: 2 pad: 1 weight_filler { type: "gaussian" std: 1 } '
            'bias_filler { type: "gaussian" std: 1 } }')
    x = torch.randn(2, 6, 5, 7, generator=torch.Generator().manual_seed(3))
    dw = make_layer(f'name: "dw" type: "DepthwiseConvolution" {body}', [x.shape])
    conv = make_layer(f'name: "c" type: "Convolution" {body}', [x.shape])
    assert [tuple(b.shape) for b in dw.blobs] == [(num_output, 6 // group, 3, 3), (num_output,)]
    for mine, theirs in zip(dw.blobs, conv.blobs):
        mine.data.copy_(theirs.data)
    assert torch.equal(dw(x), conv(x))


@pytest.mark.parametrize("text,shapes,message", [
    ('name: "det" type: "Yolov3DetectionOutput" yolov3_detection_output_param { biases: [1, 2] '
     'anchors_scale: 32 mask_group_num: 1 mask: [0, 0, 0] }', [(1, 75, 2, 2)],
     "num_classes must be set"),
    (yolo_param(heads=3), [(1, 21, 2, 2), (1, 21, 4, 4)], r"mask_group_num \(3\) must equal"),
    (yolo_param(), [(1, 20, 2, 2), (1, 21, 4, 4)], r"bottom 0 must be \[N, num_box"),
    (yolo_param(), [(1, 21, 2, 2), (2, 21, 4, 4)], "bottom 1 has batch 2"),
    (yolo_param(mask="mask: [3, 4, 5, 0]"), [(1, 21, 2, 2), (1, 21, 4, 4)], "mask has 4 entries"),
    (yolo_param(mask="mask: [3, 4, 9, 0, 1, 2]"), [(1, 21, 2, 2), (1, 21, 4, 4)],
     "mask 9 needs 20"),
    (yolo_param(scales="anchors_scale: 32"), [(1, 21, 2, 2), (1, 21, 4, 4)], "anchors_scale"),
    (yolo_param(extra="gaussian_box: true"), [(1, 21, 2, 2), (1, 21, 4, 4)], "gaussian_box"),
])
def test_yolov3_bad_params_name_layer_and_field(text, shapes, message):
    with pytest.raises(LayerError, match=r"layer 'det' \(Yolov3DetectionOutput\).*" + message):
        make_layer(text, shapes)


def region_reference(x, coords, classes, num):
    """region_layer.cpp's Forward_cpu in float64: logistic on x, y and the objectness,
    softmax over the classes at each cell, per image and anchor."""
    n, _, h, w = x.shape
    top = x.astype(np.float64).reshape(n, num, coords + classes + 1, h, w).copy()
    for b in range(n):
        for a in range(num):
            for e in (0, 1, coords):
                top[b, a, e] = 1 / (1 + np.exp(-top[b, a, e]))
            scores = top[b, a, coords + 1:]
            e = np.exp(scores - scores.max(axis=0))
            top[b, a, coords + 1:] = e / e.sum(axis=0)
    return top.reshape(x.shape)


def test_region_matches_darknet_activations():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 2 * (4 + 3 + 1), 3, 5, generator=g) * 3
    layer = make_layer('name: "region" type: "Region" region_param { classes: 3 coords: 4 num: 2 }',
                       [x.shape])
    out = layer(x)
    assert out.shape == x.shape and out.dtype == torch.float32 and not out.requires_grad
    np.testing.assert_allclose(out.numpy(), region_reference(x.numpy(), 4, 3, 2), rtol=1e-6,
                               atol=1e-7)
    # tw, th pass through unchanged
    assert torch.equal(out.view(2, 2, 8, 3, 5)[:, :, 2:4], x.view(2, 2, 8, 3, 5)[:, :, 2:4])


def test_region_checks_channels_and_refuses_other_ports_fields(tmp_path):
    with pytest.raises(LayerError,
                       match=r"layer 'region' \(Region\).*num·\(coords \+ classes \+ 1\)"):
        make_layer('name: "region" type: "Region" region_param { classes: 3 num: 2 }',
                   [(1, 15, 3, 3)])
    path = tmp_path / "net.prototxt"
    path.write_text('layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 '
                    'dim: 125 dim: 2 dim: 2 } } }\nlayer { name: "region" type: "Region" '
                    'bottom: "data" top: "out"\n'
                    '  region_param { classes: 20 boxes_of_each_grid: 5 } }\n')
    with pytest.raises(ProtoTextError, match=r"layer 'region'.*no field 'boxes_of_each_grid' "
                       r"\(defined by another YOLOv2 port's Region layer"):
        caffe.Net(str(path), caffe.TEST)
