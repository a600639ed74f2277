"""NetSpec on BVLC's example generators: the FCN nets (text byte-identical to the files the
FCN repo generated with pycaffe, including coord_map.crop offsets) and CaffeNet from
examples/pycaffe/caffenet.py (pycaffe's auto-naming, in-place tops, accuracy variant)."""
from pathlib import Path

import pytest

import caffe_compat as caffe
from caffe_compat import layers as L, params as P, to_proto
from caffe_compat.coord_map import crop

DATA = Path(__file__).parent / "data" / "net_spec"
LEARN = [dict(lr_mult=1, decay_mult=1), dict(lr_mult=2, decay_mult=0)]


def conv_relu(bottom, nout, ks=3, stride=1, pad=1):
    conv = L.Convolution(bottom, kernel_size=ks, stride=stride, num_output=nout, pad=pad,
                         param=LEARN)
    return conv, L.ReLU(conv, in_place=True)


def upscore(bottom, ks, stride):
    return L.Deconvolution(bottom, convolution_param=dict(num_output=21, kernel_size=ks,
                                                          stride=stride, bias_term=False),
                           param=[dict(lr_mult=0)])


def fcn_base(n, split):
    if split == "train":   # insertion order as Python 2 printed the dict in the shipped file
        data = {"sbdd_dir": "../data/sbdd/dataset", "seed": 1337, "split": split,
                "mean": (104.00699, 116.66877, 122.67892)}
        layer = "SBDDSegDataLayer"
    else:
        data = {"voc_dir": "../data/pascal/VOC2011", "seed": 1337, "split": split,
                "mean": (104.00699, 116.66877, 122.67892)}
        layer = "VOCSegDataLayer"
    n.data, n.label = L.Python(module="voc_layers", layer=layer, ntop=2, param_str=str(data))
    bottom = n.data
    for stage, (width, depth) in enumerate([(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)], 1):
        for k in range(1, depth + 1):
            pad = 100 if (stage, k) == (1, 1) else 1
            n[f"conv{stage}_{k}"], n[f"relu{stage}_{k}"] = conv_relu(bottom, width, pad=pad)
            bottom = n[f"relu{stage}_{k}"]
        n[f"pool{stage}"] = bottom = L.Pooling(bottom, pool=P.Pooling.MAX, kernel_size=2,
                                               stride=2)
    n.fc6, n.relu6 = conv_relu(n.pool5, 4096, ks=7, pad=0)
    n.drop6 = L.Dropout(n.relu6, dropout_ratio=0.5, in_place=True)
    n.fc7, n.relu7 = conv_relu(n.drop6, 4096, ks=1, pad=0)
    n.drop7 = L.Dropout(n.relu7, dropout_ratio=0.5, in_place=True)
    n.score_fr = L.Convolution(n.drop7, num_output=21, kernel_size=1, pad=0, param=LEARN)


def fcn32s(split):
    n = caffe.NetSpec()
    fcn_base(n, split)
    n.upscore = upscore(n.score_fr, 64, 32)
    n.score = crop(n.upscore, n.data)
    n.loss = L.SoftmaxWithLoss(n.score, n.label,
                               loss_param=dict(normalize=False, ignore_label=255))
    return n.to_proto()


def fcn8s(split):
    n = caffe.NetSpec()
    fcn_base(n, split)
    n.upscore2 = upscore(n.score_fr, 4, 2)
    n.score_pool4 = L.Convolution(n.pool4, num_output=21, kernel_size=1, pad=0, param=LEARN)
    n.score_pool4c = crop(n.score_pool4, n.upscore2)
    n.fuse_pool4 = L.Eltwise(n.upscore2, n.score_pool4c, operation=P.Eltwise.SUM)
    n.upscore_pool4 = upscore(n.fuse_pool4, 4, 2)
    n.score_pool3 = L.Convolution(n.pool3, num_output=21, kernel_size=1, pad=0, param=LEARN)
    n.score_pool3c = crop(n.score_pool3, n.upscore_pool4)
    n.fuse_pool3 = L.Eltwise(n.upscore_pool4, n.score_pool3c, operation=P.Eltwise.SUM)
    n.upscore8 = upscore(n.fuse_pool3, 16, 8)
    n.score = crop(n.upscore8, n.data)
    n.loss = L.SoftmaxWithLoss(n.score, n.label,
                               loss_param=dict(normalize=False, ignore_label=255))
    return n.to_proto()


