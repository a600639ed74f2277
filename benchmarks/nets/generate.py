"""Write the benchmark's deploy prototxts (one layer per line) from the published architectures.

    python benchmarks/nets/generate.py          # rewrites benchmarks/nets/*.prototxt

AlexNet (Krizhevsky et al. 2012, BVLC's single-GPU variant with groups), GoogLeNet (Szegedy
et al. 2015, inception v1), VGG16 (Simonyan & Zisserman 2015, configuration D), ResNet-50
(He et al. 2016, the 1x1-stride-2 bottleneck variant with BatchNorm + Scale), SqueezeNet 1.1
(Iandola et al., v1.1 layout) and MobileNet v1 (Howard et al. 2017, width 1.0), and the small deployed nets of small.py. Layer and
blob names follow the usual Caffe releases so caffemodels line up by name; weights are the
fillers' random values (the benchmark measures speed, not accuracy).
"""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from small import SMALL_NETS  # noqa: E402  (the small deployed nets, benchmarks/nets/small.py)


class Net:
    def __init__(self, name: str, size, channels: int = 3):
        h, w = size if isinstance(size, tuple) else (size, size)
        self.lines = [f'name: "{name}"',
                      f'layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ '
                      f'dim: 1 dim: {channels} dim: {h} dim: {w} }} }} }}']

    def add(self, text: str) -> None:
        self.lines.append(f"layer {{ {text} }}")

    def conv(self, name, bottom, n, k, s=1, p=0, group=1, bias=True, top=None):
        extra = (f" group: {group}" if group > 1 else "") + ("" if bias else " bias_term: false")
        self.add(f'name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{top or name}" '
                 f'convolution_param {{ num_output: {n} kernel_size: {k} stride: {s} pad: {p}'
                 f'{extra} weight_filler {{ type: "msra" }} }}')
        return top or name

    def relu(self, name, blob):
        self.add(f'name: "{name}" type: "ReLU" bottom: "{blob}" top: "{blob}"')
        return blob

    def bn_scale(self, bn, scale, blob):
        self.add(f'name: "{bn}" type: "BatchNorm" bottom: "{blob}" top: "{blob}"')
        self.add(f'name: "{scale}" type: "Scale" bottom: "{blob}" top: "{blob}" '
                 'scale_param { bias_term: true }')
        return blob

    def pool(self, name, bottom, kind, k=0, s=1, p=0, glob=False):
        spec = "global_pooling: true" if glob else f"kernel_size: {k} stride: {s} pad: {p}"
        self.add(f'name: "{name}" type: "Pooling" bottom: "{bottom}" top: "{name}" '
                 f'pooling_param {{ pool: {kind} {spec} }}')
        return name

    def lrn(self, name, bottom):
        self.add(f'name: "{name}" type: "LRN" bottom: "{bottom}" top: "{name}" '
                 'lrn_param { local_size: 5 alpha: 0.0001 beta: 0.75 }')
        return name

    def fc(self, name, bottom, n):
        self.add(f'name: "{name}" type: "InnerProduct" bottom: "{bottom}" top: "{name}" '
                 f'inner_product_param {{ num_output: {n} weight_filler {{ type: "gaussian" '
                 'std: 0.005 } }')
        return name

    def dropout(self, name, blob, ratio=0.5):
        self.add(f'name: "{name}" type: "Dropout" bottom: "{blob}" top: "{blob}" '
                 f'dropout_param {{ dropout_ratio: {ratio} }}')
        return blob

    def concat(self, name, bottoms):
        self.add(f'name: "{name}" type: "Concat" ' + " ".join(f'bottom: "{b}"' for b in bottoms)
                 + f' top: "{name}"')
        return name

    def softmax(self, bottom):
        self.add(f'name: "prob" type: "Softmax" bottom: "{bottom}" top: "prob"')

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def alexnet() -> Net:
    n = Net("AlexNet", 227)
    x = n.relu("relu1", n.conv("conv1", "data", 96, 11, s=4))
    x = n.pool("pool1", n.lrn("norm1", x), "MAX", 3, 2)
    x = n.relu("relu2", n.conv("conv2", x, 256, 5, p=2, group=2))
    x = n.pool("pool2", n.lrn("norm2", x), "MAX", 3, 2)
    x = n.relu("relu3", n.conv("conv3", x, 384, 3, p=1))
    x = n.relu("relu4", n.conv("conv4", x, 384, 3, p=1, group=2))
    x = n.relu("relu5", n.conv("conv5", x, 256, 3, p=1, group=2))
    x = n.pool("pool5", x, "MAX", 3, 2)
    for i in (6, 7):
        x = n.dropout(f"drop{i}", n.relu(f"relu{i}", n.fc(f"fc{i}", x, 4096)))
    n.softmax(n.fc("fc8", x, 1000))
    return n


