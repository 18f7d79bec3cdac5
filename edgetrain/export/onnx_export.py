"""ONNX export of a trained prefix G_k + F_k, checked with onnx and ONNX Runtime.

`export_prefix(run_dir, depth)` reads only the run directory's config.json, metrics.json,
preprocessing.json and modules/NN.safetensors (never a pickle, never the data set: the image
folder and its pack may be gone), rebuilds the first k modules on the CPU, exports them with
a dynamic batch axis, stores what a deployment needs (depth, accuracies, input shape,
normalisation, class names, version) in the ONNX metadata, and writes the file only after
`onnx.checker` accepts it and ONNX Runtime reproduces the PyTorch prefix on inputs built from
the recorded preprocessing (`edgetrain.export.onnx_check.check_inputs`): logits within
`ATOL` at batch sizes 1 and 7, and the same class on every one of 256 fixed-seed inputs.

Exporter: the torch.export-based one (`dynamo=True`, needs onnxscript). The TorchScript
exporter is deprecated since PyTorch 2.9 and receives no fixes; torch.export captures the
graph soundly (it refuses a model it cannot capture instead of silently tracing one Python
branch), declares the batch dimension symbolically (`Dim`), and covers the operators of the
transformer models too. It costs a few seconds per export and the onnxscript dependency; both
exporters give identical outputs here (max |diff| ~2e-7 on the tiny K-M ResNet). Opset 18 is
the default: the lowest the new exporter implements natively, so the widest choice of
runtimes can load the file.

`--quantize int8` adds a statically quantised copy (`edgetrain.export.int8_export`, computed
before either file is written). This file does not train or build runtime engines (TensorRT
reads the .onnx file).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
import tempfile
import time

import torch

from edgetrain import __version__
from edgetrain.config import RunConfig
from edgetrain.errors import UserError
from edgetrain.export.int8_export import QUANTIZE_CHOICES, int8_path, quant_inputs, quantized
from edgetrain.export.onnx_check import ATOL, check_inputs, optional_import, ort_session, verify
from edgetrain.export.quantize import LATENCY_CALLS
from edgetrain.method.stage import Prefix, Stage
from edgetrain.regimes.run import load_run, read_finished_run
from edgetrain.storage.atomic import atomic_write_bytes

MIN_OPSET = 18  # the torch.export-based exporter implements opset >= 18 natively
DEFAULT_OPSET = 18


def resolve_depth(depth: int | str, metrics: dict) -> int:
    """'best' -> the run's best depth (chosen on validation); else an int in 1..K.

    Raises:
        UserError: not 'best' nor an integer in range.
    """
    n = len(metrics["modules"])
    if isinstance(depth, str) and depth.strip().lower() == "best":
        return int(metrics["best_depth"])
    try:
        k = int(depth)
    except (TypeError, ValueError):
        raise UserError(f"--depth must be 'best' or an integer 1..{n} (got {depth!r})") from None
    if not 1 <= k <= n:
        raise UserError(f"--depth must be between 1 and the run's {n} modules (got {k})")
    return k


# --------------------------------------------------------------------------- exporting
def require_export_deps() -> None:
    """Fail fast, before any work, when onnx, onnxscript or onnxruntime is missing."""
    for name in ("onnx", "onnxscript", "onnxruntime"):
        optional_import(name)


def check_opset(opset: int) -> int:
    """Raises UserError unless `opset` is one the exporter and the installed onnx support."""
    onnx = optional_import("onnx")
    top = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= int(opset) <= top:
        raise UserError(f"--opset must be between {MIN_OPSET} and {top} (got {opset})")
    return int(opset)


def export_onnx(model: torch.nn.Module, example: torch.Tensor, opset: int, output_name: str):
    """Export `model` (eval mode) with a dynamic batch axis; returns an onnx.ModelProto.

    `example` must have batch >= 2 so that the batch size is not specialised into the graph.
    """
    optional_import("onnxscript")
    batch = torch.export.Dim("batch")
    with torch.no_grad():
        prog = torch.onnx.export(model, (example,), None, dynamo=True, opset_version=opset,
                                 dynamic_shapes=({0: batch},), input_names=["input"],
                                 output_names=[output_name], verbose=False)
    return prog.model_proto


def strip_debug_info(proto) -> None:
    """Drop the exporter's debugging annotations (stack traces, FX node text, signatures).

    They hold this machine's file paths and are a third of a small model's file; the
    model-level metadata (ours) is kept.
    """
    g = proto.graph
    for item in [g, *g.node, *g.value_info, *g.input, *g.output, *g.initializer,
                 *(n for f in proto.functions for n in f.node)]:
        del item.metadata_props[:]
    for node in [*g.node, *(n for f in proto.functions for n in f.node)]:
        node.doc_string = ""


def set_metadata(proto, meta: dict[str, str]) -> None:
    """Replace the model's metadata_props by `meta` (string keys and values)."""
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def deployment_metadata(cfg: RunConfig, metrics: dict, data, depth: int, features_only: bool,
                        output_shape: tuple[int, ...]) -> dict[str, str]:
    """Everything a runtime needs next to the graph; lists are JSON strings. `data` is the
    run's `Preprocessing` (input shape, mean, std, class names)."""
    m = metrics["modules"][depth - 1]
    return {
        "edgetrain_version": __version__, "depth": str(depth),
        "n_modules": str(len(metrics["modules"])), "best_depth": str(metrics["best_depth"]),
        "val_acc": repr(float(m["val_acc"])), "test_acc": repr(float(m["test_acc"])),
        "output": "features" if features_only else "logits",
        "output_shape": json.dumps(list(output_shape)),
        "input_shape": json.dumps(list(data.input_shape)), "input_dtype": "float32",
        "normalization": "x = (pixel / 255 - mean[c]) / std[c], NCHW",
        "mean": json.dumps(data.mean), "std": json.dumps(data.std),
        "class_names": json.dumps(data.class_names),
        "resize_policy": json.dumps(data.resize_policy().to_dict()),
        "data": cfg.data, "model": cfg.model, "mode": cfg.mode,
    }


