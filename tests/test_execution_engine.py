"""One plan, one executor (engine/net/plan.py): every registered layer type, in a small
generated net, computes the same outputs through every plan — layer by layer, the lean
training plan, the fused inference plan and pycaffe's outputs-only fast path — and the same
gradients layer by layer and lean. A plug-in layer that declares its capabilities is fused
like a built-in one; no execution file names a layer type."""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

import caffe_compat as caffe
from caffe_compat.engine.layers import Layer, register
from caffe_compat.engine.layers.base import layer_types
from caffe_compat.engine.net.folded import FoldedLinear, InPlaceReLU
from caffe_compat.engine.net.fuse import fused_for_inference
from caffe_compat.engine.net.train_fuse import NormalizeAffine
from test_gradcheck_registry import EXAMPLES, labels, rand

PACKAGE = Path(caffe.__file__).parent

# Types whose net needs files or writes them (their own tests run them), or whose output
# needs more set-up than a generated net has.
NOT_GENERATED = {
    "Data": "reads an LMDB/LevelDB (test_data_layers.py)",
    "ImageData": "reads an image list (test_data_layers.py)",
    "HDF5Data": "reads HDF5 files (test_data_layers.py)",
    "MemoryData": "fed from Python arrays (test_data_layers.py)",
    "WindowData": "reads a window file and images (test_data_window_data.py)",
    "DenseImageData": "reads image pairs (test_dense_image_data.py)",
    "AnnotatedData": "reads an AnnotatedDatum LMDB (test_annotated_data.py)",
    "VideoData": "reads a video file or camera (test_video_data.py)",
    "ImageSegData": "reads image/label pairs (test_fork_layers_deeplab.py)",
    "MatRead": "reads MATLAB files (test_fork_layers_deeplab.py)",
    "MatWrite": "writes MATLAB files on every forward (test_fork_layers_deeplab.py)",
    "HDF5Output": "writes a file on every forward (test_data_hdf5_output.py)",
    "LandmarkHeatmap": "renders from landmark labels (test_data_landmarks.py)",
    "PriorBox": "SSD's anchors, checked against goldens (test_forks.py)",
    "DetectionOutput": "SSD's NMS, checked against goldens (test_forks.py)",
    "DetectionEvaluate": "needs detection and ground-truth rows (test_detection_evaluate.py)",
    "Input": "every generated net starts with it",
}

