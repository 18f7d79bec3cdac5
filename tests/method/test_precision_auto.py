"""`--precision auto` (#29): bf16 where the device computes it natively, fp32 elsewhere.

The detection (`detect_bf16`) is checked against /proc/cpuinfo texts of each CPU kind
(tests/fixtures/cpuinfo) crossed with the torch checks it uses (oneDNN's bf16 kernels, a
CUDA device's compute capability); the resolution against config.json (`precision` is the
resolved one, `precision_requested` the request), the printed line, `train --fit`, `plan`
and `devices calibrate`.
"""
from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner
import pytest

from edgetrain.budget import calibrate
from edgetrain.budget.devices import load_profile
from edgetrain.budget.planner import planned_precision, profile_bf16
from edgetrain.cli import cli
from edgetrain.config import RunConfig
from edgetrain.errors import UserError
from edgetrain.method import precision as precision_mod
from edgetrain.method.precision import (Bf16Check, choose_precision, cpu_flags, detect_bf16,
                                        resolve_precision)
from edgetrain.storage.rundir import config_hash
from tests.method.test_precision import TINY

CPUINFO = Path(__file__).parents[1] / "fixtures" / "cpuinfo"
# fixture -> native bf16 (with oneDNN's bf16 kernels in the build)
KINDS = {
    "x86-avx512_bf16-amd-epyc.txt": True,
    "x86-amx_bf16-xeon-sapphire-rapids.txt": True,
    "x86-avx512-no-bf16-xeon-cascade-lake.txt": False,
    "x86-avx2-no-avx512-amd-epyc-rome.txt": False,
    "x86-sse4-no-avx-atom.txt": False,
    "aarch64-bf16-neoverse-v1-graviton3.txt": True,
    "aarch64-bf16-neoverse-n2.txt": True,
    "aarch64-no-bf16-raspberry-pi-4-cortex-a72.txt": False,
    "aarch64-no-bf16-raspberry-pi-5-cortex-a76.txt": False,
}


def text(name: str) -> str:
    return (CPUINFO / name).read_text()


def test_every_fixture_is_a_case():
    assert {p.name for p in CPUINFO.glob("*.txt")} == set(KINDS)


@pytest.mark.parametrize("name", sorted(KINDS))
@pytest.mark.parametrize("onednn", [True, False])
def test_cpu_detection_of_each_kind(name, onednn):
    check = detect_bf16("cpu", cpuinfo=text(name), onednn=onednn)
    assert check.native is (KINDS[name] and onednn), check
    assert choose_precision("auto", "cpu", check)[0] == ("bf16" if check.native else "fp32")
    if KINDS[name] and not onednn:
        assert "oneDNN has no bf16 kernels" in check.reason
    elif not KINDS[name]:
        assert "no bf16 instructions" in check.reason


def test_flags_come_from_the_flags_and_features_lines_only():
    assert "avx512_bf16" in cpu_flags(text("x86-avx512_bf16-amd-epyc.txt"))
    assert "bf16" in cpu_flags(text("aarch64-bf16-neoverse-n2.txt"))
    assert "bf16" not in cpu_flags("model name\t: bf16 lookalike\nflags\t\t: sse avx2\n")
    assert not detect_bf16("cpu", cpuinfo="model name : bf16\n", onednn=True).native


def test_no_cpuinfo_is_fp32(monkeypatch):
    monkeypatch.setattr(precision_mod, "CPUINFO", Path("/nonexistent/cpuinfo"))
    monkeypatch.setattr(precision_mod, "read_cpuinfo",
                        lambda path=precision_mod.CPUINFO: None)
    check = detect_bf16("cpu", onednn=True)
    assert not check.native and "no /proc/cpuinfo" in check.reason


@pytest.mark.parametrize("capability, native", [((5, 3), False), ((7, 2), False),
                                                ((7, 5), False), ((8, 0), True),
                                                ((8, 7), True), ((9, 0), True)])
def test_cuda_needs_sm80(capability, native):
    check = detect_bf16("cuda", capability=capability)
    assert check.native is native and f"sm_{capability[0]}{capability[1]}" in check.reason


