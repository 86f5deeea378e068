"""Phantom MLPs in PyTorch's native stack: DeviceMesh, DTensor plans, FSDP2, ``torch.compile``.

:class:`PhantomMLPParallel` is a ``torch.distributed.tensor.parallel.ParallelStyle``: an entry of
a ``parallelize_module(model, mesh["tp"], plan)`` plan, next to PyTorch's ``ColwiseParallel`` /
``RowwiseParallel`` for attention, that converts the matched MLP (any layout
:mod:`phantom_plugin.convert` knows: Llama ``gate/up/down_proj``, GPT-2 ``c_fc/c_proj`` ``Conv1D``,
``nn.Sequential``, ...) into phantom layers over the tensor-parallel mesh dimension. The MLP takes
the replicated hidden state and returns it replicated (``docs/concepts.md``, "Inside a
transformer MLP"), so attention styles without sequence parallelism compose unchanged.

Parameters are DTensors. Each phantom parameter differs across the ``p`` tensor-parallel ranks, so
it is stored as ``Shard(0)`` of a stacked global tensor on the tp mesh:

| parameter | local (rank ``i``) | global (``Shard(0)``) |
| --- | --- | --- |
| ``local_weight`` | ``L_i [n_out/p, n_in/p]`` | ``[n_out, n_in/p]`` |
| ``compressor`` | ``C_i [k, n_in/p]`` | ``[p*k, n_in/p]`` |
| ``decompressor`` | ``[D_ij, j != i] [n_out/p, (p-1)k]`` | ``[n_out, (p-1)k]`` |
| ``bias`` | ``b_i [n_out/p]`` | ``[n_out]`` |

Plain tensors would be taken for replicas by ``torch.distributed.checkpoint`` (DCP), which then
saves one tp rank's copy only, and by FSDP2's 2-D handling; as DTensors every rank's blocks are
saved, resharded and loaded at their own offsets. ``forward`` runs the phantom operators of
:mod:`phantom_plugin.ops` on the ``.to_local()`` blocks (autograd returns ``Shard(0)`` grads).

Checks: :func:`check_plan` (called by :func:`parallelize_module`, a drop-in for torch's) tests a
whole plan locally, with no collective, so every rank raises the same error before any data
moves: an entry that matches no module, a matched module the converter does not know, widths the
mesh size does not divide, a module already sharded by another style. ``PhantomMLPParallel``
applied through torch's own ``parallelize_module`` runs the same checks per module (an entry
matching nothing is then only torch's warning).

Export: :meth:`to_dense` of :mod:`phantom_plugin.convert` works on these layers (it gathers every
rank's blocks), and :func:`dense_state_dict` returns the whole model's full dense state dict, keys
as in the original model, for a model that is also sharded by FSDP2.
"""
from __future__ import annotations

import fnmatch
import itertools
import weakref
from typing import Optional

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ParallelStyle
from torch.distributed.tensor.parallel import parallelize_module as _torch_parallelize_module

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:                      # torch < 2.5 kept DTensor under a private name
    from torch.distributed._tensor import DTensor, Replicate, Shard

from . import blocks, convert, ops
from .edge import PhantomEdgeLinear, dense_parts, fused_row_order
from .layers import PhantomLinear

__all__ = ["PhantomMLPParallel", "parallelize_module", "check_plan", "dense_state_dict"]

_PHANTOM_PARAMS = ("local_weight", "compressor", "decompressor", "bias")
_NAMES: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()
"""Dotted names of the modules :func:`check_plan` matched (for error messages and random seeds)."""
_WRAPPERS = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def _is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and getattr(compiler, "is_compiling", lambda: False)())


