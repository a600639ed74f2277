"""caffe_compat/formats."""
