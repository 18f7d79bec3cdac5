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
from edgetrain.budget.devices import list_profiles, load_profile
from edgetrain.config import (CACHE_DTYPES, DEVICES, HEADS, MODES, OPTIMIZERS, PRECISIONS,
                              SPLITS, TAU_SCHEDULES, TRANSPORT_SCALINGS, RunConfig,
                              config_from_options)
from edgetrain.errors import UserError
from edgetrain.signals import StopSignals
from edgetrain.units import fmt_bytes, parse_size


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
        except UserError as e:  # Stopped (a signal, after its checkpoint) carries 130 / 143
            _fail(str(e), getattr(e, "exit_code", 2))
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
    from edgetrain.measure import apply_malloc_policy, default_threads  # imports torch: deferred
    policy = malloc_policy()
    if policy != "auto":  # auto: chosen per job, once its memory budget is known
        apply_malloc_policy(policy)
    default_threads()  # no more intra-op threads than the CPUs this process may use


def malloc_policy() -> str:
    """EDGETRAIN_MALLOC (README: the allocator), checked: a bad value stops with exit 2."""
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


def train_options(fn):
    """The options of `edgetrain train` that map one-to-one onto RunConfig fields."""
    d = RunConfig()
    opts = [
        click.option("--data", default=d.data, show_default=True,
                     help="dataset name, or an image folder (one sub-folder per class)"),
        click.option("--train-size", type=int, default=None, help="stratified subset of the training split"),
        click.option("--test-size", type=int, default=None,
                     help="fixed stratified subset of the test split (quick benchmarks)"),
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
        click.option("--precision", type=click.Choice(PRECISIONS), default=d.precision,
                     show_default=True,
                     help="forward under autocast in bf16 or fp16 (fp32 master weights); fp16 "
                          "needs CUDA; auto: bf16 where the device computes it natively, else "
                          "fp32 (the default of --fit)"),
        click.option("--cache-dtype", type=click.Choice(CACHE_DTYPES), default=None,
                     show_default="float16; bfloat16 with --precision bf16",
                     help="storage dtype of the activation cache"),
        click.option("--cache-dir", default=None, help="activation cache (default RUN_DIR/cache)"),
        click.option("--cache-views", type=int, default=d.cache_views, show_default=True),
        click.option("--prefetch-mib", type=float, default=d.prefetch_mib, show_default=True),
        click.option("--distributed", is_flag=True,
                     help="one rank per group of modules (--mode parallel, launched by torchrun)"),
        click.option("--buffer-size", type=int, default=d.buffer_size, show_default=True,
                     help="--distributed: activation batches buffered per direction; 0 = synchronous"),
        click.option("--recompute", default=d.recompute, show_default=True,
                     help="recompute activations inside the trained module(s) during backward: "
                          "none, blocks (one checkpoint per block) or segments:S"),
        # fine-tuning (issue #16)
        click.option("--init", default=None,
                     help="start from weights: a safetensors file, a PyTorch state dict "
                          "(weights only) or an edgetrain RUN_DIR"),
        click.option("--init-strict/--no-init-strict", default=d.init_strict, show_default=True,
                     help="every key of --init must match (else load what matches, report the rest)"),
        click.option("--train-modules", default=None,
                     help="A:B, 1-based inclusive: train only these modules (default all)"),
        click.option("--classes", default=None,
                     help="comma-separated classes to keep (names, or indices with --classes-by index)"),
        click.option("--classes-by", type=click.Choice(("name", "index")), default=d.classes_by,
                     show_default=True),
        # image folders (issue 15)
        click.option("--data-cache", default=None,
                     help="where data sets are packed (default ~/.cache/edgetrain/data)"),
        click.option("--image-size", default=None,
                     help="HxW for an image folder: resize the short side, centre crop"),
        click.option("--channels", type=click.Choice(["1", "3"]), default=None,
                     callback=lambda c, p, v: None if v is None else int(v),
                     help="image folder channels (default 3 if any image is in colour)"),
        click.option("--flip/--no-flip", default=None,
                     help="horizontal flips preserve labels (default: off for folders)"),
        click.option("--skip-bad-images", is_flag=True,
                     help="skip and count corrupt images instead of stopping"),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def print_table(modules: list[dict], best: int) -> None:
    click.echo(f"{'depth':>5} {'val_acc':>8} {'test_acc':>8}")
    for m in modules:
        mark = "  <- best (chosen on val)" if m["index"] + 1 == best else ""
        click.echo(f"{m['index'] + 1:>5} {m['val_acc']:>8.4f} {m['test_acc']:>8.4f}{mark}")


@cli.command()
@train_options
@click.option("--out", type=click.Path(file_okay=False), default=None, help="run directory")
@click.option("--progress/--no-progress", default=True, show_default=True)
@click.option("--device-profile", default=None,
              help="devices/NAME.toml: enforce its memory budget (see `edgetrain devices`)")
@click.option("--memory-budget", default=None, help="resident memory budget, e.g. 1.5GiB")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False), default=None,
              help="continue the interrupted run in RUN_DIR from its last checkpoint")
