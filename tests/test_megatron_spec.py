"""The spec swap (no ranks needed: specs are plain data until built)."""
from __future__ import annotations

import importlib
import sys
import warnings

import pytest

pytest.importorskip("megatron.core")

from megatron.core.models.gpt import gpt_layer_specs as specs  # noqa: E402
from megatron.core.transformer.identity_op import IdentityOp  # noqa: E402
from megatron.core.transformer.mlp import MLP, MLPSubmodules  # noqa: E402
from megatron.core.transformer.spec_utils import ModuleSpec  # noqa: E402
from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules  # noqa: E402
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules  # noqa: E402

from phantom_plugin.megatron import (NORM_KEY_MAP, PhantomMLP, get_gpt_layer_phantom_spec,  # noqa: E402
                                     with_phantom_mlp)


def _mlp_module(layer_spec):
    return layer_spec.submodules.mlp.module


def test_layer_spec_swap_copies_and_keeps_attention():
    base = specs.get_gpt_layer_local_spec()
    out = with_phantom_mlp(base, ghost_dim=8, seed=3)
    assert _mlp_module(base) is MLP                                  # input not mutated
    assert _mlp_module(out) is PhantomMLP
    assert out.submodules.mlp.params == {"ghost_dim": 8, "seed": 3}
    assert out.submodules.self_attention.submodules.linear_qkv is \
        base.submodules.self_attention.submodules.linear_qkv          # attention untouched
    assert out.submodules.pre_mlp_layernorm is base.submodules.pre_mlp_layernorm
    assert get_gpt_layer_phantom_spec(ghost_dim=8).submodules.mlp.module is PhantomMLP


def test_moe_left_alone_and_block_specs():
    dense, moe = specs.get_gpt_layer_local_spec(), specs.get_gpt_layer_local_spec(num_experts=4)
    with pytest.warns(UserWarning, match="nothing was replaced"):
        out = with_phantom_mlp(moe, ghost_dim=4)
    assert _mlp_module(out) is _mlp_module(moe) and _mlp_module(moe) is not MLP
    block = TransformerBlockSubmodules(layer_specs=[dense, moe, dense])
    out = with_phantom_mlp(block, ghost_dim=4)
    assert [_mlp_module(s) for s in out.layer_specs] == [PhantomMLP, _mlp_module(moe), PhantomMLP]
    assert [_mlp_module(s) for s in block.layer_specs] == [MLP, _mlp_module(moe), MLP]
    wrapped = ModuleSpec(module=TransformerBlock, submodules=block)
    out = with_phantom_mlp(wrapped, ghost_dim=4)
    assert _mlp_module(out.submodules.layer_specs[0]) is PhantomMLP
    with pytest.raises(TypeError, match="expected a layer spec"):
        with_phantom_mlp([dense], ghost_dim=4)
    with pytest.raises(ValueError, match="ghost_dim must be an integer >= 1"):
        with_phantom_mlp(dense, ghost_dim=0)


class FakeTELayerNormColumnParallelLinear:  # stands in for TE's fused norm + fc1 class (by name)
    pass


def test_fused_norm_is_restored_with_key_map():
    """A TE-shaped layer spec: fc1 carries the MLP norm, pre_mlp_layernorm is IdentityOp."""
    class Norm:
        pass
    te_like = ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
        pre_mlp_layernorm=IdentityOp,
        mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=FakeTELayerNormColumnParallelLinear,
                                                            linear_fc2=object)),
        sharded_state_dict_keys_map={"mlp.0.weight": "mlp.linear_fc1.layer_norm_weight"}))
    out = with_phantom_mlp(te_like, ghost_dim=4, norm=Norm)
    assert out.submodules.pre_mlp_layernorm is Norm
    assert out.submodules.sharded_state_dict_keys_map == {
        "mlp.0.weight": "mlp.linear_fc1.layer_norm_weight", **NORM_KEY_MAP}
    assert te_like.submodules.pre_mlp_layernorm is IdentityOp      # input not mutated
    default = with_phantom_mlp(te_like, ghost_dim=4)               # TENorm, or megatron's local norm
    assert default.submodules.pre_mlp_layernorm not in (IdentityOp, None)
    # the local spec keeps its own norm and key map
    local = with_phantom_mlp(specs.get_gpt_layer_local_spec(), ghost_dim=4)
    assert local.submodules.sharded_state_dict_keys_map["pre_mlp_layernorm."] == NORM_KEY_MAP["pre_mlp_layernorm."]


@pytest.mark.skipif(not specs.HAVE_TE, reason="Transformer Engine not installed")
def test_transformer_engine_spec():
    out = get_gpt_layer_phantom_spec(ghost_dim=4, use_te=True)
    assert out.submodules.mlp.module is PhantomMLP
    assert out.submodules.pre_mlp_layernorm is not IdentityOp
    assert out.submodules.sharded_state_dict_keys_map["pre_mlp_layernorm."] == "mlp.linear_fc1.layer_norm_"


@pytest.mark.skipif(specs.HAVE_TE, reason="checks the error without Transformer Engine")
def test_te_flavour_without_te_is_a_clear_error():
    with pytest.raises(ImportError, match="needs Transformer Engine"):
        get_gpt_layer_phantom_spec(ghost_dim=4, use_te=True)


def test_megatron_lm_spec_module(monkeypatch):
    name = "integrations.megatron_lm.phantom_spec"
    monkeypatch.delenv("PHANTOM_GHOST_DIM", raising=False)
    sys.modules.pop(name, None)
    with pytest.raises(RuntimeError, match="set PHANTOM_GHOST_DIM"):
        importlib.import_module(name)
    monkeypatch.setenv("PHANTOM_GHOST_DIM", "16")
    sys.modules.pop(name, None)
    # what Megatron-LM's --spec does: import, then vars(module)[name], never a call
    from megatron.core.transformer.spec_utils import import_module
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = import_module((name, "phantom_layer_spec"))
        rms = import_module((name, "phantom_rmsnorm_layer_spec"))
    assert isinstance(spec, ModuleSpec) and spec.submodules.mlp.module is PhantomMLP
    assert spec.submodules.mlp.params["ghost_dim"] == 16
    assert rms.submodules.mlp.module is PhantomMLP
    sys.modules.pop(name, None)
