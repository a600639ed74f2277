"""Every registered layer type goes through a float64 gradient check (or says why it has none).

A new layer type fails this test until it gets an example here, so no layer ships unchecked.
"""
import pytest
import torch

import caffe_compat as caffe
from caffe_compat.commands.layer_table import builtin_layers   # the package's own, not plug-ins
from layer_utils import gradcheck_layer, make_layer

g = torch.Generator().manual_seed(0)


def rand(*shape):
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def away_from_zero(*shape):
    x = rand(*shape)
    return x + 0.3 * torch.sign(x)             # keeps kinks (|x|, ReLU, max) out of the FD stencil


def labels(n, classes):
    return torch.randint(0, classes, (n,), generator=g).double()


def filled(layer_type, body=""):
    return f'name: "l" type: "{layer_type}" {body}'


GAUSS = 'weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "gaussian" std: 0.5 }'

# Four priors (and variances) and two images' boxes (a padding row) for MultiBoxLoss.
SSD_PRIORS = torch.tensor([[0, 0, .4, .4, .3, 0, .7, .4, .6, 0, 1, .4, .1, .1, .5, .5],
                           [.1, .1, .2, .2] * 4], dtype=torch.float64).view(1, 2, 16)
SSD_LABELS = torch.tensor([[0, 1, 0, .04, .04, .44, .44, 0], [-1] * 8,
                           [1, 2, 0, .3, .05, .72, .42, 0]], dtype=torch.float64).view(1, 1, 3, 8)

