"""Swap dense MLPs for phantom ones by module name (framework-free).

:func:`convert_modules` finds the modules whose dotted name matches one of a list of regular
expressions (``re.search``; the outermost match wins, its descendants are not considered) and
replaces their ``nn.Linear`` children **in place** with :class:`PhantomEdgeLinear` modules. The
matched module object itself is kept, so its own ``forward``, and references to it held elsewhere
(a DeepSpeed ``PipelineModule``'s layer list), keep working. Convertible modules:

* ``nn.Sequential`` of ``nn.Linear`` and elementwise activations (ReLU, GELU, SiLU, Tanh, Dropout, ...);
* MLPs with linear children (``nn.Linear`` or a subclass, or Hugging Face's ``Conv1D``) in one
  of the :data:`MLP_CHILDREN` layouts, whose forward applies only elementwise operations
  (activation, gating product, dropout) between the two layers: ``fc1 -> fc2`` (Phi, OPT's
  decoder layer), ``up_proj(, gate_proj) -> down_proj`` (Llama, Mistral, Qwen, Gemma),
  ``gate_up_proj -> down_proj`` (Phi-3, fused: split by the forward's ``chunk(2)``),
  ``dense_h_to_4h -> dense_4h_to_h`` (GPT-NeoX, Falcon, BLOOM), ``c_fc -> c_proj`` (GPT-2,
  ``Conv1D``) or ``w1(, w3) -> w2``.

A converted MLP is a drop-in (``docs/concepts.md``, "Inside a transformer MLP"): the first
layer(s) take this rank's slice of the replicated input (``scatter_to_group``), activations stay
sharded ``[*, n/p]`` in between, the last layer all-gathers its output (``gather_from_group``).

Weights: by default each phantom layer is the best rank-``k`` approximation of the dense weight
(:meth:`PhantomLinear.from_dense`, truncated SVD; exact when ``k = n_in/p``), which needs the
dense weights identical on every rank of the group; that is checked with one small all-gather.
``init="random"`` draws fresh phantom weights from a seed instead.

Every argument is checked before the first collective; a matched module that cannot be
converted is an error naming it, a pattern that matches nothing a warning.

:func:`to_dense` is the inverse: every phantom layer back to the exactly equivalent dense
layer of its original type (``W[i,j] = D_ij C_j``), identical on every rank.
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
import warnings
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from . import comm
from .checks import resolve_group
from .edge import PhantomEdgeLinear, dense_parts, fused_row_order, meta_template
from .init import derive_seed
from .layers import PhantomLinear
from .shapes import divisibility_error, ghost_dim_error

__all__ = ["PhantomEdgeLinear", "Conversion", "convert_modules", "check_convertible", "find_matches",
           "to_dense", "parameter_sources", "ELEMENTWISE", "MLP_CHILDREN", "FUSED_CHUNKS"]

ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Identity, nn.Dropout,
               nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Hardswish,
               nn.Hardtanh, nn.Hardsigmoid)
"""Module types allowed between the ``nn.Linear`` layers of a converted ``nn.Sequential``."""

MLP_CHILDREN: tuple[tuple[tuple[str, ...], tuple[str, ...], str], ...] = (
    (("fc1",), (), "fc2"),
    (("up_proj",), ("gate_proj",), "down_proj"),
    (("gate_up_proj",), (), "down_proj"),
    (("dense_h_to_4h",), (), "dense_4h_to_h"),
    (("c_fc",), (), "c_proj"),
    (("w1",), ("w3",), "w2"),
)
"""Recognised MLP layouts: (required input layers, optional input layers, output layer)."""

FUSED_CHUNKS = {"gate_up_proj": 2}
"""Input layers whose output the MLP's forward splits with ``chunk(n, dim=-1)``."""

_EXPECTED = ("an nn.Sequential of nn.Linear and elementwise activations, or a module with linear "
             "(nn.Linear or Conv1D) children fc1/fc2, up_proj/down_proj(/gate_proj), "
             "gate_up_proj/down_proj, dense_h_to_4h/dense_4h_to_h, c_fc/c_proj or w1/w2(/w3)")


@dataclasses.dataclass(frozen=True)
class Conversion:
    """One converted module: its name, layout, converted children and SVD error.

    ``approx_error`` is the largest relative Frobenius error ``||W - W_phantom|| / ||W||`` over
    its layers (``None`` with ``init="random"``).
    """
    name: str
    kind: str
    children: tuple[str, ...]
    approx_error: Optional[float]


@dataclasses.dataclass
class _Plan:
    name: str
    module: nn.Module
    kind: str
    layers: list[tuple[str, nn.Module, bool, bool]]   # (child name, linear-like, scatter_in, gather_out)