# --------------------------------------------------------------------------- the whole job
def weight_bytes(stages: list[Stage]) -> int:
    """Bytes of the tensors G_k + F_k uses: stems and blocks of `stages`, the last head."""
    parts = [p for st in stages for p in (st.stem, st.blocks) if p is not None]
    parts.append(stages[-1].head)
    return sum(t.numel() * t.element_size() for p in parts for t in p.state_dict().values())


def default_out(run_dir: Path, depth: int, features_only: bool) -> Path:
    return Path(run_dir) / f"{'features' if features_only else 'prefix'}-depth{depth}.onnx"


def check_out(out: Path, suffix: str = ".onnx") -> Path:
    """Make sure `out` can be written before any work is done.

    Raises:
        UserError: not a `suffix` path, a directory, or its folder cannot be created/written.
    """
    out = Path(out)
    if out.suffix.lower() != suffix:
        raise UserError(f"--out must name a {suffix} file (got {out})")
    if out.is_dir():
        raise UserError(f"--out {out} is a directory")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"cannot write to --out {out}: {e.strerror or e}") from None
    return out


def build_onnx(model: torch.nn.Module, example: torch.Tensor, opset: int, output_name: str,
               meta: dict[str, str]) -> bytes:
    """Export, strip the exporter's debug annotations, add `meta`, run the ONNX checker.

    Returns:
        The serialised model (not yet verified against PyTorch).
    """
    proto = export_onnx(model, example, opset, output_name)
    strip_debug_info(proto)
    set_metadata(proto, meta)
    optional_import("onnx").checker.check_model(proto, full_check=True)
    return proto.SerializeToString()


def check_quantize(quantize: str, features_only: bool) -> str:
    """Raises UserError unless `quantize` is 'none' or 'int8' (int8: logits only)."""
    if quantize not in QUANTIZE_CHOICES:
        raise UserError(f"--quantize must be one of {', '.join(QUANTIZE_CHOICES)} (got {quantize})")
    if quantize == "int8" and features_only:
        raise UserError("--quantize int8 exports a classifier; drop --features-only")
    return quantize


def export_prefix(run_dir: Path, depth: int | str = "best", features_only: bool = False,
                  opset: int = DEFAULT_OPSET, out: Path | None = None, atol: float = ATOL,
                  quantize: str = "none", calibration: Path | None = None) -> dict:
    """Export G_k + F_k (or G_k alone) of a finished run to ONNX, verified with ONNX Runtime.

    Args:
        run_dir: a finished run directory.
        depth: 'best' (the run's best depth, chosen on validation) or k in 1..K.
        features_only: export G_k alone (output: the module's feature map).
        opset: ONNX opset, MIN_OPSET up to what the installed onnx knows.
        out: the .onnx file (default RUN_DIR/prefix-depthK.onnx or features-depthK.onnx).
        atol: the largest max |ONNX Runtime - PyTorch| output difference accepted.
        quantize: 'int8' also writes OUT-int8.onnx, statically quantised by ONNX Runtime
            (`edgetrain.export.quantize`), calibrated on the run's training images.
        calibration: image files or a folder to calibrate on instead (the pack gone).

    Returns:
        A report: path, depth, sizes, the recorded accuracies of the prefix and of the whole
        network, the ONNX Runtime / PyTorch differences on the check inputs; with int8,
        `int8`: its path, fp32 vs int8 accuracy, sizes, latency and largest logit difference
        (or `error`: ONNX Runtime could not quantise it, the float file alone is written).

    Raises:
        UserError: bad run, depth, opset or output; no preprocessing.json in the run;
            onnx/onnxruntime/onnxscript missing; ExportCheckFailed when the file disagrees
            with PyTorch (nothing is written then).
    """
    if not atol > 0:
        raise UserError(f"--atol must be positive (got {atol})")
    check_quantize(quantize, features_only)
    require_export_deps()
    cfg, metrics = read_finished_run(Path(run_dir))
    k = resolve_depth(depth, metrics)
    opset = check_opset(opset)
    out = check_out(out or default_out(run_dir, k, features_only))
    if quantize == "int8":
        check_out(int8_path(out))
    run = load_run(Path(run_dir), torch.device("cpu"), depth=k, bounds=metrics.get("bounds"),
                   with_data=False)  # run.data: the stored Preprocessing, not the data set
    stages = run.stages
    model = Prefix(stages[:k], features_only=features_only).eval()
    example = check_inputs(run.data, 2)
    with torch.no_grad():
        out_shape = tuple(model(example).shape[1:])
    meta = deployment_metadata(cfg, metrics, run.data, k, features_only, out_shape)
    t0 = time.perf_counter()
    blob = build_onnx(model, example, opset, meta["output"], meta)
    export_s = time.perf_counter() - t0
    checks = verify(ort_session(blob), model, stages[k - 1].head if features_only else None,
                    run.data, atol)
    int8, qrep = None, None
    if quantize == "int8":  # everything is read and computed before a file is written
        int8, qrep = quantized(blob, meta, quant_inputs(cfg, run.data, calibration))
    write_file(out, blob)
    if int8 is not None:
        qrep["path"] = str(write_file(int8_path(out), int8))
    rep = _report(out, k, features_only, opset, export_s, metrics, stages, checks, out_shape)
    return rep if qrep is None else {**rep, "int8": qrep}


