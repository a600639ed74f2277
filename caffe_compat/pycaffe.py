"""pycaffe's ``caffe.pycaffe`` module: ``Net`` and ``Layer`` as BVLC's module exposes them.

The implementation lives in ``caffe_compat._pycaffe`` (the Net in ``_pycaffe/net.py``);
this module only gives it pycaffe's name.
"""
from caffe_compat._pycaffe.blobs import Blob
from caffe_compat._pycaffe.net import Net, PythonLayer, read_net_prototxt
from caffe_compat.engine.layers.base import TEST, TRAIN
from caffe_compat.engine.layers.blob_vectors import BlobVec, IntVec, LayerVec, StringVec

Layer = PythonLayer

__all__ = ["Net", "Layer", "PythonLayer", "Blob", "read_net_prototxt", "TRAIN", "TEST",
           "BlobVec", "IntVec", "LayerVec", "StringVec"]
