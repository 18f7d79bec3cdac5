"""`edgetrain bench ...`: the benchmark commands. Each is thin and calls one function of its
benchmark module, imported inside the command so that `edgetrain --help` does not import
torch; results go to benchmarks/results/.
"""
from __future__ import annotations

from pathlib import Path
import tempfile

import click

from edgetrain.config import CACHE_DTYPES, MODES, SPLITS, parse_image_size, parse_shape
from edgetrain.errors import UserError


@click.group()
def bench() -> None:
    """Benchmarks that write JSON, tables and plots to benchmarks/results/."""


@bench.command("speed")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="benchmarks/results",
              show_default=True, help="where speed.json and speed.md go")
@click.option("--ks", default="4,8", show_default=True, help="module counts, comma separated")
@click.option("--epochs", type=int, default=3, show_default=True, help="epochs per module")
@click.option("--synthetic-size", type=int, default=512, show_default=True)
@click.option("--cache-dtype", type=click.Choice(CACHE_DTYPES), default="float16", show_default=True)
@click.option("--accuracy/--no-accuracy", default=True, show_default=True,
              help="also measure the cache dtype and --cache-views accuracy effects on digits")
@click.option("--rss/--no-rss", default=True, show_default=True,
              help="also measure peak RSS at N and 4N samples in fresh processes")
def bench_speed(out_dir, ks, epochs, synthetic_size, cache_dtype, accuracy, rss):
    """Cache vs recomputed prefix (time), disk-streamed vs in-RAM (throughput), RSS vs N."""
    from edgetrain.bench.speed import run_speed  # imports torch: deferred
    try:
        k_list = [int(v) for v in ks.split(",")]
    except ValueError:
        raise UserError(f"--ks must be comma-separated integers (got {ks!r})") from None
    res = run_speed(Path(out_dir), ks=k_list, epochs=epochs, synthetic_size=synthetic_size,
                    cache_dtype=cache_dtype, accuracy=accuracy, rss=rss)
    click.echo(res["table_md"])


@bench.command("precision")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="benchmarks/results",
              show_default=True, help="where precision.json and precision.md go")
@click.option("--seeds", type=int, default=None, help="accuracy seeds (default 5; 1 with --quick)")
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--quick", is_flag=True, help="tiny configurations: a smoke check of the pipeline")
@click.option("--parts", default="memory,accuracy", show_default=True,
              help="comma separated: memory (and step time), accuracy, auto (--precision auto "
                   "against fp32 on ResNet-18 3x32x32)")
def bench_precision(out_dir, seeds, threads, quick, parts):
    """bf16 against fp32: activation memory, step time (fresh processes) and accuracy;
    `--parts auto`: what `--precision auto` buys on this machine."""
    from edgetrain.bench.precision import run_precision  # imports torch: deferred
    if seeds is not None and seeds < 1 or threads < 1:
        raise UserError("--seeds and --threads must be >= 1")
    chosen = tuple(p.strip() for p in parts.split(",") if p.strip())
    unknown = sorted(set(chosen) - {"memory", "accuracy", "auto"})
    if unknown or not chosen:
        raise UserError(f"--parts takes memory, accuracy and auto (got {parts!r})")
    res = run_precision(Path(out_dir), seeds=seeds, quick=quick, threads=threads, parts=chosen)
    click.echo(Path(res["md_path"]).read_text())


class VariadicCommand(click.Command):
    """A command whose `multiple` options also take several values after one flag:
    `--modules 4 8 16` is read as `--modules 4 --modules 8 --modules 16`."""

    def parse_args(self, ctx, args):
        multi = {o for p in self.params if isinstance(p, click.Option) and p.multiple for o in p.opts}
        out, cur, fresh = [], None, False
        for a in args:
            if a.startswith("-"):
                cur, fresh = (a, True) if a in multi else (None, False)
                out.append(a)
            elif cur and not fresh:
                out += [cur, a]
            else:
                out.append(a)
                fresh = False
        return super().parse_args(ctx, out)