# type -> (layer text, bottoms factory, phase)
EXAMPLES = {
    "AbsVal": (filled("AbsVal"), lambda: [away_from_zero(2, 3, 2, 2)], caffe.TEST),
    "BNLL": (filled("BNLL"), lambda: [rand(2, 3, 2, 2)], caffe.TEST),
    "BatchNorm": (filled("BatchNorm"), lambda: [rand(4, 3, 2, 2)], caffe.TRAIN),
    "Bias": (filled("Bias", 'bias_param { filler { type: "gaussian" } }'),
             lambda: [rand(2, 3, 2, 2)], caffe.TEST),
    "Clip": (filled("Clip", "clip_param { min: -0.5 max: 0.5 }"),
             lambda: [away_from_zero(2, 3, 2, 2)], caffe.TEST),
    "Concat": (filled("Concat"), lambda: [rand(2, 3, 2), rand(2, 2, 2)], caffe.TEST),
    "Convolution": (filled("Convolution", "convolution_param { num_output: 4 kernel_size: 3 pad: 1 "
                           f"stride: 2 group: 2 dilation: 1 {GAUSS} }}"),
                    lambda: [rand(2, 4, 5, 5)], caffe.TEST),
    "Crop": (filled("Crop", "crop_param { offset: 1 }"),
             lambda: [rand(2, 3, 5, 5), rand(2, 3, 3, 3)], caffe.TEST),
    "Deconvolution": (filled("Deconvolution", "convolution_param { num_output: 4 kernel_size: 3 "
                             f"stride: 2 pad: 1 group: 2 {GAUSS} }}"),
                      lambda: [rand(2, 2, 3, 3)], caffe.TEST),
    "Dropout": (filled("Dropout", "dropout_param { dropout_ratio: 0.5 }"),
                lambda: [rand(2, 3, 2, 2)], caffe.TEST),
    "ELU": (filled("ELU", "elu_param { alpha: 0.7 }"), lambda: [away_from_zero(2, 3, 2, 2)],
            caffe.TEST),
    "Eltwise": (filled("Eltwise", "eltwise_param { operation: MAX }"),
                lambda: [away_from_zero(2, 3, 2), away_from_zero(2, 3, 2) + 0.1], caffe.TEST),
    "EuclideanLoss": (filled("EuclideanLoss"), lambda: [rand(3, 4), rand(3, 4)], caffe.TEST),
    "Exp": (filled("Exp", "exp_param { base: 2 scale: 0.5 shift: 0.1 }"),
            lambda: [rand(2, 3, 2, 2)], caffe.TEST),
    "Flatten": (filled("Flatten"), lambda: [rand(2, 3, 2, 2)], caffe.TEST),
    "HingeLoss": (filled("HingeLoss", "hinge_loss_param { norm: L2 }"),
                  lambda: [rand(5, 4), labels(5, 4)], caffe.TEST),
    "InfogainLoss": (filled("InfogainLoss"),
                     lambda: [torch.softmax(rand(5, 4), 1), labels(5, 4),
                              torch.rand(4, 4, generator=g, dtype=torch.float64)], caffe.TEST),
    "InnerProduct": (filled("InnerProduct", f"inner_product_param {{ num_output: 3 {GAUSS} }}"),
                     lambda: [rand(2, 3, 2, 2)], caffe.TEST),
    "LRN": (filled("LRN", "lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 k: 2 }"),
            lambda: [rand(2, 5, 3, 3)], caffe.TEST),
    "Log": (filled("Log", "log_param { shift: 3 }"),             # x + 3 > 0 whatever the draw
            lambda: [rand(2, 3, 2, 2).clamp(min=-2.5)], caffe.TEST),
    "PReLU": (filled("PReLU", 'prelu_param { filler { type: "gaussian" } }'),
              lambda: [away_from_zero(2, 3, 2, 2)], caffe.TEST),
    "Pooling": (filled("Pooling", "pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 }"),
                lambda: [rand(2, 3, 5, 5)], caffe.TEST),
    "Power": (filled("Power", "power_param { power: 2 scale: 0.5 shift: 1.5 }"),
              lambda: [rand(2, 3, 2, 2)], caffe.TEST),
    "ReLU": (filled("ReLU", "relu_param { negative_slope: 0.1 }"),
             lambda: [away_from_zero(2, 3, 2, 2)], caffe.TEST),
    "Reduction": (filled("Reduction", "reduction_param { operation: SUMSQ axis: 1 coeff: 0.5 }"),
                  lambda: [rand(2, 3, 2)], caffe.TEST),
    "Reshape": (filled("Reshape", "reshape_param { shape { dim: 0 dim: -1 } }"),
                lambda: [rand(2, 3, 2, 2)], caffe.TEST),
    "Scale": (filled("Scale", 'scale_param { bias_term: true filler { type: "gaussian" } '
                     'bias_filler { type: "gaussian" } }'), lambda: [rand(2, 3, 2, 2)], caffe.TEST),
    "Sigmoid": (filled("Sigmoid"), lambda: [rand(2, 3, 2, 2)], caffe.TEST),
    "SigmoidCrossEntropyLoss": (filled("SigmoidCrossEntropyLoss"),
                                lambda: [rand(3, 4), torch.rand(3, 4, generator=g,
                                                                dtype=torch.float64)], caffe.TEST),
    "Slice": (filled("Slice", 'top: "a" top: "b" slice_param { slice_point: 1 }'), lambda: [rand(2, 3, 2)], caffe.TEST),
    "Softmax": (filled("Softmax"), lambda: [rand(2, 4, 3)], caffe.TEST),
    "SoftmaxWithLoss": (filled("SoftmaxWithLoss"), lambda: [rand(5, 4), labels(5, 4)], caffe.TEST),
    "Split": (filled("Split", 'top: "a" top: "b"'), lambda: [rand(2, 3)], caffe.TEST),
    "Swish": (filled("Swish"), lambda: [rand(2, 3, 2, 2)], caffe.TEST),
    "TanH": (filled("TanH"), lambda: [rand(2, 3, 2, 2)], caffe.TEST),
    "Tile": (filled("Tile", "tile_param { axis: 1 tiles: 3 }"), lambda: [rand(2, 2, 2)], caffe.TEST),
    "BatchReindex": (filled("BatchReindex"),
                     lambda: [rand(4, 3), torch.tensor([3., 0., 3., 1., 2.])], caffe.TEST),
    "ContrastiveLoss": (filled("ContrastiveLoss",  # legacy: Caffe's gradient is the exact one
                               "contrastive_loss_param { margin: 4 legacy_version: true }"),
                        lambda: [rand(6, 3), rand(6, 3), torch.tensor([1., 0., 0., 1., 0., 0.])],
                        caffe.TEST),
    "Embed": (filled("Embed", f"embed_param {{ num_output: 3 input_dim: 5 {GAUSS} }}"),
              lambda: [torch.tensor([[4., 0., 4.], [1., 2., 0.]])], caffe.TEST),
    "Filter": (filled("Filter", 'top: "a" top: "b"'),
               lambda: [rand(5, 3), rand(5, 2, 2), torch.tensor([1., 0., 1., 1., 0.])],
               caffe.TEST),
    "Im2col": (filled("Im2col", "convolution_param { kernel_h: 2 kernel_w: 3 stride: 2 pad: 1 "
                      "dilation: 1 }"), lambda: [rand(2, 2, 5, 4)], caffe.TEST),
    "LSTM": (filled("LSTM", f"recurrent_param {{ num_output: 3 {GAUSS} }}"),   # static input
             lambda: [rand(4, 2, 3), torch.tensor([[0., 0.], [1., 1.], [0., 1.], [1., 1.]]),
                      rand(2, 2)], caffe.TEST),
    "LSTMUnit": (filled("LSTMUnit", 'top: "c" top: "h"'),
                 lambda: [rand(1, 3, 2), rand(1, 3, 8), torch.tensor([[1., 0., 1.]])], caffe.TEST),
    "MVN": (filled("MVN"), lambda: [rand(2, 3, 3, 2)], caffe.TEST),
    "MultinomialLogisticLoss": (filled("MultinomialLogisticLoss"),
                                lambda: [torch.softmax(rand(5, 4), 1), labels(5, 4)], caffe.TEST),
    "Parameter": (filled("Parameter", "parameter_param { shape { dim: 2 dim: 3 } }"),
                  lambda: [], caffe.TEST),
    "RNN": (filled("RNN", f"recurrent_param {{ num_output: 3 {GAUSS} }}"),     # static input
            lambda: [rand(3, 2, 2), torch.tensor([[0., 0.], [1., 0.], [1., 1.]]), rand(2, 3)],
            caffe.TEST),
    "SPP": (filled("SPP", "spp_param { pyramid_height: 2 pool: MAX }"),
            lambda: [rand(2, 2, 5, 7)], caffe.TEST),
    "Python": (filled("Python", 'top: "t" python_param { module: "pylayer_examples" '
                      'layer: "ScaleLayer" param_str: "2.5" }'), lambda: [rand(2, 3)], caffe.TEST),
    # Fork layers (docs/forks.md).
    "ReLU6": (filled("ReLU6", "relu6_param { negative_slope: 0.1 }"),
              lambda: [away_from_zero(2, 3, 2, 2) * 4], caffe.TEST),
    # SSD's backward is the exact gradient only with a shared scale (per-channel: goldens).
    "Normalize": (filled("Normalize", 'norm_param { across_spatial: false channel_shared: true '
                         'scale_filler { type: "gaussian" mean: 2 } }'),
                  lambda: [rand(2, 3, 2, 2)], caffe.TEST),
    "Permute": (filled("Permute", "permute_param { order: 0 order: 3 order: 1 }"),
                lambda: [rand(2, 3, 2, 4)], caffe.TEST),
    "BN": (filled("BN", 'bn_param { scale_filler { type: "gaussian" } '
                  'shift_filler { type: "gaussian" } }'), lambda: [rand(4, 3, 2, 2)], caffe.TRAIN),
    "Upsample": (filled("Upsample", "upsample_param { upsample_h: 4 upsample_w: 4 }"),
                 lambda: [rand(1, 2, 2, 2),
                          torch.stack([torch.randperm(16, generator=g)[:4] for _ in range(2)])
                          .view(1, 2, 2, 2).double()], caffe.TEST),
    "SmoothL1Loss": (filled("SmoothL1Loss", "smooth_l1_loss_param { sigma: 2 }"),  # kinks at
                     lambda: [rand(2, 4) * 0.1, rand(2, 4) * 3,       # |d| = 0.25 kept away
                              away_from_zero(2, 4), rand(2, 4).abs()], caffe.TRAIN),
    "L1Loss": (filled("L1Loss"),                         # |a - b| >= 0.3 - 0.1: no kink
               lambda: [rand(2, 4) * 0.05, away_from_zero(2, 4)], caffe.TRAIN),
    "ROIPooling": (filled("ROIPooling", "roi_pooling_param { pooled_h: 2 pooled_w: 3 "
                          "spatial_scale: 0.5 }"),
                   lambda: [rand(2, 2, 5, 6), torch.tensor([[0, 0, 0, 9, 7], [1, 2, 4, 11, 9.]],
                                                           dtype=torch.float64)], caffe.TEST),
    "PSROIPooling": (filled("PSROIPooling", "psroi_pooling_param { spatial_scale: 0.5 "
                            "output_dim: 2 group_size: 2 }"),
                     lambda: [rand(2, 8, 5, 6), torch.tensor([[0, 0, 0, 9, 7], [1, -2, 4, 11, 9.]],
                                                             dtype=torch.float64)], caffe.TEST),
    "Reorg": (filled("Reorg", "reorg_param { stride: 2 }"), lambda: [rand(2, 8, 2, 4)], caffe.TEST),
    "Axpy": (filled("Axpy"), lambda: [rand(2, 3), rand(2, 3, 2, 2), rand(2, 3, 2, 2)], caffe.TEST),
    "ShuffleChannel": (filled("ShuffleChannel", "shuffle_channel_param { group: 3 }"),
                       lambda: [rand(2, 6, 2, 1)], caffe.TEST),
    "DepthwiseConvolution": (filled("DepthwiseConvolution", "convolution_param { num_output: 4 "
                                    f"kernel_size: 3 stride: 2 pad: 1 group: 4 {GAUSS} }}"),
                             lambda: [rand(2, 4, 5, 5)], caffe.TEST),
    "ConvolutionDepthwise": (filled("ConvolutionDepthwise", "convolution_param { kernel_size: 3 "
                                    f"pad: 1 stride: 2 {GAUSS} }}"),
                             lambda: [rand(2, 3, 5, 4)], caffe.TEST),
    # Matching and mining are constants of the forward pass; loc and conf get gradients.
    "MultiBoxLoss": (filled("MultiBoxLoss", "multibox_loss_param { num_classes: 3 "
                            "code_type: CENTER_SIZE }"),
                     lambda: [rand(2, 16) * 2, rand(2, 12), SSD_PRIORS.clone(),
                              SSD_LABELS.clone()], caffe.TRAIN),
    "BiasChannel": (filled("BiasChannel", "bias_channel_param { label_type: PIXEL }"),
                    lambda: [rand(1, 3, 2, 2), torch.tensor([[[[0, 1], [2, -1.]]]],
                                                            dtype=torch.float64)], caffe.TEST),
    # edge map >= 0 keeps the weights inside (min_weight, 1), off the fork's clamp
    "DomainTransform": (filled("DomainTransform", "domain_transform_param { num_iter: 2 "
                               "spatial_sigma: 3 range_sigma: 2 }"),
                        lambda: [rand(2, 2, 3, 4), rand(2, 1, 3, 4).abs(),
                                 torch.tensor([[3, 4], [2, 3.]]).view(2, 2, 1, 1)], caffe.TEST),
    "Interp": (filled("Interp", "interp_param { height: 5 width: 7 pad_beg: -1 }"),
               lambda: [rand(1, 2, 4, 5)], caffe.TEST),
    "CenterLoss": (filled("CenterLoss", 'center_loss_param { num_output: 3 '
                          'center_filler { type: "gaussian" } }'),
                   lambda: [rand(4, 2, 3), torch.tensor([0., 2., 2., 1.])], caffe.TRAIN),
    # the margins' other settings: tests/test_fork_layers_margin.py
    "LabelSpecificAdd": (filled("LabelSpecificAdd", "label_specific_add_param { bias: -0.05 }"),
                         lambda: [rand(3, 4), torch.tensor([0., 3., 1.])], caffe.TRAIN),
    "CombinedMargin": (filled("CombinedMargin", "combined_margin_param { m1: 2 m2: 0.3 }"),
                       lambda: [torch.tanh(rand(3, 4)) * 0.9, torch.tensor([1., -1., 2.])],
                       caffe.TRAIN),
    # the margin's linear branch and FocalLoss' settings: tests/test_fork_layers_arcface_focal.py
    "CosinAddm": (filled("CosinAddm", "cosin_add_m_param { m: 0.3 }"),
                  lambda: [torch.tanh(rand(3, 4)) * 0.9, torch.tensor([1., 0., 3.])],
                  caffe.TRAIN),
    "FocalLoss": (filled("FocalLoss", "focal_loss_param { alpha: 0.5 gamma: 1.5 } "
                         "loss_param { ignore_label: 1 }"),
                  lambda: [rand(3, 4, 2), torch.tensor([[0., 1.], [3., 2.], [1., 1.]])],
                  caffe.TRAIN),
    # SINGLE: the fork's other types scale the label's x-diff (not a gradient)
    "MarginInnerProduct": (filled("MarginInnerProduct", "margin_inner_product_param { "
                                  'num_output: 3 weight_filler { type: "xavier" } }'),
                           lambda: [rand(4, 2, 2), torch.tensor([0., 2., 2., 1.])], caffe.TRAIN),
    "Correlation": (filled("Correlation", "correlation_param { pad: 1 kernel_size: 3 "
                           "max_displacement: 2 stride_2: 2 }"),
                    lambda: [rand(1, 2, 5, 6), rand(1, 2, 5, 6)], caffe.TEST),
    "Correlation1D": (filled("Correlation1D", "correlation_param { pad: 2 kernel_size: 3 "
                             "max_displacement: 1 single_direction: -1 }"),
                      lambda: [rand(1, 2, 4, 5), rand(1, 2, 4, 5)], caffe.TEST),
    "ChannelNorm": (filled("ChannelNorm"), lambda: [away_from_zero(2, 3, 2, 2)], caffe.TEST),
    "Accum": (filled("Accum"), lambda: [rand(1, 2, 3, 4), rand(1, 1, 5, 3)], caffe.TEST),
    # flows of fractional part in (0.2, 0.8) keep the bilinear kinks out of the FD stencil
    "FlowWarp": (filled("FlowWarp"),
                 lambda: [rand(1, 2, 4, 5), torch.rand(1, 2, 4, 5, generator=g,
                                                       dtype=torch.float64) * 0.6 + 0.2],
                 caffe.TEST),
}

