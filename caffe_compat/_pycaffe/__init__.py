"""The implementation behind pycaffe's ``caffe.Net``: blob views (``blobs``), the Net
(``net``), its layer-by-layer executor glue (``layerwise``) and its outputs-only fast path
(``fast``). pycaffe's own module names (``caffe_compat.pycaffe``, ``caffe._caffe``) re-export
from here; nothing here takes a pycaffe name."""
