"""ExecuTorch export of a trained prefix: a `.pte` program with the XNNPACK delegate.

`export_pte(run_dir, depth)` rebuilds the prefix G_k + F_k from the run directory alone (as
the ONNX export does), captures it with `torch.export` at batch 1 (a static shape: a phone
classifies one image at a time, and a dynamic batch axis got a runtime capacity far below
its declared bound in ExecuTorch 1.5.1),
lowers it with `to_edge_transform_and_lower` and the `XnnpackPartitioner`, and stores the
ONNX file's deployment metadata as the program's `edgetrain_metadata` method (a JSON
string), so that `edgetrain predict FILE.pte` needs the file alone. Before writing, the
program is run by ExecuTorch's own Python runtime on `CHECK_SAMPLES` inputs built from the
run's preprocessing and compared with PyTorch (argmax agreement, largest difference); a
float32 program must agree on every input. `--quantize int8` adds a program quantised by
XNNPACK's PT2E quantiser (symmetric, per-channel weights) calibrated on training images.
ExecuTorch is the optional `executorch` extra, imported inside the functions that need it.
On-device training with ExecuTorch is out of scope: training stays in PyTorch.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
import statistics
import time

import numpy as np
import torch

from edgetrain.errors import UserError
from edgetrain.export.int8_export import int8_path, quant_inputs, read_data, test_inputs
from edgetrain.export.onnx_check import CHECK_SAMPLES, ExportCheckFailed, check_inputs
from edgetrain.export.onnx_export import (check_out, deployment_metadata, resolve_depth,
                                          write_file)
from edgetrain.export.quantize import LATENCY_CALLS, LATENCY_WARMUP
from edgetrain.method.stage import Prefix
from edgetrain.regimes.run import load_run, read_finished_run

EXTRA_HINT = "pip install edgetrain[executorch]"
META_METHOD = "edgetrain_metadata"


def require_executorch():
    """The executorch package, or UserError naming the extra to install."""
    try:
        with quiet_stderr():  # its import warns through torch and probes the CPU on stderr
            import executorch.exir  # noqa: F401  (the optional `executorch` extra)
            import executorch.runtime  # the optional `executorch` extra
    except ImportError:
        raise UserError(f"--format pte needs ExecuTorch; {EXTRA_HINT}") from None
    return executorch


@contextlib.contextmanager
def quiet_stderr():
    """Hide what ExecuTorch's C++ runtime prints on stderr (cpuinfo probes) while it loads."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def capture(model: torch.nn.Module, example: torch.Tensor):
    """torch.export of `model` on `example` (batch 1: a static shape)."""
    with torch.no_grad():
        return torch.export.export(model, (example[:1],))


def quantize_pt2e(model: torch.nn.Module, example: torch.Tensor, calibration: np.ndarray):
    """The prefix quantised by XNNPACK's PT2E quantiser, calibrated on `calibration`."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (  # the extra
        XNNPACKQuantizer, get_symmetric_quantization_config)
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e  # its dep
    config = get_symmetric_quantization_config(is_per_channel=True)
    quantizer = XNNPACKQuantizer().set_global(config)
    prepared = prepare_pt2e(capture(model, example).module(), quantizer)
    with torch.no_grad():
        for row in calibration:
            prepared(torch.from_numpy(row[None]))
    return convert_pt2e(prepared)


def lower(model: torch.nn.Module, example: torch.Tensor, meta: dict[str, str]) -> bytes:
    """The XNNPACK-delegated ExecuTorch program of `model`, with `meta` as a JSON method."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import (  # the extra
        XnnpackPartitioner)
    from executorch.exir import to_edge_transform_and_lower  # the optional `executorch` extra
    edge = to_edge_transform_and_lower(capture(model, example), partitioner=[XnnpackPartitioner()],
                                       constant_methods={META_METHOD: json.dumps(meta)})
    return edge.to_executorch().buffer


def load_program(buffer: bytes):
    """An ExecuTorch runtime program from a serialised .pte."""
    from executorch.runtime import Runtime  # the optional `executorch` extra
    with quiet_stderr():
        return Runtime.get().load_program(buffer)


def load_forward(program, input_shape):
    """The program's forward method, run once on zeros (XNNPACK probes the CPU on stderr
    at its first call: hidden here)."""
    with quiet_stderr():
        forward = program.load_method("forward")
        forward.execute([torch.zeros(1, *input_shape)])
    return forward


def run_program(method, x: torch.Tensor) -> torch.Tensor:
    """The (batch 1) forward method on every row of `x` (B, C, H, W) -> (B, classes)."""
    return torch.cat([method.execute([x[i:i + 1].contiguous()])[0] for i in range(len(x))])


class ProgramRunner:
    """float32 numpy (B, C, H, W) -> logits (B, classes) through a loaded program's forward.

    It holds the program too: a method outlives its program in ExecuTorch's bindings only as
    a dangling pointer (a segmentation fault on the next call)."""

    def __init__(self, program, forward):
        self.program, self.forward = program, forward

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return run_program(self.forward, torch.from_numpy(x)).numpy()


def pte_runner(path: Path):
    """(metadata, runner float32 numpy (B, C, H, W) -> logits) of a .pte file.

    Raises:
        UserError: executorch missing, a program without edgetrain's metadata, unloadable.
    """
    require_executorch()
    try:
        program = load_program(Path(path).read_bytes())
        meta = json.loads(program.load_method(META_METHOD).execute([])[0])
        forward = load_forward(program, json.loads(meta["input_shape"]))
    except (RuntimeError, ValueError, TypeError) as e:
        raise UserError(f"ExecuTorch cannot run {path} as an edgetrain program "
                        f"({type(e).__name__}: {e})") from None
    return meta, ProgramRunner(program, forward)


