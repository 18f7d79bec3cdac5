"""The `edgetrain` command line: a click group whose commands each call one library function.

Every mistake a user can make ends in one line on stderr and exit code 2 (`main`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
import sys

import click

from edgetrain import __version__
from edgetrain.bench.cli import bench
from edgetrain.budget.devices import find_profiles, load_profile, read_profile
from edgetrain.config import (BUDGET_FIELDS, RunConfig, config_from_options,  # noqa: F401
                              parse_shape)  # parse_shape: benchmarks/ import it from here
from edgetrain.errors import UserError
from edgetrain.options.command import PLAN_FIELDS, field_options, train_fields
from edgetrain.options.file import build
from edgetrain.options.request import (budget_text, check_budget, check_requested, config_text,
                                       requested, without_budget)
from edgetrain.signals import StopSignals
from edgetrain.units import fmt_bytes, parse_size


class EdgeGroup(click.Group):
    """A group whose errors are one line on stderr with exit code 2 (also under CliRunner)."""

    def invoke(self, ctx: click.Context):
        """Note a `--help` after the command (the group's callback then imports nothing)."""
        ctx.meta["edgetrain.help"] = bool({"-h", "--help"} & set(ctx.args))
        return super().invoke(ctx)

    def main(self, args=None, prog_name=None, standalone_mode=True, **extra):
        try:
            return super().main(args, prog_name or "edgetrain", standalone_mode=False, **extra)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.exceptions.Abort:
            _fail("aborted", 130)
        except click.UsageError as e:
            _fail(e.format_message(), 2)
        except UserError as e:  # Stopped (a signal, after its checkpoint) carries 130 / 143
            _fail(str(e), getattr(e, "exit_code", 2))
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except ModuleNotFoundError as e:  # a device with the torch-free install (docs/deploy.md)
            if e.name != "torch":
                raise
            _fail("this command needs PyTorch (pip install torch); without it, only "
                  "`edgetrain predict MODEL.onnx` runs", 2)


def _fail(message: str, code: int) -> None:
    first = message.strip().splitlines()[0] if message.strip() else "failed"
    click.echo(f"error: {first}", err=True)
    sys.exit(code)


@click.group(cls=EdgeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgetrain")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Module-wise (TRGL) training for devices that cannot hold end-to-end backprop."""
    if ctx.meta.get("edgetrain.help"):  # help alone stays torch-free
        return
    if ctx.invoked_subcommand != "predict":  # predict FILE.onnx runs where torch is not
        torch_runtime()


def torch_runtime() -> None:
    """The process-wide settings of a command that runs torch: allocator policy, threads."""
    from edgetrain.measure import apply_malloc_policy, default_threads  # imports torch: deferred
    policy = malloc_policy()
    if policy != "auto":  # auto: chosen per job, once its memory budget is known
        apply_malloc_policy(policy)
    default_threads()  # no more intra-op threads than the CPUs this process may use


def malloc_policy() -> str:
    """EDGETRAIN_MALLOC (docs/memory.md: the allocator), checked: a bad value stops with exit 2."""
    from edgetrain.measure import MALLOC_DEFAULT, resolve_malloc_policy  # imports torch: deferred
    spec = os.environ.get("EDGETRAIN_MALLOC", MALLOC_DEFAULT)
    try:
        resolve_malloc_policy(spec, False)
    except ValueError as e:
        _fail(str(e), 2)
    return spec


def job_malloc(budgeted: bool) -> None:
    """Apply the allocator policy for a training job (EDGETRAIN_MALLOC=auto: by its budget)."""
    from edgetrain import measure  # imports torch: deferred
    spec = malloc_policy()
    if spec == "auto":
        measure.apply_malloc_policy(measure.resolve_malloc_policy(spec, budgeted))


def print_table(modules: list[dict], best: int) -> None:
    click.echo(f"{'depth':>5} {'val_acc':>8} {'test_acc':>8}")
    for m in modules:
        mark = "  <- best (chosen on val)" if m["index"] + 1 == best else ""
        click.echo(f"{m['index'] + 1:>5} {m['val_acc']:>8.4f} {m['test_acc']:>8.4f}{mark}")


CONFIG_HELP = ("a TOML file of options, grouped as --print-config writes it, or the name of a "
               "shipped recipe (quickstart, raspberry-pi-finetune, paper-cpu-...); options "
               "given here override it")


@cli.command()
@field_options(train_fields())
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help=CONFIG_HELP)
@click.option("--print-config", "print_only", is_flag=True,
              help="print the configuration (the file, the options, the defaults; nothing "
                   "resolved for this machine) as TOML and exit without training")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="run directory")
