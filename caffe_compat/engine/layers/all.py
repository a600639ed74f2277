"""Kept for code that imports it: importing this module registers every built-in layer type
(the list is ``builtin.MODULES``)."""
from caffe_compat.engine.layers import builtin

builtin.load()