def latency_ms(method, x1: torch.Tensor, calls: int = LATENCY_CALLS) -> float:
    """Median ms of one forward call at batch 1 (XNNPACK's thread pool as the runtime sets it)."""
    for _ in range(LATENCY_WARMUP):
        method.execute([x1])
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        method.execute([x1])
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


@torch.no_grad()
def check_program(buffer: bytes, model: torch.nn.Module, prep, exact: bool,
                  test: tuple[np.ndarray, np.ndarray] | None) -> dict:
    """ExecuTorch's runtime against PyTorch on CHECK_SAMPLES inputs from the preprocessing,
    its accuracy on the test split `test` (None: not measured), its batch-1 latency.

    Raises:
        ExportCheckFailed: `exact` (a float32 program) and a class differs on any input.
    """
    program = load_program(buffer)  # kept alive while its method runs
    forward = load_forward(program, prep.input_shape)
    x = check_inputs(prep, CHECK_SAMPLES)
    got, want = run_program(forward, x), model(x)
    same = int((got.argmax(1) == want.argmax(1)).sum())
    if exact and same < len(x):
        raise ExportCheckFailed(f"ExecuTorch predicts another class than PyTorch on "
                                f"{len(x) - same} of {len(x)} check inputs; nothing written")
    acc = None
    if test is not None:
        pred = run_program(forward, torch.from_numpy(test[0])).argmax(1).numpy()
        acc = float((pred == test[1]).mean())
    return {"n_check": len(x), "same_class": same, "max_abs_diff": float((got - want).abs().max()),
            "file_bytes": len(buffer), "latency_ms": latency_ms(forward, x[:1]), "test_acc": acc}


def program_inputs(cfg, prep, quantize: str, calibration: Path | None):
    """(int8 calibration inputs or None, (test x, test y) or None): read before any work.

    Raises:
        UserError: int8 without readable training images or --calibration.
    """
    if quantize != "int8":
        return None, test_inputs(read_data(cfg), prep)
    inputs = quant_inputs(cfg, prep, calibration)
    return inputs, None if inputs.test_x is None else (inputs.test_x, inputs.test_y)


def default_pte(run_dir: Path, depth: int) -> Path:
    return Path(run_dir) / f"prefix-depth{depth}.pte"


def export_pte(run_dir: Path, depth: int | str = "best", out: Path | None = None,
               quantize: str = "none", calibration: Path | None = None) -> dict:
    """Export G_k + F_k of a finished run to an ExecuTorch program (XNNPACK), verified.

    Args:
        run_dir: a finished run directory.
        depth: 'best' (chosen on validation) or k in 1..K.
        out: the .pte file (default RUN_DIR/prefix-depthK.pte).
        quantize: 'int8' also writes OUT-int8.pte, quantised by XNNPACK's PT2E quantiser.
        calibration: image files or a folder to calibrate int8 on (the run's pack gone).
    Returns:
        A report: the depth, the recorded test accuracy, per program (fp32, int8) its path,
        size, ExecuTorch vs PyTorch agreement and difference, batch-1 latency.
    Raises:
        UserError: executorch missing, bad run, depth or output; ExportCheckFailed.
    """
    if quantize not in ("none", "int8"):
        raise UserError(f"--quantize must be none or int8 (got {quantize})")
    require_executorch()
    cfg, metrics = read_finished_run(Path(run_dir))
    k = resolve_depth(depth, metrics)
    out = check_out(out or default_pte(run_dir, k), suffix=".pte")
    if quantize == "int8":
        check_out(int8_path(out), suffix=".pte")
    run = load_run(Path(run_dir), torch.device("cpu"), depth=k, bounds=metrics.get("bounds"),
                   with_data=False)
    prep = run.data
    inputs, test = program_inputs(cfg, prep, quantize, calibration)
    model = Prefix(run.stages[:k]).eval()
    example = check_inputs(prep, 2)
    with torch.no_grad():
        out_shape = tuple(model(example).shape[1:])
    meta = deployment_metadata(cfg, metrics, prep, k, False, out_shape)
    programs = {"fp32": lower(model, example, {**meta, "format": "pte fp32 xnnpack"})}
    if inputs is not None:
        qmodel = quantize_pt2e(model, example, inputs.calibration)
        programs["int8"] = lower(qmodel, example, {**meta, "format": "pte int8 xnnpack",
                                                   "calibration": inputs.source})
    checks = {t: check_program(b, model, prep, t == "fp32", test) for t, b in programs.items()}
    for t, b in programs.items():  # written only once every program is checked
        checks[t]["path"] = str(write_file(out if t == "fp32" else int8_path(out), b))
    return {"depth": k, "n_modules": len(metrics["modules"]),
            "test_acc": metrics["modules"][k - 1]["test_acc"], "programs": checks}


def format_pte_report(r: dict) -> str:
    """The lines `edgetrain export --format pte` prints."""
    lines = [f"ExecuTorch program(s), XNNPACK delegate, depth {r['depth']} of {r['n_modules']} "
             f"(recorded test accuracy {r['test_acc']:.4f}); checked with ExecuTorch's runtime "
             "against PyTorch on fixed-seed inputs built from preprocessing.json"]
    for t, c in r["programs"].items():
        acc = "-" if c["test_acc"] is None else f"{c['test_acc']:.4f}"
        lines.append(f"{t:5} {c['file_bytes'] / 1024:>9.1f} KiB  test_acc {acc}  same class "
                     f"{c['same_class']}/{c['n_check']}  max |diff| {c['max_abs_diff']:.3g}  "
                     f"{c['latency_ms']:.3f} ms/image (batch 1)  -> {c['path']}")
    return "\n".join(lines)
