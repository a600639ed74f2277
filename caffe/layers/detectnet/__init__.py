"""``caffe.layers.detectnet``: NVIDIA/caffe's module path for DIGITS' DetectNet layers.

Its modules are the very module objects of ``caffe_compat.detectnet`` (see there).
"""
