"""The `edgetrain` command line: a click group whose commands each call one library function.

Every mistake a user can make ends in one line on stderr and exit code 2 (`main`).
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

from edgetrain import __version__
from edgetrain.config import (CACHE_DTYPES, DEVICES, HEADS, MODES, OPTIMIZERS, SPLITS,
                              TAU_SCHEDULES, TRANSPORT_SCALINGS, RunConfig)
from edgetrain.errors import UserError


def parse_shape(text: str | None) -> tuple[int, int, int] | None:
    """'3x32x32' -> (3, 32, 32)."""
    if text is None:
        return None
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--input must look like CxHxW, e.g. 3x32x32 (got {text!r})") from None
    if len(shape) != 3 or min(shape) < 1:
        raise UserError(f"--input must look like CxHxW with positive sizes (got {text!r})")
    return shape


class EdgeGroup(click.Group):
    """A group whose errors are one line on stderr with exit code 2 (also under CliRunner)."""

    def main(self, args=None, prog_name=None, standalone_mode=True, **extra):
        try:
            return super().main(args, prog_name or "edgetrain", standalone_mode=False, **extra)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.exceptions.Abort:
            _fail("aborted", 130)
        except click.UsageError as e:
            _fail(e.format_message(), 2)
        except UserError as e:
            _fail(str(e), 2)
        except KeyboardInterrupt:
            _fail("interrupted", 130)


def _fail(message: str, code: int) -> None:
    first = message.strip().splitlines()[0] if message.strip() else "failed"
    click.echo(f"error: {first}", err=True)
    sys.exit(code)


@click.group(cls=EdgeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgetrain")
def cli() -> None:
    """Module-wise (TRGL) training for devices that cannot hold end-to-end backprop."""


def train_options(fn):
    """The options of `edgetrain train` that map one-to-one onto RunConfig fields."""
    d = RunConfig()
    opts = [
        click.option("--data", default=d.data, show_default=True, help="dataset name"),
        click.option("--train-size", type=int, default=None, help="stratified subset of the training split"),
        click.option("--val-fraction", type=float, default=d.val_fraction, show_default=True),
        click.option("--input", "input_shape", default=None, help="CxHxW, for --data synthetic"),
        click.option("--synthetic-size", type=int, default=d.synthetic_size, show_default=True),
        click.option("--augment/--no-augment", default=d.augment, show_default=True),
        click.option("--model", default=d.model, show_default=True),
        click.option("--width", type=int, default=None, help="base width (model default if unset)"),
        click.option("--depth", type=int, default=None, help="number of blocks (kmresnet) or n (resnet)"),
        click.option("--modules", "-K", type=int, default=d.modules, show_default=True),
        click.option("--split", type=click.Choice(SPLITS), default=d.split, show_default=True),
        click.option("--head", type=click.Choice(HEADS), default=d.head, show_default=True),
        click.option("--mode", type=click.Choice(MODES), default=d.mode, show_default=True),
        click.option("--laps", type=int, default=d.laps, show_default=True),
        click.option("--epochs", type=int, default=d.epochs, show_default=True,
                     help="epochs per module (sequential/multilap, all laps together) or in all"),
        click.option("--tau", type=float, default=d.tau, show_default=True),
        click.option("--tau-schedule", type=click.Choice(TAU_SCHEDULES), default=d.tau_schedule,
                     show_default=True),
        click.option("--transport-scaling", type=click.Choice(TRANSPORT_SCALINGS),
                     default=d.transport_scaling, show_default=True),
        click.option("--no-transport", is_flag=True, help="VanGL: no transport regularisation"),
        click.option("--mult-h", type=float, default=d.mult_h, show_default=True),
        click.option("--mult-s", type=int, default=d.mult_s, show_default=True),
        click.option("--mult-lambda1", type=float, default=d.mult_lambda1, show_default=True),
        click.option("--optimizer", type=click.Choice(OPTIMIZERS), default=d.optimizer, show_default=True),
        click.option("--lr", type=float, default=d.lr, show_default=True),
        click.option("--momentum", type=float, default=d.momentum, show_default=True),
        click.option("--weight-decay", type=float, default=d.weight_decay, show_default=True),
        click.option("--label-smoothing", type=float, default=d.label_smoothing, show_default=True),
        click.option("--init-gain", type=float, default=None, help="orthogonal init with this gain"),
        click.option("--cosine/--no-cosine", default=d.cosine, show_default=True),
        click.option("--batch-size", type=int, default=d.batch_size, show_default=True),
        click.option("--seed", type=int, default=d.seed, show_default=True),
        click.option("--device", type=click.Choice(DEVICES), default=d.device, show_default=True),
        click.option("--cache-dtype", type=click.Choice(CACHE_DTYPES), default=d.cache_dtype,
                     show_default=True),
        click.option("--cache-dir", default=None, help="activation cache (default RUN_DIR/cache)"),
        click.option("--cache-views", type=int, default=d.cache_views, show_default=True),
        click.option("--prefetch-mib", type=float, default=d.prefetch_mib, show_default=True),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def config_from_options(opts: dict) -> RunConfig:
    opts = dict(opts)
    opts["input_shape"] = parse_shape(opts.get("input_shape"))
    opts["transport"] = not opts.pop("no_transport")
    return RunConfig(**opts)


def print_table(modules: list[dict], best: int) -> None:
    click.echo(f"{'depth':>5} {'val_acc':>8} {'test_acc':>8}")
    for m in modules:
        mark = "  <- best (chosen on val)" if m["index"] + 1 == best else ""
        click.echo(f"{m['index'] + 1:>5} {m['val_acc']:>8.4f} {m['test_acc']:>8.4f}{mark}")


@cli.command()
@train_options
@click.option("--out", type=click.Path(file_okay=False), default=None, help="run directory")
@click.option("--progress/--no-progress", default=True, show_default=True)
def train(out, progress, **opts):
    """Train a network module by module (or end-to-end) and write a run directory."""
    from edgetrain.schedule import default_out_dir, train as run_train
    cfg = config_from_options(opts)
    out_dir = Path(out) if out else default_out_dir(cfg)
    metrics = run_train(cfg, out_dir, progress=progress)
    print_table(metrics["modules"], metrics["best_depth"])
    click.echo(f"best depth {metrics['best_depth']}: test accuracy {metrics['best_test_acc']:.4f}"
               f"  (run directory {out_dir})")


@cli.command("eval")
@click.argument("run_dir", type=click.Path())
def eval_cmd(run_dir):
    """Re-evaluate every depth of a finished run on its validation and test splits."""
    from edgetrain.schedule import evaluate_run
    res = evaluate_run(Path(run_dir))
    print_table(res["modules"], res["best_depth"])


@cli.group()
def bench() -> None:
    """Benchmarks that write JSON, tables and plots to benchmarks/results/."""


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv)


if __name__ == "__main__":
    main()