def bench_job_options(fn):
    """The training job of `bench memory` / `bench cap` (synthetic data)."""
    opts = [click.option("--model", default="resnet110", show_default=True),
            click.option("--input", "input_shape", default="3x96x96", show_default=True, help="CxHxW"),
            click.option("--batch", type=int, default=64, show_default=True),
            click.option("--width", type=int, default=None),
            click.option("--depth", type=int, default=None),
            click.option("--steps", type=int, default=2, show_default=True,
                         help="optimizer steps per module and lap"),
            click.option("--threads", type=int, default=2, show_default=True),
            click.option("--out", "out_dir", type=click.Path(file_okay=False),
                         default="benchmarks/results", show_default=True)]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


@bench.command("memory", cls=VariadicCommand)
@bench_job_options
@click.option("--modules", type=int, multiple=True, help="K values (default 4 8 16)")
@click.option("--modes", type=click.Choice(MODES), multiple=True, help="regimes (default: all)")
@click.option("--vangl/--no-vangl", default=True, show_default=True,
              help="also measure every regime without transport")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--recompute", default="none", show_default=True,
              help="also measure every module-wise row with this --recompute (blocks, segments:S)")
@click.option("--ckpt-baseline/--no-ckpt-baseline", default=True, show_default=True,
              help="also measure e2e with torch.utils.checkpoint (S = sqrt(blocks) and S = K)")
@click.option("--split", type=click.Choice(SPLITS), default="depth", show_default=True,
              help="--split of every module-wise row (memory: what the planner picks)")
@click.option("--tag", default="", help="suffix of the result files' names")
def bench_memory_cmd(model, input_shape, batch, width, depth, steps, threads, out_dir, modules,
                     modes, vangl, device, recompute, ckpt_baseline, split, tag):
    """Peak memory of every regime vs end-to-end (Table 5), one fresh process per row."""
    from edgetrain.bench.memory import bench_memory, format_table  # imports torch: deferred
    res = bench_memory(model, parse_shape(input_shape), batch, list(modules) or [4, 8, 16],
                       list(modes) or list(MODES), (True, False) if vangl else (True,), device,
                       steps, width, depth, threads, Path(out_dir), log=click.echo,
                       recompute=recompute, ckpt_baseline=ckpt_baseline, split=split,
                       tag=tag)
    click.echo(format_table(res))
    click.echo(f"wrote {res['json_path']}" + (f" and {res['png_path']}" if res["png_path"] else ""))


@bench.command("cap")
@bench_job_options
@click.option("--modules", type=int, default=16, show_default=True, help="edgetrain's K")
@click.option("--mode", type=click.Choice(["sequential", "multilap"]), default="sequential",
              show_default=True)
@click.option("--recompute", default="none", show_default=True,
              help="edgetrain's --recompute (none, blocks, segments:S)")
@click.option("--split", type=click.Choice(SPLITS), default="depth", show_default=True,
              help="edgetrain's --split")
@click.option("--ckpt-segments", type=int, default=None,
              help="also bisect e2e with torch.utils.checkpoint over S segments "
                   "(default: --modules; 0: skip)")
@click.option("--cap-mib", type=float, default=None, help="also run every job at this cap")
@click.option("--tol-mib", type=float, default=32, show_default=True, help="bisection resolution")
@click.option("--max-probes", type=int, default=16, show_default=True, help="per bisected job")
def bench_cap_cmd(model, input_shape, batch, width, depth, steps, threads, out_dir, modules, mode,
                  recompute, split, ckpt_segments, cap_mib, tol_mib, max_probes):
    """e2e, e2e+ckpt and edgetrain under RLIMIT_AS caps: the smallest cap each completes at."""
    from edgetrain.bench.cap import bench_cap, format_cap  # imports torch: deferred
    res = bench_cap(model, parse_shape(input_shape), batch, modules, mode, width, depth, steps,
                    threads, cap_mib, tol_mib, max_probes, Path(out_dir), log=click.echo,
                    recompute=recompute, split=split, ckpt_segments=ckpt_segments)
    click.echo(format_cap(res))
    click.echo(f"wrote {res['json_path']}\nwrote {res['md_path']}")


