"""``phantom-plan --datasheet``: the step-time model's terms priced at a GPU's datasheet rates
(:mod:`phantom_plugin.modeling.datasheet`), checked term by term against hand-computed figures and
against the cost model's bytes. Pure arithmetic: no ranks, no GPU."""
import json

import pytest

from phantom_plugin.cli import plan
from phantom_plugin.modeling import counts, datasheet, devices, step_model

pytestmark = pytest.mark.fast

H100 = devices.DEVICES["h100-sxm"]
LINK = datasheet.Link(bytes_per_s=100e9, latency_s=5e-6, words="test link")


def test_gemm_roofline():
    big = step_model.Gemm(4096, 4096, 4096)                  # compute-bound at any sane rate
    assert datasheet.term_seconds(big, H100, "bf16", LINK) == pytest.approx(2 * 4096 ** 3 / 989.4e12)
    assert datasheet.term_seconds(big, H100, "bf16", LINK, efficiency=0.5) == pytest.approx(2 * 2 * 4096 ** 3 / 989.4e12)
    assert datasheet.term_seconds(big, H100, "fp32", LINK) == pytest.approx(2 * 4096 ** 3 / 67e12)
    narrow = step_model.Gemm(8192, 8192, 16, b_t=True)        # x C^T with k = 16: bound by memory
    moved = (8192 * 8192 + 8192 * 16 + 8192 * 16) * 2
    assert datasheet.term_seconds(narrow, H100, "bf16", LINK) == pytest.approx(moved / 3.35e12)
    assert moved / 3.35e12 > 2 * narrow.macs / 989.4e12


def test_memory_terms_and_collectives():
    t = step_model.Pointwise("act", 100, 30)
    assert datasheet.term_seconds(t, H100, "bf16", LINK) == pytest.approx(5 * 3000 * 2 / 3.35e12)
    assert datasheet.term_seconds(step_model.Pointwise("bias_grad", 100, 30), H100, "fp32", LINK) == \
        pytest.approx(3000 * 4 / 3.35e12)
    assert datasheet.term_seconds(step_model.Optimizer(1000), H100, "fp32", LINK) == pytest.approx(7 * 4000 / 3.35e12)
    c = step_model.Collective("all_gather", 800, 8, 700)
    assert datasheet.term_seconds(c, H100, "bf16", LINK) == pytest.approx(5e-6 + 700 / 100e9)
    assert datasheet.term_seconds(step_model.Framework("tp", 2, 8), H100, "bf16", LINK) == 0.0
    with pytest.raises(TypeError, match="not a timing term"):
        datasheet.term_seconds("gemm", H100, "bf16", LINK)


def test_waits_hide_async_collectives_under_their_gemms():
    coll = step_model.Collective("reduce_scatter", 8 * 4096, 8, 7 * 4096 * 2)
    sync = step_model.Wait(step_model.Gemm(64, 64, 64), 1, coll)
    assert datasheet.term_seconds(sync, H100, "bf16", LINK) == 0.0
    long_gemm = step_model.Gemm(8192, 8192, 8192)             # far longer than the collective: hides all of it
    hidden = step_model.Wait(step_model.Gemm(64, 64, 64), 1, coll, (long_gemm,))
    assert datasheet.term_seconds(hidden, H100, "bf16", LINK) == pytest.approx(-LINK.seconds(coll.bytes_sent))
    short = step_model.Gemm(16, 16, 16)                       # shorter: hides only its own time
    part = step_model.Wait(step_model.Gemm(64, 64, 64), 1, coll, (short, short))
    assert datasheet.term_seconds(part, H100, "bf16", LINK) == pytest.approx(
        -2 * datasheet.term_seconds(short, H100, "bf16", LINK))


