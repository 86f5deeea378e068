"""``PhantomConfig``: the options of a phantom layer or block, validated once at construction."""
from __future__ import annotations

import dataclasses
from typing import Optional

__all__ = ["PhantomConfig", "ACTIVATIONS"]

ACTIVATIONS = ("relu", "gelu", "silu", "tanh", "identity")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PhantomConfig:
    """Options shared by phantom layers and the framework adapters.

    Attributes:
        ghost_dim: ``k``, ghost neurons per rank (>= 1).
        activation: one of :data:`ACTIVATIONS`, applied between the layers of a ``PhantomFFN``.
        bias: whether layers carry a bias ``b_i [n_out/p]``.
        seed: initialisation seed; ``None`` draws one from torch's default generator (every rank
            must then have seeded torch identically; construction checks that they agree).
        comm_timeout_s: bound on every wait for a collective, seconds (``None``: the process
            group's own timeout).
    """
    ghost_dim: int
    activation: str = "gelu"
    bias: bool = True
    seed: Optional[int] = None
    comm_timeout_s: Optional[float] = None

    def __post_init__(self) -> None:
        if not isinstance(self.ghost_dim, int) or isinstance(self.ghost_dim, bool) or self.ghost_dim < 1:
            raise ValueError(f"PhantomConfig.ghost_dim must be an integer >= 1, got {self.ghost_dim!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"PhantomConfig.activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.comm_timeout_s is not None and self.comm_timeout_s <= 0:
            raise ValueError(f"PhantomConfig.comm_timeout_s must be > 0 or None, got {self.comm_timeout_s!r}")
