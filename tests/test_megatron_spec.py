"""The spec swap (no ranks needed: specs are plain data until built)."""
from __future__ import annotations

import functools
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

pytestmark = pytest.mark.fast


def _mlp_module(layer_spec):
    return layer_spec.submodules.mlp.module


def _dense_forms(submodules):
    """Every way this megatron-core can write a dense MLP in a layer spec."""
    forms = {"ModuleSpec(MLP)": ModuleSpec(module=MLP, submodules=submodules),
             "partial(MLP)": functools.partial(MLP, submodules=submodules)}
    if hasattr(MLP, "as_mlp_submodule"):                            # megatron-core 0.18+
        forms["partial(MLP.as_mlp_submodule)"] = functools.partial(MLP.as_mlp_submodule,
                                                                   submodules=submodules)
    return forms


def test_layer_spec_swap_copies_and_keeps_attention():
    base = specs.get_gpt_layer_local_spec()
    before = repr(base)
    out = with_phantom_mlp(base, ghost_dim=8, seed=3)
    assert repr(base) == before                                      # input not mutated
    assert _mlp_entry(base) in (MLP, getattr(MLP, "as_mlp_submodule", MLP))   # 0.16-0.17 / 0.18+ form
    assert _mlp_module(out) is PhantomMLP
    assert out.submodules.mlp.params == {"ghost_dim": 8, "seed": 3}
    assert out.submodules.self_attention.submodules.linear_qkv is \
        base.submodules.self_attention.submodules.linear_qkv          # attention untouched
    assert out.submodules.pre_mlp_layernorm is base.submodules.pre_mlp_layernorm
    assert get_gpt_layer_phantom_spec(ghost_dim=8).submodules.mlp.module is PhantomMLP


def _mlp_entry(layer_spec):
    """What a layer spec's mlp slot names: the ModuleSpec's module or the partial's function."""
    mlp = layer_spec.submodules.mlp
    return mlp.module if isinstance(mlp, ModuleSpec) else mlp.func


def test_moe_left_alone_and_block_specs():
    dense, moe = specs.get_gpt_layer_local_spec(), specs.get_gpt_layer_local_spec(num_experts=4)
    with pytest.raises(ValueError, match=r"no dense MLP to replace; found \[.*MoELayer\)'\]"):
        with_phantom_mlp(moe, ghost_dim=4)
    with pytest.raises(ValueError, match="MoELayer"):
        get_gpt_layer_phantom_spec(ghost_dim=4, num_experts=4)
    with pytest.raises(ValueError, match=r"found \[.*MoELayer.*MoELayer"):
        with_phantom_mlp(TransformerBlockSubmodules(layer_specs=[moe, moe]), ghost_dim=4)
    block = TransformerBlockSubmodules(layer_specs=[dense, moe, dense])
    out = with_phantom_mlp(block, ghost_dim=4)
    moe_entry, dense_entry = _mlp_entry(moe), _mlp_entry(dense)
    assert [_mlp_entry(s) for s in out.layer_specs] == [PhantomMLP, moe_entry, PhantomMLP]
    assert [_mlp_entry(s) for s in block.layer_specs] == [dense_entry, moe_entry, dense_entry]
    wrapped = ModuleSpec(module=TransformerBlock, submodules=block)
    out = with_phantom_mlp(wrapped, ghost_dim=4)
    assert _mlp_module(out.submodules.layer_specs[0]) is PhantomMLP
    with pytest.raises(TypeError, match="expected a layer spec"):
        with_phantom_mlp([dense], ghost_dim=4)
    with pytest.raises(ValueError, match="ghost_dim must be an integer >= 1"):
        with_phantom_mlp(dense, ghost_dim=0)


class FakeTELayerNormColumnParallelLinear:  # stands in for TE's fused norm + fc1 class (by name)
    pass


def _te_like(mlp_entry):
    return ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
        pre_mlp_layernorm=IdentityOp, mlp=mlp_entry,
        sharded_state_dict_keys_map={"mlp.0.weight": "mlp.linear_fc1.layer_norm_weight"}))


def test_fused_norm_is_restored_with_key_map():
    """A TE-shaped layer spec in every dense form: fc1 carries the MLP norm, pre_mlp_layernorm is IdentityOp."""
    class Norm:
        pass
    fused = MLPSubmodules(linear_fc1=FakeTELayerNormColumnParallelLinear, linear_fc2=object)
    for form, entry in _dense_forms(fused).items():
        te_like = _te_like(entry)
        out = with_phantom_mlp(te_like, ghost_dim=4, norm=Norm)
        assert out.submodules.mlp.module is PhantomMLP, form
        assert out.submodules.pre_mlp_layernorm is Norm, form
        assert out.submodules.sharded_state_dict_keys_map == {
            "mlp.0.weight": "mlp.linear_fc1.layer_norm_weight", **NORM_KEY_MAP}, form
        assert te_like.submodules.pre_mlp_layernorm is IdentityOp, form    # input not mutated
        default = with_phantom_mlp(te_like, ghost_dim=4)           # TENorm, or megatron's local norm
        assert default.submodules.pre_mlp_layernorm not in (IdentityOp, None), form
        # a fused fc1 and a real pre_mlp_layernorm would normalise twice
        twice = _te_like(entry)
        twice.submodules.pre_mlp_layernorm = Norm
        with pytest.raises(ValueError, match="normalise twice"):
            with_phantom_mlp(twice, ghost_dim=4)
    # an unfused fc1 keeps the spec's own norm and key map
    plain = MLPSubmodules(linear_fc1=object, linear_fc2=object)
    for form, entry in _dense_forms(plain).items():
        out = with_phantom_mlp(_te_like(entry), ghost_dim=4)
        assert out.submodules.pre_mlp_layernorm is IdentityOp, form
    local = with_phantom_mlp(specs.get_gpt_layer_local_spec(), ghost_dim=4)
    assert local.submodules.sharded_state_dict_keys_map["pre_mlp_layernorm."] == NORM_KEY_MAP["pre_mlp_layernorm."]