@click.option("--progress/--no-progress", default=True, show_default=True)
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False), default=None,
              help="continue the interrupted run in RUN_DIR from its last checkpoint")
@click.option("--fit", "fit", is_flag=True,
              help="with --device-profile/--memory-budget: plan mode, K, split, batch, cache "
                   "dtype and (when nothing else fits) --recompute around the options given, "
                   "print the plan, train it")
def train(out, progress, resume_dir, fit, config_file, print_only, **opts):
    """Train a network module by module (or end-to-end) and write a run directory."""
    if resume_dir is not None:
        return resume_cmd(Path(resume_dir), progress)
    values, given, file_values = requested(click.get_current_context(), opts, config_file)
    if print_only:
        return click.echo(config_text(values, file_values, config_file, "train"), nl=False)
    from edgetrain.budget.guard import apply_budget_options  # imports torch: deferred
    from edgetrain.regimes.schedule import train as run_train  # imports torch: deferred
    from edgetrain.storage.rundir import default_out_dir  # imports torch: deferred
    if fit:
        from edgetrain.budget.fit import fit_config  # imports torch: deferred
        where = Path(out) if out else default_out_dir(RunConfig()).parent  # its file system
        cfg, text = fit_config(without_budget(values), given - set(BUDGET_FIELDS),
                               values["device_profile"], budget_text(values), where)
        click.echo(text)
    else:
        cfg = build(lambda v: config_from_options(apply_budget_options(
            without_budget(check_budget(v)), v["device_profile"], budget_text(v))), values,
            file_values, config_file)
    cfg = echo_precision(cfg)
    out_dir = Path(out) if out else default_out_dir(cfg)
    job_malloc(cfg.memory_budget is not None)
    launch = None
    if cfg.distributed:  # the library never reads the environment: torchrun's variables, here
        from edgetrain.regimes.distributed import launch_from_env  # imports torch: deferred
        launch = launch_from_env(os.environ)
    with StopSignals() as stop:  # Ctrl-C / SIGTERM: a checkpoint at the next step, then exit
        metrics = run_train(cfg, out_dir, progress=progress, launch=launch, stop=stop)
    if metrics is None:  # a distributed rank other than 0: rank 0 reports
        return
    print_table(metrics["modules"], metrics["best_depth"])
    click.echo(f"best depth {metrics['best_depth']}: test accuracy {metrics['best_test_acc']:.4f}"
               f"  (run directory {out_dir})")


def echo_precision(cfg: RunConfig) -> RunConfig:
    """`cfg` with `--precision auto` resolved for its device, the choice printed once."""
    from edgetrain.method.precision import resolve_precision  # imports torch: deferred
    from edgetrain.regimes.run import resolve_device  # imports torch: deferred
    cfg, chosen = resolve_precision(cfg, resolve_device(cfg.device))
    if chosen and os.environ.get("RANK", "0") == "0":  # under torchrun: rank 0 says it once
        click.echo(chosen)
    return cfg


@cli.command("eval")
@click.argument("run_dir", type=click.Path())
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="also draw the validation and test accuracy of every depth into this PNG")
def eval_cmd(run_dir, plot_path):
    """Re-evaluate every depth of a finished run on its validation and test splits."""
    from edgetrain.plots.run_plots import check_plot_path, plot_depth_accuracy  # matplotlib: deferred
    from edgetrain.regimes.schedule import evaluate_run  # imports torch: deferred
    plot = check_plot_path(plot_path) if plot_path else None  # before anything is written
    res = evaluate_run(Path(run_dir))
    print_table(res["modules"], res["best_depth"])
    print_per_class(res["test_per_class"])
    if plot is not None:
        plot_depth_accuracy(res["modules"], res["best_depth"], plot, title=str(run_dir))
        click.echo(f"wrote {plot}")


