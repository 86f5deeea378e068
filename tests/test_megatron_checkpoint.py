"""dist_checkpointing with phantom MLPs on 2 gloo ranks: exact round trip, the wrong-TP error and
the resharding path through dense weights. The checks read the checkpoint's metadata themselves:
megatron's ``load_tensors_metadata`` (broken by torch 2.15's ``TensorProperties.strides``) is
replaced by a function that fails, and one check runs on rank 0 alone (no collective).

Test-only: megatron's saver calls ``torch.cuda.synchronize``; the ranks redirect it to a no-op
(``megatron_utils.redirect_cuda_for_checkpointing``).
"""
from __future__ import annotations

import pytest

from dist_utils import run_ranks

pytest.importorskip("megatron.core")

SEQ, BATCH, K = 16, 4, 4


def _ckpt_ranks(rank, world, phantom_dir, dense_dir):
    import torch
    import torch.nn.functional as F
    import megatron_utils as mu
    from megatron.core import dist_checkpointing
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from phantom_plugin.megatron import (PhantomCheckpointError, check_checkpoint, convert_to_phantom,
                                         load_checkpoint, save_checkpoint, to_dense, with_phantom_mlp)
    from megatron.core.dist_checkpointing.core import CheckpointingException
    mu.redirect_cuda_for_checkpointing()

    def _not_called(*args, **kwargs):       # the checks read the metadata themselves (see below)
        raise AssertionError("check_checkpoint called megatron's load_tensors_metadata")
    dist_checkpointing.load_tensors_metadata = _not_called
    out = {}
    tok, lab, pos = mu.batches(1, BATCH, SEQ)[0]
    kw = dict(gated_linear_unit=True, activation_func=F.silu)

    # --- TP = 2: save, load into a differently initialised model ----------------------------
    mu.init_megatron(2)
    cfg = mu.make_config(2, **kw)
    a = mu.build_gpt(cfg, with_phantom_mlp(get_gpt_layer_local_spec(), ghost_dim=K), seq=SEQ)
    mu.set_params_by_name(a, rank)
    save_checkpoint(a, phantom_dir)
    torch.manual_seed(99)
    b = mu.build_gpt(cfg, with_phantom_mlp(get_gpt_layer_local_spec(), ghost_dim=K, seed=9), seq=SEQ)
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    out["differed_before"] = sum(not torch.equal(pa[n], pb[n]) for n in pa)
    load_checkpoint(b, phantom_dir)
    out["differ_after"] = [n for n in pa if not torch.equal(pa[n], pb[n])]
    out["phantom_params"] = sum(".local_weight" in n or ".compressor" in n for n in pa)
    with torch.no_grad():
        ref = a(tok, pos, None, labels=lab)                             # per-token losses [b, s]
        out["roundtrip_loss_diff"] = (b(tok, pos, None, labels=lab) - ref).abs().max().item()
    # wrong ghost_dim at the same TP size; checked on rank 0 alone (no collective: no hang)
    c = mu.build_gpt(cfg, with_phantom_mlp(get_gpt_layer_local_spec(), ghost_dim=K + 1), seq=SEQ)
    if rank == 0:
        try:
            check_checkpoint(c, phantom_dir)
        except PhantomCheckpointError as e:
            out["wrong_k"] = str(e)
    torch.distributed.barrier()
    check_checkpoint(b, phantom_dir)                                   # the matching model passes
    try:
        check_checkpoint(b, phantom_dir + "_missing")
    except CheckpointingException as e:
        out["missing_dir"] = str(e)
    # exact dense export, saved as a stock checkpoint (megatron reshards those)
    assert to_dense(a) == cfg.num_layers
    with torch.no_grad():
        out["dense_export_diff"] = (a(tok, pos, None, labels=lab) - ref).abs().max().item()
    save_checkpoint(a, dense_dir)                                      # now a stock model

    # --- TP = 1 (DP = 2): the phantom checkpoint is refused, the dense one reshards ----------
    mu.init_megatron(1)
    cfg1 = mu.make_config(1, **kw)
    c = mu.build_gpt(cfg1, with_phantom_mlp(get_gpt_layer_local_spec(), ghost_dim=K), seq=SEQ)
    try:
        load_checkpoint(c, phantom_dir)
    except PhantomCheckpointError as e:
        out["wrong_tp"] = str(e)
    try:
        check_checkpoint(c, dense_dir)
    except PhantomCheckpointError as e:
        out["dense_into_phantom"] = str(e)
    d = mu.build_gpt(cfg1, get_gpt_layer_local_spec(), seq=SEQ)
    d.load_state_dict(dist_checkpointing.load(d.sharded_state_dict(), dense_dir))
    report = convert_to_phantom(d, ghost_dim=K)
    with torch.no_grad():
        out["resharded_loss_diff"] = (d(tok, pos, None, labels=lab) - ref).abs().max().item()
    out["resharded_errors"] = [(r.fc1_error, r.fc2_error) for r in report]
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return run_ranks(_ckpt_ranks, 2, str(root / "phantom"), str(root / "dense"), timeout=240)


def test_round_trip_is_exact_on_every_rank(ranks):
    for r in ranks:
        assert r["phantom_params"] >= 4 and r["differed_before"] > r["phantom_params"]
        assert r["differ_after"] == []                                 # bit-exact, rank 1 included
        assert r["roundtrip_loss_diff"] == 0.0


def test_other_tp_size_or_ghost_dim_is_a_clear_error(ranks):
    for r in ranks:
        msg = r["wrong_tp"]
        assert "saved at tensor-parallel size 2" in msg and "runs at tensor-parallel size 1" in msg
        assert "megatron.to_dense(model)" in msg and "convert_to_phantom" in msg
        assert "holds dense (tensor-parallel) MLP weights" in r["dense_into_phantom"]
        assert "_missing does not exist" in r["missing_dir"]
    wrong_k = ranks[0]["wrong_k"]                                      # rank 0 checked alone
    assert f"ghost_dim {K}" in wrong_k and f"ghost_dim {K + 1}" in wrong_k and "wrong_k" not in ranks[1]


def test_resharding_path_through_dense_weights(ranks):
    for r in ranks:
        assert r["dense_export_diff"] < 1e-5
        assert all(e1 < 1e-6 and e2 < 1e-6 for e1, e2 in r["resharded_errors"])   # p = 1: exact
        assert r["resharded_loss_diff"] < 1e-4
