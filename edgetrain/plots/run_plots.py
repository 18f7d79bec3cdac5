"""PNG pictures of one run: accuracy at every depth, and memory per epoch and per phase.

What this file holds: `check_plot_path` (validates a PNG destination and that matplotlib
is installed, before a command writes anything), `plot_depth_accuracy` (the table
`edgetrain eval` prints, as a picture) and `plot_memory` (RSS per logged epoch from
`RUN_DIR/log.jsonl`, and the per-phase peaks of metrics.json's `memory`). What it is not:
the benchmarks' figures (`edgetrain.bench`); it reads records, it trains nothing.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

from edgetrain.errors import UserError
from edgetrain.storage.atomic import atomic_write_bytes
from edgetrain.storage.runlog import LOG, read_log


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed).

    Raises:
        UserError: matplotlib missing (install the `plots` extra).
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plots need matplotlib: pip install 'edgetrain[plots]'") from None
    return plt


def check_plot_path(path: str | Path, option: str = "--plot") -> Path:
    """A PNG destination checked before anything is computed or written.

    Args:
        path: where the PNG goes; its folder must exist.
        option: the command-line option named in the error messages.

    Returns:
        The path.

    Raises:
        UserError: not a .png name, its folder missing, or matplotlib not installed.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise UserError(f"{option} needs a .png file name, got {path}")
    if not path.parent.is_dir():
        raise UserError(f"{option}: folder {path.parent} does not exist")
    if path.is_dir():
        raise UserError(f"{option}: {path} is a folder")
    pyplot()
    return path


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    fig.clf()
    atomic_write_bytes(path, buf.getvalue())
    return path


def plot_depth_accuracy(modules: list[dict], best_depth: int, path: Path,
                        title: str = "") -> Path:
    """Validation and test accuracy of every depth (prefix F_k o T_k o ... o T_1), the
    depth chosen on validation marked.

    Args:
        modules: per depth, `val_acc` and `test_acc` (what `evaluate_run` returns).
        best_depth: 1-based depth chosen on the validation split.
        path: the PNG to write (atomically).
        title: the figure's title.

    Returns:
        The path written.
    """
    plt = pyplot()
    depths = list(range(1, len(modules) + 1))
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(depths, [m["val_acc"] for m in modules], "o-", label="validation")
    ax.plot(depths, [m["test_acc"] for m in modules], "s-", label="test")
    ax.axvline(best_depth, color="grey", ls=":", label=f"best depth {best_depth} (val)")
    ax.set(xlabel="depth (modules in the prefix)", ylabel="accuracy", xticks=depths,
           title=title or "accuracy at every depth")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return _save(fig, path)


def memory_records(run_dir: Path) -> tuple[list[dict], dict]:
    """The run's log lines and metrics.json's `memory` phases ({} while it runs).

    Raises:
        UserError: the run has logged no epoch yet.
    """
    run_dir = Path(run_dir)
    lines = read_log(run_dir / LOG) if (run_dir / LOG).is_file() else []
    if not lines:
        raise UserError(f"no epoch logged in {run_dir / LOG} yet: nothing to plot")
    try:
        phases = json.loads((run_dir / "metrics.json").read_text()).get("memory") or {}
    except (OSError, json.JSONDecodeError):
        phases = {}
    return lines, phases


def _epoch_label(line: dict) -> str:
    mod = line["module"]
    mods = "all" if isinstance(mod, list) else str(mod + 1)
    return f"lap {line['lap'] + 1}, module {mods}"


def epoch_stretches(lines: list[dict]) -> list[tuple[int, int, str]]:
    """(first, last, label) of every run of consecutive epochs of one lap and module."""
    out: list[tuple[int, int, str]] = []
    for i, line in enumerate(lines, start=1):
        label = _epoch_label(line)
        if out and out[-1][2] == label:
            out[-1] = (out[-1][0], i, label)
        else:
            out.append((i, i, label))
    return out


def _plot_epochs(ax, lines: list[dict]) -> None:
    x = list(range(1, len(lines) + 1))
    ax.step(x, [ln["peak_rss_mib"] for ln in lines], where="mid", label="peak RSS so far")
    ax.plot(x, [ln["rss_mib"] for ln in lines], "o", ms=3, label="RSS at epoch end")
    for n, (first, last, label) in enumerate(epoch_stretches(lines)):
        ax.axvspan(first - 0.5, last + 0.5, color="grey", alpha=0.12 if n % 2 else 0.04)
        ax.text((first + last) / 2, 0.5, label, ha="center", va="center", fontsize=7,
                rotation=90, transform=ax.get_xaxis_transform(), color="dimgrey")
    ax.set(xlabel="logged epoch", ylabel="MiB", title="memory per epoch (log.jsonl)",
           xticks=x if len(x) <= 20 else ax.get_xticks())
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)


def _plot_phases(ax, phases: dict) -> None:
    names = sorted(k for k in phases if k.startswith("module_")) or sorted(phases)
    ax.barh(names, [phases[n]["peak_rss_mib"] for n in names], color="tab:green")
    ax.invert_yaxis()
    ax.set(xlabel="peak RSS (MiB)", title="peak per phase (metrics.json)")
    ax.tick_params(axis="y", labelsize=7)
    ax.grid(axis="x", alpha=0.3)


def plot_memory(run_dir: Path, path: Path) -> Path:
    """Memory of a run: RSS and peak RSS at every logged epoch (bands per lap and module),
    and, once the run has finished, the peak RSS of every phase (train, eval, cache write,
    per module) from metrics.json.

    Args:
        run_dir: the run directory (running or finished).
        path: the PNG to write (atomically).

    Returns:
        The path written.

    Raises:
        UserError: no logged epoch yet, or matplotlib missing.
    """
    lines, phases = memory_records(run_dir)
    plt = pyplot()
    panels = 2 if phases else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 3.8), squeeze=False)
    _plot_epochs(axes[0][0], lines)
    if phases:
        _plot_phases(axes[0][1], phases)
    fig.tight_layout()
    return _save(fig, path)