def print_per_class(pc: dict) -> None:
    """Per-class test accuracy and the confusion matrix (rows: true class, columns: predicted)."""
    names = pc["class_names"]
    w = max(6, *(len(n) for n in names))
    click.echo(f"test split at depth {pc['depth']}: per-class accuracy and confusion matrix "
               "(rows true, columns predicted)")
    click.echo(f"{'class':<{w}} {'n':>6} {'acc':>7}  " + " ".join(f"{i:>5}" for i in range(len(names))))
    for i, (name, row) in enumerate(zip(names, pc["confusion"])):
        acc = "-" if pc["accuracy"][i] is None else f"{pc['accuracy'][i]:.4f}"
        click.echo(f"{name:<{w}} {pc['support'][i]:>6} {acc:>7}  " + " ".join(f"{v:>5}" for v in row))


@cli.command("export")
@click.argument("run_dir", type=click.Path())
@click.option("--depth", default="best", show_default=True,
              help="'best' (chosen on validation) or a depth 1..K")
@click.option("--format", "fmt", type=click.Choice(("onnx", "pte")), default="onnx",
              show_default=True, help="onnx (ONNX Runtime) or pte (ExecuTorch + XNNPACK)")
@click.option("--quantize", type=click.Choice(("none", "int8")), default="none",
              show_default=True,
              help="int8: also write an int8 copy (onnx: OUT-int8.onnx, static QDQ; pte: "
                   "XNNPACK's quantiser), calibrated on training images")
@click.option("--calibration", type=click.Path(), default=None,
              help="image files or a folder to calibrate int8 on (when the run's pack is gone)")
@click.option("--features-only", is_flag=True, help="export G_k alone (no head): features out")
@click.option("--opset", type=int, default=18, show_default=True, help="ONNX opset (>= 18)")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="output file (default RUN_DIR/prefix-depthK.onnx or .pte)")
@click.option("--atol", type=float, default=1e-4, show_default=True,
              help="largest max |onnxruntime - PyTorch| output difference accepted")
def export_cmd(run_dir, depth, fmt, quantize, calibration, features_only, opset, out, atol):
    """Export a trained prefix (stem, modules 1..k, head F_k) to ONNX, checked with onnxruntime,
    or to an ExecuTorch program, checked with ExecuTorch's runtime."""
    calibration = Path(calibration) if calibration else None
    if fmt == "pte":
        ctx, src = click.get_current_context(), click.core.ParameterSource.COMMANDLINE
        onnx_only = [f"--{n.replace('_', '-')}" for n in ("features_only", "opset", "atol")
                     if ctx.get_parameter_source(n) == src]
        if onnx_only:
            raise UserError(f"{', '.join(onnx_only)} apply to --format onnx only")
        from edgetrain.export.pte import export_pte, format_pte_report  # imports torch: deferred
        report = export_pte(Path(run_dir), depth=depth, out=Path(out) if out else None,
                            quantize=quantize, calibration=calibration)
        click.echo(format_pte_report(report))
        return
    from edgetrain.export.onnx_export import export_prefix, format_report  # imports torch: deferred
    report = export_prefix(Path(run_dir), depth=depth, features_only=features_only, opset=opset,
                           out=Path(out) if out else None, atol=atol, quantize=quantize,
                           calibration=calibration)
    click.echo(format_report(report))


@cli.command("predict")
@click.argument("model", type=click.Path())
@click.argument("paths", nargs=-1, required=True)
@click.option("--depth", default="best", show_default=True,
              help="'best' (chosen on validation) or a depth 1..K (a model file: its own)")
