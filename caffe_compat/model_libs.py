"""``caffe.model_libs``: the net-building helpers of weiliu89/caffe (SSD), on our NetSpec.

SSD's scripts (``examples/ssd/ssd_pascal.py`` and the many written after them) start with
``from caffe.model_libs import *`` and then build train/test/deploy nets from these calls;
the same names, arguments and defaults are here, and the generated layers carry the names
those scripts and the released caffemodels use. As in the fork, the star import also brings
``caffe``, ``L`` (``caffe.layers``), ``P`` (``caffe.params``), ``caffe_pb2`` and ``os``.

The helpers only write prototxt. ``AnnotatedData`` (from :func:`CreateAnnotatedDataLayer`)
reads the databases ``tools/convert_annoset.py`` writes; the ``MultiBoxLoss`` the scripts add
is not computed by caffe-compat, and building a TRAIN net that holds it says so. Deploy nets
(Input, the bodies, Normalize, Permute, PriorBox, DetectionOutput) build and run.

Differences from the fork, each where it would have failed or silently misbehaved:
``ConvBNLayer`` rejects unknown batch-norm keywords (the fork ignored them);
``CreateMultiBoxHead`` passes ``use_scale`` on (the fork accepted and dropped it) and raises
``ValueError`` where the fork asserted; ``VGGNetBody(nopool=True)`` builds (the fork hit a
NameError); ``InceptionTower`` leaves its ``layer_params`` dicts unmodified.
"""
import importlib
import os

from caffe_compat.net_spec import params as P
from caffe_compat.proto import caffe_pb2

from caffe_compat._model_libs.blocks import (ConvBNLayer, CreateAnnotatedDataLayer,
                                             InceptionTower, ResBody, UnpackVariable)
from caffe_compat._model_libs.bodies import (ResNet101Body, ResNet152Body, VGGNetBody,
                                             ZFNetBody)
from caffe_compat._model_libs.inception import InceptionV3Body
from caffe_compat._model_libs.multibox import CreateMultiBoxHead

__all__ = ["caffe", "L", "P", "caffe_pb2", "os",
           "check_if_exist", "make_if_not_exist", "UnpackVariable", "ConvBNLayer", "ResBody",
           "InceptionTower", "CreateAnnotatedDataLayer", "ZFNetBody", "VGGNetBody",
           "ResNet101Body", "ResNet152Body", "InceptionV3Body", "CreateMultiBoxHead"]


def check_if_exist(path) -> bool:
    """Whether ``path`` exists (SSD's scripts call it for their inputs and ignore the result)."""
    return os.path.exists(path)


def make_if_not_exist(path) -> None:
    """Create directory ``path`` and its parents unless it exists."""
    os.makedirs(path, exist_ok=True)


def __getattr__(name):
    # The fork's module namespace holds the ``caffe`` package, and scripts reach it through
    # the star import, and ``L`` is its ``caffe.layers`` (NetSpec's factory, also a package).
    # Resolved on first use: ``import caffe`` itself imports this module.
    if name == "caffe":
        return importlib.import_module("caffe")
    if name == "L":
        return importlib.import_module("caffe").layers
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