@pytest.mark.parametrize("name, make", [("voc-fcn32s", fcn32s), ("voc-fcn8s", fcn8s)])
@pytest.mark.parametrize("split, file_split", [("train", "train"), ("seg11valid", "val")])
def test_fcn_text_equals_pycaffe_output(name, make, split, file_split):
    expected = (DATA / f"{name}-{file_split}.prototxt").read_text()
    assert str(make(split)) == expected


def caffenet(lmdb, batch_size=256, include_acc=False):
    """examples/pycaffe/caffenet.py's net, anonymous tops (to_proto of the loss)."""
    def conv_relu_(bottom, ks, nout, stride=1, pad=0, group=1):
        conv = L.Convolution(bottom, kernel_size=ks, stride=stride, num_output=nout, pad=pad,
                             group=group)
        return conv, L.ReLU(conv, in_place=True)

    def fc_relu(bottom, nout):
        fc = L.InnerProduct(bottom, num_output=nout)
        return fc, L.ReLU(fc, in_place=True)

    def max_pool(bottom, ks, stride=1):
        return L.Pooling(bottom, pool=P.Pooling.MAX, kernel_size=ks, stride=stride)

    data, label = L.Data(source=lmdb, backend=P.Data.LMDB, batch_size=batch_size, ntop=2,
                         transform_param=dict(crop_size=227, mean_value=[104, 117, 123],
                                              mirror=True))
    conv1, relu1 = conv_relu_(data, 11, 96, stride=4)
    norm1 = L.LRN(max_pool(relu1, 3, stride=2), local_size=5, alpha=1e-4, beta=0.75)
    conv2, relu2 = conv_relu_(norm1, 5, 256, pad=2, group=2)
    norm2 = L.LRN(max_pool(relu2, 3, stride=2), local_size=5, alpha=1e-4, beta=0.75)
    conv3, relu3 = conv_relu_(norm2, 3, 384, pad=1)
    conv4, relu4 = conv_relu_(relu3, 3, 384, pad=1, group=2)
    conv5, relu5 = conv_relu_(relu4, 3, 256, pad=1, group=2)
    fc6, relu6 = fc_relu(max_pool(relu5, 3, stride=2), 4096)
    fc7, relu7 = fc_relu(L.Dropout(relu6, in_place=True), 4096)
    fc8 = L.InnerProduct(L.Dropout(relu7, in_place=True), num_output=1000)
    loss = L.SoftmaxWithLoss(fc8, label)
    return to_proto(loss, L.Accuracy(fc8, label)) if include_acc else to_proto(loss)


