"""Device profiles (`devices/*.toml`) and memory sizes.

What this file holds: `DeviceProfile`, reading and validating the profile files
(`read_profile`, `load_profile`, `list_profiles`, `profile_names`, `DEVICES_DIR`,
`PROFILE_FIELDS`). Sizes and their units are `edgetrain.units`.

The planner that searches for a configuration fitting a profile's budget is
`edgetrain.budget.planner`; enforcing the budget during training is `edgetrain.budget.guard`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
import re

from edgetrain.config import CACHE_DTYPES
from edgetrain.errors import UserError
from edgetrain.units import MIB

DEVICES_DIR = Path(__file__).resolve().parents[2] / "devices"
ACCELERATORS = ("none", "cuda")
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9.-]*$")

# field -> accepted types (bool is checked apart: it is a subclass of int)
PROFILE_FIELDS: dict[str, tuple[type, ...]] = {
    "name": (str,), "description": (str,), "total_memory_mib": (int,), "reserved_mib": (int,),
    "shared_cpu_gpu_memory": (bool,), "accelerator": (str,), "accelerator_name": (str,),
    "storage": (str,), "storage_read_mib_s": (int, float), "storage_write_mib_s": (int, float),
    "cache_dtype": (str,), "estimated": (list,), "sources": (list,), "notes": (str,),
}
NUMERIC_FIELDS = ("total_memory_mib", "reserved_mib", "storage_read_mib_s", "storage_write_mib_s")
# written by `edgetrain devices calibrate` (edgetrain.budget.calibrate); a profile may omit them.
# `measured` maps each measured field to how, where and when it was measured.
OPTIONAL_FIELDS: dict[str, tuple[type, ...]] = {
    "runtime_baseline_mib": (int, float), "cpu_cores": (int,), "bf16": (bool,), "fp16": (bool,),
    "measured": (dict,),
}


# --------------------------------------------------------------------------- profiles
@dataclass(frozen=True)
class DeviceProfile:
    """One device kind, as read from `devices/NAME.toml` (units in the field names)."""

    name: str
    description: str
    total_memory_mib: int
    reserved_mib: int  # the OS, its services and (Jetson) the CUDA context: not ours to use
    shared_cpu_gpu_memory: bool
    accelerator: str  # "cuda" or "none"
    accelerator_name: str
    storage: str
    storage_read_mib_s: float
    storage_write_mib_s: float
    cache_dtype: str
    estimated: tuple[str, ...]  # fields whose values are estimates, not published figures
    sources: tuple[str, ...]
    notes: str
    runtime_baseline_mib: float | None = None  # RSS after imports and one step (calibrated)
    cpu_cores: int | None = None
    bf16: bool | None = None  # native bfloat16 compute (CPU: oneDNN's check; CUDA: the GPU's)
    fp16: bool | None = None
    measured: dict = field(default_factory=dict)  # field -> how, where and when it was measured

    @property
    def budget_bytes(self) -> int:
        """What the training process may hold resident: total minus reserved."""
        return (self.total_memory_mib - self.reserved_mib) * MIB

    @property
    def train_device(self) -> str:
        return "cuda" if self.accelerator == "cuda" else "cpu"


def _load_toml(path: Path) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"malformed device profile {path}: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read device profile {path}: {e}") from None


def _check_field_types(d: dict, path: Path) -> None:
    missing = [k for k in PROFILE_FIELDS if k not in d]
    unknown = sorted(set(d) - set(PROFILE_FIELDS) - set(OPTIONAL_FIELDS))
    if missing or unknown:
        raise UserError(f"device profile {path}: missing fields {missing or 'none'}, "
                        f"unknown fields {unknown or 'none'}")
    for key, types in {**PROFILE_FIELDS, **OPTIONAL_FIELDS}.items():
        if key not in d:
            continue
        v = d[key]
        if (isinstance(v, bool) and bool not in types) or not isinstance(v, types):
            raise UserError(f"device profile {path}: {key} must be "
                            f"{' or '.join(t.__name__ for t in types)} (got {v!r})")
    for key in ("estimated", "sources"):
        if not all(isinstance(s, str) for s in d[key]):
            raise UserError(f"device profile {path}: {key} must be a list of strings")


def _check_field_values(d: dict, path: Path) -> None:
    def bad(msg: str) -> UserError:
        return UserError(f"device profile {path}: {msg}")
    if d["name"] != path.stem:
        raise bad(f"name {d['name']!r} must equal the file name {path.stem!r}")
    if any(d[k] <= 0 for k in NUMERIC_FIELDS):
        raise bad(f"{', '.join(NUMERIC_FIELDS)} must all be > 0")
    if d["reserved_mib"] >= d["total_memory_mib"]:
        raise bad("reserved_mib must be smaller than total_memory_mib")
    if d["accelerator"] not in ACCELERATORS:
        raise bad(f"accelerator must be one of {', '.join(ACCELERATORS)}")
    if d["cache_dtype"] not in CACHE_DTYPES:
        raise bad(f"cache_dtype must be one of {', '.join(CACHE_DTYPES)}")
    if not set(d["estimated"]) <= set(NUMERIC_FIELDS):
        raise bad(f"estimated may name only {', '.join(NUMERIC_FIELDS)}")
    if not all(s.startswith("https://") for s in d["sources"]):
        raise bad("sources must be https:// addresses")
    measured = d.get("measured", {})
    if not set(measured) <= set(d) or not all(isinstance(v, str) for v in measured.values()):
        raise bad("measured must map fields of the profile to how they were measured")
    if set(measured) & set(d["estimated"]):
        raise bad(f"{', '.join(sorted(set(measured) & set(d['estimated'])))} cannot be both "
                  "estimated and measured")


def read_profile(path: Path) -> DeviceProfile:
    """Read and validate one profile file.

    Raises:
        UserError: unreadable or malformed TOML, a missing, unknown or ill-typed field.
    """
    path = Path(path)
    d = _load_toml(path)
    _check_field_types(d, path)
    _check_field_values(d, path)
    d["estimated"], d["sources"] = tuple(d["estimated"]), tuple(d["sources"])
    return DeviceProfile(**d)


def profile_names(root: Path | None = None) -> list[str]:
    """Names of the profiles in `root` (default: the repository's `devices/`)."""
    root = Path(root or DEVICES_DIR)
    return sorted(p.stem for p in root.glob("*.toml"))


def load_profile(name: str, root: Path | None = None) -> DeviceProfile:
    """The profile called `name`.

    Raises:
        UserError: no such profile, or the file is malformed.
    """
    root = Path(root or DEVICES_DIR)
    path = root / f"{name}.toml"
    if not NAME_RE.match(name) or not path.is_file():
        known = ", ".join(profile_names(root)) or f"none in {root}"
        raise UserError(f"unknown device profile {name!r}; known profiles: {known}")
    return read_profile(path)


def list_profiles(root: Path | None = None) -> list[DeviceProfile]:
    """Every profile in `root`, validated (a malformed file raises `UserError`)."""
    return [load_profile(n, root) for n in profile_names(root)]