def write_file(out: Path, blob: bytes) -> Path:
    try:
        atomic_write_bytes(out, blob)
    except OSError as e:
        raise UserError(f"cannot write to --out {out}: {e.strerror or e}") from None
    return out


def _report(out: Path, k: int, features_only: bool, opset: int, export_s: float, metrics: dict,
            stages: list[Stage], checks: dict, out_shape: tuple) -> dict:
    mods = metrics["modules"]
    return {"path": str(out), "depth": k, "n_modules": len(mods), "features_only": features_only,
            "opset": opset, "exporter": "torch.export (dynamo=True)", "export_s": export_s,
            "output_shape": list(out_shape), "file_bytes": out.stat().st_size,
            "prefix_weight_bytes": weight_bytes(stages[:k]),
            "whole_weight_bytes": weight_bytes(stages),
            "prefix_val_acc": mods[k - 1]["val_acc"], "prefix_test_acc": mods[k - 1]["test_acc"],
            "whole_test_acc": mods[-1]["test_acc"], **checks}


def format_report(r: dict) -> str:
    """The lines `edgetrain export` prints."""
    kib = lambda b: f"{b / 1024:.1f} KiB"  # noqa: E731
    diffs = ", ".join(f"{d:.2g} at batch {b}" for b, d in r["max_abs_diff"].items())
    what = "features" if r["features_only"] else "logits"
    same = r["n_check"] - r["class_disagreements"]
    return "\n".join([
        f"exported depth {r['depth']} of {r['n_modules']} ({what}, opset {r['opset']}, "
        f"{r['exporter']}) -> {r['path']}",
        f"onnxruntime vs PyTorch: max |{what} diff| {diffs}; same class on {same}/{r['n_check']}"
        " fixed-seed inputs (built from preprocessing.json; the data set is not read)",
        f"{'':14} {'depth':>5} {'test_acc':>8} {'weights':>11} {'file':>11}",
        f"{'ONNX file':14} {r['depth']:>5} {r['prefix_test_acc']:>8.4f} "
        f"{kib(r['prefix_weight_bytes']):>11} {kib(r['file_bytes']):>11}",
        f"{'whole network':14} {r['n_modules']:>5} {r['whole_test_acc']:>8.4f} "
        f"{kib(r['whole_weight_bytes']):>11} {'-':>11}",
        *([] if "int8" not in r else format_int8(r["int8"], r["path"])),
    ])


def format_int8(q: dict, fp32_path: str) -> list[str]:
    """The lines of an int8 export: a table fp32 vs int8, the float ops, or the failure."""
    if "error" in q:
        return [f"onnxruntime cannot quantise this model ({q['error']}); kept the float32 "
                f"file {fp32_path} alone"]
    acc = lambda a: "-" if a is None else f"{a:.4f}"  # noqa: E731
    lines = [f"int8 (static QDQ, per-channel, calibrated on {q['n_calibration']} images of "
             f"{q['calibration']}) -> {q['path']}",
             f"{'':6} {'test_acc':>8} {'file':>11} {'ms/image':>9}   (batch 1, onnxruntime, "
             f"1 thread, median of {LATENCY_CALLS} calls)"]
    for t in ("fp32", "int8"):
        lines.append(f"{t:6} {acc(q[t + '_acc']):>8} {q[t + '_bytes'] / 1024:>9.1f} KiB "
                     f"{q[t + '_latency_ms']:>9.3f}")
    lines.append(f"int8 vs fp32 on {q['n_compared']} {q['compared_on']}: max |logit diff| "
                 f"{q['max_abs_logit_diff']:.3g}, same class on "
                 f"{q['argmax_agreement'] * 100:.2f}%; file "
                 f"{q['int8_bytes'] / q['fp32_bytes']:.2f}x")
    lines += [f"onnxruntime does not quantise {op} ({n} nodes): it runs in float32 between "
              "int8 tensors" for op, n in q["float_ops"].items()]
    return lines
