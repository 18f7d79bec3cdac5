"""Static int8 quantisation of an exported ONNX prefix with ONNX Runtime, and its measures.

`quantize_int8` runs `onnxruntime.quantization.quant_pre_process` (shape inference, graph
optimisation) then `quantize_static`: the QDQ format, per-channel int8 weights, int8
activations (S8S8, ONNX Runtime's default for QDQ on CPUs) whose ranges are calibrated
(MinMax) on training images. Operators that ONNX Runtime has no int8 kernel or QDQ rule for
stay float32 and are named (`float_ops`). `compare` measures the fp32 and int8 files on the
same inputs (accuracy, largest logit difference), `latency_ms` the median call at batch 1
on one thread. numpy, onnx and onnxruntime only: no torch here (the caller builds the
calibration and test inputs; see `edgetrain.export.onnx_export.export_int8`).
"""
from __future__ import annotations

from collections import Counter
import contextlib
import logging
from pathlib import Path
import statistics
import tempfile
import time

import numpy as np

CALIBRATION_SAMPLES = 256  # training images the activation ranges are calibrated on
CALIBRATION_BATCH = 32
LATENCY_CALLS = 200  # batch-1 calls timed (after LATENCY_WARMUP) for the median
LATENCY_WARMUP = 20
# Ops that carry no arithmetic of their own to quantise (they pass int8 tensors through).
SHAPE_OPS = {"Identity", "Shape", "Constant", "Concat", "Squeeze", "Unsqueeze", "Flatten",
             "Reshape", "Transpose", "QuantizeLinear", "DequantizeLinear"}


def quantizable_ops() -> set[str]:
    """The op types onnxruntime.quantization quantises in QDQ form (its registries)."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry
    return set(QDQRegistry) | set(QLinearOpsRegistry)


def float_ops(model_path: Path) -> dict[str, int]:
    """{op type: node count} of the ops in `model_path` that stay float32 when quantised."""
    import onnx
    counts = Counter(n.op_type for n in onnx.load(str(model_path)).graph.node)
    keep = quantizable_ops() | SHAPE_OPS
    return {op: n for op, n in sorted(counts.items()) if op not in keep}


def calibration_reader(x: np.ndarray, input_name: str = "input"):
    """A CalibrationDataReader over float32 inputs `x` (N, C, H, W), CALIBRATION_BATCH at once."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{input_name: x[i:i + CALIBRATION_BATCH]}
                                 for i in range(0, len(x), CALIBRATION_BATCH)])

        def get_next(self):
            return next(self.batches, None)

    return Reader()


@contextlib.contextmanager
def quiet_root_logger():
    """onnxruntime.quantization warns on the root logger (e.g. per-channel axes of a
    BatchNormalization's rank-1 weights); hide that while it runs."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_int8(fp32: bytes, calibration: np.ndarray, meta: dict[str, str]
                  ) -> tuple[bytes, dict[str, int]]:
    """Statically quantise a serialised float32 ONNX model.

    Args:
        fp32: the float32 model (as `edgetrain export` writes it).
        calibration: normalised float32 inputs (N, C, H, W) the activation ranges come from.
        meta: the metadata_props the int8 file carries (the fp32 file's, plus quantisation).
    Returns:
        (the int8 model serialised, {op type: nodes} left in float32).
    Raises:
        Exception: whatever onnxruntime.quantization raises on a model it cannot quantise
            (the caller keeps the float model and names the failure).
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    with tempfile.TemporaryDirectory(prefix="edgetrain-int8-") as tmp:
        src, pre, dst = (Path(tmp) / n for n in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        src.write_bytes(fp32)
        with quiet_root_logger():
            quant_pre_process(str(src), str(pre))
            quantize_static(str(pre), str(dst), calibration_reader(calibration),
                            quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax)
        left = float_ops(pre)
        proto = onnx.load(str(dst))
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto.SerializeToString(), left


def session(model: bytes, threads: int = 1):
    """An ONNX Runtime CPU session with `threads` intra-op threads (1: comparable latency)."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def logits(sess, x: np.ndarray, batch: int = 256) -> np.ndarray:
    """The model's outputs on `x` (N, C, H, W), `batch` rows at a time."""
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + batch]})[0]
                           for i in range(0, len(x), batch)])


def latency_ms(sess, x1: np.ndarray, calls: int = LATENCY_CALLS) -> float:
    """Median wall time (ms) of one call on the batch-1 input `x1`, after a warm-up."""
    name = sess.get_inputs()[0].name
    for _ in range(LATENCY_WARMUP):
        sess.run(None, {name: x1})
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        sess.run(None, {name: x1})
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def compare(fp32: bytes, int8: bytes, x: np.ndarray, y: np.ndarray | None) -> dict:
    """Both files on the same inputs: accuracy on labels `y` (None: not measured), the largest
    |int8 - fp32| logit difference, argmax agreement, batch-1 latency on one thread."""
    s32, s8 = session(fp32), session(int8)
    a, b = logits(s32, x), logits(s8, x)
    acc = (lambda z: None if y is None else float((z.argmax(1) == y).mean()))
    return {"n_compared": len(x), "fp32_acc": acc(a), "int8_acc": acc(b),
            "max_abs_logit_diff": float(np.abs(a - b).max()),
            "argmax_agreement": float((a.argmax(1) == b.argmax(1)).mean()),
            "fp32_latency_ms": latency_ms(s32, x[:1]), "int8_latency_ms": latency_ms(s8, x[:1]),
            "fp32_bytes": len(fp32), "int8_bytes": len(int8)}
