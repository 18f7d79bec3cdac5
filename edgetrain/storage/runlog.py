"""The headless progress record of a run: `RUN_DIR/log.jsonl`, one JSON line per epoch.

What this file holds: `RunLog` (appends the lines), `epoch_logger` (the `on_epoch_end`
callback the regimes hand to `edgetrain.method.loop.fit`), `read_log`, and `run_status` /
`format_status`, which say where a running or stopped run stands from log.jsonl,
state.json, metrics.json and the lock file.

A line is appended after the epoch's checkpoint is written, so every logged epoch survives a
kill and a resumed run continues the same file without repeating a line. What it is not:
metrics.json (the finished run's figures) or state.json (the resume cursor); nothing reads
log.jsonl to train.

A line: time (UTC), lap, module (an int; a list of ints for parallel, whose line covers
every module), epoch (1-based within the module's epochs, all laps together), train_loss,
transport, train_acc (per module, like `module`), samples, seconds, samples_per_s,
rss_mib and peak_rss_mib (this process), done and total (epochs of all modules), eta_s.
The ETA is the mean wall time per logged epoch in this process (cache writes and
checkpoints included) times the epochs left: module-wise runs whose modules differ in cost
see it drift.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
import time
from typing import Callable

from edgetrain.errors import UserError
from edgetrain.measure import current_rss_bytes, peak_rss_bytes
from edgetrain.units import MIB

LOG = "log.jsonl"


class RunLog:
    """Appends one JSON line per trained epoch to `path` (see the module docstring).

    Args:
        path: RUN_DIR/log.jsonl (appended to: a resumed run continues it).
        total: epochs of all modules the run trains (e2e/parallel: its epochs).
        samples_per_epoch: training samples one epoch visits.
    """

    def __init__(self, path: Path, total: int, samples_per_epoch: int):
        self.path, self.total, self.samples = Path(path), int(total), int(samples_per_epoch)
        self.done_before = len(read_log(self.path)) if self.path.is_file() else 0
        self.done = 0
        self._t0 = self._mark = time.perf_counter()

    def mark(self) -> None:
        """Start timing an epoch now."""
        self._mark = time.perf_counter()

    def since_mark(self) -> float:
        """Seconds since the last `mark` (or logged epoch)."""
        return time.perf_counter() - self._mark

    def epoch(self, *, lap: int, module, epoch: int, summary: list[dict],
              seconds: float | None = None) -> dict:
        """Append the line of one finished epoch; returns it.

        Args:
            lap: 0-based lap.
            module: the 0-based module index, or a list of them (one summary each).
            epoch: 0-based epoch index within the module (all laps together).
            summary: per-module dicts with train_loss, transport, train_acc (`train_epoch`).
            seconds: the epoch's training time (default: since the last `mark`).
        """
        now = time.perf_counter()
        seconds = now - self._mark if seconds is None else seconds
        self.done += 1
        done = self.done_before + self.done
        per = (now - self._t0) / self.done
        one = not isinstance(module, list)
        pick = (lambda k: summary[0][k]) if one else (lambda k: [s[k] for s in summary])
        rec = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "lap": lap,
               "module": module, "epoch": epoch + 1, "train_loss": pick("train_loss"),
               "transport": pick("transport"), "train_acc": pick("train_acc"),
               "samples": self.samples, "seconds": round(seconds, 3),
               "samples_per_s": round(self.samples / seconds, 2) if seconds > 0 else None,
               "rss_mib": round(current_rss_bytes() / MIB, 1),
               "peak_rss_mib": round(peak_rss_bytes() / MIB, 1),
               "done": done, "total": self.total,
               "eta_s": round(per * max(0, self.total - done), 1)}
        with open(self.path, "a", encoding="utf-8") as f:  # one write of one line
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._mark = time.perf_counter()
        return rec


def epoch_logger(log: RunLog | None, module, lap: int = 0,
                 then: Callable[[int, list[dict]], None] | None = None):
    """An `on_epoch_end(epoch, summary)` for `train_epochs`: first `then` (a checkpoint), then the
    log line, timed from this call to the epoch's end. Without a log it is `then` itself."""
    if log is None:
        return then
    log.mark()

    def on_epoch_end(e: int, summary: list[dict]) -> None:
        seconds = log.since_mark()  # the epoch's training, without the checkpoint after it
        if then is not None:
            then(e, summary)
        log.epoch(lap=lap, module=module, epoch=e, summary=summary, seconds=seconds)
    return on_epoch_end