def test_transformer_engine_dense_classes_in_both_forms(monkeypatch):
    """TEFusedMLP / TEFusedMLPWithGroupedLinear as ModuleSpec, partial(class) and partial(as_mlp_submodule).

    Without Transformer Engine megatron defines both names as None; stand-in subclasses of MLP are
    put there (what megatron does with TE installed), so the swap's lookup is exercised either way.
    """
    from megatron.core.extensions import transformer_engine as te_ext
    fused = MLPSubmodules(linear_fc1=FakeTELayerNormColumnParallelLinear, linear_fc2=object)
    for name in ("TEFusedMLP", "TEFusedMLPWithGroupedLinear"):
        cls = getattr(te_ext, name, None)
        if cls is None:
            cls = type(name, (MLP,), {})
            monkeypatch.setattr(te_ext, name, cls, raising=False)
        entries = [ModuleSpec(module=cls, submodules=fused), functools.partial(cls, submodules=fused)]
        if hasattr(cls, "as_mlp_submodule"):
            entries.append(functools.partial(cls.as_mlp_submodule, submodules=fused))
        for entry in entries:
            out = with_phantom_mlp(TransformerBlockSubmodules(layer_specs=[_te_like(entry)]), ghost_dim=2)
            layer = out.layer_specs[0].submodules
            assert layer.mlp.module is PhantomMLP and layer.mlp.params == {"ghost_dim": 2, "seed": 0}
            assert layer.pre_mlp_layernorm is not IdentityOp
    # a subclass of MLP that is not one of megatron's dense classes is not swapped silently
    custom = type("MyMLP", (MLP,), {})
    with pytest.raises(ValueError, match=r"found \['partial\(MyMLP\)'\]"):
        with_phantom_mlp(_te_like(functools.partial(custom, submodules=fused)), ghost_dim=2)


def test_unrecognised_layouts_and_parameters_raise():
    plain = MLPSubmodules(linear_fc1=object, linear_fc2=object)
    for form, entry in _dense_forms(plain).items():                 # dense MLP parameters carry over
        if isinstance(entry, ModuleSpec):
            entry.params["ffn_hidden_size"] = 48
        else:
            entry = functools.partial(entry.func, *entry.args, **entry.keywords, ffn_hidden_size=48)
        out = with_phantom_mlp(_te_like(entry), ghost_dim=2)
        assert out.submodules.mlp.params == {"ffn_hidden_size": 48, "ghost_dim": 2, "seed": 0}, form
        bad = (ModuleSpec(module=MLP, submodules=plain, params={"fancy": 1})
               if isinstance(entry, ModuleSpec) else functools.partial(entry.func, fancy=1, submodules=plain))
        with pytest.raises(ValueError, match=r"parameters \['fancy'\] that PhantomMLP does not implement"):
            with_phantom_mlp(_te_like(bad), ghost_dim=2)
    with pytest.raises(ValueError, match=r"found \['IdentityOp'\]"):
        with_phantom_mlp(_te_like(IdentityOp), ghost_dim=2)
    not_a_layer = ModuleSpec(module=MLP, submodules=plain)           # an MLP spec, not a layer spec
    with pytest.raises(ValueError, match="submodules MLPSubmodules .not a transformer layer or block."):
        with_phantom_mlp(not_a_layer, ghost_dim=2)
    with pytest.raises(ValueError, match="found no layers"):
        with_phantom_mlp(TransformerBlockSubmodules(layer_specs=[]), ghost_dim=2)


def test_megatron_core_version_gate():
    from phantom_plugin.megatron._version import check_megatron_version, parse_version
    assert parse_version("0.19.2+ca899de") == (0, 19) and parse_version("1.0.0rc1") == (1, 0)
    check_megatron_version("0.16.1")
    check_megatron_version("0.19.2")
    with pytest.raises(ImportError, match=r"megatron-core >= 0.16 .*found 0.15.3.*pip install -U"):
        check_megatron_version("0.15.3")
    check_megatron_version()                                          # the installed one passes


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
    name = "phantom_plugin.integrations.megatron_lm.phantom_spec"
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
    # a base spec with nothing to swap makes the import fail loudly, not fall back silently
    monkeypatch.setattr(specs, "get_gpt_layer_local_spec",
                        functools.partial(specs.get_gpt_layer_local_spec, num_experts=4))
    with pytest.raises(ValueError, match="no dense MLP to replace.*MoELayer"):
        importlib.import_module(name)
    sys.modules.pop(name, None)


def test_megatrons_own_block_spec_with_moe_and_dense_layers():
    """get_gpt_decoder_block_spec (what GPT training scripts build): dense layers swapped, MoE kept."""
    import megatron_utils as mu
    cfg = mu.make_config(1, num_layers=4, num_moe_experts=4, moe_layer_freq=[1, 0, 1, 0])
    block = specs.get_gpt_decoder_block_spec(cfg, use_transformer_engine=False, pp_rank=0)
    out = with_phantom_mlp(block, ghost_dim=2)
    names = [_mlp_entry(s).__name__ for s in out.layer_specs]
    assert names == ["MoELayer", "PhantomMLP", "MoELayer", "PhantomMLP"], names
