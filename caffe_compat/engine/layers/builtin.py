"""The one list of modules that define the built-in layer types.

The registry (``base.layer_class``, ``base.layer_types``) imports them on its first lookup,
so a net built from any entry point knows every type, and nothing imports a layer family
for its side effect. The data layers live in ``caffe_compat/data`` (they need the data
pipeline); they are named here as strings so the engine keeps no import of the data
package. A new built-in family module goes on this list; a user's plug-in layer needs no
entry (its ``@register`` runs when the user imports it).
"""
from __future__ import annotations

import importlib

MODULES = (
    "caffe_compat.engine.layers.input",
    "caffe_compat.engine.layers.common",
    "caffe_compat.engine.layers.conv",
    "caffe_compat.engine.layers.inner_product",
    "caffe_compat.engine.layers.neuron",
    "caffe_compat.engine.layers.norm",
    "caffe_compat.engine.layers.bn_forks",
    "caffe_compat.engine.layers.deeplab_labels",
    "caffe_compat.engine.layers.domain_transform",
    "caffe_compat.engine.layers.lrn",
    "caffe_compat.engine.layers.pooling",
    "caffe_compat.engine.layers.roi_pooling",
    "caffe_compat.engine.layers.loss",
    "caffe_compat.engine.layers.loss_extra",
    "caffe_compat.engine.layers.accuracy",
    "caffe_compat.engine.layers.indexing",
    "caffe_compat.engine.layers.selection",
    "caffe_compat.engine.layers.resize",
    "caffe_compat.engine.layers.recurrent",
    "caffe_compat.engine.layers.forks",
    "caffe_compat.engine.layers.rfcn_yolo",
    "caffe_compat.engine.layers.face_ohem",
    "caffe_compat.engine.layers.face_margins",
    "caffe_compat.engine.layers.arcface_focal",
    "caffe_compat.engine.layers.detectnet_train",
    "caffe_compat.engine.layers.yolo",
    "caffe_compat.engine.layers.proposal",
    "caffe_compat.engine.layers.flownet",
    "caffe_compat.engine.layers.flownet_resample",
    "caffe_compat.engine.layers.flownet_augmentation",
    "caffe_compat.engine.layers.ssd",
    "caffe_compat.engine.layers.ssd_detection",
    "caffe_compat.engine.layers.ssd_evaluate",
    "caffe_compat.engine.layers.ssd_multibox",
    "caffe_compat.engine.layers.python_layer",
    "caffe_compat.data.layers",
    "caffe_compat.data.annotated_data",
    "caffe_compat.data.video_data",
    "caffe_compat.data.array_layers",
    "caffe_compat.data.window_data",
    "caffe_compat.data.dense_image_data",
    "caffe_compat.data.image_seg_data",
    "caffe_compat.data.mat_files",
    "caffe_compat.data.hdf5_output",
    "caffe_compat.data.landmark_layer",
)


def load() -> None:
    """Import every module of ``MODULES`` (each registers its classes with ``@register``)."""
    for name in MODULES:
        importlib.import_module(name)
