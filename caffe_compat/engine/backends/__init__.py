"""Inference engines behind a TEST net's forward: torch, onnxruntime, OpenVINO (engine.py)."""