# Examples for the types without a backward (test_gradcheck_registry only lists why).
FORWARD_ONLY = {
    "Accuracy": ('name: "l" type: "Accuracy"', lambda: [rand(5, 4), labels(5, 4)]),
    "ArgMax": ('name: "l" type: "ArgMax" argmax_param { top_k: 2 }', lambda: [rand(3, 5)]),
    "Threshold": ('name: "l" type: "Threshold" threshold_param { threshold: 0.1 }',
                  lambda: [rand(2, 3, 2)]),
    "Silence": ('name: "l" type: "Silence"', lambda: [rand(2, 3)]),
    "DummyData": ('name: "l" type: "DummyData" top: "d" dummy_data_param { shape { dim: 2 '
                  'dim: 3 } data_filler { type: "constant" value: 0.25 } }', lambda: []),
    "BoxAnnotatorOHEM": ('name: "l" type: "BoxAnnotatorOHEM" top: "a" top: "b" '
                         'box_annotator_ohem_param { roi_per_img: 2 }',
                         lambda: [torch.tensor([[0, 1, 1, 5, 5.]] * 3 + [[1, 0, 0, 4, 4.]] * 2),
                                  rand(5).abs(), labels(5, 3), rand(5, 8)]),
    "Region": ('name: "l" type: "Region" region_param { classes: 2 num: 2 }',
               lambda: [rand(2, 14, 3, 2)]),
    "Yolov3DetectionOutput": ('name: "l" type: "Yolov3DetectionOutput" '
                              'yolov3_detection_output_param { num_classes: 2 num_box: 1 '
                              'confidence_threshold: 0.2 biases: [16, 32] anchors_scale: 32 '
                              'mask_group_num: 1 mask: 0 }', lambda: [rand(2, 7, 3, 2)]),
    "Proposal": ('name: "l" type: "Proposal" top: "rois" top: "scores" proposal_param { '
                 'feat_stride: 4 base_size: 4 min_size: 2 ratio: 1 scale: 1 scale: 2 }',
                 lambda: [rand(1, 4, 3, 2).abs(), rand(1, 8, 3, 2) * 0.1,
                          torch.tensor([[12.0, 8.0, 1.0]])]),
    "SegAccuracy": ('name: "l" type: "SegAccuracy" seg_accuracy_param { ignore_label: 255 }',
                    lambda: [rand(2, 3, 4, 5), labels(2, 3).float().reshape(2, 1, 1, 1)
                             .expand(2, 1, 4, 5).contiguous()]),
    "Resample": ('name: "l" type: "Resample" resample_param { height: 3 width: 5 }',
                 lambda: [rand(2, 3, 6, 4)]),
    "DataAugmentation": ('name: "l" type: "DataAugmentation" augmentation_param { '
                         'recompute_mean: 3 mean_per_pixel: false }', lambda: [rand(2, 3, 4, 5)]),
    "UniqueLabel": ('name: "l" type: "UniqueLabel" unique_label_param { max_labels: 4 }',
                    lambda: [labels(8, 3).float().reshape(2, 1, 2, 2)]),
    "AdaptiveBiasChannel": ('name: "l" type: "AdaptiveBiasChannel"',   # one foreground label:
                            lambda: [rand(2, 3, 2, 2),                # no random order
                                     torch.tensor([[0., 2], [1, -1]]).view(2, 2, 1, 1)]),
    "DetectNetTransformation": ('name: "l" type: "DetectNetTransformation" top: "a" top: "b" '
                                'detectnet_groundtruth_param { stride: 4 image_size_x: 8 '
                                'image_size_y: 8 }',    # a header row, then one box of class 1
                                lambda: [rand(2, 3, 8, 8).abs() * 100, torch.tensor(
                                    [[1.0, 16] + [0] * 14, [1, 2, 5, 4, 0, 1] + [0] * 10]
                                ).expand(2, 1, 2, 16).contiguous()]),
}


def _examples():
    for name in layer_types():
        if name in NOT_GENERATED:
            continue
        if name in EXAMPLES:
            text, bottoms, _ = EXAMPLES[name]
            yield name, text, bottoms
        elif name in FORWARD_ONLY:
            yield (name, *FORWARD_ONLY[name])


def test_every_registered_type_is_generated_or_says_why():
    from caffe_compat.commands.layer_table import builtin_layers
    covered = {name for name, _, _ in _examples()} | set(NOT_GENERATED)
    missing = [t for t in builtin_layers() if t not in covered]
    assert not missing, f"add an example for: {missing}"


def _net_text(type_name: str, text: str, inputs: list[torch.Tensor]) -> str:
    """Inputs -> (a 1x1 Convolution head for a single 4-D bottom, so affine layers and
    rectifiers have something to fold into) -> the layer under test."""
    lines = ['name: "gen"']
    names = []
    for i, x in enumerate(inputs):
        dims = " ".join(f"dim: {d}" for d in x.shape)
        lines.append(f'layer {{ name: "in{i}" type: "Input" top: "b{i}" '
                     f'input_param {{ shape {{ {dims} }} }} }}')
        names.append(f"b{i}")
    if len(inputs) == 1 and inputs[0].dim() == 4:
        channels = inputs[0].shape[1]
        lines.append(f'layer {{ name: "head" type: "Convolution" bottom: "b0" top: "h" '
                     f'convolution_param {{ num_output: {channels} kernel_size: 1 '
                     'weight_filler { type: "gaussian" std: 0.5 } '
                     'bias_filler { type: "gaussian" std: 0.5 } } }')
        names = ["h"]
    bottoms = " ".join(f'bottom: "{n}"' for n in names)
    body = text[text.index('type:'):]
    body = body.split(" ", 2)[2] if body.count(" ") >= 2 else ""
    tops = "" if 'top:' in text or type_name == "Silence" else ' top: "out"'
    lines.append(f'layer {{ name: "l" type: "{type_name}" {bottoms}{tops} {body} }}')
    return "\n".join(lines) + "\n"