def _inception(n: Net, name: str, x: str, c1, c3r, c3, c5r, c5, cp) -> str:
    p = f"inception_{name}/"
    b1 = n.relu(p + "relu_1x1", n.conv(p + "1x1", x, c1, 1))
    b3 = n.relu(p + "relu_3x3_reduce", n.conv(p + "3x3_reduce", x, c3r, 1))
    b3 = n.relu(p + "relu_3x3", n.conv(p + "3x3", b3, c3, 3, p=1))
    b5 = n.relu(p + "relu_5x5_reduce", n.conv(p + "5x5_reduce", x, c5r, 1))
    b5 = n.relu(p + "relu_5x5", n.conv(p + "5x5", b5, c5, 5, p=2))
    bp = n.pool(p + "pool", x, "MAX", 3, 1, 1)
    bp = n.relu(p + "relu_pool_proj", n.conv(p + "pool_proj", bp, cp, 1))
    return n.concat(p + "output", [b1, b3, b5, bp])


def googlenet() -> Net:
    n = Net("GoogleNet", 224)
    x = n.relu("conv1/relu_7x7", n.conv("conv1/7x7_s2", "data", 64, 7, s=2, p=3))
    x = n.lrn("pool1/norm1", n.pool("pool1/3x3_s2", x, "MAX", 3, 2))
    x = n.relu("conv2/relu_3x3_reduce", n.conv("conv2/3x3_reduce", x, 64, 1))
    x = n.relu("conv2/relu_3x3", n.conv("conv2/3x3", x, 192, 3, p=1))
    x = n.pool("pool2/3x3_s2", n.lrn("conv2/norm2", x), "MAX", 3, 2)
    x = _inception(n, "3a", x, 64, 96, 128, 16, 32, 32)
    x = _inception(n, "3b", x, 128, 128, 192, 32, 96, 64)
    x = n.pool("pool3/3x3_s2", x, "MAX", 3, 2)
    for name, cfg in (("4a", (192, 96, 208, 16, 48, 64)), ("4b", (160, 112, 224, 24, 64, 64)),
                      ("4c", (128, 128, 256, 24, 64, 64)), ("4d", (112, 144, 288, 32, 64, 64)),
                      ("4e", (256, 160, 320, 32, 128, 128))):
        x = _inception(n, name, x, *cfg)
    x = n.pool("pool4/3x3_s2", x, "MAX", 3, 2)
    x = _inception(n, "5a", x, 256, 160, 320, 32, 128, 128)
    x = _inception(n, "5b", x, 384, 192, 384, 48, 128, 128)
    x = n.dropout("pool5/drop_7x7_s1", n.pool("pool5/7x7_s1", x, "AVE", 7, 1), 0.4)
    n.softmax(n.fc("loss3/classifier", x, 1000))
    return n


VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def vgg16() -> Net:
    n = Net("VGG_ILSVRC_16_layers", 224)
    x, block, idx = "data", 1, 1
    for v in VGG16:
        if v == "M":
            x, block, idx = n.pool(f"pool{block}", x, "MAX", 2, 2), block + 1, 1
            continue
        x = n.relu(f"relu{block}_{idx}", n.conv(f"conv{block}_{idx}", x, v, 3, p=1))
        idx += 1
    for i in (6, 7):
        x = n.dropout(f"drop{i}", n.relu(f"relu{i}", n.fc(f"fc{i}", x, 4096)))
    n.softmax(n.fc("fc8", x, 1000))
    return n


