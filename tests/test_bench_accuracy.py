"""Accuracy benchmark: statistics, the smoke grid end to end, resume, CLI errors."""
from __future__ import annotations

import json
import math

from click.testing import CliRunner
import pytest

from edgetrain.bench import accuracy as acc
from edgetrain.bench.accuracy_report import mean_ci95
from edgetrain.cli import cli
from edgetrain.data.builtin import fashion_available
from edgetrain.errors import UserError

SAMPLE = [0.80, 0.82, 0.78, 0.85, 0.81]
# by hand: mean 0.812, sum of squared deviations 0.00268, s = sqrt(0.00268 / 4) = 0.0258844,
# t_{0.975, 4} = 2.776445 (tables), half-width = 2.776445 * 0.0258844 / sqrt(5) = 0.0321398
SAMPLE_MEAN, SAMPLE_CI = 0.812, 0.0321398


def test_ci95_of_a_known_sample_matches_the_hand_value():
    s = mean_ci95(SAMPLE)
    assert s["n"] == 5
    assert s["mean"] == pytest.approx(SAMPLE_MEAN, abs=1e-12)
    assert s["ci95"] == pytest.approx(SAMPLE_CI, rel=1e-5)


@pytest.mark.parametrize("df,table", [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622),
                                      (30, 2.0423), (120, 1.9799)])
def test_ci95_uses_the_printed_t_quantile(df, table):
    """ci95 = t_{0.975, n-1} * s / sqrt(n), with t as printed in the tables."""
    s = mean_ci95([0.0] * df + [1.0])  # n = df + 1 values
    assert s["ci95"] * math.sqrt(s["n"]) / s["std"] == pytest.approx(table, abs=1e-4)


def test_ci95_matches_scipy():
    from scipy import stats
    for sample in (SAMPLE, [0.1, 0.9], [0.5, 0.52, 0.49, 0.55, 0.47, 0.51, 0.5, 0.53, 0.46, 0.5]):
        lo, hi = stats.t.interval(0.95, len(sample) - 1, loc=sum(sample) / len(sample),
                                  scale=stats.sem(sample))
        assert mean_ci95(sample)["ci95"] == pytest.approx((hi - lo) / 2, rel=1e-7)


def test_ci95_degenerate_samples():
    assert mean_ci95([])["mean"] is None
    one = mean_ci95([0.7])
    assert one["mean"] == 0.7 and one["ci95"] is None
    assert mean_ci95([0.5, 0.5, 0.5])["ci95"] == 0.0


def _check_results(res: dict, grid: acc.AccuracyGrid) -> None:
    """Every requested cell is there, with one run per seed and consistent accuracies."""
    assert res["complete"] is True and res["benchmark"] == "accuracy"
    assert len(res["runs"]) == len(acc.grid_points(grid))
    cells = {(c["dataset"], c["train_size"], c["arm"]): c for c in res["cells"]}
    want = {(d, n, a) for d, sizes in grid.datasets.items() for n in sizes for a in grid.arms}
    assert set(cells) == want
    for c in cells.values():
        assert c["n_seeds"] == len(grid.seeds) and c["seeds"] == sorted(grid.seeds)
        for key in ("best_test_acc", "last_test_acc"):
            assert 0.0 <= c[key]["mean"] <= 1.0 and c[key]["ci95"] >= 0.0
    for r in res["runs"]:
        mods = r["modules"]
        assert len(mods) == (1 if r["arm"] == "e2e" else grid.base["modules"])
        vals = [m["val_acc"] for m in mods]
        assert r["best_depth"] == vals.index(max(vals)) + 1  # chosen on validation
        assert r["best_test_acc"] == mods[r["best_depth"] - 1]["test_acc"]
        assert r["last_test_acc"] == mods[-1]["test_acc"]
        assert r["epochs"] == grid.datasets[r["dataset"]][r["train_size"]]


def _check_table(md: str, grid: acc.AccuracyGrid) -> None:
    for section in ("## Best depth", "## Last module", "## Paper claims"):
        assert section in md
    md, claims = md.split("## Paper claims")
    for d, sizes in grid.datasets.items():
        for n in sizes:  # one row of paired differences per (data set, size)
            assert len([ln for ln in claims.splitlines() if ln.startswith(f"| {d} | {n} |")]) == 1
    header = [ln for ln in md.splitlines() if ln.startswith("| data set |")]
    assert len(header) == 2 and all(a in header[0] for a in grid.arms)
    for d, sizes in grid.datasets.items():
        for n in sizes:
            rows = [ln for ln in md.splitlines() if ln.startswith(f"| {d} | {n} |")]
            assert len(rows) == 2  # one per table
            for row in rows:
                cols = [c.strip() for c in row.strip("|").split("|")][2:]
                assert len(cols) == len(grid.arms)
                assert all("±" in c for c in cols), row  # mean ± CI in every cell