@click.option("--fit", "fit", is_flag=True,
              help="with --device-profile/--memory-budget: plan mode, K, split, batch, cache "
                   "dtype and (when nothing else fits) --recompute around the options given, "
                   "print the plan, train it")
def train(out, progress, device_profile, memory_budget, resume_dir, fit, **opts):
    """Train a network module by module (or end-to-end) and write a run directory."""
    if resume_dir is not None:
        return resume_cmd(Path(resume_dir), progress)
    from edgetrain.budget.guard import apply_budget_options  # imports torch: deferred
    from edgetrain.regimes.schedule import train as run_train  # imports torch: deferred
    from edgetrain.storage.rundir import default_out_dir  # imports torch: deferred
    if fit:
        from edgetrain.budget.fit import fit_config  # imports torch: deferred
        where = Path(out) if out else default_out_dir(RunConfig()).parent  # its file system
        cfg, text = fit_config(opts, given_fields(), device_profile, memory_budget, where)
        click.echo(text)
    else:
        cfg = config_from_options(apply_budget_options(opts, device_profile, memory_budget))
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
    if chosen:
        click.echo(chosen)
    return cfg


@cli.command("eval")
@click.argument("run_dir", type=click.Path())
def eval_cmd(run_dir):
    """Re-evaluate every depth of a finished run on its validation and test splits."""
    from edgetrain.regimes.schedule import evaluate_run  # imports torch: deferred
    res = evaluate_run(Path(run_dir))
    print_table(res["modules"], res["best_depth"])
    print_per_class(res["test_per_class"])


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
@click.option("--features-only", is_flag=True, help="export G_k alone (no head): features out")
@click.option("--opset", type=int, default=18, show_default=True, help="ONNX opset (>= 18)")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="ONNX file (default RUN_DIR/prefix-depthK.onnx)")
@click.option("--atol", type=float, default=1e-4, show_default=True,
              help="largest max |onnxruntime - PyTorch| output difference accepted")
def export_cmd(run_dir, depth, features_only, opset, out, atol):
    """Export a trained prefix (stem, modules 1..k, head F_k) to ONNX, checked with onnxruntime."""
    from edgetrain.export.onnx_export import export_prefix, format_report  # imports torch: deferred
    report = export_prefix(Path(run_dir), depth=depth, features_only=features_only, opset=opset,
                           out=Path(out) if out else None, atol=atol)
    click.echo(format_report(report))


@cli.command("predict")
@click.argument("run_dir", type=click.Path())
@click.argument("paths", nargs=-1, required=True)
@click.option("--depth", default="best", show_default=True,
              help="'best' (chosen on validation) or a depth 1..K")
@click.option("--top-k", type=int, default=3, show_default=True, help="classes shown per image")
@click.option("--json", "as_json", is_flag=True, help="one JSON document instead of lines")
def predict_cmd(run_dir, paths, depth, top_k, as_json):
    """Classify image files (or every image under folders) with a trained run."""
    from edgetrain.export.predict import format_predictions, predict  # imports torch: deferred
    k, preds = predict(Path(run_dir), list(paths), depth=depth, top_k=top_k)
    if as_json:
        click.echo(json.dumps({"depth": k, "predictions": [p.to_dict() for p in preds]}, indent=1))
    else:
        click.echo(format_predictions(preds))


@cli.group("devices", invoke_without_command=True)
@click.pass_context
def devices_cmd(ctx):
    """List the device profiles in devices/ and the budget each leaves for training."""
    if ctx.invoked_subcommand is not None:
        return
    click.echo(f"{'name':<22} {'total':>10} {'reserved':>10} {'budget':>10} {'accel':>5}  cache")
    for p in list_profiles():
        click.echo(f"{p.name:<22} {fmt_bytes(p.total_memory_mib * 2**20):>10} "
                   f"{fmt_bytes(p.reserved_mib * 2**20):>10} {fmt_bytes(p.budget_bytes):>10} "
                   f"{p.accelerator:>5}  {p.cache_dtype}")


@devices_cmd.command("calibrate")
@click.argument("name")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=".", show_default=True,
              help="where the activation cache will live: its storage speed is measured")
@click.option("--storage-mib", type=int, default=256, show_default=True,
              help="size of the file written and read back")