# (name, type, bottoms, tops) by pycaffe's rules: tops get <Type><k> per type as reached,
# a layer takes its first top's name, an in-place layer names itself and keeps its bottom.
CAFFENET = [
    ("Data1", "Data", [], ["Data1", "Data2"]),
    ("Convolution1", "Convolution", ["Data1"], ["Convolution1"]),
    ("ReLU1", "ReLU", ["Convolution1"], ["Convolution1"]),
    ("Pooling1", "Pooling", ["Convolution1"], ["Pooling1"]),
    ("LRN1", "LRN", ["Pooling1"], ["LRN1"]),
    ("Convolution2", "Convolution", ["LRN1"], ["Convolution2"]),
    ("ReLU2", "ReLU", ["Convolution2"], ["Convolution2"]),
    ("Pooling2", "Pooling", ["Convolution2"], ["Pooling2"]),
    ("LRN2", "LRN", ["Pooling2"], ["LRN2"]),
    ("Convolution3", "Convolution", ["LRN2"], ["Convolution3"]),
    ("ReLU3", "ReLU", ["Convolution3"], ["Convolution3"]),
    ("Convolution4", "Convolution", ["Convolution3"], ["Convolution4"]),
    ("ReLU4", "ReLU", ["Convolution4"], ["Convolution4"]),
    ("Convolution5", "Convolution", ["Convolution4"], ["Convolution5"]),
    ("ReLU5", "ReLU", ["Convolution5"], ["Convolution5"]),
    ("Pooling3", "Pooling", ["Convolution5"], ["Pooling3"]),
    ("InnerProduct1", "InnerProduct", ["Pooling3"], ["InnerProduct1"]),
    ("ReLU6", "ReLU", ["InnerProduct1"], ["InnerProduct1"]),
    ("Dropout1", "Dropout", ["InnerProduct1"], ["InnerProduct1"]),
    ("InnerProduct2", "InnerProduct", ["InnerProduct1"], ["InnerProduct2"]),
    ("ReLU7", "ReLU", ["InnerProduct2"], ["InnerProduct2"]),
    ("Dropout2", "Dropout", ["InnerProduct2"], ["InnerProduct2"]),
    ("InnerProduct3", "InnerProduct", ["InnerProduct2"], ["InnerProduct3"]),
    ("SoftmaxWithLoss1", "SoftmaxWithLoss", ["InnerProduct3", "Data2"], ["SoftmaxWithLoss1"]),
]


def _layer_text(name, type_, bottoms, tops, body):
    head = [f'  name: "{name}"', f'  type: "{type_}"'] + [f'  bottom: "{b}"' for b in bottoms]
    return "layer {\n" + "\n".join(head + [f'  top: "{t}"' for t in tops]) + "\n" + body + "}\n"


def test_caffenet_names_and_text():
    proto = caffenet("/path/to/caffe-train-lmdb")
    assert [(l.name, l.type, list(l.bottom), list(l.top)) for l in proto.layer] == CAFFENET
    data = ("  transform_param {\n    mirror: true\n    crop_size: 227\n    mean_value: 104\n"
            "    mean_value: 117\n    mean_value: 123\n  }\n  data_param {\n"
            '    source: "/path/to/caffe-train-lmdb"\n    batch_size: 256\n    backend: LMDB\n'
            "  }\n")
    # pad=0 and group=1 are passed explicitly by conv_relu, so they are written
    conv1 = ("  convolution_param {\n    num_output: 96\n    pad: 0\n    kernel_size: 11\n"
             "    group: 1\n    stride: 4\n  }\n")
    conv2 = ("  convolution_param {\n    num_output: 256\n    pad: 2\n    kernel_size: 5\n"
             "    group: 2\n    stride: 1\n  }\n")
    lrn = "  lrn_param {\n    local_size: 5\n    alpha: 0.0001\n    beta: 0.75\n  }\n"
    pool = "  pooling_param {\n    pool: MAX\n    kernel_size: 3\n    stride: 2\n  }\n"
    bodies = {"Data1": data, "Convolution1": conv1, "Convolution2": conv2, "LRN1": lrn,
              "Pooling1": pool}
    text = str(proto)
    for entry in CAFFENET:
        if entry[0] in bodies:
            assert _layer_text(*entry, bodies[entry[0]]) in text, entry[0]
    assert text.count("layer {") == len(CAFFENET)


def test_caffenet_with_accuracy_and_build(tmp_path):
    proto = caffenet("/path/to/caffe-val-lmdb", batch_size=50, include_acc=True)
    assert [(l.name, l.type, list(l.bottom), list(l.top)) for l in proto.layer] == CAFFENET + [
        ("Accuracy1", "Accuracy", ["InnerProduct3", "Data2"], ["Accuracy1"])]
    assert proto.layer[0].data_param.batch_size == 50
