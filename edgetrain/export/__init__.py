"""Leaving edgetrain: ONNX export of a trained prefix and its ONNX Runtime check
(`onnx_export`, `onnx_check`), its int8 copy (`quantize`, `int8_export`), ExecuTorch
programs (`pte`), and prediction on image files from a run directory (`predict`) or from
an exported file alone (`model_file`, `predictions`: no torch for .onnx)."""