@pytest.mark.parametrize("ranks,k", [(8, 64), (16, 32), (2, 8)])
def test_extrapolate_sums_the_terms(ranks, k):
    n, depth, batch = 4096, 4, 2048
    ext = datasheet.extrapolate(n, depth, ranks, k, batch, "bf16", "h100-sxm")
    assert ext["extrapolation"]["label"] == "extrapolated from datasheet figures, not measured"
    link = datasheet.link_for(H100, ranks)
    for mode, c in (("tp", counts.tp_ffn_cost(n, depth, p=ranks, batch=batch, dtype_bytes=2)),
                    ("phantom", counts.phantom_ffn_cost(n, depth, p=ranks, k=k, batch=batch, dtype_bytes=2))):
        parts = ext["extrapolated_parts_s"][mode]
        # the collectives carry exactly the cost model's bytes, over the stated link
        assert parts["collective"] == pytest.approx(len(c.messages) * link.latency_s + c.bytes_sent / link.bytes_per_s)
        assert -parts["collective"] <= parts["wait"] <= 0          # hidden, never more than exists
        assert parts["framework"] == 0.0
        assert ext["extrapolated_step_time_s"][mode] == pytest.approx(sum(parts.values()))
        # every GEMM at least its MACs at the peak rate
        assert parts["gemm"] >= 2 * (c.macs - (batch * (n // ranks) * (n // ranks + k) if mode == "phantom" and ranks > 1
                                               else 0)) / 989.4e12 * (1 - 1e-9)
    assert ext["extrapolated_ratio"] == pytest.approx(
        ext["extrapolated_step_time_s"]["phantom"] / ext["extrapolated_step_time_s"]["tp"])
    assert ext["extrapolation"]["link_bytes_per_s"] == (450e9 if ranks <= 8 else 50e9)


def test_link_within_a_node_is_the_datasheets():
    assert datasheet.link_for(H100, 8).bytes_per_s == 450e9


def test_link_across_nodes_is_a_stated_assumption():
    across = datasheet.link_for(H100, 16)
    assert across.bytes_per_s == 50e9 and "2 nodes" in across.words and "assumption" in across.words


def test_link_given_by_the_user_is_used_and_labelled():
    given = datasheet.link_for(H100, 16, gpus_per_node=16, bytes_per_s=200e9, latency_s=0.0)
    assert (given.bytes_per_s, given.latency_s) == (200e9, 0.0) and "given" in given.words


@pytest.mark.parametrize("call, text", [
    (lambda: datasheet.link_for(H100, 2, bytes_per_s=0.0), "bytes_per_s"),
    (lambda: datasheet.extrapolate(64, 2, 2, 4, 8, "bf16", "b200"), "unknown device 'b200'.*a100-sxm"),
    (lambda: datasheet.extrapolate(64, 2, 2, 4, 8, "bf16", "h100-sxm", efficiency=1.5), "efficiency"),
], ids=["zero-bandwidth", "unknown-device", "efficiency-above-1"])
def test_bad_datasheet_input_names_the_field(call, text):
    with pytest.raises(ValueError, match=text):
        call()


def test_float32_uses_the_fp32_peak():
    assert datasheet.extrapolate(64, 2, 2, 4, 8, "float32", "a100-sxm")["extrapolation"]["matmul_flops_per_s"] == 19.5e12


def test_plan_datasheet_cli(capsys):
    args = ["--width", "8192", "--depth", "4", "--ranks", "8", "--ghosts", "64", "--batch", "8192", "--dtype", "bf16",
            "--datasheet", "h100-sxm"]
    assert plan.main(args) == 0
    out = capsys.readouterr().out
    assert "step time extrapolated (NVIDIA H100 SXM5 80GB datasheet, not measured)" in out
    assert "Extrapolated, not measured" in out and "989.4 TFLOP/s" in out and "- of which wait" in out
    assert plan.main(args + ["--json", "--gemm-efficiency", "0.6", "--link-gbs", "100", "--link-latency-us", "0"]) == 0
    doc = json.loads(capsys.readouterr().out)
    direct = datasheet.extrapolate(8192, 4, 8, 64, 8192, "bf16", "h100-sxm", efficiency=0.6,
                                   link_bytes_per_s=100e9, link_latency_s=0.0)
    assert doc["extrapolated_step_time_s"] == pytest.approx(direct["extrapolated_step_time_s"])
    assert doc["extrapolation"]["gemm_efficiency"] == 0.6 and doc["modeled"]["tp"]["params"] > 0
    assert "predicted_step_time_s" not in doc                       # nothing was measured


@pytest.mark.parametrize("extra,message", [
    (["--link-gbs", "100"], "--link-gbs apply to --datasheet"),
    (["--datasheet", "h100-sxm", "--gemm-efficiency", "0"], "--gemm-efficiency must be in"),
    (["--datasheet", "h100-sxm", "--link-latency-us", "-1"], "--link-latency-us must be >= 0"),
    (["--datasheet", "h100-sxm", "--dtype", "fp64", "--link-gbs", "-2"], "--link-gbs must be > 0"),
    (["--datasheet", "tpu"], "invalid choice"),
])
def test_plan_datasheet_refusals(capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        plan.main(["--width", "64", "--depth", "2", "--ranks", "2", "--ghosts", "4", *extra])
    assert e.value.code == 2 and message in capsys.readouterr().err
