"""Python bindings generated from proto/caffe.proto.

`caffe_pb2.py` is generated code, committed so the package works without protoc. Regenerate it
with `python tools/regenerate_proto.py` after editing the schema (a test checks it is current).
"""
from caffe_compat.proto import caffe_pb2

__all__ = ["caffe_pb2"]
