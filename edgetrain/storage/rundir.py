"""The run directory: its layout, the resume state, RNG states, the config hash, metrics.json.

This docstring is the contract between commands (`train` writes it; `eval`, `export`,
`predict`, `status` and `train --resume` read it), rendered as the manual's "Run directory"
page; `tests/docs/test_docs.py` checks that every file a finished run holds is named here.

| path | written by | what it holds |
|---|---|---|
| `config.json` | `train`, before the first step | the resolved configuration (every `RunConfig` field; what `--fit` chose, with its prediction under `extra.fit`) |
| `preprocessing.json` | `train`, before the first step | input shape, channels, resize policy, normalisation (mean, std), class names: all `export` and `predict` need besides the weights |
| `metrics.json` | `train`, at the end; `eval` adds `test_per_class` | per module: val / test accuracy and loss, transport, tau (null without the penalty), epochs, steps, history (every epoch's train loss, accuracy, transport); `best_depth`, `best_val_acc`, `best_test_acc`, `last_test_acc`; `memory` (per phase: train, eval, cache_write, per module; its peak RSS, count and wall seconds in this process) and `peak_rss_mib`; `max_resident_modules`; `timings` (`train_s`; `step_s`, the optimizer steps; sequential and multi-lap: `cache_pass_s`, writing the training caches in this process); `init`, `train_modules` and `data` where they apply |
| `modules/NN.safetensors` | `train`, at every epoch boundary | module NN (from 00) with its head; while training also its optimizer, tau and progress state (`edgetrain.storage.modules`) |
| `state.json` | `train`, after the module files of every checkpoint | `STATE`: the resume cursor (lap, module, epoch), RNG states, per-module results, a hash of config.json, the edgetrain version, `finished` |
| `log.jsonl` | `train`, one line per trained epoch | lap, module, epoch, train loss, transport, train accuracy, samples/s, RSS and peak RSS, done / total, ETA (`edgetrain.storage.runlog`) |
| `lock` | the live training process | its PID while it holds the run (`fcntl.flock`; a dead holder's lock is taken over) |
| `cache/` | sequential and multi-lap runs, while training | activation caches (shards and a checksummed manifest); deleted as soon as the next one is complete, none left at the end; elsewhere with `--cache-dir` |
| `prefix-depthK.onnx` | `export` (default name) | the exported prefix of depth K, checked against ONNX Runtime |

Every file is written atomically (temporary file, fsync, rename); weights are safetensors
and records JSON: nothing in a run directory is ever unpickled. A run directory from
another edgetrain version, or whose config.json was changed, is refused by `--resume`.

This file creates and checks run directories and builds their records; it trains nothing.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
import random
import time

import numpy as np
import torch

from edgetrain import __version__
from edgetrain.config import RunConfig
from edgetrain.errors import UserError
from edgetrain.storage.lock import FileLock, lock_run_dir

STATE = "state.json"
# earlier versions whose run directories this one resumes (same state.json and module files)
RESUMES_FROM = ("0.1.0",)


# fields added after run directories of this version were written, with the default that
# means "as before": left out of the hash at that value, so those directories still resume
HASH_OMITS_AT_DEFAULT = {"precision": "fp32", "precision_requested": None, "memory_format": "auto",
                         "compile": False}


def config_hash(cfg: RunConfig) -> str:
    """sha256 of the resolved configuration (canonical JSON), without the fields of
    `HASH_OMITS_AT_DEFAULT` at their default."""
    d = {k: v for k, v in cfg.to_dict().items()
         if not (k in HASH_OMITS_AT_DEFAULT and v == HASH_OMITS_AT_DEFAULT[k])}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def rng_state() -> dict:
    """torch, numpy and python RNG states as JSON."""
    np_state = np.random.get_state()
    return {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "python": json.loads(json.dumps(random.getstate()))}


def set_rng_state(d: dict) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(d["torch"])), dtype=torch.uint8))
    n = d["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    p = d["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def read_state(run_dir: Path) -> dict | None:
    """state.json of a run directory (None if absent).

    Raises:
        UserError: unreadable, from another edgetrain version, or config.json was changed.
    """
    path = Path(run_dir) / STATE
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); cannot resume") from None
    if not isinstance(state, dict) or "cursor" not in state:
        raise UserError(f"{path} is not an edgetrain state file; cannot resume")
    if state.get("edgetrain_version") not in (__version__, *RESUMES_FROM):
        raise UserError(f"{run_dir} was written by edgetrain {state.get('edgetrain_version')}, "
                        f"this is {__version__}; it cannot be resumed")
    return state


def check_config(state: dict, cfg: RunConfig, run_dir: Path) -> None:
    """Refuse to resume when config.json is not the configuration the run started with."""
    if state.get("config_sha256") != config_hash(cfg):
        raise UserError(f"{Path(run_dir) / 'config.json'} differs from the configuration the run "
                        "was started with (hash mismatch); refusing to resume")


def remove_temporaries(out: Path) -> None:
    """Delete temporary files a killed writer left behind (never a completed file)."""
    for p in Path(out).rglob(".*.tmp"):
        p.unlink(missing_ok=True)


def prepare_out_dir(out: Path) -> Path:
    """Create a fresh, writable run directory (refusing to overwrite another run)."""
    out = Path(out)
    if (out / "config.json").exists():
        raise UserError(f"{out} already holds a run; choose another --out (or --resume it)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to --out {out}: {e.strerror or e}") from None
    return out


def claim_out_dir(out: Path) -> FileLock:
    """`prepare_out_dir` under RUN_DIR/lock: returns the held lock (release it when done).

    A directory a live process holds is refused naming its PID (before "already holds a
    run"); the lock is taken before config.json is checked again, so two processes that
    start on one fresh directory cannot both write it.
    """
    out = Path(out)
    lock = lock_run_dir(out) if out.is_dir() else None
    try:
        prepare_out_dir(out)
        if lock is None:
            lock = lock_run_dir(out)
            if (out / "config.json").exists():
                raise UserError(f"{out} already holds a run; choose another --out (or --resume it)")
        return lock
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def best_depth(per_module: list[dict]) -> int:
    """1-based depth with the highest validation accuracy (the shallowest on ties)."""
    accs = [m["val_acc"] for m in per_module]
    return accs.index(max(accs)) + 1


HISTORY_KEYS = ("epoch", "train_loss", "train_acc", "transport")


def module_entry(index: int, record: dict, evals: dict, **extra) -> dict:
    """One module's entry of metrics.json["modules"].

    Args:
        index: the module's 0-based index.
        record: its training record: history (per-epoch dicts), tau, step, blocks
            (`Trainer.record()`, or the summary an out-of-core run keeps in state.json).
        evals: val_acc, val_loss, test_acc, test_loss.
        extra: more keys (a distributed run adds the rank).

    `train_loss` / `transport` are the last epoch's; `history` keeps every epoch's
    `HISTORY_KEYS` (transport: the mean W of the module's residues, measured with the
    penalty off too), the figures a fixed seed reproduces bit for bit (the epoch times are
    in log.jsonl). `tau` is None when the module trained without the transport penalty.
    """
    last = record["history"][-1] if record["history"] else {}
    return {"index": index, **evals, "train_loss": last.get("train_loss"),
            "transport": last.get("transport"), "tau": record["tau"],
            "epochs": len(record["history"]), "steps": record["step"],
            "blocks": record["blocks"], "history": [{k: h[k] for k in HISTORY_KEYS if k in h} for h in record["history"]],
            **extra}


def metrics_record(mode: str, bounds: list[int], modules: list[dict], *, max_resident: int,
                   peak_rss_mib: float, timings: dict, device: str, memory: dict | None = None,
                   precision: str = "fp32", **extra) -> dict:
    """metrics.json: the per-module entries, the best depth (chosen on validation), the
    precision trained in and the figures that measure the machine (peak memory, timings,
    device)."""
    bd = best_depth(modules)
    return {"edgetrain_version": __version__, "mode": mode, "modules": modules,
            "n_modules": len(modules), "bounds": bounds, "best_depth": bd,
            "best_val_acc": modules[bd - 1]["val_acc"],
            "best_test_acc": modules[bd - 1]["test_acc"],
            "last_test_acc": modules[-1]["test_acc"], "max_resident_modules": max_resident,
            "peak_rss_mib": peak_rss_mib, "memory": memory or {}, "timings": timings,
            "device": device, "precision": precision, **extra}


def default_out_dir(cfg: RunConfig) -> Path:
    """runs/DATA-MODEL-MODE-STAMP-PID under the working directory."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    data = Path(cfg.data).name if os.path.isabs(cfg.data) else cfg.data  # a folder: its base name
    return Path("runs") / f"{data}-{cfg.model}-{cfg.mode}-{stamp}-{os.getpid()}"
