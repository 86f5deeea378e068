"""Two "nodes" on this machine: two ``torchrun`` agents on localhost with ``--nnodes 2``.

Each agent starts 2 ranks of the 4-rank ZeRO case of ``test_deepspeed_launcher.py`` (phantom 2 x
data 2, ZeRO 0/1/2, one after another). The ranks of each phantom group must sit on one node
(the groups are consecutive ranks, the agents number theirs node by node), the data-parallel
groups span the nodes, and every stage trains the float64 reference's losses and grad norms, as
the single-node run does (rtol 1e-4).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow       # every test here launches ranks (about a minute a launch)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from test_deepspeed_launcher import _close  # noqa: E402


def test_two_nodes_phantom_groups_inside_a_node(tmp_path):
    from dist_utils import free_port
    port = free_port()
    runner = Path(sys.executable).parent / "torchrun"
    cmd = [str(runner)] if runner.exists() else [sys.executable, "-m", "torch.distributed.run"]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PHANTOM_PLUGIN_AUTOLOAD="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")]))
    agents = [subprocess.Popen(cmd + ["--nnodes", "2", "--nproc_per_node", "2", "--node_rank", str(node),
                                      "--master_addr", "127.0.0.1", "--master_port", str(port),
                                      str(HERE / "test_deepspeed_launcher.py"), "--case", "zero",
                                      "--out", str(tmp_path)],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True) for node in (0, 1)]
    outs = []
    try:
        for a in agents:
            outs.append(a.communicate(timeout=600)[0])
    except subprocess.TimeoutExpired as e:
        for a in agents:
            os.killpg(a.pid, signal.SIGKILL)
        raise AssertionError("two-node run timed out") from e
    for a, out in zip(agents, outs):
        assert a.returncode == 0, out[-6000:]
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    node = {r["rank"]: r["node"] for r in res}
    assert [node[r] for r in range(4)] == ["0", "0", "1", "1"], node
    for r in res:
        assert {node[q] for q in r["phantom_ranks"]} == {node[r["rank"]]}, "phantom group spans nodes"
        assert {node[q] for q in r["data_ranks"]} == {"0", "1"}
        for stage in ("0", "1", "2"):
            assert _close(r["losses"][stage], r["ref_losses"], 1e-4), (stage, r["losses"][stage], r["ref_losses"])
        for stage in ("1", "2"):
            assert _close(r["norms"][stage], r["ref_norms"], 1e-4), (stage, r["norms"][stage], r["ref_norms"])
