"""The parts of ``caffe_compat.model_libs`` (SSD's net-building helpers), one family a file."""
