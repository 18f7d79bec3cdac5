"""Accuracy benchmark: statistics, the smoke grid end to end, resume, CLI errors."""
from __future__ import annotations

import json
import math

from click.testing import CliRunner
import pytest

from research.accuracy import accuracy as acc
from research.accuracy import presets
from research.accuracy.run import accuracy as accuracy_cmd
from research.accuracy.accuracy_report import mean_ci95
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
    import research.accuracy.accuracy as mod
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
    for name in presets.PRESETS:
        p = presets.preset(name)
        for grid in p.parts if isinstance(p, acc.GridSet) else [p]:
            assert len(grid.seeds) >= 2
            for d, n, a, s in acc.grid_points(grid)[: len(grid.arms) * 8]:
                cfg = acc.run_config(grid, d, n, a, s)  # RunConfig validates (epochs % laps, ...)
                assert cfg.transport == a.endswith("-trgl")
    cpu = presets.preset("cpu")
    assert len(cpu.seeds) >= 5 and set(cpu.datasets) == {"fashion-mnist", "digits"}
    assert set(cpu.arms) == set(acc.ARMS)


@pytest.mark.parametrize("args,msg", [
    (["--preset", "smoke", "--seeds", "1"], "--seeds must be >= 2"),
    (["--preset", "smoke", "--data", "cifar10"], "no data set cifar10"),
    (["--preset", "smoke", "--data", "digits", "--threads", "-1"], "--threads must be >= 0"),
    (["--preset", "nope"], "Invalid value"),
])
def test_cli_user_errors_are_one_line(tmp_path, args, msg, capsys):
    from research.accuracy.run import main
    assert main([*args, "--out-dir", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    lines = (captured.out + captured.err).strip().splitlines()
    assert len(lines) == 1 and msg in lines[0]


@pytest.mark.slow
@pytest.mark.skipif(not fashion_available(),
                    reason="Debian's dataset-fashion-mnist is not installed "
                           "(apt-get install dataset-fashion-mnist)")
def test_smoke_grid_on_fashion_mnist_via_cli(tmp_path):
    grid = acc.smoke_grid(("digits", "fashion-mnist"))
    r = CliRunner().invoke(accuracy_cmd, ["--preset", "smoke", "--data", "digits",
                                 "--data", "fashion-mnist", "--out-dir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "accuracy-smoke.json").read_text())
    _check_results(res, grid)
    _check_table((tmp_path / "accuracy-smoke.md").read_text(), grid)
    assert (tmp_path / "accuracy-smoke-modules-fashion-mnist.png").is_file()


# --------------------------------------------------------------------------- paper-cpu
def _paper_parts() -> dict[str, acc.AccuracyGrid]:
    gs = presets.preset("paper-cpu")
    assert isinstance(gs, acc.GridSet) and gs.name == "paper-cpu"
    return {p.name.removeprefix("paper-cpu-"): p for p in gs.parts}


def test_paper_cpu_has_the_tables_the_issue_names():
    """Table 13 analogue: 20-1 K-M ResNet in parallel at 150 / 600 samples; Table 12
    analogue: 10-1 sequential and multilap at 300 / 1000; digits first, >= 3 seeds."""
    parts = _paper_parts()
    assert list(parts) == ["t13-digits", "t12-digits", "t13-fashion-mnist", "t12-fashion-mnist"]
    for name, g in parts.items():
        table, d = name.split("-", 1)
        assert list(g.datasets) == [d] and len(g.seeds) >= 3
        assert g.base["model"] == "kmresnet" and g.base["width"] in (16, 32)
        assert g.base["width"] == (32 if d == "digits" else 16)
        depth = 20 if table == "t13" else 10
        assert g.base["depth"] == g.base["modules"] == depth  # one block per module
        if table == "t13":
            assert g.arms == ["e2e", "parallel-vangl", "parallel-trgl"]
            assert set(g.datasets[d]) == {150, 600}
        else:
            assert g.arms == ["e2e", "sequential-vangl", "sequential-trgl", "multilap-vangl",
                              "multilap-trgl"]
            assert set(g.datasets[d]) == {300, 1000}


def test_paper_cpu_e2e_is_compute_matched():
    """Every arm of a cell trains every sample through every block the same number of
    times (RunConfig's epochs: per module for sequential/multilap, in all for e2e/parallel)."""
    from research.paper_cpu.paper_cpu import block_passes
    assert block_passes("e2e", 40) == block_passes("parallel-trgl", 40) == 40
    assert block_passes("sequential-vangl", 40) == 40
    assert block_passes("multilap-trgl", 40, laps=2) == 40  # 2 laps of 20 epochs
    with pytest.raises(UserError, match="multiple of laps"):
        block_passes("multilap-vangl", 41, laps=2)
    for g in _paper_parts().values():
        for d, n, _, s in acc.grid_points(g):
            cfgs = [acc.run_config(g, d, n, a, s) for a in g.arms]
            passes = {block_passes(a, c.epochs, c.laps) for a, c in zip(g.arms, cfgs)}
            assert len(passes) == 1, (g.name, n)
            e2e = cfgs[0]
            assert e2e.mode == "e2e" and not e2e.transport
            assert all(c.depth == e2e.depth and c.width == e2e.width for c in cfgs)


def test_paper_cpu_validation_is_not_carved_from_the_small_subset():
    from edgetrain.data.splits import load_splits
    g = _paper_parts()["t13-digits"]
    cfg = acc.run_config(g, "digits", 150, "parallel-trgl", 0)
    small = load_splits("digits", train_size=150, val_fraction=cfg.val_fraction, seed=0)
    full = load_splits("digits", train_size=None, val_fraction=cfg.val_fraction, seed=0)
    assert len(small.train) == 150 and len(small.val) == len(full.val) >= 250
    assert bool((small.val.y == full.val.y).all())  # the same validation set at any size


def _fake_runner(cfg):
    """Validation accuracy peaks at lr 0.05 / tau 10; test accuracy the opposite way."""
    score = 0.9 - abs(cfg.lr - 0.05) - (0.01 * abs(math.log10(cfg.tau) - 1) if cfg.transport
                                         else 0.0)
    mods = [{"val_acc": score, "test_acc": 1.0 - score, "curve": {"ce": [1.0, 0.5]}}] * 2
    return {"modules": mods, "best_val_acc": score, "best_test_acc": 1.0 - score,
            "last_test_acc": 1.0 - score, "run_s": 0.0}


def test_paper_cpu_tuning_chooses_on_validation_and_stores_no_test(tmp_path):
    from research.paper_cpu import paper_cpu as pc
    g = _paper_parts()["t13-digits"]
    path = tmp_path / "tune.json"
    t = pc.tune_part(g, 150, path, seeds=[100, 101], runner=_fake_runner)
    assert t["best"] == {"e2e": {"lr": 0.05}, "parallel-vangl": {"lr": 0.05},
                         "parallel-trgl": {"lr": 0.05, "tau": 10.0}}
    stored = json.loads(path.read_text())
    assert "provenance" in stored  # (its command line names this test file: left out below)
    text = json.dumps({k: v for k, v in stored.items() if k != "provenance"})
    assert "test" not in text  # nothing of the test split is even stored
    taus = {r["overrides"]["tau"] for r in t["runs"] if r["arm"] == "parallel-trgl"}
    assert taus == set(pc.TAU_SWEEP)  # swept over decades
    lrs = {r["overrides"]["lr"] for r in t["runs"] if r["arm"] == "parallel-trgl"}
    assert lrs == {t["best"]["parallel-vangl"]["lr"]}  # TRGL at VanGL's lr: no lr confound
    assert {r["seed"] for r in t["runs"]}.isdisjoint(g.seeds)  # tuning seeds are not grid seeds
    n = len(t["runs"])
    again = pc.tune_part(g, 150, path, seeds=[100, 101],
                         runner=lambda cfg: pytest.fail("tuning resumed by retraining"))
    assert len(again["runs"]) == n and again["best"] == t["best"]


@pytest.mark.parametrize("failure", ["loss", "cache"])
def test_paper_cpu_tuning_scores_a_diverged_setting_zero_and_goes_on(tmp_path, failure):
    """A tau small enough to blow the loss (or the activations, beyond the float16 cache's
    range) up is a result of the sweep, not the end of it."""
    from research.paper_cpu import paper_cpu as pc
    from research.paper_cpu.paper_cpu_report import write_tuning_report
    from edgetrain.method.loop import NonFiniteLoss
    from edgetrain.storage.cache import CacheOverflow

    def runner(cfg):
        if cfg.transport and cfg.tau == 0.01:
            raise (NonFiniteLoss if failure == "loss" else CacheOverflow)("blew up")
        return _fake_runner(cfg)

    g = _paper_parts()["t13-digits"]
    t = pc.tune_part(g, 150, tmp_path / "accuracy-paper-cpu-tuning-t13-digits.json",
                     seeds=[100, 101], runner=runner)
    bad = [r for r in t["runs"] if "diverged" in r]
    assert len(bad) == 2 and {r["overrides"]["tau"] for r in bad} == {0.01}
    assert all(r["last_val_acc"] == 0.0 for r in bad)
    assert t["best"]["parallel-trgl"] == {"lr": 0.05, "tau": 10.0}
    write_tuning_report(tmp_path)
    row = [l for l in (tmp_path / "accuracy-paper-cpu-tuning.md").read_text().splitlines()
           if '"tau": 0.01' in l]
    assert len(row) == 1 and row[0].rstrip(" |").endswith("2")


def test_paper_cpu_gridset_runs_and_reports(tmp_path):
    """A tiny GridSet through run_traced: per-part JSON with curves and residue energies,
    then the combined page with a verdict per claim."""
    import dataclasses
    from research.paper_cpu import paper_cpu_report as rep
    parts = []
    for name, arms in (("paper-cpu-t13-digits", ["e2e", "parallel-vangl", "parallel-trgl"]),
                       ("paper-cpu-t12-digits", ["e2e", "sequential-vangl", "sequential-trgl"])):
        g = acc.smoke_grid(("digits",))
        parts.append(dataclasses.replace(g, name=name, arms=arms,
                                         base={**g.base, "depth": 3, "modules": 3}))
    gs = acc.GridSet("paper-cpu", parts, runner=rep.run_traced, report=rep.write_paper_report)
    out = acc.run_benchmark(gs, tmp_path, plots=True)
    names = {p.name for p in out["paths"]}
    assert {"accuracy-paper-cpu.json", "accuracy-paper-cpu.md", "accuracy-paper-cpu.png",
            "accuracy-paper-cpu-curves.png", "accuracy-paper-cpu-t13-digits.json"} <= names
    res = json.loads((tmp_path / "accuracy-paper-cpu-t12-digits.json").read_text())
    for r in res["runs"]:
        k = 1 if r["arm"] == "e2e" else 3
        assert len(r["modules"]) == k and len(r["residue_energy"]["mean"]) == 3
        assert all(len(m["curve"]["ce"]) == r["epochs"] for m in r["modules"])
    summary = json.loads((tmp_path / "accuracy-paper-cpu.json").read_text())
    assert {c["verdict"].split(" ")[0] for c in summary["claims"]} <= {
        "shown", "not", "contradicted"}
    md = (tmp_path / "accuracy-paper-cpu.md").read_text()
    assert "81.84" in md and "45.67" in md  # the paper's numbers beside ours
    glance = md.split("## Verdicts at a glance")[1].split("\n## ")[0]
    assert "| t13-digits n=100 | t12-digits n=100 |" in glance
    assert glance.count("\n| parallel TRGL > VanGL, last block |") == 1
    pooled = [c for c in summary["claims"] if c["part"] == "all"]
    n_pairs = sum(1 for res in (json.loads((tmp_path / f"accuracy-{n}.json").read_text())
                                for n in ("paper-cpu-t13-digits", "paper-cpu-t12-digits"))
                  for r in res["runs"] if r["arm"].endswith("-trgl"))
    assert [c["diff"]["n"] for c in pooled] == [n_pairs, n_pairs]  # every TRGL run, paired
    # the investigation's figures and tables from the same results, for every part
    from research.investigate.investigate import write_investigation
    names = {p.name for p in write_investigation(tmp_path)}
    assert {"investigate-paper-cpu-transport-t13-digits-n100.png",
            "investigate-paper-cpu-transport-t12-digits-n100.png",
            "investigate-paper-cpu-tables.md"} <= names, names
    tables = (tmp_path / "investigate-paper-cpu-tables.md").read_text()
    for row in ("| t13-digits | 100 | parallel-vangl |", "| t12-digits | 100 | sequential-trgl |",
                "| t13-digits | 100 | parallel |", "| t12-digits | 100 | sequential |"):
        assert row in tables


def test_verdicts_read_the_interval():
    from research.paper_cpu.paper_cpu_report import verdict
    assert verdict({"mean": 0.02, "ci95": 0.01}) == "shown"
    assert verdict({"mean": -0.02, "ci95": 0.01}) == "contradicted"
    assert verdict({"mean": 0.02, "ci95": 0.03}).startswith("not shown")
    assert verdict({"mean": 0.02, "ci95": None}) == "not measured"


def test_investigation_runs_vary_one_thing_each():
    from research.investigate.investigate import investigation_gridset
    tuned = {"paper-cpu-t13-digits": {"parallel-trgl": {"lr": 0.05, "tau": 0.1}}}
    parts = {p.name: p for p in investigation_gridset(tuned).parts}
    t13 = _paper_parts()["t13-digits"]
    for k in (10, 40):
        g = parts[f"investigate-k{k}"]
        assert g.base == {**t13.base, "depth": k, "modules": k}
        assert g.datasets == {"digits": {150: t13.datasets["digits"][150]}}
        same = parts[f"investigate-k{k}-vangl-lr"]  # VanGL of the K runs at TRGL's lr
        assert same.base == g.base and same.datasets == g.datasets and same.seeds == g.seeds
        assert same.arms == ["parallel-vangl"]
        assert same.arm_overrides["parallel-vangl"]["lr"] == 0.05  # TRGL's (tuned above)
    s = parts["investigate-sample"]
    assert s.base == {**t13.base, "transport_scaling": "sample"}
    assert s.arm_overrides["parallel-trgl"] == {"lr": 0.05, "tau": 0.1 * 32 * 8 * 8}


def test_paper_cpu_multilap_takes_sequentials_tuned_values(tmp_path):
    from research.paper_cpu import paper_cpu as pc
    g = _paper_parts()["t12-digits"]
    t = pc.tune_part(g, 300, tmp_path / "accuracy-paper-cpu-tuning-t12-digits.json",
                     seeds=[100, 101], runner=_fake_runner)
    assert not [r for r in t["runs"] if r["arm"].startswith("multilap")]
    assert t["best"]["multilap-trgl"] == t["best"]["sequential-trgl"] == {"lr": 0.05, "tau": 10.0}
    assert t["best"]["multilap-vangl"] == t["best"]["sequential-vangl"]
    # the sweep's page and figure: one panel per arm that swept (multilap once crashed it)
    from research.paper_cpu.paper_cpu_report import write_tuning_report
    assert [p.name for p in write_tuning_report(tmp_path)][-1] == "accuracy-paper-cpu-tau-sweep.png"


def test_plots_of_an_e2e_only_grid(tmp_path):
    """A grid of e2e alone has no per-module panels (it once raised in matplotlib)."""
    import dataclasses
    grid = dataclasses.replace(acc.smoke_grid(("digits",)), arms=["e2e"])
    out = acc.run_benchmark(grid, tmp_path)
    assert sorted(p.name for p in out["paths"]) == [
        "accuracy-smoke-size.png", "accuracy-smoke.json", "accuracy-smoke.md"]
