"""The grouped TOML file of `edgetrain train --config FILE` and `--print-config`.

One `[section]` per RunConfig group (`edgetrain.config.GROUPS`), a key per field, as
`--print-config` writes it: every field, its one-line doc as a comment above it, unset ones
commented out. Reading uses tomllib (tomli before 3.11). Writing is by hand: the schema is
fixed (scalars and flat lists), and a writer of our own can put each field's doc above it,
which tomli-w cannot. Command-line options override the file (`merge`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from edgetrain.config import GROUPS, default_of, field_meta, field_type
from edgetrain.errors import UserError
from edgetrain.options.command import train_fields


def _toml():
    try:
        import tomllib  # Python >= 3.11
    except ModuleNotFoundError:
        import tomli as tomllib
    return tomllib


def _recipes_dir() -> Path:
    """`edgetrain/recipes/` in an installed package, else the checkout's top-level `recipes/`."""
    here = Path(__file__).resolve().parents[1]  # the edgetrain package
    installed = here / "recipes"
    return installed if installed.is_dir() else here.parent / "recipes"


RECIPES_DIR = _recipes_dir()


def recipe_names() -> list[str]:
    """The shipped recipes (`--config NAME`)."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))


def config_path(spec: str) -> Path:
    """`--config SPEC`: a TOML file, or the name of a shipped recipe (`quickstart`).

    Raises:
        UserError: neither a file nor a shipped recipe's name.
    """
    path = Path(spec)
    if path.is_file() or "/" in spec or spec.endswith(".toml"):
        return path  # a missing file is reported by read_config_file
    if spec in recipe_names():
        return RECIPES_DIR / f"{spec}.toml"
    raise UserError(f"--config {spec}: no such file, and no shipped recipe of that name "
                    f"(recipes: {', '.join(recipe_names()) or 'none'})")


def read_config_file(path: Path, names: list[str] | None = None) -> dict:
    """The fields a TOML file sets, by name, in the file's order.

    Args:
        path: the file.
        names: the fields it may set (default: every field an option sets).
    Raises:
        UserError: unreadable or not TOML, or a key that is no field of its section (one line
            naming the key and the file).
    """
    path, names = Path(path), names or train_fields()
    tomllib = _toml()
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"cannot read --config {path}: {e.strerror or e}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid TOML: {e}") from None
    values = {}
    for group, table in doc.items():
        if group not in GROUPS or not isinstance(table, dict):
            raise UserError(f"unknown key {group!r} in {path}: the sections are "
                            f"{', '.join(GROUPS)}")
        for key, value in table.items():
            if key not in names or field_meta(key)["group"] != group:
                raise UserError(f"unknown key {group}.{key} in {path}")
            values[key] = value
    return values


def merge(options: dict, given: set[str], file_values: dict) -> dict:
    """The requested values: the file's, overridden by the options given on the command line;
    the options' defaults for the rest."""
    return {**options, **{k: v for k, v in file_values.items() if k not in given}}


def build(make: Callable[[dict], object], values: dict, file_values: dict, path: Path | None):
    """`make(values)`; when it fails because of the file, the error names its key and file.

    `file_values` are the file's values that `values` took (none the command line overrode).

    The culprit is the first key of the file whose value, added to the command line's and the
    defaults, makes `make` fail (one line: `run.toml: optimisation.lr: --lr must be > 0`).
    """
    try:
        return make(values)
    except UserError as e:
        if not file_values:
            raise
        base = {**values, **{k: default_of(k) for k in file_values}}
        for key in file_values:
            base[key] = values[key]
            try:
                make(base)
            except UserError:
                raise UserError(f"{path}: {field_meta(key)['group']}.{key}: {e}") from None
        raise


def toml_value(v) -> str:
    """A TOML value: bool, int, float, string, or a flat list of them."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(str(v), ensure_ascii=False)  # a JSON string is a TOML basic string


def write_config_file(values: dict, header: str = "") -> str:
    """TOML text of `values` (fields by name) in the grouped layout, each key under its doc;
    a field set to None is written commented out (unset)."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    for group in GROUPS:
        names = [n for n in values if field_meta(n)["group"] == group]
        if not names:
            continue
        lines += ["", f"[{group}]"]
        for name in names:
            v = values[name]
            lines.append(f"# {field_meta(name)['doc']}")
            lines.append(f"# {name} = (unset)" if v is None else f"{name} = {toml_value(v)}")
    return "\n".join(lines).lstrip("\n") + "\n"


def printable(values: dict, parsed) -> dict:
    """The requested values as `--print-config` writes them: as given (nothing resolved for
    this machine: `auto` stays `auto`, an unset cache dtype stays unset), the tuple fields
    as lists parsed from their command-line text (`3x32x32` -> [3, 32, 32])."""
    out = {}
    for name in train_fields():
        v = values.get(name, default_of(name))
        if field_type(name)[0] is tuple and v is not None:
            v = list(getattr(parsed, name))
        out[name] = v
    return out
