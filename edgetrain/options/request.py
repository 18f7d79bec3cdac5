"""What a user asked `edgetrain train` / `plan` for: the command line over `--config FILE`
over the defaults, validated without resolving anything for this machine.

`requested` merges; `check_requested` validates (the device profile named exists, the budget
is a size); `config_text` is `--print-config`'s output. torch-free.
"""
from __future__ import annotations

from pathlib import Path

import click

from edgetrain import __version__
from edgetrain.budget.devices import load_profile
from edgetrain.config import BUDGET_FIELDS, RunConfig, config_from_options
from edgetrain.errors import UserError
from edgetrain.options.command import field_values, given_fields, train_fields
from edgetrain.options.file import (build, config_path, merge, printable, read_config_file,
                                    write_config_file)
from edgetrain.units import parse_size


def requested(ctx: click.Context, opts: dict, config_file: str | None
              ) -> tuple[dict, set[str], dict]:
    """(the requested values by field, the fields the user gave, the file's values taken).

    Args:
        ctx: the command's click context (where each option's value came from).
        opts: the command's parsed field options.
        config_file: `--config FILE`, or None.
    """
    values = field_values(opts)
    given = given_fields(ctx, [n for n in train_fields() if n in values])
    file_values = read_config_file(config_path(config_file)) if config_file else {}
    if given & set(BUDGET_FIELDS):  # a budget on the command line replaces the file's, either kind
        file_values = {k: v for k, v in file_values.items() if k not in BUDGET_FIELDS}
    file_values = {k: v for k, v in file_values.items() if k not in given}  # the ones taken
    return merge(values, given, file_values), given | set(file_values), file_values


def budget_text(values: dict) -> str | None:
    """`memory_budget` as `parse_size` reads it (a file may give bytes as an integer)."""
    v = values.get("memory_budget")
    return None if v is None else str(v)


def without_budget(values: dict) -> dict:
    """`values` without the budget fields (a device profile is resolved, not passed on)."""
    return {k: v for k, v in values.items() if k not in BUDGET_FIELDS}


def check_budget(values: dict) -> dict:
    """`values`, once its budget fields are of their kinds (a profile name; a size or bytes)
    and not both given.

    Raises:
        UserError: a wrong kind, or both a profile and a budget.
    """
    profile, budget = values.get("device_profile"), values.get("memory_budget")
    if profile is not None and not isinstance(profile, str):
        raise UserError(f"--device-profile must be a profile name (got {profile!r})")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (str, int))):
        raise UserError(f"--memory-budget must be a size such as 1.5GiB (got {budget!r})")
    if profile and budget is not None:
        raise UserError("give --device-profile or --memory-budget, not both")
    return values


def check_requested(values: dict) -> RunConfig:
    """The RunConfig of `values`, the budget left unresolved: a profile that exists, a size.

    Raises:
        UserError: any invalid value, both a profile and a budget.
    """
    check_budget(values)
    if values.get("device_profile"):
        load_profile(values["device_profile"])
    if values.get("memory_budget") is not None:
        parse_size(budget_text(values))
    return config_from_options(without_budget(values))


def config_text(values: dict, file_values: dict, config_file: str | None, command: str) -> str:
    """`--print-config`: the requested configuration as TOML (validated first; a bad value
    of the file names its key and the file)."""
    parsed = build(check_requested, values, file_values, config_file)
    header = (f"edgetrain {command} configuration (edgetrain {__version__}); run it with\n"
              f"  edgetrain {command} --config FILE.toml\n"
              "options given with --config override this file")
    return write_config_file(printable(values, parsed), header)