# Blobs whose diff is a fork's update rule rather than a gradient: only the bottoms are checked
# here, the blobs' diffs against the fork's formula in the named test file.
NOT_GRADIENT_BLOBS = {
    "CenterLoss": "caffe-face's center update (tests/test_fork_layers_face_ohem.py)",
    "MarginInnerProduct": "sphereface's weight diff ignores the row normalization "
                          "(tests/test_fork_layers_margin.py)",
}

# Types with no backward pass in Caffe, and why.
NO_BACKWARD = {
    "Accuracy": "an evaluation layer; Caffe has no backward",
    "ArgMax": "integer indices; Caffe has no backward",
    "Input": "a source layer; the net feeds its tops",
    "DummyData": "a source layer",
    "Silence": "no tops; its backward only writes zeros (tested in test_common.py)",
    "Threshold": "a step function; Caffe has no backward",
    "Data": "a source layer", "ImageData": "a source layer", "HDF5Data": "a source layer",
    "MemoryData": "a source layer",
    "LandmarkHeatmap": "renders targets from labels; no gradient",
    "WindowData": "a source layer", "HDF5Output": "a sink: writes its bottoms to a file",
    "PriorBox": "constant boxes from the bottoms' shapes; SSD's backward does nothing",
    "DetectionOutput": "NMS output; SSD has no backward",
    "DetectionEvaluate": "true/false-positive marks for the solver's mAP; SSD has no backward",
    "DenseImageData": "a source layer", "AnnotatedData": "a source layer",
    "BoxAnnotatorOHEM": "selects labels and weights by loss; R-FCN has no backward",
    "Yolov3DetectionOutput": "NMS output; MobileNet-YOLO has no backward",
    "Region": "the training_toolbox_caffe port's backward is empty",
    "Proposal": "NMS output; the Faster R-CNN layers (C++ and Python) have no backward",
    "VideoData": "a source layer", "ImageSegData": "a source layer", "MatRead": "a source layer",
    "MatWrite": "a sink: writes its bottoms to files",
    "SegAccuracy": "an evaluation layer; DeepLab has no backward",
    "UniqueLabel": "label values out of labels; DeepLab has no backward",
    "AdaptiveBiasChannel": "pseudo-label scores; DeepLab's backward is empty",
    "Resample": "FlowNet 2.0's backward is a FATAL (CPU and GPU)",
    "DataAugmentation": "FlowNet 2.0's backward is a FATAL",
    "DetectNetTransformation": "images and ground truth from box labels; NVIDIA's backward "
                               "is empty",
}

# Dropout with a random mask cannot be finite-differenced; TRAIN with ratio 0.5 is checked by
# fixing the mask, so use the TEST-phase identity here and the mask test in test_neuron.py.


def test_every_registered_type_is_covered():
    missing = [t for t in builtin_layers() if t not in EXAMPLES and t not in NO_BACKWARD]
    assert not missing, f"add a gradient-check example for: {missing}"


@pytest.mark.parametrize("layer_type", sorted(EXAMPLES))
def test_float64_gradient(layer_type):
    text, bottoms, phase = EXAMPLES[layer_type]
    inputs = bottoms()
    layer = make_layer(text, [tuple(b.shape) for b in inputs], phase)
    if layer_type in NOT_GRADIENT_BLOBS:
        for blob in layer.blobs:
            blob.requires_grad_(False)
    gradcheck_layer(layer, inputs)