def _feeds(net, inputs) -> dict[str, torch.Tensor]:
    return {f"b{i}": x.float() for i, x in enumerate(inputs)}


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=1e-5, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("type_name,text,bottoms", list(_examples()),
                         ids=[n for n, _, _ in _examples()])
def test_every_plan_computes_the_same(type_name, text, bottoms, tmp_path):
    torch.manual_seed(0)
    inputs = bottoms()
    path = tmp_path / "net.prototxt"
    path.write_text(_net_text(type_name, text, inputs))
    net = caffe.Net(str(path), caffe.TEST)
    module = net.module
    feed = _feeds(module, inputs)
    reference = module.run(feed)                                  # layer by layer
    outputs = {n: reference[n].detach() for n in module.output_names}
    lean = module.forward(**feed)                                 # the training pipeline
    fused = fused_for_inference(module).outputs(**feed)           # the inference pipeline
    for name, value in outputs.items():
        _close(lean[name], value, f"lean {name}")
        _close(fused[name], value, f"fused {name}")
    for name, x in feed.items():                                  # pycaffe's forward()
        net.blobs[name].data[...] = x.numpy()
    pycaffe = net.forward()
    path = "fast" if net.fast_path else "layer-by-layer"
    for name, value in outputs.items():
        _close(torch.from_numpy(np.asarray(pycaffe[name])), value, f"pycaffe {path} {name}")
    _same_gradients(module, feed)


def test_input_fed_test_nets_take_the_fast_path(tmp_path):
    """The comparison above reaches pycaffe's fast path: a generated TEST net takes it, the
    same net in the TRAIN phase does not (a training forward needs every blob)."""
    (name, text, bottoms), = [e for e in _examples() if e[0] == "Convolution"]
    path = tmp_path / "net.prototxt"
    path.write_text(_net_text(name, text, bottoms()))
    assert caffe.Net(str(path), caffe.TEST).fast_path
    assert not caffe.Net(str(path), caffe.TRAIN).fast_path


def _same_gradients(module, feed) -> None:
    """Layer by layer and lean give the same bottom and parameter gradients."""
    def grads(lean: bool):
        leaves = {n: x.clone().requires_grad_(x.is_floating_point()) for n, x in feed.items()}
        for p in module.parameters():
            p.grad = None
        blobs = module.forward(**leaves) if lean else module.run(leaves)
        torch.manual_seed(1)
        total = sum((blobs[n].float() * torch.randn(blobs[n].shape)).sum()
                    for n in module.output_names if blobs[n].is_floating_point()
                    and blobs[n].requires_grad)
        if not isinstance(total, torch.Tensor):
            return []
        total.backward()
        return [x.grad for x in leaves.values()] + [p.grad for p in module.parameters()]
    for a, b in zip(grads(False), grads(True)):
        if a is None or b is None:
            assert a is None and b is None
        else:
            _close(b, a, "gradient")


# ------------------------------------------------------------------ a plug-in layer is fused
@register
class ChannelGain(Layer):
    """A user's per-channel ``y = g * x + s`` that declares its affine form."""
    type = "TestChannelGain"
    origin = "tests/test_execution_engine.py"

    def __init__(self, param, bottom_shapes, phase):
        super().__init__(param, bottom_shapes, phase)
        channels = bottom_shapes[0][1]
        self.add_blob(torch.linspace(0.5, 1.5, channels))
        self.add_blob(torch.linspace(-0.2, 0.2, channels))

    def _view(self, t, x):
        return t.view(1, -1, *[1] * (x.dim() - 2))

    def forward(self, x):
        return self._view(self.blobs[0], x) * x + self._view(self.blobs[1], x)

    def affine(self, channels):
        if self.blobs[0].shape != (channels,):
            return None
        return self.blobs[0].detach().double(), self.blobs[1].detach().double()

    def learned_affine(self, channels):
        return (self.blobs[0], self.blobs[1]) if self.blobs[0].shape == (channels,) else None

    def output_not_saved(self, num_bottoms):
        return True                      # autograd keeps x and g for g * x + s, not y


@register
class Rectifier(Layer):
    """A user's ReLU that says it is one."""
    type = "TestRectifier"
    origin = "tests/test_execution_engine.py"

    def forward(self, x):
        return torch.relu(x)

    def rectifier_slope(self):
        return 0.0


