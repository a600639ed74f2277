"""``caffe.layers``: NetSpec's layer factory, and the package of forks' Python layers.

In pycaffe ``from caffe import layers as L`` gives NetSpec's factory (``L.Convolution(...)``).
NVIDIA/caffe also ships Python layers under this very name (its python/caffe/layers folder),
and DIGITS' DetectNet prototxt names ``python_param { module:
"caffe.layers.detectnet.clustering" }``. One module object does both, so ``caffe.layers``
is the same object before and after such an import: its subpackages (``detectnet``) are
attributes once imported, and every other attribute is a NetSpec layer type, served by
``caffe_compat.net_spec.layers``.
"""
from caffe_compat.net_spec import layers as _net_spec_layers


def __getattr__(name):
    # Only called for names this package does not hold: a NetSpec layer type. The factory
    # refuses dunder names, so import machinery probing (__all__, __wrapped__) sees none.
    return getattr(_net_spec_layers, name)
