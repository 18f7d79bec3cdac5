"""The `edgetrain train` / `plan` options, generated from RunConfig's fields.

Names, types, defaults, choices and help text come from the fields (`edgetrain.config.opt`):
one source. Spellings follow 0.1.0's options (`-K`, `--input`, `--no-transport`), not the
field names. This file imports click and edgetrain.config only: `--help` stays torch-free.
"""
from __future__ import annotations

from typing import Callable

import click

from edgetrain.config import default_of, field_meta, field_names, field_type

# the options of `edgetrain plan`: what it plans around (mode, K, split and batch it chooses)
PLAN_FIELDS = ("model", "data", "input_shape", "data_cache", "image_size", "channels",
               "train_size", "synthetic_size", "width", "depth", "epochs", "laps", "batch_size",
               "optimizer", "head", "prefetch_mib", "precision", "recompute",
               "device_profile", "memory_budget")


def train_fields() -> list[str]:
    """Every field a command-line option sets, in the order of `--help` (grouped)."""
    return [n for n in field_names() if field_meta(n)["cli"]]


def _int_or_none(ctx, param, value):
    return None if value is None else int(value)


def _declarations(name: str) -> tuple[tuple[str, ...], dict]:
    """click's parameter declarations and keyword arguments for field `name`."""
    meta, (base, _) = field_meta(name), field_type(name)
    dashed = name.replace("_", "-")
    if base is bool:
        style = meta["style"] or "pair"
        if style == "off":  # 0.1.0's --no-transport: a flag that turns the field off
            return (f"--no-{dashed}", f"no_{name}"), {"is_flag": True}
        if style == "on":
            return (f"--{dashed}", name), {"is_flag": True}
        return (f"--{dashed}/--no-{dashed}", name), {"default": default_of(name)}
    kw = {"default": default_of(name)}
    if meta["choices"]:
        kw["type"] = click.Choice(meta["choices"])
    elif base in (int, float) and name != "memory_budget":  # a budget is a size: 1.5GiB
        kw["type"] = base
    if name == "channels":
        kw["callback"] = _int_or_none
    return (*(meta["flags"] or (f"--{dashed}",)), name), kw


def field_option(name: str, **override) -> Callable:
    """The click option of field `name`; `override` replaces its keyword arguments (plan's
    own help or default)."""
    decls, kw = _declarations(name)
    meta = field_meta(name)
    kw = {"help": meta["doc"], "show_default": meta["shown"] or kw.get("default") is not None,
          **kw, **override}
    return click.option(*decls, **kw)


def field_options(names, overrides: dict | None = None) -> Callable:
    """A decorator adding the options of fields `names` (in that order in `--help`)."""
    overrides = overrides or {}

    def deco(fn):
        for name in reversed(list(names)):
            fn = field_option(name, **overrides.get(name, {}))(fn)
        return fn
    return deco


def given_fields(ctx: click.Context, names) -> set[str]:
    """The fields of `names` the user gave on the command line (or through the environment)."""
    src = click.core.ParameterSource
    given = set()
    for name in names:
        param = f"no_{name}" if field_meta(name)["style"] == "off" else name
        if ctx.get_parameter_source(param) in (src.COMMANDLINE, src.ENVIRONMENT):
            given.add(name)
    return given


def field_values(opts: dict) -> dict:
    """Parsed options by field name (`no_transport` -> `transport`)."""
    out = {}
    for key, value in opts.items():
        name = key[3:] if key.startswith("no_") and key[3:] in field_names() else key
        out[name] = (not value) if name != key else value
    return out
