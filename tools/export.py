#!/usr/bin/env python3
"""Export a deploy net and its weights for serving: TorchScript or ONNX.

  python tools/export.py --model deploy.prototxt --weights W.caffemodel --format onnx net.onnx
  python tools/export.py --model deploy.prototxt --weights W.caffemodel --format torchscript net.pt

The export is checked against the net (onnxruntime for ONNX) before it is written.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from caffe_compat.commands.export import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
