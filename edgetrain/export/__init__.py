"""Leaving edgetrain: ONNX export of a trained prefix and its ONNX Runtime check."""
