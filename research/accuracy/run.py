#!/usr/bin/env python
"""Accuracy grids: TRGL vs VanGL vs end-to-end over regimes, train sizes and seeds.

    python -m research.accuracy.run --preset cpu          # < 1 h on 2 cores
    nohup python -m research.accuracy.run --preset cpu > log &

Presets: smoke (tests), cpu, paper (GPU), paper-cpu (the paper's Tables 12/13 at CPU scale; the
whole study with tuning is `python -m research.paper_cpu.run`). Results go to
research/accuracy/results/ (resumable: an interrupted invocation's runs are reused).
It parses argv and calls `research.accuracy.accuracy.run_benchmark`; nothing else.
"""
from __future__ import annotations

from pathlib import Path
import sys

import click

from edgetrain.errors import UserError


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--preset", type=click.Choice(["smoke", "cpu", "paper", "paper-cpu"]), default="cpu",
              show_default=True, help="grid: smoke (tests), cpu (< 1 h on 2 cores), paper (GPU), "
                                      "paper-cpu (the paper's Tables 12/13 at CPU scale, ~4 h)")
@click.option("--data", "datasets", multiple=True, help="only these data sets (repeatable)")
@click.option("--seeds", type=int, default=None, help="number of seeds (default: the preset's)")
@click.option("--out-dir", type=click.Path(file_okay=False), default="research/accuracy/results",
              show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True)
@click.option("--threads", type=int, default=1, show_default=True,
              help="torch threads (0: torch's default)")
@click.option("--resume/--fresh", default=True, show_default=True,
              help="reuse the runs an interrupted invocation left in the results JSON")
@click.option("--plots/--no-plots", default=True, show_default=True)
def accuracy(preset, datasets, seeds, out_dir, device, threads, resume, plots):
    """TRGL vs VanGL vs end-to-end accuracy over regimes, train sizes and seeds."""
    from research.accuracy.accuracy import run_benchmark  # imports torch: deferred
    from research.accuracy.presets import narrow_grid
    grid = narrow_grid(preset, list(datasets), seeds)
    out = run_benchmark(grid, Path(out_dir), device=device, threads=threads or None,
                        resume=resume, plots=plots, log=click.echo)
    for p in out["paths"]:
        click.echo(f"wrote {p}")


def main(argv: list[str] | None = None) -> int:
    """Run the command; a user's mistake is one line on stderr and exit code 2."""
    try:
        accuracy.main(argv, prog_name="research.accuracy.run", standalone_mode=False)
    except (click.UsageError, UserError) as e:
        msg = e.format_message() if isinstance(e, click.UsageError) else str(e)
        print(f"error: {msg.strip().splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