def test_smoke_grid_writes_json_table_and_plots(tmp_path):
    grid = acc.smoke_grid(("digits",))  # the default suite never needs Fashion-MNIST
    out = acc.run_benchmark(grid, tmp_path)
    names = sorted(p.name for p in out["paths"])
    assert names == ["accuracy-smoke-modules-digits.png", "accuracy-smoke-size.png",
                     "accuracy-smoke.json", "accuracy-smoke.md"]
    res = json.loads((tmp_path / "accuracy-smoke.json").read_text())
    _check_results(res, grid)
    _check_table((tmp_path / "accuracy-smoke.md").read_text(), grid)
    for p in out["paths"]:
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a second invocation resumes: nothing is retrained
    def boom(*a, **k):
        raise AssertionError("resume retrained a finished run")
    import edgetrain.bench.accuracy as mod
    orig, mod.run_one = mod.run_one, boom
    try:
        again = acc.run_grid(grid, tmp_path / "accuracy-smoke.json")
    finally:
        mod.run_one = orig
    assert len(again["runs"]) == len(res["runs"])


def test_results_of_another_grid_are_not_mixed_in(tmp_path):
    path = tmp_path / "accuracy-smoke.json"
    path.write_text(json.dumps({"grid": {"name": "other"}, "runs": []}))
    with pytest.raises(UserError, match="different grid"):
        acc.run_grid(acc.smoke_grid(), path)
    path.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        acc.run_grid(acc.smoke_grid(), path)


def test_resume_keeps_only_runs_of_the_same_settings(tmp_path):
    grid = acc.smoke_grid(("digits",))
    grid.datasets = {"digits": {100: 2, 200: 4}}
    runs = [{"dataset": d, "train_size": n, "arm": a, "seed": s, "epochs": grid.datasets[d][n]}
            for d, n, a, s in acc.grid_points(grid)]
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"grid": grid.to_dict(), "runs": runs}))
    narrower = acc.smoke_grid(("digits",))
    narrower.datasets = {"digits": {100: 2, 200: 2}}  # size 200 now trains 2 epochs, not 4
    kept = acc._load_previous(path, narrower)
    assert len(kept) == len(grid.arms) * len(grid.seeds)
    assert {r["train_size"] for r in kept.values()} == {100}
    changed = acc.smoke_grid(("digits",))
    changed.base = {**changed.base, "lr": 0.5}
    with pytest.raises(UserError, match="different grid"):
        acc._load_previous(path, changed)


def test_test_size_is_one_fixed_stratified_subset_for_every_seed():
    from edgetrain.data.splits import load_splits
    a = load_splits("digits", test_size=100, seed=0)
    b = load_splits("digits", test_size=100, seed=3)
    assert len(a.test) == 100 and bool((a.test.y == b.test.y).all())
    assert bool((a.test.x[:] == b.test.x[:]).all())
    assert a.test.y.bincount().min() >= 9  # stratified: every digit about 10 times
    with pytest.raises(UserError, match="larger than"):
        load_splits("digits", test_size=10_000)


def test_presets_are_valid_configurations():
    for name in acc.PRESETS:
        grid = acc.preset(name)
        assert len(grid.seeds) >= 2
        for d, n, a, s in acc.grid_points(grid)[: len(grid.arms) * 8]:
            cfg = acc.run_config(grid, d, n, a, s)  # RunConfig validates (epochs % laps, ...)
            assert cfg.transport == a.endswith("-trgl")
    cpu = acc.preset("cpu")
    assert len(cpu.seeds) >= 5 and set(cpu.datasets) == {"fashion-mnist", "digits"}
    assert set(cpu.arms) == set(acc.ARMS)


@pytest.mark.parametrize("args,msg", [
    (["--preset", "smoke", "--seeds", "1"], "--seeds must be >= 2"),
    (["--preset", "smoke", "--data", "cifar10"], "no data set cifar10"),
    (["--preset", "smoke", "--data", "digits", "--threads", "-1"], "--threads must be >= 0"),
    (["--preset", "nope"], "Invalid value"),
])
def test_cli_user_errors_are_one_line(tmp_path, args, msg):
    r = CliRunner().invoke(cli, ["bench", "accuracy", *args, "--out-dir", str(tmp_path)])
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and msg in lines[0]


@pytest.mark.slow
@pytest.mark.skipif(not fashion_available(),
                    reason="Debian's dataset-fashion-mnist is not installed "
                           "(apt-get install dataset-fashion-mnist)")
def test_smoke_grid_on_fashion_mnist_via_cli(tmp_path):
    grid = acc.smoke_grid(("digits", "fashion-mnist"))
    r = CliRunner().invoke(cli, ["bench", "accuracy", "--preset", "smoke", "--data", "digits",
                                 "--data", "fashion-mnist", "--out-dir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "accuracy-smoke.json").read_text())
    _check_results(res, grid)
    _check_table((tmp_path / "accuracy-smoke.md").read_text(), grid)
    assert (tmp_path / "accuracy-smoke-modules-fashion-mnist.png").is_file()
