"""DetectNet's Python layers (NVIDIA DIGITS object detection), written for caffe-compat.

DIGITS' DetectNet nets name them by the module path NVIDIA/caffe ships inside its own pycaffe
package, ``python_param { module: "caffe.layers.detectnet.clustering" }``; caffe-compat's
``caffe`` package answers that path with these modules (``caffe/layers/detectnet``):

- ``clustering``: ``ClusterDetections`` turns the coverage map and bbox regressions of a
  deploy net into a fixed-size list of rectangles per image (cv2.groupRectangles voting);
  ``ClusterGroundtruth`` lists the ground-truth rectangles of the label maps (validation);
- ``mean_ap``: ``ScoreDetections`` marks each rectangle as a true positive, a false positive
  or a missed ground truth, and ``mAP`` reduces those marks to DIGITS' precision, recall and
  "mAP" (precision x recall) curves.

The layers have no gradient: DetectNet trains on the coverage and bbox losses before them.
"""
