"""Phantom layers: ``PhantomLinear`` and ``PhantomFFN`` (framework-free).

Rank ``i`` of a group of ``p`` holds ``L_i [n_out/p, n_in/p]`` (``local_weight``),
``C_i [k, n_in/p]`` (``compressor``), ``[D_ij, j != i] [n_out/p, (p-1)k]`` (``decompressor``) and
``b_i [n_out/p]`` (``bias``). All of them differ across ranks and are tagged
``tensor_model_parallel=True`` (with ``partition_dim``/``partition_stride``) so Megatron's and
DeepSpeed's grad-norm code counts them on every rank. At ``p = 1`` only ``local_weight`` and
``bias`` exist and the layer is a plain dense one.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from . import blocks, comm, dtypes, init, ops
from .checks import agree_across_group, resolve_group
from .shapes import divisibility_error, ghost_dim_error

__all__ = ["PhantomLinear", "PhantomFFN", "mark_tensor_parallel"]


def mark_tensor_parallel(param: nn.Parameter, partition_dim: int = 0) -> nn.Parameter:
    """Tag ``param`` as differing across the group, the way Megatron and DeepSpeed expect."""
    param.tensor_model_parallel = True
    param.partition_dim = partition_dim
    param.partition_stride = 1
    return param


def _draw_seed() -> int:
    """One draw of torch's default CPU generator (explicit device: safe under a meta/CUDA default)."""
    return int(torch.randint(0, 2 ** 31 - 1, (1,), device="cpu").item())