def read_log(path: Path) -> list[dict]:
    """The lines of a log.jsonl (a torn last line, from a kill mid-write, is skipped)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


# --------------------------------------------------------------------------- status
def _read_json(path: Path) -> dict | None:
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return d if isinstance(d, dict) else None


def _lock_pid(run_dir: Path) -> int | None:
    """The PID in RUN_DIR/lock when that process is alive, else None."""
    try:
        pid = int((run_dir / "lock").read_text().split()[0])
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError, IndexError):
        return None


def run_status(run_dir: Path) -> dict:
    """Where a run stands: its state (finished, running, stopped), the last logged epoch,
    the resume cursor and, when finished, the best depth.

    Raises:
        UserError: no run in `run_dir` (no config.json).
    """
    run_dir = Path(run_dir)
    cfg = _read_json(run_dir / "config.json")
    if cfg is None:
        raise UserError(f"no run in {run_dir} (no readable config.json)")
    state, metrics = _read_json(run_dir / "state.json"), _read_json(run_dir / "metrics.json")
    lines = read_log(run_dir / LOG) if (run_dir / LOG).is_file() else []
    pid = _lock_pid(run_dir)
    finished = metrics is not None and (state is None or bool(state.get("finished")))
    where = "finished" if finished else ("running" if pid else "stopped or running")
    return {"run_dir": str(run_dir), "state": where, "pid": pid, "config": cfg,
            "cursor": (state or {}).get("cursor"), "last": lines[-1] if lines else None,
            "epochs_logged": len(lines), "metrics": metrics,
            "age_s": time.time() - (run_dir / LOG).stat().st_mtime if lines else None}


def format_status(s: dict) -> str:
    """`run_status` as the lines `edgetrain status` prints."""
    c = s["config"]
    laps = c.get("laps", 1) if c.get("mode") == "multilap" else 1
    k = 1 if c.get("mode") == "e2e" else c.get("modules")
    out = [f"run        {s['run_dir']}: {c.get('mode')} {c.get('model')} on {c.get('data')}, "
           f"K={k}, {c.get('epochs')} epochs" + (f", {laps} laps" if laps > 1 else ""),
           f"state      {s['state']}" + (f" (pid {s['pid']})" if s["pid"] else "")]
    last = s["last"]
    if last is not None:
        mod = last["module"]
        mods = ", ".join(str(m + 1) for m in mod) if isinstance(mod, list) else str(mod + 1)
        loss, acc = last["train_loss"], last["train_acc"]
        loss = ", ".join(f"{v:.4f}" for v in loss) if isinstance(loss, list) else f"{loss:.4f}"
        acc = ", ".join(f"{v:.3f}" for v in acc) if isinstance(acc, list) else f"{acc:.3f}"
        out += [f"last epoch lap {last['lap'] + 1}, module {mods}, epoch {last['epoch']} "
                f"({s['age_s']:.0f} s ago): train loss {loss}, train acc {acc}",
                f"progress   {last['done']}/{last['total']} epochs, {last['samples_per_s']} "
                f"samples/s, RSS {last['rss_mib']} MiB (peak {last['peak_rss_mib']} MiB)"
                + (f", ETA {last['eta_s']:.0f} s" if s["state"] != "finished" else "")]
    else:
        out.append("last epoch none logged yet")
    if s["cursor"] and s["state"] != "finished":
        cur = s["cursor"]
        out.append(f"resume at  lap {cur['lap'] + 1}, module {cur['module'] + 1}, epoch "
                   f"{cur['epoch'] + 1} (`edgetrain train --resume {s['run_dir']}`)")
    m = s["metrics"]
    if s["state"] == "finished" and m:
        out.append(f"result     best depth {m.get('best_depth')}: val {m.get('best_val_acc'):.4f}, "
                   f"test {m.get('best_test_acc'):.4f}")
    return "\n".join(out)
