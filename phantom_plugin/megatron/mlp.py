"""``PhantomMLP``: a drop-in for megatron-core's ``MLP`` in the phantom form of ``docs/concepts.md``.

Contract (``megatron.core.transformer.mlp.MLP``): ``hidden_states [s, b, h]`` replicated over the
TP group in, ``(output [s, b, h], output_bias)`` out, the output identical on every TP rank.
Inside (``docs/concepts.md``, "Inside a transformer MLP")::

    x_i = split(x)                 # [s, b, h/p]      fwd: own slice  bwd: all-gather of dx
    a_i = act(phantom_fc1(x_i))    # [s, b, ffn/p]    ghosts k (gated: fc1 rows are [gate_i; up_i])
    y_i = phantom_fc2(a_i)         # [s, b, h/p]      ghosts k, fc2 bias added here
    y   = gather(y_i)              # [s, b, h]        fwd: all-gather  bwd: own slice

With ``config.sequence_parallel`` the input arrives as ``[s/p, b, h]`` and leaves the same way:
an all-to-all switches sequence shards to hidden shards and back (1/p of the all-gather's bytes).
fc2's bias is a shard ``[h/p]``, so it is added before the gather and ``output_bias`` is always
``None`` (the contract allows it; ``mlp_bda`` then adds nothing).

The group is ``tp_group``, else ``pg_collection.tp``, else megatron's parallel state.
megatron-core 0.18+'s ``TransformerLayer`` passes ``pg_collection`` (with ``name`` and
``is_mtp_layer``) to every MLP builder. 0.16/0.17's pass ``tp_group`` only to their own ``MLP``
class (an identity check) and log "Unknown MLP type ... Using default kwargs" once per layer for
this one; the fallback to ``parallel_state`` covers that case (``docs/megatron.md``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import (ensure_metadata_has_dp_cp_group,
                                             make_sharded_tensors_for_checkpoint)

from .. import comm, ops
from ..init import derive_seed
from ..layers import PhantomLinear
from ..shapes import divisibility_error, ghost_dim_error

__all__ = ["PhantomMLP", "PhantomCheckpointError", "resolve_tp_group"]

_PARAMS = ("local_weight", "compressor", "decompressor", "bias")


class PhantomCheckpointError(ValueError):
    """A phantom checkpoint does not fit the model (tensor-parallel size or ghost_dim differ)."""


def resolve_tp_group(tp_group, pg_collection, who: str = "PhantomMLP"):
    """The phantom group: ``tp_group``, else ``pg_collection.tp``, else megatron's TP group.

    Returns ``None`` only in a single process without torch.distributed (then ``p = 1``).
    """
    if tp_group is not None:
        return tp_group
    if pg_collection is not None and getattr(pg_collection, "tp", None) is not None:
        return pg_collection.tp
    if parallel_state.model_parallel_is_initialized():
        return parallel_state.get_tensor_model_parallel_group()
    if dist.is_initialized():
        raise RuntimeError(
            f"{who}: no tensor-parallel group: pass tp_group= (or pg_collection=), or call "
            "megatron.core.parallel_state.initialize_model_parallel(...) before building the model")
    return None


class PhantomMLP(MegatronModule):
    """Phantom MLP with megatron ``MLP``'s constructor and forward contract.

    Args:
        config: the ``TransformerConfig`` (``hidden_size``, ``ffn_hidden_size``,
            ``gated_linear_unit``, ``activation_func``, ``add_bias_linear``, ``params_dtype``,
            ``use_cpu_initialization``, ``perform_initialization``, ``init_model_with_meta_device``,
            ``sequence_parallel`` are read).
        submodules: ignored (kept for the spec contract).
        ghost_dim: ``k`` ghost neurons per rank, ``1 <= k <= min(h, ffn)/p``.
        seed: initialisation seed; at layer number ``l`` fc1 is seeded
            ``derive_seed(seed, l, "linear_fc1")`` and fc2 ``derive_seed(seed, l, "linear_fc2")``
            (:func:`phantom_plugin.init.derive_seed`), so the initial weights do not depend on
            TP or PP sizes.
        tp_group / pg_collection: the phantom group (see :func:`resolve_tp_group`); ``tp_group``
            wins when both are given.
        ffn_hidden_size, input_size, is_expert: as megatron's ``MLP``; experts are refused.
        name, is_mtp_layer: what megatron-core 0.18+'s ``TransformerLayer`` passes (``name`` is
            kept as ``self.name``; an MTP layer's MLP is an ordinary dense MLP here).
        init: initialisation scheme of fc1 and fc2 (``PhantomLinear``'s ``init``: ``"balanced"``
            or ``"spectral"``).
        **kwargs: accepted and ignored, for keywords later megatron-core releases add.

    Parameters (all ``tensor_model_parallel``): ``linear_fc1`` and ``linear_fc2`` are
    :class:`~phantom_plugin.layers.PhantomLinear` of ``h -> fc1_out`` and ``ffn -> h``.
    """

    def __init__(self, config: TransformerConfig, submodules=None, ghost_dim: Optional[int] = None,
                 is_expert: bool = False, input_size: Optional[int] = None,
                 ffn_hidden_size: Optional[int] = None, tp_group=None, pg_collection=None,
                 seed: int = 0, name: Optional[str] = None, is_mtp_layer: bool = False,
                 init: str = "balanced", **kwargs):
        super().__init__(config=config)
        group = resolve_tp_group(tp_group, pg_collection)
        p = comm.group_size(group)
        h = config.hidden_size
        ffn = ffn_hidden_size if ffn_hidden_size is not None else config.ffn_hidden_size
        _check_args(config, ghost_dim, is_expert, input_size, h, ffn, p)
        self.tp_group, self.ghost_dim, self.seed = group, ghost_dim, seed
        self.hidden_size, self.ffn_hidden_size, self.group_size = h, ffn, p
        self.gated = bool(config.gated_linear_unit)
        self.sequence_parallel = bool(config.sequence_parallel) and p > 1
        self.activation_func = config.activation_func
        self.layer_number = 0
        self.name = name
        device = _param_device(config)
        # perform_initialization=False (weights come from a checkpoint) and meta-device models
        # allocate without drawing; otherwise draw once here and again only if the layer's seeds change
        self._draws = bool(getattr(config, "perform_initialization", True)) and device.type != "meta"
        s1, s2 = _layer_seeds(seed, 0)
        kw = {"ghost_dim": ghost_dim, "group": group, "bias": config.add_bias_linear,
              "dtype": config.params_dtype, "init": init}
        fc1_out = 2 * ffn if self.gated else ffn
        self.linear_fc1 = _build(h, fc1_out, s1, device, self._draws, kw)
        self.linear_fc2 = _build(ffn, h, s2, device, self._draws, kw)

    def set_layer_number(self, layer_number: int) -> None:
        """Called by ``TransformerLayer`` after construction: reseeds both layers for ``layer_number``.

        Redraws the weights (when this MLP draws at all: ``perform_initialization`` and not on
        the meta device) only if the seeds changed. On the meta device,
        :meth:`PhantomLinear.reset_parameters` draws these seeds' values after ``to_empty``.
        """
        self.layer_number = layer_number
        seeds = _layer_seeds(self.seed, layer_number)
        changed = seeds != (self.linear_fc1.seed, self.linear_fc2.seed)
        self.linear_fc1.seed, self.linear_fc2.seed = seeds
        if changed and self._draws:
            self.linear_fc1.reset_parameters()
            self.linear_fc2.reset_parameters()

    # --- forward ---------------------------------------------------------------------------

    def _activation(self, a: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if not self.gated:
            return self.activation_func(a)
        gate, up = torch.chunk(a, 2, dim=-1)                      # [s, b, ffn/p] each
        clamp = getattr(cfg, "activation_func_clamp_value", None)
        if clamp is not None:
            gate = gate.clamp(min=None, max=clamp)
            up = up.clamp(min=-clamp, max=clamp)
        return self.activation_func(gate) * (up + getattr(cfg, "glu_linear_offset", 0.0))

    def forward(self, hidden_states: torch.Tensor, per_token_scale=None, **kwargs):
        """``[s, b, h]`` (``[s/p, b, h]`` with sequence parallelism) -> ``(same shape, None)``."""
        if per_token_scale is not None:
            raise ValueError("PhantomMLP: per_token_scale is for MoE experts; phantom MLPs replace "
                             "dense MLPs only (leave MoE layers on megatron's MLP)")
        g = self.tp_group
        if self.sequence_parallel:
            x_shard = ops.sequence_to_hidden(hidden_states, g)         # [s, b, h/p]
        else:
            x_shard = ops.scatter_to_group(hidden_states, g)           # [s, b, h/p]
        a_shard = self._activation(self.linear_fc1(x_shard))           # [s, b, ffn/p]
        y_shard = self.linear_fc2(a_shard)                             # [s, b, h/p]
        if self.sequence_parallel:
            return ops.hidden_to_sequence(y_shard, g), None            # [s/p, b, h]
        return ops.gather_from_group(y_shard, g), None                 # [s, b, h]

    def backward_dw(self):  # megatron's delayed-wgrad hook; phantom computes wgrads in backward
        pass

    # --- dense equivalence (collective) -----------------------------------------------------

    def _fc1_rows(self) -> torch.Tensor:
        """Row order of phantom fc1 in the canonical dense fc1 (``[gate; up]`` when gated)."""
        ffn, p = self.ffn_hidden_size, self.group_size
        if not self.gated:
            return torch.arange(ffn)
        m = ffn // p
        return torch.cat([torch.cat([torch.arange(r * m, (r + 1) * m),
                                     ffn + torch.arange(r * m, (r + 1) * m)]) for r in range(p)])

    @torch.no_grad()
    def to_dense(self):
        """``(W1 [fc1_out, h], b1, W2 [h, ffn], b2)``, the exact dense MLP, on every rank.

        Gated fc1 rows are in megatron's global order ``[gate; up]``. Collective over the group.
        """
        w1p, b1p = self.linear_fc1.to_dense()
        w2, b2 = self.linear_fc2.to_dense()
        inv = torch.argsort(self._fc1_rows()).to(w1p.device)
        return w1p[inv], None if b1p is None else b1p[inv], w2, b2

    @torch.no_grad()
    def load_dense(self, w1, b1, w2, b2) -> tuple[float, float]:
        """Set fc1/fc2 to the best phantom approximation of a dense MLP (truncated SVD).

        Takes the :meth:`to_dense` layout (same on every rank); returns the relative Frobenius
        errors ``(fc1, fc2)``, 0 up to rounding when the off-diagonal blocks have rank <= k.
        Collective over the group.
        """
        errors = []
        rows = self._fc1_rows().to(w1.device)
        for layer, w, b in ((self.linear_fc1, w1[rows], None if b1 is None else b1[rows]),
                            (self.linear_fc2, w2, b2)):
            fit = PhantomLinear.from_dense(w.to(torch.float64), None if b is None else b.to(torch.float64),
                                           ghost_dim=self.ghost_dim, group=self.tp_group)
            for name in _PARAMS:
                src, dst = getattr(fit, name), getattr(layer, name)
                if (src is None) != (dst is None):
                    raise ValueError(f"PhantomMLP.load_dense: `{name}` present in only one of the "
                                     "dense weights and this MLP (add_bias_linear must match)")
                if dst is not None:
                    dst.copy_(src)
            errors.append(fit.approx_error)
        return errors[0], errors[1]

    # --- checkpointing ----------------------------------------------------------------------

    def layout(self) -> dict:
        return {"phantom_tp_size": self.group_size, "ghost_dim": self.ghost_dim,
                "hidden_size": self.hidden_size, "ffn_hidden_size": self.ffn_hidden_size,
                "gated": self.gated}

    def get_extra_state(self):
        return self.layout()

    def set_extra_state(self, state) -> None:
        if not isinstance(state, dict) or "phantom_tp_size" not in state:
            return
        mine = self.layout()
        if state["phantom_tp_size"] != mine["phantom_tp_size"] or state["ghost_dim"] != mine["ghost_dim"]:
            raise PhantomCheckpointError(
                f"PhantomMLP (layer {self.layer_number}): the checkpoint was saved at tensor-parallel "
                f"size {state['phantom_tp_size']} with ghost_dim {state['ghost_dim']}, this model runs at "
                f"tensor-parallel size {mine['phantom_tp_size']} with ghost_dim {mine['ghost_dim']}. "
                "Phantom blocks depend on both; load at the saved size, or reshard through dense weights "
                "(phantom_plugin.megatron.to_dense, then convert_to_phantom at the new size)")

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: Optional[dict] = None):
        """Every phantom parameter sharded over TP on axis 0 (rank blocks stacked), plus the layout.

        Global shapes depend on the TP size (e.g. fc1 ``local_weight`` is ``[fc1_out, h/p]``), so
        loading at another TP size fails; :func:`phantom_plugin.megatron.check_checkpoint` turns
        that into an error naming both sizes.
        """
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        state = self.state_dict(prefix="", keep_vars=True)             # includes _extra_state
        axis_map = {k: 0 for k in state if not k.endswith("_extra_state")}
        return make_sharded_tensors_for_checkpoint(
            state, prefix, axis_map, sharded_offsets,
            tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"])

    def extra_repr(self) -> str:
        return (f"hidden={self.hidden_size}, ffn={self.ffn_hidden_size}, ghost_dim={self.ghost_dim}, "
                f"p={self.group_size}, gated={self.gated}, sequence_parallel={self.sequence_parallel}")


def _layer_seeds(seed: int, layer_number: int) -> tuple[int, int]:
    """``(fc1, fc2)`` seeds of the MLP at ``layer_number`` (see :class:`PhantomMLP`'s ``seed``)."""
    return derive_seed(seed, layer_number, "linear_fc1"), derive_seed(seed, layer_number, "linear_fc2")


def _param_device(config) -> torch.device:
    """``meta`` with ``init_model_with_meta_device``, the CPU with ``use_cpu_initialization`` or
    without CUDA, else this rank's current CUDA device (megatron sets it before building)."""
    if getattr(config, "init_model_with_meta_device", False):
        return torch.device("meta")
    if config.use_cpu_initialization or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _build(n_in: int, n_out: int, seed: int, device: torch.device, draw: bool, kw: dict) -> PhantomLinear:
    """A ``PhantomLinear`` on ``device``, its weights drawn from ``seed`` only when ``draw``."""
    if draw or device.type == "meta":
        return PhantomLinear(n_in, n_out, seed=seed, device=device, **kw)
    layer = PhantomLinear(n_in, n_out, seed=seed, device="meta", **kw)
    layer.to_empty(device=device)                                 # allocated, not drawn
    layer._tag()
    return layer


def _check_args(config, k, is_expert, input_size, h, ffn, p) -> None:
    """Every argument error, raised on each rank before any collective."""
    who = "PhantomMLP"
    if k is None:
        raise ValueError(f"{who}: ghost_dim is required; build the spec with "
                         "with_phantom_mlp(spec, ghost_dim=k) or get_gpt_layer_phantom_spec(ghost_dim=k)")
    error = ghost_dim_error(k, 0, 1)         # p = 1: the integer rule only; the bound is checked below
    if error:
        raise ValueError(f"{who}: {error}")
    if is_expert:
        raise ValueError(f"{who}: is_expert=True: MoE experts are not replaced; with_phantom_mlp "
                         "leaves MoE layers on megatron's own modules")
    if input_size is not None and input_size != h:
        raise ValueError(f"{who}: input_size={input_size} differs from config.hidden_size={h}; "
                         "phantom MLPs need input and output of the hidden size")
    if ffn is None:
        raise ValueError(f"{who}: config.ffn_hidden_size is None; set it in the TransformerConfig")
    for name, n in (("config.hidden_size", h), ("ffn_hidden_size", ffn)):
        error = divisibility_error(name, n, p, by="tensor-parallel size", fix=f"choose a multiple of {p}")
        if error:
            raise ValueError(f"{who}: {error}")
    error = ghost_dim_error(k, min(h, ffn), p, bound="min(hidden_size, ffn_hidden_size)/p")
    if error:
        raise ValueError(f"{who}: {error}")
    if getattr(config, "use_te_activation_func", False):
        raise ValueError(f"{who}: config.use_te_activation_func=True is not supported; set it to "
                         "False (the activation is applied on the local shard with config.activation_func)")
    if config.sequence_parallel and p == 1:
        raise ValueError(f"{who}: config.sequence_parallel=True needs a tensor-parallel size > 1")