def _bottleneck(n: Net, name: str, x: str, mid: int, out: int, stride: int, project: bool):
    def unit(branch, bottom, c, k, s, p, relu):
        top = n.conv(f"res{name}_{branch}", bottom, c, k, s, p, bias=False)
        n.bn_scale(f"bn{name}_{branch}", f"scale{name}_{branch}", top)
        return n.relu(f"res{name}_{branch}_relu", top) if relu else top
    short = unit("branch1", x, out, 1, stride, 0, False) if project else x
    y = unit("branch2a", x, mid, 1, stride, 0, True)
    y = unit("branch2b", y, mid, 3, 1, 1, True)
    y = unit("branch2c", y, out, 1, 1, 0, False)
    n.add(f'name: "res{name}" type: "Eltwise" bottom: "{short}" bottom: "{y}" top: "res{name}"')
    return n.relu(f"res{name}_relu", f"res{name}")


def resnet50() -> Net:
    n = Net("ResNet-50", 224)
    x = n.conv("conv1", "data", 64, 7, s=2, p=3, bias=False)
    x = n.relu("conv1_relu", n.bn_scale("bn_conv1", "scale_conv1", x))
    x = n.pool("pool1", x, "MAX", 3, 2)
    for stage, blocks, mid in ((2, 3, 64), (3, 4, 128), (4, 6, 256), (5, 3, 512)):
        for b in range(blocks):
            stride = 2 if b == 0 and stage > 2 else 1
            x = _bottleneck(n, f"{stage}{'abcdef'[b]}", x, mid, mid * 4, stride, b == 0)
    n.softmax(n.fc("fc1000", n.pool("pool5", x, "AVE", 7, 1), 1000))
    return n


def _fire(n: Net, i: int, x: str, s: int, e: int) -> str:
    p = f"fire{i}/"
    sq = n.relu(p + "relu_squeeze1x1", n.conv(p + "squeeze1x1", x, s, 1))
    e1 = n.relu(p + "relu_expand1x1", n.conv(p + "expand1x1", sq, e, 1))
    e3 = n.relu(p + "relu_expand3x3", n.conv(p + "expand3x3", sq, e, 3, p=1))
    return n.concat(p + "concat", [e1, e3])


def squeezenet1_1() -> Net:
    n = Net("SqueezeNet_v1.1", 227)
    x = n.pool("pool1", n.relu("relu_conv1", n.conv("conv1", "data", 64, 3, s=2)), "MAX", 3, 2)
    x = _fire(n, 3, _fire(n, 2, x, 16, 64), 16, 64)
    x = n.pool("pool3", x, "MAX", 3, 2)
    x = _fire(n, 5, _fire(n, 4, x, 32, 128), 32, 128)
    x = n.pool("pool5", x, "MAX", 3, 2)
    for i, (s, e) in zip(range(6, 10), ((48, 192), (48, 192), (64, 256), (64, 256))):
        x = _fire(n, i, x, s, e)
    x = n.relu("relu_conv10", n.conv("conv10", n.dropout("drop9", x), 1000, 1))
    n.softmax(n.pool("pool10", x, "AVE", glob=True))
    return n


MOBILENET = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1),
             (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1)]


def mobilenet_v1() -> Net:
    n = Net("MobileNet", 224)
    x = n.conv("conv1", "data", 32, 3, s=2, p=1, bias=False)
    x = n.relu("relu1", n.bn_scale("conv1/bn", "conv1/scale", x))
    c = 32
    for i, (out, s) in enumerate(MOBILENET, start=2):
        x = n.conv(f"conv{i}/dw", x, c, 3, s=s, p=1, group=c, bias=False)
        x = n.relu(f"relu{i}/dw", n.bn_scale(f"conv{i}/dw/bn", f"conv{i}/dw/scale", x))
        x = n.conv(f"conv{i}/sep", x, out, 1, bias=False)
        x = n.relu(f"relu{i}/sep", n.bn_scale(f"conv{i}/sep/bn", f"conv{i}/sep/scale", x))
        c = out
    x = n.pool("pool6", x, "AVE", glob=True)
    n.softmax(n.conv("fc7", x, 1000, 1))
    return n


NETS = {"alexnet": alexnet, "googlenet": googlenet, "vgg16": vgg16, "resnet50": resnet50,
        "squeezenet1_1": squeezenet1_1, "mobilenet_v1": mobilenet_v1,
        **{name: (lambda make=make: make(Net)) for name, make in SMALL_NETS.items()}}


def generate(folder: Path = HERE) -> list[Path]:
    paths = []
    for name, make in NETS.items():
        path = folder / f"{name}.prototxt"
        path.write_text(make().text())
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in generate():
        print(p)
