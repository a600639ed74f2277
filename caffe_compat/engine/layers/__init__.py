"""Caffe layers, one module per family; importing this package registers them all."""
from caffe_compat.engine.layers.base import (TEST, TRAIN, Layer, LayerError, layer_class, layer_types,
                                      register)

__all__ = ["Layer", "LayerError", "TRAIN", "TEST", "register", "layer_class", "layer_types"]
