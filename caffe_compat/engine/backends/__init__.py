"""Inference engines behind a TEST net's forward: torch, onnxruntime, OpenVINO (engine.py).

This module imports no torch: command-line parsers take the names from here."""
ENGINES = ("auto", "torch", "onnxruntime", "openvino")
