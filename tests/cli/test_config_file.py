"""`--config FILE.toml` and `--print-config` (issue #28), the options generated from RunConfig,
and a run directory written by edgetrain 0.1.0 (tests/fixtures/run-0.1.0, made with
`edgetrain train --data digits --train-size 200 --width 4 --depth 2 -K 2 --mode sequential
--epochs 1 --batch-size 32 --device cpu --device-profile cpu-2gb`) read by this version."""
from __future__ import annotations

import json
from pathlib import Path
import shutil
import subprocess
import sys

from click.testing import CliRunner
import pytest

from edgetrain.cli import cli
from edgetrain.config import GROUPS, RunConfig, field_meta, field_names
from edgetrain.options.command import train_fields
from edgetrain.registry import DATASET_NAMES, MODEL_NAMES
from edgetrain.storage.rundir import config_hash

FIXTURE = Path(__file__).parents[1] / "fixtures" / "run-0.1.0"
TINY = ["--train-size", "200", "--width", "4", "--depth", "2", "--batch-size", "32",
        "--device", "cpu", "--no-progress"]


def _print_config(*args) -> str:
    r = CliRunner().invoke(cli, ["train", "--print-config", *args])
    assert r.exit_code == 0, r.output
    return r.output


def test_every_field_has_a_group_and_a_one_line_doc():
    for name in field_names():
        meta = field_meta(name)
        assert meta["group"] in GROUPS, name
        assert meta["doc"] and "\n" not in meta["doc"], name


