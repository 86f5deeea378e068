"""phantom-bench end to end on 2 gloo ranks (tiny sizes), its report helpers and the GPU
script's CPU dry run."""
import json
import os
import subprocess
import sys

import pytest

from phantom_plugin.bench import report, runs
from phantom_plugin.cli import bench as cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = ["mode", "world_size", "width", "depth", "ghost_dim", "batch", "steps", "step_time_s",
          "tokens_or_samples_per_s", "comm_bytes_per_step", "comm_bytes_per_step_model", "macs_per_step",
          "params", "peak_memory_bytes", "final_loss", "energy_j", "energy_source", "energy_reason",
          "energy_j_modeled", "machine"]


@pytest.fixture(scope="module")
def bench_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    cli.main(["--width", "64", "--depth", "3", "--ranks", "2", "--ghosts", "4", "--batch", "16",
              "--steps", "12", "--warmup", "2", "--probe", "--recipe", "e1", "--no-progress",
              "--out", str(out)])
    return out


def test_results_json_has_every_field_and_bytes_match_the_model(bench_out):
    doc = json.load(open(bench_out / "results.json"))
    runs = doc["runs"]
    assert sorted(r["mode"] for r in runs) == ["phantom", "tp"]
    for r in runs:
        missing = [f for f in FIELDS if f not in r]
        assert not missing, missing
        assert r["world_size"] == 2 and r["steps_run"] == 12
        assert r["comm_bytes_per_step"] == r["comm_bytes_per_step_model"] > 0
        assert r["energy_j_modeled"] > 0 and "modeled" in r["energy_model"]
        if r["energy_j"] is None:
            assert r["energy_reason"] and r["energy_source"] == "none"
        assert r["probe"]["dense_gemm_rate_macs_per_s"] > 0
    ph = next(r for r in runs if r["mode"] == "phantom")
    assert {"hidden_fraction_ab", "hidden_fraction_wait", "ghost_comm_alone_s"} <= set(ph["probe"])
    assert doc["summary"]["to_target"][0]["phantom"]["steps"] <= 12


def test_markdown_and_plots_written(bench_out):
    md = open(bench_out / "results.md").read()
    assert "E1" in md and "phantom/TP" in md and "Performance figures" in md
    for name in ("loss_vs_step.png", "loss_vs_cost.png", "per_step_vs_ranks.png"):
        with open(bench_out / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.fast
def test_grid_arguments():
    args = cli.parse_args(["--width", "64,128", "--ranks", "2,4", "--ghosts", "4,8", "--modes", "phantom"])
    specs = runs.grid_specs(args)
    assert len(specs) == 8 and {p for p, _ in specs} == {2, 4}
    both = runs.grid_specs(cli.parse_args(["--ghosts", "4,8"]))
    assert [s.mode for _, s in both] == ["tp", "phantom", "phantom"]   # TP once per point
    with pytest.raises(SystemExit):
        cli.parse_args(["--modes", "dp"])


@pytest.mark.fast
def test_to_target_counts_steps_time_and_energy():
    r = {"losses": [5, 4, 3, 2, 1, 1], "step_times_s": [1.0] * 6, "step_cpu_s": [2.0] * 6,
         "energy_j_per_step": None, "energy_j_modeled_per_step": 0.5}
    hit = report.to_target(r, 2.0, smooth=2)              # running means 4.5, 3.5, 2.5, 1.5
    assert hit == {"steps": 5, "seconds": 5.0, "cpu_seconds": 10.0, "energy_j": None, "energy_j_modeled": 2.5}
    assert report.to_target(r, 0.5, smooth=2) is None


def test_gpu_script_dry_run(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import gpu_layer_check as g
    rows = g.shape_table()
    assert {(r["n"], r["p"]) for r in rows} == {(n, p) for n in g.WIDTHS for p in g.RANKS}
    assert all(r["phantom_macs"] < r["tp_macs"] for r in rows)
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_layer_check.py"), "--dry-run",
                    "--out", str(tmp_path)], check=True, capture_output=True, timeout=120)
    doc = json.load(open(tmp_path / "gpu_layer_check.json"))
    assert doc["rows"] and all("phantom" in r and "tp" in r for r in doc["rows"])
    assert "Extrapolated" in open(tmp_path / "gpu_layer_check.md").read()
