"""`edgetrain bench cap` on tiny configurations: e2e fails under the cap, edgetrain completes;
e2e+checkpointing is bisected beside it; bad options are refused before any run."""
from __future__ import annotations

import json

from click.testing import CliRunner
import pytest

from edgetrain.bench.cap import bench_cap, cap_stem
from edgetrain.cli import cli


@pytest.mark.slow
def test_bench_cap_tiny_e2e_fails_edgetrain_completes(tmp_path):
    # 3x64x64 batch 32: activations dominate; one thread, one step: about 45 s on 2 cores
    res = bench_cap("resnet56", (3, 64, 64), 32, 8, "sequential", steps=1, threads=1,
                    max_probes=0, out_dir=tmp_path, ckpt_segments=0)
    saved = json.loads(open(res["json_path"]).read())
    at = saved["at_min_cap"]
    assert saved["uncapped"]["e2e"]["completed"] and saved["uncapped"]["edgetrain"]["completed"]
    assert not at["e2e"]["completed"], at["e2e"]
    assert at["edgetrain"]["completed"], at["edgetrain"]["error"]
    assert "allocate" in at["e2e"]["error"] or "Memory" in at["e2e"]["error"]
    assert 0 < saved["min_cap_fraction_of_e2e_peak_above_runtime"] < 1
    assert saved["limit"].startswith("RLIMIT_AS")
    assert saved["runtime_warm_address_space_mib"] > saved["runtime_import_address_space_mib"]
    assert saved["bisection"]["verified_upper_cap_mib"] == saved["min_cap_mib"]  # no probes
    assert saved["ckpt_segments"] == 0 and saved["ckpt_bisection"] is None  # skipped
    assert saved["uncapped"]["e2e_ckpt"] is None and saved["at_min_cap"]["e2e_ckpt"] is None


TINY = ["--model", "kmresnet", "--width", "8", "--depth", "4", "--input", "1x16x16",
        "--batch", "32", "--steps", "1", "--threads", "1", "--modules", "2"]


@pytest.mark.slow
def test_bench_cap_tiny_recompute_and_ckpt_baseline_bisected(tmp_path):
    # 14 fresh processes (two bisections of three probes): ~3.5 min on 2 shared cores. Three
    # probes of the ~100 MiB bracket reach ~12 MiB above the runtime's address space after
    # imports, below what any first training step maps (the warm runtime, ~30 MiB): one fails.
    args = ["bench", "cap", *TINY, "--recompute", "blocks", "--ckpt-segments", "2",
            "--tol-mib", "8", "--max-probes", "3", "--out", str(tmp_path)]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    stem = "cap_kmresnet_1x16x16_b32_sequential-K2-blocks"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{stem}.json", f"{stem}.md"]
    saved = json.loads((tmp_path / f"{stem}.json").read_text())
    assert (saved["recompute"], saved["split"], saved["ckpt_segments"]) == ("blocks", "depth", 2)
    for key in ("ckpt_min_cap_mib", "ckpt_min_cap_fraction_of_e2e_peak_above_runtime",
                "ckpt_peak_fraction_of_e2e_above_runtime", "ckpt_at_own_min_cap"):
        assert saved[key] is not None, key
    assert saved["uncapped"]["e2e_ckpt"]["completed"]
    assert saved["at_min_cap"]["e2e_ckpt"] is not None
    assert saved["at_min_cap"]["edgetrain"]["completed"]
    # each job completes at its own minimal cap, and a probe below it failed
    for bis, min_cap in ((saved["ckpt_bisection"], saved["ckpt_min_cap_mib"]),
                         (saved["bisection"], saved["min_cap_mib"])):
        failed = [p["cap_mib"] for p in bis["probes"] if not p["completed"]]
        assert failed and bis["largest_failed_cap_mib"] == max(failed) < min_cap
        assert min_cap <= bis["verified_upper_cap_mib"]
    assert saved["ckpt_at_own_min_cap"]["completed"]
    assert saved["ckpt_at_own_min_cap"]["peak_address_space_mib"] <= saved["ckpt_min_cap_mib"]
    frac = (saved["ckpt_min_cap_mib"] - saved["runtime_import_address_space_mib"]) / (
        saved["uncapped"]["e2e"]["peak_address_space_mib"]
        - saved["runtime_import_address_space_mib"])
    assert saved["ckpt_min_cap_fraction_of_e2e_peak_above_runtime"] == pytest.approx(frac, abs=2e-3)
    table = [ln for ln in (tmp_path / f"{stem}.md").read_text().splitlines()
             if ln.startswith("| ") and not ln.startswith("| job")]
    assert [ln.split(" | ")[0] for ln in table] == [
        "| e2e", "| e2e+ckpt (S=2)", "| edgetrain (sequential, K=2, recompute blocks, split depth)"]
    assert "e2e+ckpt (S=2)" in r.output


@pytest.mark.parametrize("extra, message", [
    (["--ckpt-segments", "-1"], "--ckpt-segments must be >= 0"),
    (["--recompute", "some"], "--recompute must be none, blocks or segments:S"),
])
def test_bench_cap_refuses_bad_options_before_any_run(tmp_path, extra, message):
    r = CliRunner().invoke(cli, ["bench", "cap", *TINY, *extra, "--out", str(tmp_path / "o")])
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert not (tmp_path / "o").exists()


def test_cap_stem_names_recompute_and_split():
    res = {"model": "resnet110", "input_shape": [3, 96, 96], "batch_size": 64,
           "mode": "sequential", "modules": 16}
    assert cap_stem(res) == "cap_resnet110_3x96x96_b64_sequential-K16"  # results before #18
    assert cap_stem(res | {"recompute": "blocks", "split": "depth"}) == (
        "cap_resnet110_3x96x96_b64_sequential-K16-blocks")
    assert cap_stem(res | {"recompute": "segments:4", "split": "memory"}) == (
        "cap_resnet110_3x96x96_b64_sequential-K16-segments4-split-memory")