@click.option("--top-k", type=int, default=3, show_default=True, help="classes shown per image")
@click.option("--json", "as_json", is_flag=True, help="one JSON document instead of lines")
def predict_cmd(model, paths, depth, top_k, as_json):
    """Classify image files (or every image under folders) with a trained run (RUN_DIR) or
    an exported file alone (MODEL.onnx, fp32 or int8, or MODEL.pte; .onnx needs no torch)."""
    from edgetrain.export.model_file import is_model_file, predict_file  # numpy, Pillow: deferred
    from edgetrain.export.predictions import format_predictions, predictions_json  # numpy: deferred
    if is_model_file(model):
        k, preds = predict_file(Path(model), list(paths), depth=depth, top_k=top_k)
    else:
        torch_runtime()
        from edgetrain.export.predict import predict  # imports torch: deferred
        k, preds = predict(Path(model), list(paths), depth=depth, top_k=top_k)
    if as_json:
        click.echo(json.dumps(predictions_json(k, preds), indent=1))
    else:
        click.echo(format_predictions(preds))


@cli.group("devices", invoke_without_command=True)
@click.pass_context
def devices_cmd(ctx):
    """List the device profiles (shipped, and calibrated ones in your config directory)."""
    if ctx.invoked_subcommand is not None:
        return
    click.echo(f"{'name':<22} {'total':>10} {'reserved':>10} {'budget':>10} {'accel':>5}  "
               f"{'cache':<8} origin")
    for name, f in find_profiles().items():
        p = read_profile(f.path)
        origin = f.origin + (" (overrides shipped)" if f.shadows is not None else "")
        click.echo(f"{p.name:<22} {fmt_bytes(p.total_memory_mib * 2**20):>10} "
                   f"{fmt_bytes(p.reserved_mib * 2**20):>10} {fmt_bytes(p.budget_bytes):>10} "
                   f"{p.accelerator:>5}  {p.cache_dtype:<8} {origin}")


@devices_cmd.command("calibrate")
@click.argument("name")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=".", show_default=True,
              help="where the activation cache will live: its storage speed is measured")
@click.option("--storage-mib", type=int, default=256, show_default=True,
              help="size of the file written and read back")
def calibrate_cmd(name, cache_dir, storage_mib):
    """On the device itself: measure runtime, storage, bf16/fp16, cores; write NAME.toml to
    your profiles directory ($EDGETRAIN_DEVICES_DIR, else $XDG_CONFIG_HOME/edgetrain/devices,
    else ~/.config/edgetrain/devices), starting from the shipped profile of that name."""
    from edgetrain.budget.calibrate import calibrate  # imports torch: deferred
    if storage_mib < 1:
        raise UserError(f"--storage-mib must be >= 1 (got {storage_mib})")
    p, path = calibrate(name, Path(cache_dir), storage_mib=storage_mib)
    click.echo(f"wrote {path}: runtime {p.runtime_baseline_mib} MiB, storage write "
               f"{p.storage_write_mib_s} / read {p.storage_read_mib_s} MiB/s, bf16 {p.bf16}, "
               f"fp16 {p.fp16}, {p.cpu_cores} cores, budget {fmt_bytes(p.budget_bytes)}")


PLAN_OVERRIDES = {
    "data": {"default": None, "show_default": False,
             "help": "data set name (default: synthetic with --input, else digits)"},
    "data_cache": {"help": "where the data set is packed (default ~/.cache/edgetrain/data): "
                           "the plan shows the pack's bytes to write there"},
    "batch_size": {"help": "the largest batch to consider"},
    "precision": {"default": "auto", "help": "the precision the run will train in (auto: bf16 "
                  "where the device computes it natively, else fp32; the plan says which and "
                  "why)"},
    "recompute": {"help": "keep this --recompute (none, blocks, segments:S); unset, the planner "
                          "tries segments:2, then blocks, when nothing fits without"},
    "memory_budget": {"help": "instead of --device-profile: a budget, e.g. 1.5GiB"},
}


@cli.command("plan")
@field_options(PLAN_FIELDS, PLAN_OVERRIDES)
@click.option("--device", "device_alias", default=None, hidden=True,
              help="deprecated spelling of --device-profile")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help=CONFIG_HELP)