def test_print_config_then_config_trains_that_configuration(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text(_print_config("--mode", "sequential", "--modules", "2", "--epochs", "2",
                                  *TINY[:8]))
    r = CliRunner().invoke(cli, ["train", "--config", str(toml), "--no-progress",
                                 "--out", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert (cfg["mode"], cfg["modules"], cfg["epochs"], cfg["width"]) == ("sequential", 2, 2, 4)
    r = CliRunner().invoke(cli, ["train", "--config", str(toml), "--epochs", "4",
                                 "--no-progress", "--out", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "b" / "config.json").read_text())["epochs"] == 4


def test_print_config_resolves_nothing_and_reads_back_the_same(tmp_path):
    text = _print_config("--input", "1x8x8", "--data", "synthetic", "--train-modules", "1:2")
    assert 'device = "auto"' in text and "# cache_dtype = (unset)" in text
    assert "input_shape = [1, 8, 8]" in text and "train_modules = [1, 2]" in text
    (tmp_path / "a.toml").write_text(text)
    again = _print_config("--config", str(tmp_path / "a.toml"))
    assert again == text


@pytest.mark.parametrize("edit,message", [
    (("lr = 0.05", "lr = -1.0"), "optimisation.lr: --lr must be > 0"),
    (("lr = 0.05", 'lr = "fast"'), "optimisation.lr: --lr must be a number"),
    (("lr = 0.05", "lrr = 0.05"), "unknown key optimisation.lrr"),
    (("[method]", "[methods]"), "unknown key 'methods'"),
    (("modules = 4", "modules = 0"), "method.modules: --modules must be >= 1"),
    (("[data]", "[data"), "is not valid TOML"),
    (("# train_modules = (unset)", 'train_modules = [1, "a"]'), "finetune.train_modules:"),
    (("# device_profile = (unset)", "device_profile = 5"), "budget.device_profile:"),
    (("# memory_budget = (unset)", "memory_budget = true"), "budget.memory_budget:"),
    (("# memory_budget = (unset)", 'memory_budget = "lots"'), "budget.memory_budget:"),
])
def test_a_bad_key_or_value_is_one_line_naming_it_and_the_file(tmp_path, edit, message):
    path = tmp_path / "bad.toml"
    path.write_text(_print_config().replace(*edit))
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["train", "--config", str(path), "--out", str(out)])
    assert r.exit_code == 2
    line = r.output.strip()
    assert "\n" not in line and message in line and "bad.toml" in line, line
    assert not out.exists()  # nothing written


def test_the_command_line_overrides_the_file_not_the_defaults(tmp_path):
    path = tmp_path / "f.toml"
    path.write_text('[optimisation]\nlr = 0.2\nseed = 3\n')
    text = _print_config("--config", str(path), "--seed", "0")
    assert "lr = 0.2" in text and "seed = 0" in text


def test_help_lists_the_registered_models_and_data_sets_without_torch():
    code = ("import sys; from edgetrain.cli import main\n"
            "try:\n    main(['train', '--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for name in MODEL_NAMES + DATASET_NAMES:
        assert name in r.stdout.replace("\n", " ").replace("  ", " ")
    r = subprocess.run([sys.executable, "-c", code.replace("'train', ", "")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_the_declared_names_are_the_registries():
    from edgetrain.data import list_datasets
    from edgetrain.models import list_models
    assert sorted(MODEL_NAMES) == list_models()
    assert sorted(DATASET_NAMES) == list_datasets()


def test_every_option_spelling_of_0_1_0_is_kept():
    params = {o for p in train_opts() for o in p.opts + p.secondary_opts}
    for spelling in ("-K", "--modules", "--input", "--no-transport", "--augment", "--no-augment",
                     "--cosine", "--no-cosine", "--init-strict", "--no-init-strict", "--flip",
                     "--no-flip", "--distributed", "--skip-bad-images", "--device-profile",
                     "--memory-budget", "--resume", "--fit", "--out", "--progress"):
        assert spelling in params, spelling
    assert {n for n in train_fields()} <= {p.name.removeprefix("no_") for p in train_opts()}


def train_opts():
    return [p for p in cli.commands["train"].params]


def test_plan_takes_device_profile_and_the_old_device_with_a_deprecation_line():
    args = ["--model", "kmresnet", "--width", "4", "--depth", "2"]
    r = CliRunner().invoke(cli, ["plan", "--device-profile", "raspberry-pi-4-4gb", *args])
    assert r.exit_code == 0, r.output
    assert "deprecated" not in r.output and "command" in r.output
    old = CliRunner().invoke(cli, ["plan", "--device", "raspberry-pi-4-4gb", *args])
    assert old.exit_code == 0, old.output
    assert old.output.count("deprecated") == 1
    assert old.output.replace(old.output.splitlines()[0] + "\n", "") == r.output


# ------------------------------------------------------------------ a 0.1.0 run directory
def test_a_0_1_0_config_json_reads_back_to_the_same_keys_and_hash():
    d = json.loads((FIXTURE / "config.json").read_text())
    cfg = RunConfig.from_dict(d)
    assert cfg.device_profile == "cpu-2gb" and cfg.shared_cpu_gpu_memory is False
    now = cfg.to_dict()
    assert {k: now[k] for k in d} == d  # flat keys, `extra` included, none renamed or changed
    added = {k: now[k] for k in set(now) - set(d)}  # 0.2.0's keys, at the values meaning "as before"
    assert added == {"precision_requested": None, "memory_format": "auto", "compile": False}
    state = json.loads((FIXTURE / "state.json").read_text())
    assert state["config_sha256"] == config_hash(cfg)


def test_a_0_1_0_run_dir_resumes_evaluates_and_exports(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    metrics = json.loads((run / "metrics.json").read_text())
    r = CliRunner().invoke(cli, ["train", "--resume", str(run), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert f"{metrics['best_test_acc']:.4f}" in r.output
    r = CliRunner().invoke(cli, ["eval", str(run)])
    assert r.exit_code == 0, r.output
    pytest.importorskip("onnxruntime")
    r = CliRunner().invoke(cli, ["export", str(run), "--out", str(tmp_path / "m.onnx")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "m.onnx").is_file()


# ------------------------------------------------------------------ the shipped recipes
RECIPES = sorted((Path(__file__).parents[2] / "recipes").glob("*.toml"))


def test_the_recipes_are_the_quick_start_the_pi_fine_tune_and_each_paper_cpu_part():
    names = {p.stem for p in RECIPES}
    assert {"quickstart", "raspberry-pi-finetune"} <= names
    assert {f"paper-cpu-{t}-{d}" for t in ("t13", "t12") for d in ("digits", "fashion-mnist")
            } <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_each_recipe_loads_validates_and_names_its_launch_command(path):
    from edgetrain.options.request import check_requested
    from edgetrain.options.file import read_config_file
    values = read_config_file(path)
    cfg = check_requested(values)  # every value valid, a device profile that exists
    assert isinstance(cfg, RunConfig)
    assert f"# launch: edgetrain train --config recipes/{path.name}" in path.read_text()
    r = CliRunner().invoke(cli, ["train", "--print-config", "--config", str(path)])
    assert r.exit_code == 0, r.output


PARTS = [("t13", "digits", "parallel-trgl", 150), ("t12", "digits", "sequential-trgl", 300),
         ("t13", "fashion-mnist", "parallel-trgl", 150),
         ("t12", "fashion-mnist", "sequential-trgl", 300)]


@pytest.mark.parametrize("table,data,arm,size", PARTS, ids=lambda v: str(v))
def test_each_paper_cpu_recipe_is_its_presets_trgl_cell(table, data, arm, size):
    """The recipe trains exactly the preset's run of that cell (seed 0), with the lr / tau
    tuned on validation (the committed tuning JSON)."""
    from edgetrain.options.file import read_config_file
    try:  # the preset moves from edgetrain/bench to research/paper_cpu (issue #26)
        from research.accuracy.accuracy import run_config
        from research.paper_cpu.paper_cpu import part_grid, tuned_overrides
    except ImportError:
        from edgetrain.bench.accuracy import run_config
        from edgetrain.bench.paper_cpu import part_grid, tuned_overrides
    root = Path(__file__).parents[2]
    found = list(root.glob(f"**/accuracy-paper-cpu-tuning-{table}-{data}.json"))
    assert found, "the tuning JSON of the part"
    grid = part_grid(table, data, tuned_overrides(json.loads(found[0].read_text())))
    want = run_config(grid, data, size, arm, 0)
    got = RunConfig(**read_config_file(root / "recipes" / f"paper-cpu-{table}-{data}.toml"))
    assert got == want


def test_a_budget_on_the_command_line_replaces_the_files_either_kind(tmp_path):
    path = tmp_path / "f.toml"
    path.write_text('[budget]\nmemory_budget = "1GiB"\n')
    text = _print_config("--config", str(path), "--device-profile", "cpu-2gb")
    assert 'device_profile = "cpu-2gb"' in text and "# memory_budget = (unset)" in text
    assert 'memory_budget = "1GiB"' in _print_config("--config", str(path))


# ------------------------------------------------------------------ the training path
def _calls_to_train_step(monkeypatch, run) -> list[str]:
    """The functions between `cli.train` (or `schedule.train`) and `train_step`, innermost
    last, seen from inside the first `train_step`."""
    import inspect
    from edgetrain.method import loop
    seen, real = [], loop.train_step

    def spy(*a, **kw):
        if not seen:
            frames = [f.function for f in inspect.stack(0)[1:]
                      if "edgetrain" in f.filename and "/tests/" not in f.filename]
            top = max(i for i, n in enumerate(frames) if n == "train")  # the outermost train
            seen.extend(reversed(frames[:top]))
        return real(*a, **kw)
    monkeypatch.setattr(loop, "train_step", spy)
    run()
    return [*seen, "train_step"]


@pytest.mark.parametrize("mode", ["sequential", "e2e"])
def test_cli_train_reaches_train_step_in_at_most_six_calls(monkeypatch, tmp_path, mode):
    def run():
        r = CliRunner().invoke(cli, ["train", *TINY, "--mode", mode, "-K", "2", "--epochs", "1",
                                     "--out", str(tmp_path / "r")])
        assert r.exit_code == 0, r.output
    chain = _calls_to_train_step(monkeypatch, run)
    assert len(chain) <= 6, chain
    assert not any("fit" in name for name in chain), chain  # "fit" is fitting into memory


def test_the_in_memory_path_is_as_short(monkeypatch, tmp_path):
    from edgetrain.regimes.schedule import train
    cfg = RunConfig(data="digits", train_size=200, width=4, depth=2, modules=2, mode="sequential",
                    epochs=1, batch_size=32, device="cpu", in_memory=True)
    chain = _calls_to_train_step(monkeypatch, lambda: train(cfg, tmp_path / "r"))
    assert chain[0] == "train_in_memory" and len(chain) <= 5, chain


# ------------------------------------------------------------------ any file: 0 or one line, 2
def _file_values():
    from hypothesis import strategies as st
    scalar = st.one_of(st.booleans(), st.integers(-3, 70), st.floats(allow_nan=True),
                       st.sampled_from(["auto", "cpu", "sgd", "2:4", "3x8x8", "a,b", "", "digits",
                                        "cpu-2gb", "1GiB", "segments:2", "bf16"]))
    value = st.one_of(scalar, st.lists(st.one_of(st.integers(-1, 9), st.text(max_size=3)),
                                       max_size=4))
    return st.dictionaries(st.sampled_from(train_fields()), value, max_size=5)


def test_any_file_is_accepted_or_refused_in_one_line_with_exit_2(tmp_path):
    """Random keys and values (hypothesis): `--print-config --config` ends in exit 0, or in
    exit 2 with one line naming the file; never a traceback."""
    from hypothesis import HealthCheck, given, settings
    from edgetrain.options.file import write_config_file

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(_file_values())
    def check(values):
        path = tmp_path / "any.toml"
        path.write_text(write_config_file(values))
        r = CliRunner().invoke(cli, ["train", "--print-config", "--config", str(path)])
        assert r.exit_code in (0, 2), (values, r.output, r.exception)
        if r.exit_code == 2:
            line = r.output.strip()
            assert "\n" not in line and line.startswith("error: ") and "any.toml" in line, (
                values, line)
    check()


# ------------------------------------------------------------------ shipped recipes by name
def test_a_shipped_recipe_is_named_by_its_name_from_any_directory(tmp_path, monkeypatch):
    """`--config quickstart` reads the shipped recipe (package data in a wheel); a name that
    is neither a file nor a recipe is one line listing the recipes, exit 2."""
    from edgetrain.options.file import RECIPES_DIR, recipe_names
    monkeypatch.chdir(tmp_path)  # not the checkout: recipes/quickstart.toml is not here
    assert {"quickstart", "raspberry-pi-finetune"} <= set(recipe_names())
    by_name = CliRunner().invoke(cli, ["train", "--config", "quickstart", "--print-config"])
    by_path = CliRunner().invoke(cli, ["train", "--config", str(RECIPES_DIR / "quickstart.toml"),
                                       "--print-config"])
    assert by_name.exit_code == 0 and by_path.exit_code == 0, by_name.output
    body = lambda out: [ln for ln in out.splitlines() if not ln.startswith("#")]  # noqa: E731
    assert body(by_name.output) == body(by_path.output) and 'mode = "multilap"' in by_name.output
    bad = CliRunner().invoke(cli, ["train", "--config", "quickstrat", "--out", "r"])
    assert bad.exit_code == 2 and len(bad.output.strip().splitlines()) == 1
    assert "quickstart" in bad.output and not (tmp_path / "r").exists()
