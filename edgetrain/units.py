"""Memory sizes: the units (`MIB`, `GIB`), parsing ("1.5GiB" -> bytes) and printing.

Pure Python (no torch), so the CLI can parse a budget without importing the runtime.
"""
from __future__ import annotations

import re

from edgetrain.errors import UserError

MIB = 1024 * 1024
GIB = 1024 * MIB


_UNITS = {"": 1, "b": 1, "k": 1024, "kib": 1024, "kb": 1000, "m": MIB, "mib": MIB, "mb": 10**6,
          "g": GIB, "gib": GIB, "gb": 10**9, "t": 1024 * GIB, "tib": 1024 * GIB, "tb": 10**12}


def parse_size(text: str) -> int:
    """'1.5GiB' -> bytes. KiB/MiB/GiB and bare K/M/G are binary, KB/MB/GB decimal.

    Raises:
        UserError: not a positive size.
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS or float(m.group(1)) <= 0:
        raise UserError(f"--memory-budget must be a positive size such as 1.5GiB or 800MB "
                        f"(got {text!r})")
    return int(float(m.group(1)) * _UNITS[unit])


def fmt_bytes(n: float) -> str:
    """Bytes as a short human string (binary units)."""
    for unit, size in (("GiB", GIB), ("MiB", MIB), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"

