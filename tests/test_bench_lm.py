"""phantom-bench --task lm: a tiny end to end run on 2 gloo ranks (megatron-core GPT on a corpus
written here), the time-to-loss summary recomputed from the records, the equal-compute solver
against a brute-force MAC count, the data windows, and every bad-input error."""
import json
import random

import pytest
import torch

from phantom_plugin.bench import lm, lm_data
from phantom_plugin.cli import bench as cli
from phantom_plugin.modeling import counts

pytest.importorskip("megatron.core")

WORDS = "the quick brown fox jumps over a lazy dog while one cat sat on the warm mat".split()
STEPS, EVERY = 10, 2


def _corpus(folder, n_words=3000, name="a.txt"):
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    (folder / name).write_text(" ".join(rng.choice(WORDS) for _ in range(n_words)))
    return folder


TINY = ["--task", "lm", "--width", "32", "--depth", "1", "--ranks", "2", "--batch", "4", "--seq", "16",
        "--eval-batches", "2", "--no-progress"]


@pytest.fixture(scope="module")
def lm_out(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    corpus = _corpus(root / "corpus")
    (corpus / "skip.bin").write_bytes(b"\x00" * 100)          # not a text suffix: not read
    out = root / "out"
    cli.main([*TINY, "--corpus", str(corpus), "--steps", str(STEPS), "--eval-every", str(EVERY),
              "--match", "compute", "--ghosts", "2", "--max-factor", "2", "--out", str(out)])
    return out


def _first_at_or_below(rec, target):
    for e in rec["evals"]:
        if e["loss"] <= target:
            s = e["step"]
            return s, sum(rec["step_cpu_s"][:s]), sum(rec["step_energy_j_modeled"][:s])
    return None, None, None


def test_results_json_records_and_time_to_loss(lm_out):
    doc = json.load(open(lm_out / "results.json"))
    tp, ph = doc["runs"]
    assert (tp["mode"], ph["mode"]) == ("tp", "phantom")
    assert "1 file(s)" in tp["corpus"]                         # a.txt only
    assert tp["steps_run"] == STEPS and ph["steps"] == 2 * STEPS and ph["steps_run"] <= 2 * STEPS
    for r in (tp, ph):
        n = r["steps_run"]
        assert r["world_size"] == 2 and len(r["losses"]) == n
        for key in ("step_times_s", "step_cpu_s", "step_bytes_sent", "step_energy_j_modeled"):
            assert len(r[key]) == n and all(v > 0 for v in r[key]), key
        assert [e["step"] for e in r["evals"]] == list(range(0, n + 1, EVERY))
        assert "modeled" in r["energy_model"]
    # --match compute: phantom's MLP is wider, its MLP MACs at most TP's
    assert ph["ffn_hidden"] > tp["ffn_hidden"] == 4 * 32
    ratio = doc["summary"]["match"]["mlp_macs_ratio"]
    assert ratio <= 1 and ratio == pytest.approx(
        counts.phantom_mlp_cost(32, ph["ffn_hidden"], p=2, k=2, tokens=1).macs
        / counts.tp_mlp_cost(32, 128, p=2, tokens=1).macs)
    ttl = doc["time_to_loss"]
    target = tp["evals"][-1]["loss"]
    assert ttl["target_loss"] == target
    for name, rec in (("tp", tp), ("phantom", ph)):
        step, cpu_s, energy = _first_at_or_below(rec, target)
        assert ttl[name]["step"] == step
        assert ttl[name]["cpu_s"] == pytest.approx(cpu_s) if step is not None else ttl[name]["cpu_s"] is None
        assert ttl[name]["energy_j"] == pytest.approx(energy) if step is not None else ttl[name]["energy_j"] is None
    assert ttl["tp"]["step"] is not None
    # --max-factor 2: phantom stops at the first evaluation at or below TP's final loss, or runs 2x
    assert ph["steps_run"] == (ttl["phantom"]["step"] or 2 * STEPS)
    if ttl["phantom"]["step"] is None:
        assert ttl["cpu_s_ratio"] is None and ttl["energy_ratio"] is None
    else:
        assert ttl["cpu_s_ratio"] == pytest.approx(ttl["phantom"]["cpu_s"] / ttl["tp"]["cpu_s"])
        assert ttl["energy_ratio"] == pytest.approx(ttl["phantom"]["energy_j"] / ttl["tp"]["energy_j"])


def test_markdown_and_plot_written(lm_out):
    md = open(lm_out / "results.md").read()
    assert "--task lm" in md and "To TP's final held-out loss" in md and "Match: compute" in md
    with open(lm_out / "lm_heldout_loss.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def _brute_force(h, f, p, k, gated):
    """Largest f' (multiple of p) whose phantom MLP MACs per token <= TP's, by the formula."""
    tp = (2 * f if gated else f) * h // p + f * h // p
    best = None
    for fp in range(p, 16 * f + 1, p):
        fc1_out = 2 * fp if gated else fp
        ph = (fc1_out // p) * (h // p) + k * (h // p) + (p - 1) * k * (fc1_out // p) \
            + (h // p) * (fp // p) + k * (fp // p) + (p - 1) * k * (h // p)
        if ph <= tp:
            best = fp
    return best


@pytest.mark.fast
@pytest.mark.parametrize("h,f,p,k,gated", [(32, 128, 2, 2, False), (256, 1024, 2, 16, False),
                                            (256, 1024, 4, 8, False), (64, 256, 8, 8, False),
                                            (128, 512, 2, 16, True), (96, 384, 3, 4, False)])
def test_equal_compute_solver_matches_brute_force(h, f, p, k, gated):
    assert counts.equal_compute_ffn_hidden(h, f, p=p, k=k, gated=gated) == _brute_force(h, f, p, k, gated)


@pytest.mark.fast
def test_equal_compute_solver_refuses_what_cannot_be_met():
    with pytest.raises(ValueError, match="equal compute cannot be met"):
        counts.equal_compute_ffn_hidden(64, 8, p=2, k=32)


@pytest.mark.fast
def test_windows_are_the_same_for_both_models_and_held_out_is_apart():
    data = bytes(range(256)) * 8
    train, held = lm_data.split_heldout(data, 0.25)
    assert train.numel() + held.numel() == len(data) and held.numel() == 512
    a, b = lm_data.train_batch(train, 3, 4, 16, seed=1), lm_data.train_batch(train, 3, 4, 16, seed=1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[0][:, 1:], a[1][:, :-1])
    assert not torch.equal(a[0], lm_data.train_batch(train, 4, 4, 16, seed=1)[0])
    evals = lm_data.heldout_batches(held, 2, 4, 16)
    assert len(evals) == 2 and evals[0][0].shape == (4, 16)
    assert evals[-1][1][-1, -1] == held[-1]                 # the windows reach the end of the held-out part


@pytest.mark.fast
def test_reached_and_time_to_loss_by_hand():
    tp = {"evals": [{"step": 0, "loss": 5.0}, {"step": 2, "loss": 3.0}, {"step": 4, "loss": 2.0}],
          "step_cpu_s": [1.0] * 4, "step_times_s": [0.5] * 4, "step_energy_j_modeled": [2.0] * 4}
    ph = {**tp, "evals": [{"step": 0, "loss": 5.0}, {"step": 2, "loss": 1.5}, {"step": 4, "loss": 1.0}],
          "step_cpu_s": [0.5] * 4}
    out = lm.time_to_loss(tp, ph)
    assert out["target_loss"] == 2.0
    assert out["tp"] == {"step": 4, "cpu_s": 4.0, "wall_s": 2.0, "energy_j": 8.0}
    assert out["phantom"]["step"] == 2 and out["cpu_s_ratio"] == 0.25 and out["energy_ratio"] == 0.5
    never = lm.time_to_loss(tp, {**ph, "evals": [{"step": 0, "loss": 9.0}, {"step": 4, "loss": 2.5}]})
    assert never["phantom"] == {"step": None, "cpu_s": None, "wall_s": None, "energy_j": None}
    assert never["cpu_s_ratio"] is None and never["energy_ratio"] is None


def _error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        cli.parse_args(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.mark.fast
def test_bad_input_is_refused_before_any_rank_starts(tmp_path, capsys):
    good = str(_corpus(tmp_path / "good"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "notext").mkdir()
    (tmp_path / "notext" / "x.bin").write_bytes(b"abc")
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "b.txt").write_text("")
    small = _corpus(tmp_path / "small", n_words=20)            # ~100 bytes: held-out part < 17 bytes
    cases = [
        (["--corpus", str(tmp_path / "missing")], ["--corpus", "no such file or folder"]),
        (["--corpus", str(tmp_path / "empty")], ["--corpus", "no text file"]),
        (["--corpus", str(tmp_path / "notext")], ["--corpus", "no text file"]),
        (["--corpus", str(tmp_path / "blank")], ["--corpus", "empty"]),
        (["--corpus", str(small)], ["--corpus", "--seq", "at least"]),
        (["--corpus", good, "--match", "compute", "--ghosts", "300"], ["--match compute", "cannot be met"]),
        (["--corpus", good, "--width", "33"], ["--width=33", "not divisible", "--ranks"]),
        (["--corpus", good, "--width", "48", "--ranks", "3"], ["vocabulary", "--ranks"]),
        (["--corpus", good, "--heads", "3"], ["--heads=3", "--width"]),
        (["--corpus", good, "--heads", "1"], ["--heads=1", "not divisible", "--ranks"]),
        (["--corpus", good, "--ghosts", "17"], ["--ghosts=17", "--width/--ranks"]),
        (["--corpus", good, "--lr-mult", "compressor"], ["--lr-mult", "KIND=NUMBER"]),
        (["--corpus", good, "--lr-mult", "wings=2"], ["--lr-mult", "unknown kind"]),
        (["--corpus", good, "--parametrization", "no-such-name"], ["--parametrization"]),
        (["--corpus", good, "--eval-every", "0"], ["--eval-every must be >= 1"]),
        (["--corpus", good, "--width", "32,64"], ["one point", "--width"]),
        (["--corpus", good, "--recipe", "e1"], ["--recipe", "do not apply to --task lm"]),
    ]
    for extra, words in cases:
        err = _error(capsys, [*TINY, *extra])
        for w in words:
            assert w in err, (extra, w, err)
    err = _error(capsys, ["--corpus", good, "--match", "compute"])            # --task ffn
    assert "--corpus, --match apply to --task lm" in err


@pytest.mark.fast
def test_defaults_of_both_tasks(tmp_path):
    ffn = cli.parse_args([])
    assert (ffn.width, ffn.ghosts, ffn.batch, ffn.steps, ffn.lr) == ([1024], [16], [256], 100, 1e-3)
    corpus = str(_corpus(tmp_path / "c"))
    a = cli.parse_args(["--task", "lm", "--corpus", corpus])
    assert (a.width, a.ghosts, a.batch, a.steps, a.seq, a.match) == ([256], [16], [8], 300, 128, "width")
    assert a.lm_plan.tp.ffn_hidden == a.lm_plan.phantom.ffn_hidden == 1024 and a.lm_plan.tp.heads == 4
    assert a.lr == a.lm_plan.tp.lr == a.lm_plan.phantom.lr == 1e-3          # TP's best at width 256
    wide = cli.parse_args(["--task", "lm", "--corpus", corpus, "--width", "512"])
    assert wide.lr == wide.lm_plan.phantom.lr == 2.5e-4                      # and at width 512
    given = cli.parse_args(["--task", "lm", "--corpus", corpus, "--width", "512", "--lr", "1e-3"])
    assert given.lm_plan.tp.lr == 1e-3
    from phantom_plugin.bench.lm_recipe import default_lr
    assert default_lr(64) == 1e-3 and default_lr(1024) == 6.25e-5                # capped below 256


@pytest.mark.fast
def test_demo_table_reports_time_to_a_common_loss():
    from phantom_plugin.bench.report import demo_table

    def rec(mode, losses, step_s):
        n = len(losses)
        return {"mode": mode, "params": 100, "macs_per_step": 10, "comm_bytes_per_step": 8, "step_time_s": step_s,
                "cpu_seconds_per_step": 2 * step_s, "energy_j_modeled_per_step": 0.5, "final_loss": sum(losses[-10:]) / 10,
                "width": 8, "depth": 1, "world_size": 2, "ghost_dim": 1, "batch": 4, "steps": n, "dtype": "fp32",
                "machine": "m", "energy_j": None, "energy_reason": "no energy counter", "energy_scope": "none",
                "comm_bytes_per_step_model": 8, "energy_model": "modeled", "losses": losses,
                "step_times_s": [step_s] * n, "step_cpu_s": [2 * step_s] * n, "energy_j_per_step": None}
    tp = rec("tp", [1.0] * 20, 1.0)                     # final 1.0
    ph = rec("phantom", [3.0] * 10 + [2.0] * 10, 0.5)   # final 2.0 = the common loss; TP is there at step 10
    md = demo_table(tp, ph)
    assert "To a common loss 2.0000" in md
    assert "| steps | 10 | 20 | 2.000 |" in md and "| CPU-seconds (all ranks) | 20.00 | 20.00 | 1.000 |" in md


@pytest.mark.fast
def test_phantom_plan_names_the_equal_compute_width(capsys):
    from phantom_plugin.cli import plan
    plan.main(["--width", "256", "--depth", "4", "--ranks", "2", "--ghosts", "16", "--json"])
    eq = json.loads(capsys.readouterr().out)["equal_compute_mlp"]
    assert eq["tp_ffn_hidden"] == 1024 and eq["phantom_ffn_hidden"] == counts.equal_compute_ffn_hidden(
        256, 1024, p=2, k=16) == _brute_force(256, 1024, 2, 16, False) == 1792
    plan.main(["--width", "256", "--depth", "4", "--ranks", "2", "--ghosts", "16", "--ffn-hidden", "512"])
    assert "ffn_hidden_size 512 in TP costs what a phantom MLP (k=16) of ffn_hidden_size" in capsys.readouterr().out