PLUGIN_NET = '''name: "plugin"
layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 dim: 6 dim: 6 } } }
layer { name: "conv" type: "Convolution" bottom: "x" top: "c"
  convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" } } }
layer { name: "gain" type: "TestChannelGain" bottom: "c" top: "c" }
layer { name: "act" type: "TestRectifier" bottom: "c" top: "c" }
layer { name: "conv2" type: "Convolution" bottom: "c" top: "d"
  convolution_param { num_output: 4 kernel_size: 1 weight_filler { type: "gaussian" } } }
layer { name: "bn" type: "BatchNorm" bottom: "d" top: "n" }
layer { name: "gain2" type: "TestChannelGain" bottom: "n" top: "n" }
layer { name: "act2" type: "TestRectifier" bottom: "n" top: "n" }
'''


def test_a_plug_in_layer_with_declared_capabilities_is_fused(tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_text(PLUGIN_NET)
    x = torch.randn(2, 3, 6, 6)
    test = caffe.Net(str(path), caffe.TEST).module
    fused = fused_for_inference(test)
    kinds = [type(step.fn).__name__ for step in fused.plan]
    assert kinds == ["FoldedLinear"] * 2, kinds   # conv+gain+act, conv2+bn+gain2+act2
    assert all(step.fn.slope == 0.0 for step in fused.plan)
    _close(fused.outputs(x=x)["n"], test.run({"x": x})["n"], "fused plug-in")

    train = caffe.Net(str(path), caffe.TRAIN).module
    lean = {train.layer_names[s.index]: s.fn for s in train.lean_plan()}
    assert isinstance(lean["bn"], NormalizeAffine)          # BatchNorm + the plug-in's gamma
    assert isinstance(lean["act"], InPlaceReLU) and isinstance(lean["act2"], InPlaceReLU)
    state = [b.detach().clone() for b in train.layer_by_name("bn").blobs]
    ref = train.run({"x": x})["n"]
    for blob, value in zip(train.layer_by_name("bn").blobs, state):
        blob.data.copy_(value)                   # the same running sums for the lean run
    _close(train.forward(x=x)["n"], ref, "lean plug-in")


# ------------------------------------------------------------ no type names in the executor
EXECUTION_FILES = ["engine/net/plan.py", "engine/net/module.py", "engine/net/fuse.py",
                   "engine/net/train_fuse.py", "engine/net/folded.py", "_pycaffe/layerwise.py",
                   "_pycaffe/fast.py", "commands/time_cmd.py"]


def _string_constants(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)}
    return {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)
            and isinstance(node.value, str) and id(node) not in docstrings}


@pytest.mark.parametrize("name", EXECUTION_FILES)
def test_no_layer_type_string_in_the_execution_files(name):
    found = _string_constants(PACKAGE / name) & set(layer_types())
    assert not found, f"{name} names layer types {sorted(found)}: declare a capability"


def test_the_type_string_check_can_fail():
    assert {"Input", "Convolution"} <= _string_constants(PACKAGE / "engine/analysis.py")


def test_forward_hooks_on_a_layer_fire_in_the_nets_own_plans(tmp_path):
    """NetModule is a torch module: a user's forward hook on a layer sees every layer-by-layer
    and lean run (only the fused plan, which is not the layers, calls forward directly)."""
    path = tmp_path / "net.prototxt"
    path.write_text(PLUGIN_NET)
    module = caffe.Net(str(path), caffe.TEST).module
    seen = []
    module.layer_by_name("conv").register_forward_hook(lambda *_: seen.append(1))
    x = torch.randn(2, 3, 6, 6)
    module.run({"x": x})
    module.forward(x=x)
    assert len(seen) == 2


def test_every_module_defining_layers_is_on_the_registration_list():
    """A family module missing from builtin.MODULES would register only when something
    happened to import it."""
    from caffe_compat.engine.layers.builtin import MODULES
    defining = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts)
                for p in PACKAGE.rglob("*.py")
                if any(line.strip() == "@register" for line in p.read_text().splitlines())}
    assert defining - set(MODULES) == set(), sorted(defining - set(MODULES))