class _MeshPhantomLinear(PhantomLinear):
    """A :class:`PhantomLinear` whose parameters are ``Shard(0)`` DTensors on the tp mesh."""

    def distribute(self, mesh: DeviceMesh) -> None:
        """Wrap each plain block as ``Shard(0)`` of its stacked global tensor (no communication)."""
        for name in _PHANTOM_PARAMS:
            t = getattr(self, name)
            if t is not None and not isinstance(t, DTensor):
                d = DTensor.from_local(t.detach(), mesh, [Shard(0)], run_check=False)
                setattr(self, name, nn.Parameter(d, requires_grad=t.requires_grad))

    def _local(self, name: str) -> Optional[torch.Tensor]:
        t = getattr(self, name)
        return t.to_local() if isinstance(t, DTensor) else t

    def forward(self, x_shard: torch.Tensor) -> torch.Tensor:
        lw, comp, decomp, bias = (self._local(n) for n in _PHANTOM_PARAMS)
        if x_shard.shape[-1] != lw.shape[1]:
            raise ValueError(f"PhantomLinear: input last dim is {x_shard.shape[-1]}, expected "
                             f"in_features/p = {lw.shape[1]} (pass this rank's shard)")
        return ops.phantom_linear(x_shard, lw, comp, decomp, bias, self.group, self.rank)  # [*, n_out/p]

    @torch.no_grad()
    def full_blocks(self) -> dict[str, list[torch.Tensor]]:
        """Every rank's blocks in float64, ``{name: [block of rank 0, ..., rank p-1]}``.

        Collective over the parameters' meshes (``full_tensor``: every rank calls it, in order).
        """
        out = {}
        for name in _PHANTOM_PARAMS:
            t = getattr(self, name)
            if t is None:
                continue
            full = t.full_tensor() if isinstance(t, DTensor) else t
            out[name] = list(full.detach().to(torch.float64).chunk(self.group_size, dim=0))
        return out

    @torch.no_grad()
    def to_dense(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(weight [out, in], bias)`` exact dense equivalent in the parameters' dtype (collective)."""
        w, b = _dense_from_full(self.full_blocks(), self.group_size)
        dtype = self._local("local_weight").dtype
        return w.to(dtype), None if b is None else b.to(dtype)


def _dense_from_full(full: dict[str, list[torch.Tensor]], p: int):
    if p == 1:
        w = full["local_weight"][0]
    else:
        w = blocks.dense_from_blocks(full["local_weight"], full["compressor"], full["decompressor"])
    b = torch.cat(full["bias"]) if "bias" in full else None
    return w, b


class _MeshEdgeLinear(PhantomEdgeLinear):
    """:class:`PhantomEdgeLinear` around a :class:`_MeshPhantomLinear`.

    The replicated-input check (one all-gather, see :mod:`phantom_plugin.edge`) runs on the first
    *eager* forward only: inside ``torch.compile`` it is skipped, since it reads values on the host.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.phantom.group
        if self.check_input and not self._input_checked and not _is_compiling():
            self._check_replicated(x)
        if self.scatter_input:
            x = ops.scatter_to_group(x, group)                            # [*, n_in/p]
        y = self.phantom(x)                                               # [*, n_out/p]
        return ops.gather_from_group(y, group) if self.gather_output else y

    @torch.no_grad()
    def dense_weight(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The exact dense ``(weight [out, in], bias)`` in float64, original row order (collective)."""
        ph = self.phantom
        w, b = _dense_from_full(ph.full_blocks(), ph.group_size)
        if self.fused_chunks > 1:
            order = fused_row_order(self.out_features, self.fused_chunks, ph.group_size).to(w.device)
            w = torch.empty_like(w).index_copy_(0, order, w)
            b = None if b is None else torch.empty_like(b).index_copy_(0, order, b)
        return w, b


def _replicated_input(module: nn.Module, args: tuple):
    """Forward pre-hook of a converted MLP: a DTensor input becomes its replicated local tensor."""
    if not any(isinstance(a, DTensor) for a in args):
        return None
    return tuple(a.redistribute(a.device_mesh, [Replicate()] * a.device_mesh.ndim).to_local()
                 if isinstance(a, DTensor) else a for a in args)


class PhantomMLPParallel(ParallelStyle):
    """Convert the matched MLP into phantom layers over a 1-D (tensor-parallel) mesh.

    Use it as a plan entry of :func:`parallelize_module` (or torch's own), e.g.
    ``{"model.layers.*.mlp": PhantomMLPParallel(ghost_dim=64)}`` with ``mesh["tp"]``.

    Args:
        ghost_dim: ``k``, ghost neurons per rank of every converted layer, capped at each layer's
            ``in_features/p`` (where it is exact); ``k = width/p`` with ``width`` the MLP's widest
            input makes every layer exact.
        init: ``"dense"``: best rank-``k`` approximation of the existing dense weights (truncated
            SVD, exact at full ``k``; the weights must be identical on every tp rank, checked with
            one small all-gather); ``"random"``: fresh phantom weights from ``seed``.
        seed: base seed for ``init="random"``; layer ``name`` gets ``derive_seed(seed, name)``
            (:func:`phantom_plugin.init.derive_seed`), ``name`` being its dotted name in the model
            given to :func:`check_plan` / :func:`parallelize_module` (under torch's own
            ``parallelize_module``: ``"<ClassName> #<n>.<child>"``, ``n`` counting the modules
            this style converted, in order).
        check_input: check on the first eager forward that the input is the same on every tp
            rank (one all-gather per converted MLP).

    The converted module keeps its own ``forward``; a DTensor input is made replicated (an
    all-gather or all-reduce if it was sharded or partial) and the output is a plain replicated
    tensor, as ``RowwiseParallel``'s default. Collectives while converting: one small all-gather
    per MLP with ``init="dense"`` (weight checksums) plus each phantom layer's setup all-gathers.
    """

    def __init__(self, *, ghost_dim: int, init: str = "dense", seed: int = 0, check_input: bool = True):
        super().__init__()
        if init not in ("dense", "random"):
            raise ValueError(f"PhantomMLPParallel: init must be 'dense' or 'random', got {init!r}")
        if not isinstance(ghost_dim, int) or isinstance(ghost_dim, bool) or ghost_dim < 1:
            raise ValueError(f"PhantomMLPParallel: ghost_dim must be a positive int, got {ghost_dim!r}")
        self.ghost_dim, self.init, self.seed, self.check_input = ghost_dim, init, seed, check_input
        self._count = itertools.count()

    def __repr__(self) -> str:
        return f"PhantomMLPParallel(ghost_dim={self.ghost_dim}, init={self.init!r}, seed={self.seed})"

    def check(self, module: nn.Module, name: str, device_mesh: DeviceMesh) -> "convert._Plan":
        """Raise what converting ``module`` (named ``name``) over ``device_mesh`` would raise; local."""
        where = f"PhantomMLPParallel on module '{name}'"
        if device_mesh.ndim != 1:
            raise ValueError(f"{where}: the mesh has {device_mesh.ndim} dimensions "
                             f"{device_mesh.mesh_dim_names}; pass the tensor-parallel sub-mesh, "
                             "e.g. parallelize_module(model, mesh['tp'], plan)")
        sharded = [n for n, t in module.named_parameters() if isinstance(t, DTensor)]
        if sharded:
            raise ValueError(
                f"{where}: the module already holds DTensor parameters ({', '.join(sharded[:4])}"
                f"{', ...' if len(sharded) > 4 else ''}), so another style (ColwiseParallel, "
                "RowwiseParallel, ...) or fully_shard was applied to it first; give the MLP and its "
                "children no other plan entry, and call fully_shard after parallelize_module")
        try:
            plan = convert._plan(name, module)
            p = device_mesh.size()
            convert._check_sizes(plan, p, self.ghost_dim)
            convert._check_ghosts([plan], p, self.ghost_dim)
        except ValueError as e:
            raise ValueError(f"{where} (tp mesh size {device_mesh.size()}): {e}. In a plan, point "
                             "PhantomMLPParallel at the MLP modules only (e.g. 'model.layers.*.mlp') "
                             "and pick a tp size that divides their widths") from e
        return plan

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        name = _NAMES.get(module) or f"{type(module).__name__} #{next(self._count)}"
        plan = self.check(module, name, device_mesh)
        # --- local checks passed (identically on every rank): collectives from here on ----------
        group, p = device_mesh.get_group(), device_mesh.size()
        if self.init == "dense":
            convert._check_same_weights([plan], group, p)
        convert._convert_plan(plan, group, p, self.ghost_dim, self.init, self.seed,
                              layer_cls=_MeshPhantomLinear, edge_cls=_MeshEdgeLinear)
        for child in module.modules():
            if isinstance(child, _MeshEdgeLinear):
                child.phantom.distribute(device_mesh)
                child.check_input = child.check_input and self.check_input
        module.register_forward_pre_hook(_replicated_input)
        return module


def _resolve(model: nn.Module, key: str, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """The modules a plan key reaches, as torch's ``parallelize_module`` resolves it (fnmatch per token)."""
    if key == "":
        return [(prefix, model)]
    token, _, rest = key.partition(".")
    out = []
    for child_name, child in model.named_children():
        if fnmatch.fnmatch(child_name, token):
            full = f"{prefix}.{child_name}" if prefix else child_name
            out += _resolve(child, rest, full) if rest else [(full, child)]
    return out


def _mlp_like(model: nn.Module) -> list[str]:
    names = []
    for name, m in model.named_modules():
        try:
            if isinstance(m, nn.Sequential) or convert._plan_mlp(name, m) is not None:
                names.append(name)
        except ValueError:
            continue
    return names


def check_plan(model: nn.Module, device_mesh: DeviceMesh, plan: dict) -> list[str]:
    """Check every :class:`PhantomMLPParallel` entry of ``plan`` locally; the names it would convert.

    Raises ``ValueError`` (on every rank alike, before any collective) when an entry matches no
    module, a matched module cannot be converted or its widths are not divisible by the mesh
    size, it already holds DTensor parameters, or another entry of ``plan`` also reaches it or its
    children. Records the matched names (used in errors and ``init="random"`` seeds).
    """
    hits: dict[str, str] = {}
    for key, style in plan.items():
        if not isinstance(style, PhantomMLPParallel):
            continue
        found = _resolve(model, key)
        if not found:
            near = _mlp_like(model)
            example = ".".join("*" if part.isdigit() else part for part in near[0].split(".")) if near else ""
            raise ValueError(
                f"plan entry {key!r} (PhantomMLPParallel) matches no module of "
                f"{type(model).__name__}; keys are matched token by token (fnmatch) against child "
                f"names. Modules with an MLP layout here: {near[:3] + (['...'] if len(near) > 3 else [])}"
                + (f"; e.g. the key {example!r}" if near else ""))
        for name, module in found:
            style.check(module, name, device_mesh)
            _NAMES[module] = name
            hits[name] = key
    for key, style in plan.items():
        if isinstance(style, PhantomMLPParallel):
            continue
        for name, _ in _resolve(model, key):
            owner = next((h for h in hits if name == h or name.startswith(h + ".")), None)
            if owner is not None:
                raise ValueError(
                    f"plan entry {key!r} ({type(style).__name__}) reaches '{name}', which the "
                    f"PhantomMLPParallel entry {hits[owner]!r} converts; a phantom MLP shards its "
                    "own layers: remove the other entry for it and its children")
    return list(hits)


def parallelize_module(module: nn.Module, device_mesh: DeviceMesh, parallelize_plan, **kwargs) -> nn.Module:
    """torch's ``parallelize_module`` after :func:`check_plan` (a drop-in with the same arguments)."""
    if isinstance(parallelize_plan, PhantomMLPParallel):
        check_plan(module, device_mesh, {"": parallelize_plan})
    elif isinstance(parallelize_plan, dict):
        check_plan(module, device_mesh, parallelize_plan)
    return _torch_parallelize_module(module, device_mesh, parallelize_plan, **kwargs)


def _clean(name: str) -> str:
    for w in _WRAPPERS:
        name = name.replace(w, "")
    return name


@torch.no_grad()
def dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full dense state dict of ``model``: plain tensors, keys as in the unconverted model.

    Every phantom layer (of this module or of :func:`phantom_plugin.convert.convert_modules`) is
    replaced by its exact dense weight and bias (``W[i,j] = D_ij C_j`` in float64, cast to the
    layer's dtype; ``Conv1D`` weights transposed back, fused layers in their original row order);
    every DTensor (TP or FSDP2-sharded) is gathered with ``full_tensor()``. Wrapper prefixes of
    activation checkpointing and ``torch.compile`` are dropped. Collective (call on every rank);
    the result, identical on every rank, loads into the original dense model.
    """
    edges = {name: m for name, m in model.named_modules() if isinstance(m, PhantomEdgeLinear)}
    out: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        owner = next((n for n in edges if key.startswith(n + ".")), None)
        if owner is not None:
            continue
        out[_clean(key)] = (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()
    for name, edge in edges.items():
        w, b = edge.dense_weight()
        dtype = edge.phantom.local_weight.dtype
        template = edge.template
        weight_t = w.to(dtype)
        if template is not None:
            if dense_parts(template)[2]:                  # Conv1D: stored [in, out]
                weight_t = weight_t.t()
        out[_clean(name) + ".weight"] = weight_t.contiguous()
        if b is not None:
            out[_clean(name) + ".bias"] = b.to(dtype)
    return out