def test_this_machines_torch_checks_are_what_detection_uses():
    """The real probes: oneDNN's check is a bool; this machine's decision is the flags' and
    the check's together (whatever CPU the test runs on)."""
    onednn = precision_mod.onednn_bf16()
    assert isinstance(onednn, bool)
    info = precision_mod.read_cpuinfo()
    flags = cpu_flags(info or "")
    expected = bool(flags & set(precision_mod.BF16_CPU_FLAGS)) and onednn
    assert detect_bf16("cpu").native is expected


def test_a_given_precision_is_kept():
    for p in ("fp32", "bf16", "fp16"):
        assert choose_precision(p, "cpu") == (p, "as requested")
        cfg = RunConfig(precision=p)
        assert resolve_precision(cfg, "cpu") == (cfg, None)


@pytest.mark.parametrize("native", [True, False])
def test_resolution_of_a_config(native):
    cfg = RunConfig(precision="auto", mode="multilap")
    assert cfg.cache_dtype is None  # follows the precision once resolved
    out, line = resolve_precision(cfg, "cpu", Bf16Check(native, "why"))
    want = "bf16" if native else "fp32"
    assert (out.precision, out.precision_requested) == (want, "auto")
    assert out.cache_dtype == RunConfig(precision=want).cache_dtype
    assert line == f"precision   {want} (auto: why)"
    given = RunConfig(precision="auto", cache_dtype="float32")
    assert resolve_precision(given, "cpu", Bf16Check(native, ""))[0].cache_dtype == "float32"


def test_old_run_directories_keep_their_hash():
    """A config.json written before #29 (no precision_requested) hashes as it did."""
    d = RunConfig().to_dict()
    del d["precision_requested"], d["memory_format"], d["compile"]  # none existed before 0.2.0
    import hashlib
    assert config_hash(RunConfig()) == hashlib.sha256(
        json.dumps({k: v for k, v in d.items() if k != "precision"}, sort_keys=True)
        .encode()).hexdigest()


def test_a_bad_precision_requested_is_refused():
    with pytest.raises(UserError, match="precision_requested"):
        RunConfig(precision="fp32", precision_requested="bf16")


@pytest.mark.parametrize("native", [True, False])
def test_train_auto_records_and_prints_the_resolved_precision(tmp_path, monkeypatch, native):
    monkeypatch.setattr(precision_mod, "onednn_bf16", lambda: native)
    monkeypatch.setattr(precision_mod, "read_cpuinfo",
                        lambda path=None: text("x86-avx512_bf16-amd-epyc.txt"))
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["train", *TINY, "--precision", "auto", "--out", str(out)])
    assert r.exit_code == 0, (r.output, r.exception)
    want = "bf16" if native else "fp32"
    assert r.output.count("precision   ") == 1 and f"precision   {want} (auto: " in r.output
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["precision"], cfg["precision_requested"]) == (want, "auto")
    assert cfg["cache_dtype"] == RunConfig(precision=want).cache_dtype
    assert RunConfig.load(out / "config.json").precision == want  # every reader still reads it


def test_only_rank_0_of_a_torchrun_launch_prints_the_choice(monkeypatch):
    from edgetrain.cli import echo_precision
    monkeypatch.setattr(precision_mod, "detect_bf16", lambda device: Bf16Check(True, "because"))
    for rank, printed in (("1", 0), ("0", 1)):
        monkeypatch.setenv("RANK", rank)
        lines = []
        monkeypatch.setattr("edgetrain.cli.click.echo", lines.append)
        cfg = echo_precision(RunConfig(precision="auto", device="cpu"))
        assert cfg.precision == "bf16" and len(lines) == printed  # every rank resolves it


def test_plain_train_stays_fp32(tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["train", *TINY, "--out", str(out)])
    assert r.exit_code == 0, (r.output, r.exception)
    assert "precision   " not in r.output
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["precision"], cfg["precision_requested"]) == ("fp32", None)


def test_the_library_resolves_auto_too(tmp_path, monkeypatch):
    from edgetrain.regimes.schedule import train
    monkeypatch.setattr(precision_mod, "detect_bf16", lambda device: Bf16Check(False, "no"))
    cfg = RunConfig(data="digits", train_size=120, test_size=100, model="kmresnet", width=4,
                    depth=2, modules=2, epochs=1, mode="sequential", batch_size=32,
                    device="cpu", precision="auto")
    train(cfg, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["precision"], saved["precision_requested"]) == ("fp32", "auto")


