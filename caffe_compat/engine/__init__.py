"""caffe_compat/engine: layers, nets, plans and their executor, the solver.

Every module that computes with torch lives under this package, so importing it is the one
place the process's numerics are set up: OpenMP's passive wait policy before torch loads
libgomp, then the thread count (engine/numerics.py says why). The package top level and the
file-format modules never come here, so they stay free of torch.
"""
from caffe_compat.engine import numerics as _numerics

_numerics.prefer_passive_wait()      # before torch is imported (libgomp reads it at load)
_numerics.configure_threads()        # $CAFFE_COMPAT_THREADS, else fewer on a busy machine
