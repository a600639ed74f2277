"""Every layer type BVLC Caffe 1.0 registers (REGISTER_LAYER_CLASS / REGISTER_LAYER_CREATOR in
its src/caffe/layers and layer_factory.cpp) is registered here too."""
import pytest

import caffe_compat as caffe

BVLC_1_0_TYPES = [
    "AbsVal", "Accuracy", "ArgMax", "BNLL", "BatchNorm", "BatchReindex", "Bias", "Concat",
    "ContrastiveLoss", "Convolution", "Crop", "Data", "Deconvolution", "Dropout", "DummyData",
    "ELU", "Eltwise", "Embed", "EuclideanLoss", "Exp", "Filter", "Flatten", "HDF5Data",
    "HDF5Output", "HingeLoss", "Im2col", "ImageData", "InfogainLoss", "InnerProduct", "Input",
    "LRN", "LSTM", "LSTMUnit", "Log", "MVN", "MemoryData", "MultinomialLogisticLoss", "PReLU",
    "Parameter", "Pooling", "Power", "Python", "RNN", "ReLU", "Reduction", "Reshape", "SPP",
    "Scale", "Sigmoid", "SigmoidCrossEntropyLoss", "Silence", "Slice", "Softmax",
    "SoftmaxWithLoss", "Split", "TanH", "Threshold", "Tile", "WindowData",
]


def test_list_has_the_59_types_of_caffe_1_0():
    assert len(BVLC_1_0_TYPES) == len(set(BVLC_1_0_TYPES)) == 59


@pytest.mark.parametrize("layer_type", BVLC_1_0_TYPES)
def test_bvlc_type_is_registered(layer_type):
    assert layer_type in caffe.layer_types()
