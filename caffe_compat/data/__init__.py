"""The data pipeline: image lists, Datum databases, the DataTransformer, means, landmarks.

The layers that use it live in ``caffe_compat.data.layers`` (Data, ImageData, HDF5Data,
MemoryData), ``window_data`` (WindowData), ``annotated_data`` (SSD's AnnotatedData),
``hdf5_output`` (HDF5Output) and ``caffe_compat.data.landmark_layer`` (LandmarkHeatmap); the
command-line tools in ``tools/`` (convert_imageset.py, compute_mean.py, make_split.py, ...)
are thin wrappers around ``caffe_compat.data.convert`` (convert_annoset.py: ``annoset``).
"""
from caffe_compat.data.db import DBReader, DBWriter, detect_backend, open_db
from caffe_compat.formats.errors import DataError
from caffe_compat.data.image_list import ListEntry, read_image_list, write_image_list
from caffe_compat.data.transformer import DataTransformer

__all__ = ["DataError", "DataTransformer", "DBReader", "DBWriter", "ListEntry", "detect_backend",
           "open_db", "read_image_list", "write_image_list"]