def plan_cmd(device_alias, config_file, **opts):
    """Choose regime, K, split, batch size, cache dtype and, when nothing else fits,
    --recompute that fit a device; print the command."""
    if device_alias is not None:
        click.echo("warning: `plan --device NAME` is deprecated and goes in 0.3.0; "
                   "use --device-profile NAME", err=True)
        opts["device_profile"] = opts["device_profile"] or device_alias
    values, given, file_values = requested(click.get_current_context(), opts, config_file)
    if bool(values["device_profile"]) == (values["memory_budget"] is not None):
        raise UserError("give exactly one of --device-profile NAME or --memory-budget SIZE")
    values["data"] = values["data"] or ("synthetic" if values["input_shape"] else "digits")
    build(check_requested, values, file_values, config_file)  # a bad key of the file: named
    from edgetrain.budget.planner import format_plan, plan_for_device  # imports torch: deferred
    profile = load_profile(values["device_profile"]) if values["device_profile"] else None
    budget = parse_size(budget_text(values)) if values["memory_budget"] is not None else None
    base = build(lambda v: config_from_options({**without_budget(v), "memory_budget": budget}),
                 values, file_values, config_file)
    p = plan_for_device(base, profile, budget, fixed={"recompute"} & given)
    click.echo(format_plan(p))
    if not p.fits:
        rc = f", recompute {p.cfg.recompute}" if p.cfg.recompute != "none" else ""
        raise UserError(f"nothing fits in {fmt_bytes(p.budget_bytes)}: the smallest plan "
                        f"({p.cfg.mode}, K={p.cfg.modules}, batch {p.cfg.batch_size}{rc}) needs "
                        f"{fmt_bytes(p.needed_bytes)} ({p.needed_bytes} bytes)")
    click.echo(f"command     {p.command()}")


def resume_cmd(run_dir: Path, progress: bool) -> None:
    """`train --resume RUN_DIR`: the configuration comes from RUN_DIR, so no other option."""
    ctx = click.get_current_context()
    given = [p.opts[0] for p in ctx.command.params if p.name not in ("resume_dir", "progress")
             and ctx.get_parameter_source(p.name) == click.core.ParameterSource.COMMANDLINE]
    if given:
        raise UserError(f"--resume takes the configuration from {run_dir}/config.json; "
                        f"do not combine it with {', '.join(given)}")
    from edgetrain.regimes.schedule import resume  # imports torch: deferred
    try:  # a budgeted run resumes under the same allocator policy (an unreadable file: resume says)
        budgeted = json.loads((run_dir / "config.json").read_text()).get("memory_budget") is not None
    except (OSError, ValueError, AttributeError):
        budgeted = False
    job_malloc(budgeted)
    launch = None
    if os.environ.get("WORLD_SIZE"):  # under torchrun: a distributed run's rank
        from edgetrain.regimes.distributed import launch_from_env  # imports torch: deferred
        launch = launch_from_env(os.environ)
    with StopSignals() as stop:
        metrics = resume(run_dir, progress=progress, stop=stop, launch=launch)
    if metrics is None:  # a distributed rank other than 0: rank 0 reports
        return
    print_table(metrics["modules"], metrics["best_depth"])
    click.echo(f"best depth {metrics['best_depth']}: test accuracy {metrics['best_test_acc']:.4f}"
               f"  (run directory {run_dir})")


@cli.command("status")
@click.argument("run_dir", type=click.Path())
@click.option("--plot-memory", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="also draw RSS per logged epoch and the peak of every phase into this PNG")
def status_cmd(run_dir, plot_path):
    """Where a running or stopped run stands (from its log.jsonl, state.json, metrics.json)."""
    from edgetrain.plots.run_plots import check_plot_path, plot_memory  # matplotlib: deferred
    from edgetrain.storage.runlog import format_status, run_status  # imports torch: deferred
    plot = check_plot_path(plot_path, "--plot-memory") if plot_path else None
    click.echo(format_status(run_status(Path(run_dir))))
    if plot is not None:
        plot_memory(Path(run_dir), plot)
        click.echo(f"wrote {plot}")


cli.add_command(bench)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv)


if __name__ == "__main__":
    main()
