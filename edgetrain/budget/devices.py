"""Device profiles (`devices/*.toml`) and memory sizes.

What this file holds: `DeviceProfile`, reading and validating the profile files
(`read_profile`, `load_profile`, `list_profiles`, `profile_names`, `PROFILE_FIELDS`) and where
they are found (`DEVICES_DIR`, `user_devices_dir`, `profile_roots`, `find_profiles`). Sizes and
their units are `edgetrain.units`.

Two places hold profiles, searched in this order:
- the user's directory (`user_devices_dir`): `$EDGETRAIN_DEVICES_DIR`, else
  `$XDG_CONFIG_HOME/edgetrain/devices`, else `~/.config/edgetrain/devices`. `edgetrain devices
  calibrate` writes there; a profile there with a shipped profile's name wins.
- the shipped profiles (`DEVICES_DIR`): the repository's top-level `devices/`, installed inside
  the package as `edgetrain/devices/` (setup.py maps it), so a wheel finds them too.

The planner that searches for a configuration fitting a profile's budget is
`edgetrain.budget.planner`; enforcing the budget during training is `edgetrain.budget.guard`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
import os
from pathlib import Path
import re
from typing import Mapping, NamedTuple, Sequence

from edgetrain.config import CACHE_DTYPES
from edgetrain.errors import UserError
from edgetrain.units import MIB


def _shipped_dir() -> Path:
    """`edgetrain/devices/` in an installed package, else the checkout's top-level `devices/`."""
    here = Path(__file__).resolve().parents[1]  # the edgetrain package
    installed = here / "devices"
    return installed if installed.is_dir() else here.parent / "devices"


DEVICES_DIR = _shipped_dir()
DEVICES_ENV = "EDGETRAIN_DEVICES_DIR"
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


def user_devices_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where calibrated profiles live: `$EDGETRAIN_DEVICES_DIR`, else
    `$XDG_CONFIG_HOME/edgetrain/devices`, else `~/.config/edgetrain/devices`."""
    env = os.environ if env is None else env
    if env.get(DEVICES_ENV):
        return Path(env[DEVICES_ENV]).expanduser()
    config = env.get("XDG_CONFIG_HOME") or str(Path("~/.config").expanduser())
    return Path(config) / "edgetrain" / "devices"


def profile_roots(root: Path | Sequence[Path] | None = None) -> tuple[Path, ...]:
    """The directories searched, first match wins: `root` when given (one or several),
    else the user's directory then the shipped one."""
    if root is None:
        return (user_devices_dir(), DEVICES_DIR)
    if isinstance(root, (str, os.PathLike)):
        return (Path(root),)
    return tuple(Path(r) for r in root)


class ProfileFile(NamedTuple):
    """Where a profile name resolves: its file, its origin and what it shadows."""

    path: Path
    origin: str  # "user" or "shipped" (or the directory, for any other root)
    shadows: Path | None  # the file of the same name it hides (a user copy of a shipped one)


def _origin(root: Path) -> str:
    if root == DEVICES_DIR:
        return "shipped"
    return "user" if root == user_devices_dir() else str(root)


def find_profiles(root: Path | Sequence[Path] | None = None) -> dict[str, ProfileFile]:
    """Every profile name under the search roots, mapped to the file that wins."""
    found: dict[str, ProfileFile] = {}
    for r in profile_roots(root):
        for path in sorted(r.glob("*.toml")) if r.is_dir() else ():
            if path.stem in found:
                if found[path.stem].shadows is None:
                    found[path.stem] = found[path.stem]._replace(shadows=path)
                continue
            found[path.stem] = ProfileFile(path, _origin(r), None)
    return dict(sorted(found.items()))


def profile_names(root: Path | Sequence[Path] | None = None) -> list[str]:
    """Names of the profiles found (default: the user's directory and the shipped ones)."""
    return list(find_profiles(root))


def load_profile(name: str, root: Path | Sequence[Path] | None = None) -> DeviceProfile:
    """The profile called `name` (the user's copy first, then the shipped one).

    Raises:
        UserError: no such profile, or the file is malformed.
    """
    found = find_profiles(root)
    if not NAME_RE.match(name) or name not in found:
        where = " or ".join(str(r) for r in profile_roots(root))
        known = ", ".join(found) or f"none in {where}"
        raise UserError(f"unknown device profile {name!r}; known profiles: {known}")
    return read_profile(found[name].path)


def list_profiles(root: Path | Sequence[Path] | None = None) -> list[DeviceProfile]:
    """Every profile found, validated (a malformed file raises `UserError`)."""
    return [read_profile(f.path) for f in find_profiles(root).values()]
