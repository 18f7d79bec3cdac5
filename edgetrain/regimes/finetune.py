"""Fine-tuning a built run: `--init` weights loaded into its network and heads, and the modules
outside `--train-modules` frozen.

`apply_init` maps the source (`edgetrain.models.weights`) onto the run's network; heads load
only from an edgetrain run with the same K, block bounds and classes, and are built new
otherwise (the run says so). `freeze_outside` freezes the stem and blocks of every module
outside the range (`edgetrain.method.freeze`), and the heads of those modules when they were
loaded (a new head of a frozen module is trained on its frozen features, so every depth stays
a classifier). This file does not train and writes nothing.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from edgetrain.config import RunConfig
from edgetrain.errors import UserError
from edgetrain.method.freeze import freeze
from edgetrain.method.stage import Stage, init_orthogonal
from edgetrain.models.base import Network
from edgetrain.models.weights import (InitSource, check_torchvision_input, load_into,
                                      read_source)

log = logging.getLogger("edgetrain")


def heads_match(src: InitSource, bounds: list[int], class_names: list[str]) -> bool:
    """An edgetrain run's heads load when its K, block bounds and classes all match (the
    same names in the same order, not only the same count: a head trained on other classes
    of the same count would classify into the wrong names)."""
    lay = src.run_layout
    return lay is not None and lay["bounds"] == bounds and \
        lay.get("class_names") == list(class_names)


def check_source_shape(src: InitSource, input_shape, source_data: Callable[[Path], tuple]
                       ) -> None:
    """A run source must have been trained on inputs of this run's shape."""
    if src.kind != "run":
        return
    theirs, names = source_data(Path(src.path))
    src.run_layout["class_names"] = list(names)
    theirs = tuple(theirs)
    if theirs != tuple(input_shape):
        raise UserError(f"--init {src.path}: that run was trained on "
                        f"{'x'.join(map(str, theirs))} inputs, this one has "
                        f"{'x'.join(map(str, input_shape))}")


def apply_init(cfg: RunConfig, net: Network, stages: list[Stage], bounds: list[int],
               input_shape, class_names: list[str], source_data: Callable[[Path], tuple]
               ) -> tuple[dict, bool]:
    """Load `cfg.init` into `net` (and the heads when they fit); `--init-gain` then applies
    only to heads built new.

    Args:
        source_data: (input shape, class names) a run directory was trained on.
    Returns:
        (metrics.json's `init` record, whether the heads were loaded).
    Raises:
        UserError: every bad source (see `edgetrain.models.weights`), a source that does not
            fit the network (strict), torchvision weights on data they do not fit, a run of
            another input shape.
    """
    src = read_source(cfg.init)
    check_torchvision_input(src, cfg.model, input_shape)
    check_source_shape(src, input_shape, source_data)
    body = {k: v for k, v in src.weights.items() if not k.startswith("heads.")}
    report = load_into(net, body, cfg.init_strict, src.path)
    loaded_heads = heads_match(src, bounds, class_names)
    for k, st in enumerate(stages):
        if loaded_heads:
            prefix = f"heads.{k}."
            head = {n[len(prefix):]: v for n, v in src.weights.items() if n.startswith(prefix)}
            load_into(st.head, head, True, src.path)
        elif cfg.init_gain is not None:
            init_orthogonal(st.head, cfg.init_gain)
    if src.skipped:
        log.warning("--init %s: the source's classifier (%s) is not loaded, by design: the "
                    "auxiliary heads replace it", src.path, ", ".join(src.skipped))
    if not loaded_heads:
        log.warning("--init %s: heads built new for %d classes (the source's heads do not "
                    "fit this run's modules or classes)", src.path, len(class_names))
    _warn_partial(src.path, report)
    return {"path": str(Path(src.path).resolve()), "sha256": src.sha256, "kind": src.kind,
            "heads": "loaded" if loaded_heads else "new", "skipped": src.skipped, **report}, \
        loaded_heads


def _warn_partial(path: str, report: dict) -> None:
    rest = report["missing"] + report["unexpected"] + report["mis_shaped"]
    if rest:
        log.warning("--init %s (--no-init-strict): %d keys loaded, %d not: %s", path,
                    report["loaded"], len(rest), ", ".join(rest[:3]))


def frozen_modules(cfg: RunConfig) -> list[int]:
    """0-based indices of the modules outside `--train-modules` (none when unset)."""
    if cfg.train_modules is None:
        return []
    a, b = cfg.train_modules
    return [k for k in range(cfg.modules) if not a - 1 <= k <= b - 1]


def freeze_outside(cfg: RunConfig, net: Network, stages: list[Stage], module_bounds: list[int],
                   loaded_heads: bool) -> None:
    """Freeze the stem and blocks of every module outside `--train-modules`, and their heads
    when loaded. `module_bounds` is the K-module split (also for e2e, whose one stage is
    the whole network)."""
    for k in frozen_modules(cfg):
        if k == 0:
            freeze(net.stem)
        for blk in net.blocks[module_bounds[k]:module_bounds[k + 1]]:
            freeze(blk)
        if loaded_heads and len(stages) == len(module_bounds) - 1:
            freeze(stages[k].head)