def _features(layer: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear-like layer."""
    w = dense_parts(layer)[0]
    return w.shape[1], w.shape[0]


def _plan_sequential(name: str, seq: nn.Sequential) -> _Plan:
    children = list(seq.named_children())
    linears = [(c, m) for c, m in children if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"module '{name}' (nn.Sequential) matched target_modules but holds no "
                         f"nn.Linear; expected {_EXPECTED}. Narrow the pattern")
    for c, m in children:
        if not isinstance(m, (nn.Linear,) + ELEMENTWISE):
            raise ValueError(
                f"module '{name}' matched target_modules but child '{c}' ({type(m).__name__}) is "
                f"not an nn.Linear or an elementwise activation, so the sharded activations in "
                f"between cannot pass through it; expected {_EXPECTED}. Narrow the pattern")
    for (c0, a), (c1, b) in zip(linears, linears[1:]):
        if a.out_features != b.in_features:
            raise ValueError(f"module '{name}': '{c0}' has out_features={a.out_features} but the "
                             f"next nn.Linear '{c1}' has in_features={b.in_features}")
    last = len(linears) - 1
    return _Plan(name, seq, "sequential",
                 [(c, m, i == 0, i == last) for i, (c, m) in enumerate(linears)])


def _plan_mlp(name: str, module: nn.Module) -> Optional[_Plan]:
    kids = dict(module.named_children())
    for required, optional, out in MLP_CHILDREN:
        if not all(c in kids for c in required + (out,)):
            continue
        ins = list(required) + [c for c in optional if c in kids]
        for c in ins + [out]:
            if dense_parts(kids[c]) is None:
                raise ValueError(f"module '{name}' matched target_modules but its child '{c}' is "
                                 f"{type(kids[c]).__name__}, not a linear layer (nn.Linear or "
                                 "Conv1D); only those are converted. Narrow the pattern")
        shape0 = _features(kids[ins[0]])
        for c in ins[1:]:
            if _features(kids[c]) != shape0:
                raise ValueError(f"module '{name}': '{c}' and '{ins[0]}' differ in shape")
        chunks = FUSED_CHUNKS.get(ins[0], 1)
        if shape0[1] % chunks or shape0[1] // chunks != _features(kids[out])[0]:
            raise ValueError(f"module '{name}': '{ins[0]}' has out_features={shape0[1]}"
                             + (f" ({chunks} fused chunks)" if chunks > 1 else "")
                             + f" but '{out}' has in_features={_features(kids[out])[0]}")
        if getattr(module, "pretraining_tp", 1) > 1 and getattr(module, "slow_but_exact", False):
            raise ValueError(f"module '{name}' (BLOOM) has pretraining_tp > 1 with slow_but_exact, "
                             f"whose forward slices '{out}.weight' directly; set "
                             "config.slow_but_exact = False (the same math) before converting")
        return _Plan(name, module, "mlp",
                     [(c, kids[c], True, False) for c in ins] + [(out, kids[out], False, True)])
    return None


def _plan(name: str, module: nn.Module) -> _Plan:
    shown = name or "<root>"
    if isinstance(module, nn.Sequential):
        return _plan_sequential(shown, module)
    plan = _plan_mlp(shown, module)
    if plan is None:
        raise ValueError(f"module '{shown}' ({type(module).__name__}) matched target_modules but "
                         f"cannot be converted: expected {_EXPECTED}. Narrow the pattern so it "
                         "matches only such modules")
    return plan


def _check_sizes(plan: _Plan, p: int, k: int) -> None:
    for child, lin, _, _ in plan.layers:
        n_in, n_out = _features(lin)
        chunks = FUSED_CHUNKS.get(child, 1) if plan.kind == "mlp" else 1
        where = f"module '{plan.name}', layer '{child}' ({n_in} -> {n_out})"
        widths = [("in_features", n_in), ("out_features", n_out)]
        if chunks > 1:
            widths.append((f"out_features/{chunks} (each of its {chunks} fused outputs)", n_out // chunks))
        for what, n in widths:
            error = divisibility_error(what, n, p, by="phantom group size",
                                       fix=f"choose a phantom group size that divides {n}")
            if error:
                raise ValueError(f"{where}: {error}")


def _check_ghosts(plans: Sequence[_Plan], p: int, k: int) -> None:
    """``k`` is capped at each layer's ``in_features/p``; beyond the largest it is a typo."""
    if p == 1 or not plans:
        return
    n_in, where = max((_features(lin)[0], f"{plan.name}.{child}")
                      for plan in plans for child, lin, _, _ in plan.layers)
    error = ghost_dim_error(k, n_in, p, name="ghost_neurons", bound="in_features/size of every converted layer",
                            where=f"largest: '{where}'")
    if error:
        raise ValueError(error)


def _ghosts(lin: nn.Module, p: int, k: int) -> int:
    """Ghost neurons of one layer: ``k``, capped at ``in_features/p`` (where the layer is exact)."""
    return k if p == 1 else min(k, _features(lin)[0] // p)


def _check_same_weights(plans: Sequence[_Plan], group, p: int) -> None:
    """One all-gather of weight checksums: SVD init needs identical dense weights on every rank."""
    if p == 1:
        return
    sums = []
    for plan in plans:
        for _, lin, _, _ in plan.layers:
            w = dense_parts(lin)[0].detach().to("cpu", torch.float64)
            sums += [w.sum(), w.abs().sum()]
    mine = torch.stack(sums).to(comm.collective_device(group))
    # float64 bit patterns as int64: no wire dtype (comm_dtype) can round them
    table = comm.all_gather(mine.view(torch.int64), group, tag="setup_check").view(torch.float64).cpu()
    bad = (table != table[0]).any(dim=1).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"ranks {bad} of the phantom group hold different dense weights than its "
                         "rank 0, so SVD initialisation would disagree across ranks; seed torch "
                         "identically on every rank before building the model "
                         "(torch.manual_seed(s)), or initialise phantom layers randomly")


def _build(lin: nn.Module, full_name: str, k: int, group, init: str, seed: int, chunks: int,
           layer_cls: type = PhantomLinear) -> PhantomLinear:
    weight, bias, _ = dense_parts(lin)
    if init == "dense":
        if chunks > 1:           # phantom rows rank by rank, chunk by chunk (see phantom_plugin.edge)
            order = fused_row_order(weight.shape[0], chunks, comm.group_size(group)).to(weight.device)
            weight = weight.index_select(0, order)
            bias = None if bias is None else bias.index_select(0, order)
        return layer_cls.from_dense(weight, bias, ghost_dim=k, group=group)
    with torch.no_grad():
        return layer_cls(weight.shape[1], weight.shape[0], ghost_dim=k, group=group,
                         bias=bias is not None, device=weight.device,
                         dtype=weight.dtype, seed=derive_seed(seed, full_name))


def _convert_plan(plan: _Plan, group, p: int, ghost_dim: int, init: str, seed: int, *,
                  layer_cls: type = PhantomLinear, edge_cls: type = PhantomEdgeLinear) -> Conversion:
    """Swap the linear children of one checked plan for ``edge_cls`` modules (collective over ``group``)."""
    errors = []
    for child, lin, scatter_in, gather_out in plan.layers:
        full = f"{plan.name}.{child}" if plan.name else child
        chunks = FUSED_CHUNKS.get(child, 1) if plan.kind == "mlp" else 1
        phantom = _build(lin, full, _ghosts(lin, p, ghost_dim), group, init, seed, chunks, layer_cls)
        if phantom.approx_error is not None:
            errors.append(phantom.approx_error)
        phantom.requires_grad_(dense_parts(lin)[0].requires_grad)
        setattr(plan.module, child, edge_cls(
            phantom, scatter_input=scatter_in, gather_output=gather_out,
            template=meta_template(lin), transposed=dense_parts(lin)[2], fused_chunks=chunks,
            name=full))
    return Conversion(plan.name, plan.kind, tuple(c for c, *_ in plan.layers),
                      max(errors) if errors else None)


def find_matches(model: nn.Module, patterns: Iterable[str]) -> tuple[list[tuple[str, nn.Module]], list[str]]:
    """Outermost modules whose name ``re.search``-matches a pattern, and the patterns matching none."""
    compiled = [(p, re.compile(p)) for p in patterns]
    hits: list[tuple[str, nn.Module]] = []
    used: set[str] = set()
    for name, module in model.named_modules():
        if any(name.startswith(h + ".") or h == "" for h, _ in hits):
            continue
        matching = [p for p, rx in compiled if rx.search(name)]
        if matching:
            hits.append((name, module))
            used.update(matching)
    return hits, [p for p, _ in compiled if p not in used]


def check_convertible(model: nn.Module, patterns: Sequence[str], *, size: int,
                      ghost_dim: int) -> list[str]:
    """Names :func:`convert_modules` would convert at group size ``size``; raises what it would raise.

    Local: no collective, nothing modified. Adapters call it before any process group exists.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    matches, _ = find_matches(model, patterns)
    plans = [_plan(name, module) for name, module in matches]
    for plan in plans:
        _check_sizes(plan, size, ghost_dim)
    _check_ghosts(plans, size, ghost_dim)
    return [plan.name for plan in plans]


def convert_modules(model: nn.Module, patterns: Sequence[str], *, ghost_dim: int,
                    group: Optional[dist.ProcessGroup] = None, init: str = "dense",
                    seed: int = 0, warn_unmatched: bool = True) -> list[Conversion]:
    """Replace the ``nn.Linear`` layers of the modules matching ``patterns`` with phantom ones.

    Args:
        model: modified in place; call it identically on every rank of ``group``.
        patterns: regular expressions searched in dotted module names (``"mlp"`` matches
            ``layers.3.mlp``). The root module has the name ``""`` (matched by ``"^$"``).
        ghost_dim: ``k``, ghost neurons per rank of every converted layer, capped at each
            layer's ``in_features/p`` (where it is exact): ``k = width/p`` with ``width`` the
            MLP's widest input makes every layer exact.
        group: the phantom group (``None``: the world group, or ``p = 1`` without torch.distributed).
        init: ``"dense"`` (truncated SVD of the existing weights) or ``"random"`` (seeded).
        seed: base seed for ``init="random"``; the layer named ``name`` (full dotted name) is
            seeded ``derive_seed(seed, name)`` (:func:`phantom_plugin.init.derive_seed`).
        warn_unmatched: warn about patterns that match no module (off for one pipeline stage,
            which holds only part of the model).

    Returns one :class:`Conversion` per converted module. Collectives: one small all-gather of
    weight checksums (``init="dense"``), then each ``PhantomLinear``'s own setup collectives.
    """
    if init not in ("dense", "random"):
        raise ValueError(f"convert_modules: init must be 'dense' or 'random', got {init!r}")
    if isinstance(patterns, str):
        patterns = [patterns]
    for pat in patterns:
        try:
            re.compile(pat)
        except re.error as e:
            raise ValueError(f"target_modules: {pat!r} is not a valid regular expression ({e})") from e
    p, _ = resolve_group(group, "convert_modules")
    matches, unused = find_matches(model, patterns)
    for pat in unused if warn_unmatched else ():
        warnings.warn(f"target_modules pattern {pat!r} matches no module name; check the names "
                      "with [n for n, _ in model.named_modules()]", stacklevel=2)
    plans = [_plan(name, module) for name, module in matches]
    for plan in plans:
        _check_sizes(plan, p, ghost_dim)
    _check_ghosts(plans, p, ghost_dim)
    # --- every check passed on every rank: collectives from here on ---------------------------
    if init == "dense" and plans:
        _check_same_weights(plans, group, p)
    return [_convert_plan(plan, group, p, ghost_dim, init, seed) for plan in plans]


def parameter_sources(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """For each dense parameter name a conversion replaced, the phantom parameters that replaced it.

    ``"<layer>.weight"`` -> ``[local_weight, compressor, decompressor]`` (the last two only at
    ``p > 1``), ``"<layer>.bias"`` -> ``[bias]``; names are relative to ``model``. Used to put
    each new parameter in its old one's optimizer group.
    """
    out: dict[str, list[nn.Parameter]] = {}
    for name, m in model.named_modules():
        if isinstance(m, PhantomEdgeLinear):
            ph, pre = m.phantom, f"{name}." if name else ""
            out[pre + "weight"] = [t for t in (ph.local_weight, ph.compressor, ph.decompressor) if t is not None]
            if ph.bias is not None:
                out[pre + "bias"] = [ph.bias]
    return out


def to_dense(model: nn.Module, *,
             gather: Optional[Callable[[list], contextlib.AbstractContextManager]] = None) -> list[str]:
    """Replace every phantom layer of ``model``, in place, by its exact dense equivalent.

    The inverse of :func:`convert_modules`: each :class:`PhantomEdgeLinear` becomes a layer of
    the type it replaced (``nn.Linear``, ``Conv1D``, ...; fused layers back in their original
    row order) with ``W[i,i] = L_i``, ``W[i,j] = D_ij C_j`` computed in float64 from every rank's
    blocks and cast to the phantom layer's dtype, on its device, identical on every rank.
    Collective: one exact all-gather per block and layer, over each layer's phantom group, in
    module order (call on every rank). Returns the names of the replaced layers.

    ``gather(params)``, if given, is a context manager in which a layer's parameters hold their
    full local data (for an optimizer or runtime that partitions them, e.g. ZeRO-3's
    ``GatheredParameters``); by default they are read as they are.
    """
    done = []
    for name, m in list(model.named_modules()):
        if not isinstance(m, PhantomEdgeLinear):
            continue
        with (gather(list(m.parameters())) if gather is not None else contextlib.nullcontext()):
            dense = m.to_dense()
        parent_name, _, child = name.rpartition(".")
        if not name:
            raise ValueError("to_dense: the model itself is a phantom layer; call its own "
                             "to_dense() method instead")
        setattr(model.get_submodule(parent_name), child, dense)
        done.append(name)
    return done
