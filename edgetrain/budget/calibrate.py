"""`edgetrain devices calibrate NAME`: measure this device and write `devices/NAME.toml`.

Run on the device itself. What is measured (each figure's method, host and date go to the
profile's `measured` table, and a measured field leaves `estimated`):
- the runtime baseline: RSS of a fresh Python after importing torch and edgetrain and one
  tiny training step (`edgetrain.measure.runtime_rss_bytes`);
- storage write and read MiB/s in the cache directory: one file written in 4 MiB blocks and
  fsync'd, its pages dropped from the page cache (`posix_fadvise(DONTNEED)`), read back;
- bf16 / fp16 compute: bf16 by `edgetrain.method.precision.detect_bf16` (the CPU's flags in
  `/proc/cpuinfo` and oneDNN's check, or the GPU's compute capability), fp16 by the flags;
- cores available to this process; total and available memory (`psutil`, the cgroup limit
  when lower). `reserved_mib` = total - available, as devices/README.md asks, on an idle board.

An existing profile keeps every figure that was not measured (its published sizes, sources,
notes); calibrating refuses when this machine's memory differs from the profile's by more
than `TOTAL_TOLERANCE` (not that device). No TOML writer is installed here (tomllib only
reads), so `profile_toml` writes the flat format by hand; `read_profile` checks the result.

What it is not: the profile format and its validation (`edgetrain.budget.devices`).
"""
from __future__ import annotations

import os
from pathlib import Path
import platform
import socket
import time

import torch

from edgetrain.budget import devices
from edgetrain.budget.devices import (NAME_RE, OPTIONAL_FIELDS, PROFILE_FIELDS, DeviceProfile,
                                      read_profile)
from edgetrain.errors import UserError
from edgetrain.measure import memory_mib, runtime_rss_bytes
from edgetrain.method.precision import cpu_flags, detect_bf16, read_cpuinfo
from edgetrain.options.file import toml_value
from edgetrain.units import MIB

TOTAL_TOLERANCE = 0.125
BLOCK = 4 * MIB