def calibrate_cmd(name, cache_dir, storage_mib):
    """On the device itself: measure runtime, storage, bf16/fp16, cores; write devices/NAME.toml."""
    from edgetrain.budget.calibrate import calibrate  # imports torch: deferred
    if storage_mib < 1:
        raise UserError(f"--storage-mib must be >= 1 (got {storage_mib})")
    p, path = calibrate(name, Path(cache_dir), storage_mib=storage_mib)
    click.echo(f"wrote {path}: runtime {p.runtime_baseline_mib} MiB, storage write "
               f"{p.storage_write_mib_s} / read {p.storage_read_mib_s} MiB/s, bf16 {p.bf16}, "
               f"fp16 {p.fp16}, {p.cpu_cores} cores, budget {fmt_bytes(p.budget_bytes)}")


@cli.command("plan")
@click.option("--device", "device_name", default=None, help="device profile (`edgetrain devices`)")
@click.option("--memory-budget", default=None, help="instead of --device: a budget, e.g. 1.5GiB")
@click.option("--model", default=RunConfig.model, show_default=True)
@click.option("--data", default=None, help="dataset name (default: synthetic with --input, else digits)")
@click.option("--input", "input_shape", default=None, help="CxHxW: plan for synthetic data of this shape")
@click.option("--data-cache", default=None,
              help="where the data set is packed (default ~/.cache/edgetrain/data): the plan "
                   "shows the pack's bytes to write there")
@click.option("--image-size", default=None, help="HxW for an image folder (as `train`)")
@click.option("--channels", type=click.Choice(["1", "3"]), default=None,
              callback=lambda c, p, v: None if v is None else int(v),
              help="image folder channels (as `train`)")
@click.option("--train-size", type=int, default=None)
@click.option("--synthetic-size", type=int, default=RunConfig.synthetic_size, show_default=True)
@click.option("--width", type=int, default=None)
@click.option("--depth", type=int, default=None)
@click.option("--epochs", type=int, default=RunConfig.epochs, show_default=True)
@click.option("--laps", type=int, default=RunConfig.laps, show_default=True)
@click.option("--batch-size", type=int, default=RunConfig.batch_size, show_default=True,
              help="the largest batch to consider")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default=RunConfig.optimizer,
              show_default=True)
@click.option("--head", type=click.Choice(HEADS), default=RunConfig.head, show_default=True)
@click.option("--prefetch-mib", type=float, default=RunConfig.prefetch_mib, show_default=True)
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
              help="the precision the run will train in (auto: bf16 where the device computes "
                   "it natively, else fp32; the plan says which and why)")
@click.option("--recompute", default=RunConfig.recompute, show_default=True,
              help="keep this --recompute (none, blocks, segments:S); unset, the planner tries "
                   "segments:2, then blocks, when nothing fits without")
def plan_cmd(device_name, memory_budget, **opts):
    """Choose regime, K, split, batch size, cache dtype and, when nothing else fits,
    --recompute that fit a device; print the command."""
    from edgetrain.budget.planner import format_plan, plan_for_device  # imports torch: deferred
    if bool(device_name) == bool(memory_budget):
        raise UserError("give exactly one of --device NAME or --memory-budget SIZE")
    opts["data"] = opts["data"] or ("synthetic" if opts["input_shape"] else "digits")
    profile = load_profile(device_name) if device_name else None
    budget = parse_size(memory_budget) if memory_budget else None
    base = config_from_options({**opts, "no_transport": False, "memory_budget": budget})
    given = click.get_current_context().get_parameter_source("recompute")
    fixed = {"recompute"} if given == click.core.ParameterSource.COMMANDLINE else set()
    p = plan_for_device(base, profile, budget, fixed=fixed)
    click.echo(format_plan(p))
    if not p.fits:
        rc = f", recompute {p.cfg.recompute}" if p.cfg.recompute != "none" else ""
        raise UserError(f"nothing fits in {fmt_bytes(p.budget_bytes)}: the smallest plan "
                        f"({p.cfg.mode}, K={p.cfg.modules}, batch {p.cfg.batch_size}{rc}) needs "
                        f"{fmt_bytes(p.needed_bytes)} ({p.needed_bytes} bytes)")
    click.echo(f"command     {p.command()}")


def given_fields() -> set[str]:
    """The RunConfig fields the user gave `edgetrain train` (command line or environment)."""
    ctx, src = click.get_current_context(), click.core.ParameterSource
    names = {p.name for p in train_options(lambda: None).__click_params__}
    given = {n for n in names if ctx.get_parameter_source(n) in (src.COMMANDLINE, src.ENVIRONMENT)}
    return {"transport" if n == "no_transport" else n for n in given}


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
def status_cmd(run_dir):
    """Where a running or stopped run stands (from its log.jsonl, state.json, metrics.json)."""
    from edgetrain.storage.runlog import format_status, run_status  # imports torch: deferred
    click.echo(format_status(run_status(Path(run_dir))))


cli.add_command(bench)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv)


if __name__ == "__main__":
    main()
