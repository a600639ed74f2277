"""caffe_compat/engine."""
