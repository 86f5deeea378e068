"""``phantom-bench --inference`` end to end on 2 and 3 gloo ranks (tiny sizes): both phases,
every field, measured bytes equal to the cost model's forward messages, plots; the percentile."""
import json

import pytest

from phantom_plugin.modeling import counts
from phantom_plugin.cli import bench as cli
from phantom_plugin.bench.inference import percentile

FIELDS = ["phase", "latency_p50_s", "latency_p99_s", "tokens_or_samples_per_s", "comm_bytes_per_step",
          "comm_bytes_per_step_model", "energy_j", "energy_j_per_step", "energy_source", "energy_reason",
          "energy_j_modeled", "energy_j_modeled_per_step", "energy_model", "machine", "macs_per_step"]


@pytest.fixture(scope="module", params=[(2, 3), (3, 2)], ids=["p2-depth3", "p3-depth2"])
def inference_out(request, tmp_path_factory):
    p, depth = request.param
    out = tmp_path_factory.mktemp("inference")
    cli.main(["--inference", "--width", "48", "--depth", str(depth), "--ranks", str(p), "--ghosts", "4",
              "--batch", "16", "--steps", "8", "--warmup", "2", "--no-progress", "--out", str(out)])
    return p, depth, out


def test_both_phases_every_field_bytes_equal_the_forward_model(inference_out):
    p, depth, out = inference_out
    runs = json.load(open(out / "results.json"))["runs"]
    assert sorted((r["mode"], r["phase"]) for r in runs) == [
        ("phantom", "latency"), ("phantom", "throughput"), ("tp", "latency"), ("tp", "throughput")]
    for r in runs:
        missing = [f for f in FIELDS if f not in r]
        assert not missing, missing
        assert r["batch"] == (16 if r["phase"] == "throughput" else 1)
        assert r["world_size"] == p and r["steps_run"] == 8 and len(r["step_times_s"]) == 8
        assert 0 < r["latency_p50_s"] <= r["latency_p99_s"]
        assert r["comm_bytes_per_step"] == r["comm_bytes_per_step_model"] > 0
        assert "modeled" in r["energy_model"] and r["energy_j_modeled"] > 0
        if r["energy_j"] is None:
            assert r["energy_reason"] and r["energy_source"] == "none"
        model = (counts.phantom_ffn_cost(48, depth, p=p, k=4, batch=r["batch"]) if r["mode"] == "phantom"
                 else counts.tp_ffn_cost(48, depth, p=p, batch=r["batch"]))
        assert r["comm_bytes_per_step_model"] == model.bytes_by("fwd")
        assert r["macs_per_step"] == model.macs_fwd


def test_markdown_and_plots(inference_out):
    _, _, out = inference_out
    md = open(out / "results.md").read()
    assert "inference" in md and "latency" in md and "throughput" in md and "phantom/TP" in md
    for name in ("inference_time.png", "inference_latency_cdf.png"):
        with open(out / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_percentile_and_argument_errors():
    assert percentile([3, 1, 2], 50) == 2
    assert percentile([1, 2, 3, 4], 100) == 4 and percentile([1, 2, 3, 4], 0) == 1
    assert percentile(list(range(101)), 99) == pytest.approx(99)
    with pytest.raises(SystemExit):
        cli.parse_args(["--inference", "--recipe", "e1"])
    with pytest.raises(SystemExit):
        cli.parse_args(["--inference", "--probe"])


def test_bench_screen_has_no_third_party_noise(tmp_path):
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "phantom_plugin.cli.bench", "--width", "32", "--depth", "2",
                           "--ranks", "2", "--ghosts", "4", "--batch", "4", "--steps", "7", "--warmup", "2",
                           "--no-progress", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    screen = proc.stdout + proc.stderr
    assert "phantom/TP" in screen                                  # the table is still there
    for noise in ("Transformer Engine and Apex are not installed", "CUDA_DEVICE_MAX_CONNECTIONS"):
        assert noise not in screen


def test_gpu_script_times_the_forward_only_op(tmp_path):
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, os.path.join(root, "benchmarks", "gpu_layer_check.py"), "--dry-run",
                    "--out", str(tmp_path)], check=True, capture_output=True, timeout=180)
    rows = json.load(open(tmp_path / "gpu_layer_check.json"))["rows"]
    measured = [r for r in rows if "phantom" in r]
    assert measured and all(r["forward"]["phantom_s"] > 0 and r["forward"]["tp_s"] > 0 for r in measured)
    assert "Forward only (inference)" in open(tmp_path / "gpu_layer_check.md").read()