@bench.command("floor", cls=VariadicCommand)
@click.option("--model", default="resnet110", show_default=True)
@click.option("--input", "input_shape", default="3x96x96", show_default=True, help="CxHxW")
@click.option("--batch", type=int, default=64, show_default=True)
@click.option("--mode", type=click.Choice(MODES), default="sequential", show_default=True)
@click.option("--modules", type=int, default=16, show_default=True)
@click.option("--recompute", multiple=True,
              help="settings to break down (default: none blocks segments:2)")
@click.option("--split", type=click.Choice(SPLITS), default="depth", show_default=True)
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="benchmarks/results",
              show_default=True)
def bench_floor_cmd(model, input_shape, batch, mode, modules, recompute, split, out_dir):
    """What the heaviest module holds at its step peak, tensor by tensor, beside e2e's peak."""
    from edgetrain.bench.floor import floor_report  # imports torch: deferred
    res = floor_report(model, parse_shape(input_shape), batch, mode, modules,
                       list(recompute) or ["none", "blocks", "segments:2"], Path(out_dir),
                       split=split)
    for p in res["paths"]:
        click.echo(f"wrote {p}")


@bench.command("plan-vs-measured")
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--only", type=int, multiple=True, help="indices into the default configurations")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="benchmarks/results",
              show_default=True)
def bench_plan_vs_measured_cmd(threads, only, out_dir):
    """`edgetrain plan`'s predicted peak against the peak measured in a fresh process."""
    from edgetrain.bench.plan_vs_measured import (DEFAULT_CONFIGS, HEADER,  # imports torch
                                                  bench_plan_vs_measured)
    if any(not 0 <= i < len(DEFAULT_CONFIGS) for i in only):
        raise UserError(f"--only takes indices 0..{len(DEFAULT_CONFIGS) - 1} (got {list(only)})")
    click.echo(HEADER)
    res = bench_plan_vs_measured([DEFAULT_CONFIGS[i] for i in only] if only else DEFAULT_CONFIGS,
                                 threads, Path(out_dir), log=click.echo)
    click.echo(f"tensors all within {res['tolerance']:.0%}: {res['all_within_tolerance']}; "
               f"process: {res['all_process_within_tolerance']}  ({res['md_path']})")


@bench.command("fit-vs-measured")
@click.option("--keep", is_flag=True, help="keep the existing rows; run only the missing ones")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="benchmarks/results",
              show_default=True)
def bench_fit_vs_measured_cmd(keep, out_dir):
    """`train --fit` on the CPU profiles: measured peak RSS against the plan and the budget."""
    from edgetrain.bench.fit_vs_measured import HEADER, bench_fit_vs_measured  # imports torch
    click.echo(HEADER)
    res = bench_fit_vs_measured(out_dir=Path(out_dir), log=click.echo, keep=keep)
    click.echo(f"all within budget: {res['all_within_budget']}  ({res['md_path']})")


@bench.command("data-stream")
@click.option("--n", type=int, default=5000, show_default=True, help="images in the small folder")
@click.option("--factor", type=int, default=8, show_default=True,
              help="the large folder holds factor x N")
@click.option("--image-size", default="64x64", show_default=True, help="HxW of the packs")
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--work", type=click.Path(file_okay=False), default=None,
              help="where the image folders and packs go (default: a temporary directory)")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="benchmarks/results",
              show_default=True)
def bench_data_stream_cmd(n, factor, image_size, batch_size, threads, work, out_dir):
    """Peak RSS of image folders of N and factor x N images, streamed from the pack vs in RAM
    (e2e and sequential; the throughput and packing parts: benchmarks/data_stream.py)."""
    from edgetrain.bench.data_stream import MemorySetup, run_memory_table  # imports torch
    if n < 8 or factor < 2:
        raise UserError(f"--n must be >= 8 and --factor >= 2 (got {n}, {factor})")
    setup = MemorySetup(n=n, factor=factor, image_size=parse_image_size(image_size),
                        batch_size=batch_size, threads=threads)
    res = run_memory_table(setup, Path(work or tempfile.mkdtemp(prefix="edgetrain-data-bench-")),
                           Path(out_dir), echo=click.echo)
    click.echo(f"wrote {res['md_path']}")