class PhantomLinear(nn.Module):
    """``y = W x + b`` over a group, with ``W``'s off-diagonal blocks ``D_ij C_j`` of rank ``ghost_dim``.

    Args:
        in_features, out_features: the dense layer's ``n_in`` and ``n_out`` (divisible by ``p``).
        ghost_dim: ``k``, ``1 <= k <= n_in/p``.
        group: the phantom group (``None``: the world group, or ``p = 1`` without torch.distributed).
        seed: initialisation seed (see :mod:`phantom_plugin.init`); ``None`` draws one from torch's
            default generator on every rank and the whole group takes the draw of its first rank
            (so ranks seeded ``s + rank`` still build one layer, the same on every run seeded
            alike). Ranks that pass *different explicit* seeds are an error.
        init: initialisation scheme of the blocks, one of :data:`phantom_plugin.init.INIT_SCHEMES`:
            ``"balanced"`` (default; ``L_i`` are the dense master's diagonal blocks) or
            ``"spectral"`` (each factor at its own maximal-update scale,
            :func:`phantom_plugin.init.init_scales`); every rank must pass the same.
        device: where the parameters live. ``"meta"`` (or a ``torch.device("meta")`` context)
            builds them without data; after ``to_empty(device=...)``, :meth:`reset_parameters`
            draws the same values a direct construction would.

    Input ``[*, n_in/p]`` (this rank's slice), output ``[*, n_out/p]``. Construction runs one small
    all-gather that checks every rank passed the same valid arguments (and carries the seed).
    """

    def __init__(self, in_features: int, out_features: int, *, ghost_dim: int,
                 group: Optional[dist.ProcessGroup] = None, bias: bool = True,
                 device=None, dtype: Optional[torch.dtype] = None, seed: Optional[int] = None,
                 init: str = "balanced"):
        super().__init__()
        who = "PhantomLinear"
        p, rank = resolve_group(group, who)
        dtype = dtype or torch.get_default_dtype()
        given = seed is not None
        error = _shape_error(in_features, out_features, ghost_dim, p, dtype) or _init_error(init)
        agreed = agree_across_group(group, p, who, {
            "in_features": in_features, "out_features": out_features, "ghost_dim": ghost_dim,
            "bias": bool(bias), "dtype": _dtype_code(dtype), "init": _init_code(init), "seed_given": int(given),
            "seed": seed if given else _draw_seed()}, error, adopt=() if given else ("seed",))
        seed = agreed["seed"]
        self.in_features, self.out_features, self.ghost_dim = in_features, out_features, ghost_dim
        self.group, self.group_size, self.rank, self.seed = group, p, rank, seed
        self.init_scheme = init
        self.approx_error: Optional[float] = None
        mi, mo, kw = in_features // p, out_features // p, {"device": device, "dtype": dtype}
        self.local_weight = mark_tensor_parallel(nn.Parameter(torch.empty(mo, mi, **kw)))
        if p > 1:
            self.compressor = mark_tensor_parallel(nn.Parameter(torch.empty(ghost_dim, mi, **kw)))
            self.decompressor = mark_tensor_parallel(nn.Parameter(torch.empty(mo, (p - 1) * ghost_dim, **kw)))
        else:
            self.register_parameter("compressor", None)
            self.register_parameter("decompressor", None)
        if bias:
            self.bias = mark_tensor_parallel(nn.Parameter(torch.empty(mo, **kw)))
        else:
            self.register_parameter("bias", None)
        if not self.local_weight.is_meta:
            self.reset_parameters()

    def _tag(self) -> None:
        for param in self.parameters(recurse=False):
            mark_tensor_parallel(param)

    def reset_parameters(self) -> None:
        """Fill every block from :attr:`seed` (identical to :func:`init.master_blocks` slices).

        A no-op on meta parameters; after ``to_empty(device=...)`` it draws the values (and
        restores the ``tensor_model_parallel`` tags that ``to_empty`` drops).
        """
        n_in, n_out, k, p, r, s = (self.in_features, self.out_features, self.ghost_dim,
                                   self.group_size, self.rank, self.seed)
        self._tag()
        if self.local_weight.is_meta:
            return
        scale = init.init_scales(self.init_scheme, n_in, n_out, k, p)
        with torch.no_grad():
            self.local_weight.copy_(init.local_block(s, n_in, n_out, p, r) * scale["local_weight"])
            if p > 1:
                self.compressor.copy_(init.compressor_block(s, n_in, k, p, r) * scale["compressor"])
                self.decompressor.copy_(init.decompressor_block(s, n_out, k, p, r) * scale["decompressor"])
            if self.bias is not None:
                self.bias.copy_(init.bias_block(s, n_in, n_out, p, r))

    def forward(self, x_shard: torch.Tensor) -> torch.Tensor:
        if x_shard.shape[-1] != self.in_features // self.group_size:
            raise ValueError(f"PhantomLinear: input last dim is {x_shard.shape[-1]}, expected "
                             f"in_features/p = {self.in_features}/{self.group_size} = "
                             f"{self.in_features // self.group_size} (pass this rank's shard)")
        return ops.phantom_linear(x_shard, self.local_weight, self.compressor, self.decompressor,
                                  self.bias, self.group, self.rank)               # [*, n_out/p]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"ghost_dim={self.ghost_dim}, p={self.group_size}, bias={self.bias is not None}"
                + ("" if self.init_scheme == "balanced" else f", init={self.init_scheme!r}"))

    # --- dense equivalence --------------------------------------------------------------------

    @torch.no_grad()
    def to_dense(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(weight [out, in], bias [out] or None)``, the exact dense equivalent, on every rank.

        Collective: all-gathers every rank's blocks (call it on all ranks of the group).
        """
        if self.group_size == 1:
            return self.local_weight.detach().clone(), None if self.bias is None else self.bias.detach().clone()
        g = self.group
        local = comm.all_gather(self.local_weight.detach(), g, tag="to_dense").unbind(0)
        comp = comm.all_gather(self.compressor.detach(), g, tag="to_dense").unbind(0)
        decomp = comm.all_gather(self.decompressor.detach(), g, tag="to_dense").unbind(0)
        bias = None
        if self.bias is not None:
            bias = comm.all_gather(self.bias.detach(), g, tag="to_dense").reshape(-1)
        return blocks.dense_from_blocks(local, comp, decomp), bias

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *, ghost_dim: int,
                   group: Optional[dist.ProcessGroup] = None) -> "PhantomLinear":
        """Best phantom approximation of the dense ``weight [out, in]`` (the same on every rank).

        ``L_i = W[i,i]``; each rank factors its own block column by truncated SVD (float64) and
        the factors are all-gathered, so every rank uses one factorisation. The relative
        Frobenius error ``||W - W_phantom|| / ||W||`` is stored in ``layer.approx_error``
        (0 up to rounding when ``ghost_dim >= in/p``). dtype and device follow ``weight``.
        """
        n_out, n_in = weight.shape
        layer = cls(n_in, n_out, ghost_dim=ghost_dim, group=group, bias=bias is not None,
                    device="meta", dtype=weight.dtype, seed=0)      # no random draw: filled below
        layer.to_empty(device=weight.device)
        layer._tag()
        p, r, k = layer.group_size, layer.rank, ghost_dim
        mo, mi = n_out // p, n_in // p
        w = weight.detach()
        with torch.no_grad():
            layer.local_weight.copy_(w[r * mo:(r + 1) * mo, r * mi:(r + 1) * mi])
            if bias is not None:
                layer.bias.copy_(bias.detach()[r * mo:(r + 1) * mo])
            dropped = torch.zeros((), dtype=torch.float64, device=w.device)
            if p > 1:
                comp, fac, dropped = layer._exchange_svd(w, k)
                layer.compressor.copy_(comp)
                layer.decompressor.copy_(fac)
            total = sum(w[i:i + mo].to(torch.float64).pow(2).sum() for i in range(0, n_out, mo))
            layer.approx_error = float((dropped / total).sqrt()) if total > 0 else 0.0
        return layer

    def _exchange_svd(self, w: torch.Tensor, k: int):
        """SVD of own block column, all-gathered; returns own ``C``, own ``[D_ij]`` and total dropped energy."""
        p, r, g = self.group_size, self.rank, self.group
        mo = self.out_features // p
        comp, fac, dropped = blocks.svd_block_column(w, p, k, r)       # [k, mi], [(p-1)mo, k], []
        packed = torch.cat([fac.reshape(-1), dropped.reshape(1)])
        every = comm.all_gather(packed, g, tag="from_dense")            # [p, (p-1)mo*k + 1]
        factors = [every[j, :-1].reshape((p - 1) * mo, k) for j in range(p)]
        return comp, blocks.decompressor_from_factors(factors, p, r), every[:, -1].sum()


def _agreed_seed(group: Optional[dist.ProcessGroup], seed: Optional[int], who: str) -> int:
    """``seed``, or (``seed=None`` on every rank) the group's first rank's draw; one small all-gather.

    Raises on every rank when some ranks pass a seed and others ``None``, or explicit seeds differ.
    """
    p, _ = resolve_group(group, who)
    given = seed is not None
    fields = {"seed_given": int(given), "seed": seed if given else _draw_seed()}
    return agree_across_group(group, p, who, fields, None, adopt=() if given else ("seed",))["seed"]


_INIT_SCHEMES = init.INIT_SCHEMES


def _init_code(scheme: str) -> int:
    """Index of ``scheme`` in :data:`phantom_plugin.init.INIT_SCHEMES` (-1 when unknown), compared across ranks."""
    return _INIT_SCHEMES.index(scheme) if scheme in _INIT_SCHEMES else -1


def _init_error(scheme: str) -> Optional[str]:
    if scheme not in _INIT_SCHEMES:
        return f"unknown init {scheme!r}; init must be one of {list(_INIT_SCHEMES)}"
    return None


def _shape_error(n_in: int, n_out: int, k: int, p: int, dtype: torch.dtype) -> Optional[str]:
    if n_in < 1 or n_out < 1:
        return f"in_features={n_in} and out_features={n_out} must be positive"
    for name, n in (("in_features", n_in), ("out_features", n_out)):
        error = divisibility_error(name, n, p)
        if error:
            return error
    error = ghost_dim_error(k, n_in, p)
    if error:
        return error
    if dtypes.of_torch(dtype) is None:
        return (f"dtype {dtype} is not supported; use "
                + ", ".join(d.torch_name for d in dtypes.DTYPES.values()))
    return None


def _dtype_code(dtype: torch.dtype) -> int:
    """The dtype's :attr:`phantom_plugin.dtypes.DType.code` (-1 when unsupported), compared across ranks."""
    entry = dtypes.of_torch(dtype)
    return -1 if entry is None else entry.code


_derive_seed = init.derive_seed

_ACT: dict[str, Callable] = {"relu": torch.relu, "gelu": nn.functional.gelu,
                             "silu": nn.functional.silu, "tanh": torch.tanh,
                             "identity": lambda x: x}


class PhantomFFN(nn.Module):
    """``depth`` phantom layers of width ``width`` with activations kept sharded in between.

    forward ``[*, width]`` replicated -> ``[*, width]`` replicated: the input edge takes this
    rank's slice (backward: all-gather of its grad), the layers exchange only ghosts, the output
    edge all-gathers (backward: own slice). ``scatter_input=False`` / ``gather_output=False``
    take / return shards ``[*, width/p]`` instead. Layer ``l`` is seeded
    ``init.derive_seed(seed, l)``; ``seed=None`` draws one from torch's default generator and the
    whole group takes its first rank's draw (as :class:`PhantomLinear`), kept as :attr:`seed`.
    Construction runs one small all-gather that checks every rank passed a seed alike (and
    carries the draw), then :class:`PhantomLinear`'s per layer. ``init`` is every layer's
    initialisation scheme (see :class:`PhantomLinear`).
    """

    def __init__(self, width: int, depth: int, *, ghost_dim: int,
                 group: Optional[dist.ProcessGroup] = None,
                 activation: Union[str, Callable] = "gelu", bias: bool = True,
                 scatter_input: bool = True, gather_output: bool = True,
                 device=None, dtype: Optional[torch.dtype] = None, seed: Optional[int] = None,
                 init: str = "balanced"):
        super().__init__()
        if depth < 1:
            raise ValueError(f"PhantomFFN: depth must be >= 1, got {depth}")
        if isinstance(activation, str) and activation not in _ACT:
            raise ValueError(f"PhantomFFN: activation must be one of {sorted(_ACT)} or a callable, "
                             f"got {activation!r}")
        self.group, self.width, self.depth = group, width, depth
        self.scatter_input, self.gather_output = scatter_input, gather_output
        self.act = _ACT[activation] if isinstance(activation, str) else activation
        self.seed = _agreed_seed(group, seed, "PhantomFFN")
        kw = dict(ghost_dim=ghost_dim, group=group, bias=bias, device=device, dtype=dtype, init=init)
        self.layers = nn.ModuleList([PhantomLinear(width, width, seed=_derive_seed(self.seed, l), **kw)
                                     for l in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = ops.scatter_to_group(x, self.group) if self.scatter_input else x   # [*, width/p]
        for l, layer in enumerate(self.layers):
            h = layer(h)
            if l < self.depth - 1:
                h = self.act(h)
        return ops.gather_from_group(h, self.group) if self.gather_output else h

    def to_dense(self) -> list[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """Every layer's dense equivalent (collective; see :meth:`PhantomLinear.to_dense`)."""
        return [layer.to_dense() for layer in self.layers]