@pytest.mark.parametrize("recorded, want", [(True, "bf16"), (False, "fp32"), (None, "fp32")])
def test_plan_for_a_profile_follows_its_bf16_record(recorded, want):
    import dataclasses
    profile = dataclasses.replace(load_profile("cpu-2gb"), bf16=recorded)
    base = RunConfig(precision="auto", data="synthetic", input_shape=(3, 8, 8))
    cfg, line = planned_precision(base, profile)
    assert cfg.precision == want and line.startswith(f"precision   {want} (auto: ")
    assert ("does not record bf16" in line) is (recorded is None)
    assert profile_bf16(profile).native is bool(recorded)


def test_plan_cli_uses_auto_and_says_why(monkeypatch):
    monkeypatch.setattr(precision_mod, "detect_bf16", lambda device: Bf16Check(True, "because"))
    r = CliRunner().invoke(cli, ["plan", "--memory-budget", "1.5GiB", "--model", "resnet20",
                                 "--input", "3x16x16", "--train-size", "256"])
    assert r.exit_code == 0, r.output
    assert "precision   bf16 (auto: because)" in r.output
    assert "--precision bf16" in r.output.split("command")[-1]
    r = CliRunner().invoke(cli, ["plan", "--memory-budget", "1.5GiB", "--model", "resnet20",
                                 "--input", "3x16x16", "--train-size", "256",
                                 "--precision", "fp32"])
    assert r.exit_code == 0 and "precision   " not in r.output
    assert "--precision" not in r.output.split("command")[-1]


def test_fit_uses_auto_unless_told(tmp_path, monkeypatch):
    from edgetrain.budget.fit import fit_config
    monkeypatch.setattr(precision_mod, "detect_bf16", lambda device: Bf16Check(True, "because"))
    opts = dict(RunConfig().to_dict())
    for k in ("extra", "transport", "memory_budget", "precision_requested"):
        opts.pop(k)
    opts.update(data="synthetic", input_shape="3x16x16", model="resnet20", train_size=256,
                no_transport=False, epochs=2, device="cpu")
    cfg, text_ = fit_config(opts, {"data", "input_shape", "model"}, None, "1.5GiB", tmp_path)
    assert (cfg.precision, cfg.precision_requested) == ("bf16", "auto")
    assert "precision   bf16 (auto: because)" in text_
    cfg, text_ = fit_config(opts, {"data", "input_shape", "model", "precision"}, None,
                            "1.5GiB", tmp_path)
    assert (cfg.precision, cfg.precision_requested) == ("fp32", None)


def test_calibrate_records_the_detected_bf16(monkeypatch):
    for native in (True, False):
        monkeypatch.setattr(calibrate, "detect_bf16", lambda device, n=native: Bf16Check(n, "r"))
        half = calibrate.half_support()
        assert half["bf16"] is native and "bf16: r" in half["how"]


def test_the_auto_benchmark_row_pairs_rounds_and_names_the_cpu(monkeypatch):
    from edgetrain.bench import precision as bench
    monkeypatch.setattr(precision_mod, "detect_bf16", lambda device: Bf16Check(True, "native"))
    step = {"fp32": [1.28, 1.92, 1.28], "bf16": [0.64, 0.64, 1.28]}  # s per step of 64
    seen = []

    def fake_child(spec, timeout_s=1800):
        p = spec["cfg"]["precision"]
        seen.append(p)
        t = step[p][sum(1 for q in seen if q == p) - 1]
        return {"ok": True, "step_s": [t] * 3, "step_cpu_s": [t / 2] * 3}
    monkeypatch.setattr(bench, "time_child", fake_child)
    row = bench.auto_rows(threads=1)
    assert seen == ["fp32", "bf16"] * 3 and row["auto_resolved"] == "bf16"
    assert row["speedup_rounds"] == pytest.approx([2.0, 3.0, 1.0])
    assert row["speedup_median"] == pytest.approx(2.0)
    assert row["ms_per_sample"]["fp32"][0] == pytest.approx(20.0)
    assert row["cpu"]["reason"] == "native" and "flags" in row["cpu"]
    md = "\n".join(bench.auto_markdown(row))
    assert "**2.00x** as fast as fp32" in md and "auto resolved to **bf16**" in md
