"""``caffe.layers.detectnet.mean_ap``, the path DetectNet prototxt names: it is
``caffe_compat.detectnet.mean_ap`` itself (an import returns what sys.modules then holds)."""
import importlib
import sys

sys.modules[__name__] = importlib.import_module("caffe_compat.detectnet.mean_ap")
