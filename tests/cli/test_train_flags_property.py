"""Property: any combination of `edgetrain train` flags and values (in range, out of range,
non-finite, wrong type) ends in success or in exit 2 with one line on stderr, no traceback,
and no half-written run directory. Derandomised and bounded (tiny data, one epoch); a larger
budget under the slow marker."""
from __future__ import annotations

from pathlib import Path
import tempfile

from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings, strategies as st
import pytest

from edgetrain.cli import cli

BASE = ["--data", "digits", "--train-size", "60", "--model", "kmresnet", "--width", "4",
        "--depth", "2", "--modules", "2", "--epochs", "1", "--laps", "1", "--batch-size", "32",
        "--device", "cpu", "--no-progress"]

WRONG = st.sampled_from(["abc", "", "1.5.2", "--", "0x10", "None", "[]"])
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32).map(repr),
                   st.sampled_from(["inf", "-inf", "nan", "1e309", "-0.0", "0", "1"]), WRONG)
INTS = st.one_of(st.integers(-3, 6).map(str), st.sampled_from(["99", "100000", "1.5"]), WRONG)
CHOICES = {"--mode": ["e2e", "parallel", "sequential", "multilap", "bogus"],
           "--tau-schedule": ["constant", "midpoint", "multipliers", "x"],
           "--head": ["dgl", "linear", "mlp", "nope"], "--split": ["depth", "memory", "?"],
           "--optimizer": ["sgd", "adamw", "lbfgs"],
           "--cache-dtype": ["float32", "float16", "bfloat16", "int8"],
           "--transport-scaling": ["mean", "sample", "max"],
           "--precision": ["fp32", "bf16", "fp16", "int8"]}
FLOAT_FLAGS = ["--tau", "--lr", "--momentum", "--weight-decay", "--label-smoothing",
               "--val-fraction", "--mult-h", "--mult-lambda1", "--init-gain", "--prefetch-mib"]
INT_FLAGS = ["--epochs", "--laps", "--modules", "--batch-size", "--cache-views", "--mult-s",
             "--seed", "--train-size", "--width", "--depth", "--buffer-size"]
OTHER = {"--memory-budget": st.sampled_from(["1KiB", "64GiB", "abc", "0", "-1MiB", "1e9"]),
         "--input": st.sampled_from(["3x8x8", "1x0x8", "axbxc", "8x8"]),
         "--cache-dir": st.sampled_from(["/etc/hostname", "/proc/nope/x", "CACHE"]),
         "--data": st.sampled_from(["digits", "synthetic", "nope"])}


@st.composite
def flag_sets(draw) -> list[str]:
    strategies = {**{f: st.sampled_from(v) for f, v in CHOICES.items()},
                  **{f: FLOATS for f in FLOAT_FLAGS}, **{f: INTS for f in INT_FLAGS}, **OTHER}
    names = draw(st.lists(st.sampled_from(sorted(strategies)), min_size=1, max_size=4,
                          unique=True))
    args = []
    for n in names:
        args += [n, draw(strategies[n])]
    if draw(st.booleans()):
        args.append(draw(st.sampled_from(["--no-transport", "--no-augment", "--no-cosine",
                                          "--distributed", "--bogus-flag"])))
    return args


def check(args: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out, cache = Path(tmp) / "run", str(Path(tmp) / "cache")
        args = [cache if a == "CACHE" else a for a in args]
        r = CliRunner().invoke(cli, ["train", *BASE, *args, "--out", str(out)])
        text = r.output.strip()
        assert "Traceback" not in text, (args, text)
        assert not isinstance(r.exception, Exception) or isinstance(r.exception, SystemExit), \
            (args, repr(r.exception))
        if r.exit_code == 0:
            assert (out / "metrics.json").is_file(), args
        else:
            assert r.exit_code == 2, (args, r.exit_code, text)
            assert len(text.splitlines()) == 1 and text.startswith("error:"), (args, text)
            if (out / "config.json").exists():  # failed mid-run: a resumable checkpoint, whole
                assert (out / "state.json").is_file(), (args, text)
                assert not list(out.rglob(".*.tmp")), args
        assert not (out / "lock").exists(), args


@settings(max_examples=12, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(flag_sets())
def test_random_train_flags_end_in_success_or_one_line_exit_2(args):
    check(args)


@pytest.mark.slow
@settings(max_examples=60, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(flag_sets())
def test_random_train_flags_large_budget(args):
    check(args)