def _stamp(what: str) -> str:
    return (f"edgetrain devices calibrate on {socket.gethostname()} ({platform.machine()}), "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {what}")


def storage_speed(directory: Path, size_mib: int = 256) -> tuple[float, float]:
    """(write, read) MiB/s of one `size_mib` file in `directory`, written in 4 MiB blocks
    with fsync, dropped from the page cache, read back; the file is removed."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f".edgetrain-calibrate-{os.getpid()}"
        block = os.urandom(BLOCK)
        n = max(1, size_mib * MIB // BLOCK)
        t0 = time.perf_counter()
        with open(path, "wb") as f:
            for _ in range(n):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        write_s = time.perf_counter() - t0
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            t0 = time.perf_counter()
            while os.read(fd, BLOCK):
                pass
            read_s = time.perf_counter() - t0
        finally:
            os.close(fd)
            path.unlink(missing_ok=True)
    except OSError as e:
        raise UserError(f"cannot measure storage in {directory}: {e.strerror or e}") from None
    mib = n * BLOCK / MIB
    return mib / max(write_s, 1e-9), mib / max(read_s, 1e-9)


def half_support() -> dict:
    """{"bf16": bool, "fp16": bool, "how": str}: native half-precision compute here (bf16:
    `edgetrain.method.precision.detect_bf16`, the check `--precision auto` uses)."""
    if torch.cuda.is_available():
        bf16 = detect_bf16(torch.device("cuda"))
        return {"bf16": bf16.native, "fp16": True,
                "how": f"torch.cuda on {torch.cuda.get_device_name(0)}: {bf16.reason}"}
    bf16 = detect_bf16(torch.device("cpu"))
    flags = cpu_flags(read_cpuinfo() or "")
    return {"bf16": bf16.native,
            "fp16": bool(flags & {"avx512_fp16", "amx_fp16", "fphp", "asimdhp"}),
            "how": f"bf16: {bf16.reason}; fp16: CPU flags in /proc/cpuinfo (avx512_fp16/"
                   "amx_fp16/fphp/asimdhp)"}


def measure_device(cache_dir: Path, storage_mib: int = 256) -> tuple[dict, dict]:
    """(values, how each was measured) of this device."""
    rt = runtime_rss_bytes()
    write, read = storage_speed(cache_dir, storage_mib)
    half = half_support()
    total, avail = memory_mib()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    values = {"total_memory_mib": total, "reserved_mib": max(1, total - avail),
              "runtime_baseline_mib": round(rt["warm_rss_bytes"] / MIB, 1),
              "storage_write_mib_s": round(write, 1), "storage_read_mib_s": round(read, 1),
              "bf16": half["bf16"], "fp16": half["fp16"], "cpu_cores": int(cores)}
    how = {"total_memory_mib": _stamp("psutil total (cgroup limit when lower)"),
           "reserved_mib": _stamp(f"total - available ({avail} MiB available at calibration)"),
           "runtime_baseline_mib": _stamp("peak RSS of a fresh Python after imports and one "
                                          f"tiny step ({rt['import_rss_bytes'] // MIB} MiB after imports)"),
           "storage_write_mib_s": _stamp(f"{storage_mib} MiB in 4 MiB blocks + fsync in {cache_dir}"),
           "storage_read_mib_s": _stamp(f"the same file read back after posix_fadvise(DONTNEED) "
                                        f"in {cache_dir}"),
           "bf16": _stamp(half["how"]), "fp16": _stamp(half["how"]),
           "cpu_cores": _stamp("CPUs this process may run on (sched_getaffinity)")}
    return values, how


def _new_profile(name: str) -> dict:
    cuda = torch.cuda.is_available()
    return {"name": name, "description": f"{platform.node()} ({platform.machine()}), calibrated",
            "total_memory_mib": 0, "reserved_mib": 0, "shared_cpu_gpu_memory": False,
            "accelerator": "cuda" if cuda else "none",
            "accelerator_name": torch.cuda.get_device_name(0) if cuda else "none",
            "storage": "the cache directory's disk", "storage_read_mib_s": 0,
            "storage_write_mib_s": 0, "cache_dtype": "float16", "estimated": [],
            "sources": [], "notes": "Written by `edgetrain devices calibrate`; every figure is "
                                    "measured on this device (see the measured table)."}


def _existing(name: str, root: Path | None) -> dict | None:
    """The profile `name` calibration starts from: the target directory's own copy, else (for
    the user's directory) the shipped profile of that name."""
    found = devices.find_profiles(root if root is not None else None)
    if name not in found:
        return None
    p = read_profile(found[name].path)
    return {k: getattr(p, k) for k in {**PROFILE_FIELDS, **OPTIONAL_FIELDS}}


def calibrate(name: str, cache_dir: Path, root: Path | None = None,
              storage_mib: int = 256) -> tuple[DeviceProfile, Path]:
    """Measure this device and write or update `root/NAME.toml` (default root: the user's
    profiles directory, `devices.user_devices_dir()`; a shipped profile of that name is the
    starting point, and the written copy overrides it).

    Returns:
        (the profile as read back, its path).
    Raises:
        UserError: a bad name, an unusable cache directory, or an existing profile whose
            memory is not this machine's (not that device).
    """
    if not NAME_RE.match(name):
        raise UserError(f"profile name {name!r} must be lower-case letters, digits, '.' and '-'")
    path = Path(root or devices.user_devices_dir()) / f"{name}.toml"
    old = _existing(name, root)
    values, how = measure_device(Path(cache_dir), storage_mib)
    d = old or _new_profile(name)
    if old is not None:
        off = abs(values["total_memory_mib"] - old["total_memory_mib"]) / old["total_memory_mib"]
        if off > TOTAL_TOLERANCE:
            raise UserError(f"this machine has {values['total_memory_mib']} MiB, profile {name} "
                            f"{old['total_memory_mib']} MiB: calibrate {name} on that device, "
                            "or give a new name")
        del values["total_memory_mib"], how["total_memory_mib"]  # the published size stays
    d.update(values)
    d["estimated"] = [f for f in d["estimated"] if f not in values]
    d["measured"] = {**(d.get("measured") or {}), **how}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(profile_toml(d), encoding="utf-8")
    os.replace(tmp, path)
    return read_profile(path), path


def profile_toml(d: dict) -> str:
    """A profile dict as TOML: the fields in `PROFILE_FIELDS` order, then the calibrated
    ones, then the `[measured]` table."""
    keys = [k for k in {**PROFILE_FIELDS, **OPTIONAL_FIELDS} if k != "measured" and
            d.get(k) is not None]
    lines = [f"# Device profile {d['name']} (edgetrain devices calibrate keeps the source of "
             "every measured figure in [measured])."]
    lines += [f"{k} = {toml_value(d[k])}" for k in keys]
    lines += ["", "[measured]"] + [f"{k} = {toml_value(v)}"
                                   for k, v in sorted((d.get("measured") or {}).items())]
    return "\n".join(lines) + "\n"
