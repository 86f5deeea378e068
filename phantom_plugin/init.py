"""Deterministic initialisation of phantom parameters from a seed.

Every block is sliced out of a *master* tensor drawn from the seed alone, so each rank computes
its own shard without communication and a single process can rebuild the whole group's
parameters (:func:`master_blocks`) to check a parallel run against.

Fan-in convention (``U(-b, b)`` as ``torch.nn.Linear``, variance ``b^2/3``):

* local block ``L_i``: ``b = 1/sqrt(n_in)``, the dense layer's own bound; ``L_i`` is the
  diagonal block ``W0[i, i]`` of the dense master ``W0 [n_out, n_in]``;
* compressor ``C_i``: ``b = 1/sqrt(n_in/p)``, fan-in of a ghost is the ``n_in/p`` local inputs;
* decompressor ``D_ij``: ``b = sqrt(3/(p*k))``, chosen so the ``(p-1)k`` remote ghosts add
  ``(p-1)/p`` of the output variance, as the off-diagonal blocks of a dense layer do;
* bias: ``b = 1/sqrt(n_in)``.

Every master (``W0 [n_out, n_in]``, the compressor's ``[k, n_in]``, the decompressor's
``[n_out, p*k]``) is drawn in tiles of 128 x 128 with a seed per tile, so a rank draws only the
tiles covering its own block (not ``p`` times more than it keeps), and a master's values do not
depend on ``p``. Draws use CPU generators and return CPU float32 tensors whatever
``torch.set_default_device`` says; layers copy them to their own device and dtype.

``init="spectral"`` layers (:func:`init_scales`) multiply these bounds per block: each factor at
its own maximal-update scale (``docs/choosing-k.md``).

Models of several layers give each layer its own seed with :func:`derive_seed` (layer ``l`` of a
``PhantomFFN``, fc1/fc2 of a Megatron ``PhantomMLP``, each module converted with random init).
"""
from __future__ import annotations

import hashlib
import math
import operator
from typing import Union

import torch

__all__ = ["INIT_SCHEMES", "init_scales", "derive_seed", "dense_master", "dense_bias", "local_block",
           "compressor_block", "decompressor_block", "bias_block", "master_blocks"]

INIT_SCHEMES = ("balanced", "spectral")
"""Initialisation scales of the phantom blocks (:func:`init_scales`); ``"balanced"`` is the default."""

_CHUNK = 128
_CPU = torch.device("cpu")
_SEED_LIMIT = 2 ** 63        # derived seeds fit torch.Generator.manual_seed and int64 tensors


def derive_seed(seed: int, *keys: Union[int, str]) -> int:
    """The seed of the part named by ``keys`` of a model seeded ``seed``, in ``[0, 2**63)``.

    Rule: the 8-byte BLAKE2b digest, read little-endian with its top bit cleared, of ``seed``
    and each key in turn, each written as a tag (``i`` for an integer, ``s`` for a string), the
    length of its text (8 bytes, little-endian), then its text (an integer's decimal digits, a
    string's UTF-8 bytes). Same value in every process, on every platform and Python version (no
    ``hash()``); distinct ``keys`` give distinct seeds (up to a 2**-63 collision chance), and
    ``1`` and ``"1"`` are distinct keys.

    Used for layer ``l`` of a ``PhantomFFN`` (``derive_seed(seed, l)``), fc1/fc2 of a Megatron
    ``PhantomMLP`` at layer number ``l`` (``derive_seed(seed, l, "linear_fc1")``), and each module
    converted with ``init="random"`` (``derive_seed(seed, module_name)``).
    """
    h = hashlib.blake2b(digest_size=8)
    for part in (seed, *keys):
        if isinstance(part, str):
            tag, text = b"s", part.encode("utf-8")
        else:
            try:
                tag, text = b"i", str(operator.index(part)).encode("ascii")
            except TypeError:
                raise TypeError(f"derive_seed: seed and keys must be integers or strings, got "
                                f"{type(part).__name__} {part!r}") from None
        h.update(tag + len(text).to_bytes(8, "little") + text)
    return int.from_bytes(h.digest(), "little") % _SEED_LIMIT


def init_scales(scheme: str, n_in: int, n_out: int, k: int, p: int) -> dict[str, float]:
    """Factors on the ``"balanced"`` bounds above of ``local_weight``, ``compressor``, ``decompressor``.

    ``"balanced"``: 1 each. ``"spectral"``: each factor at the spectral (maximal-update) bound
    ``b = min(1, sqrt(fan_out/fan_in)) / sqrt(fan_in)`` of its own shape: ``L_i`` (``n_in/p`` to
    ``n_out/p``), ``C_i`` (``n_in/p`` to ``k``), the decompressor (``(p-1)k`` to ``n_out/p``).
    """
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"init_scales: unknown scheme {scheme!r}; init must be one of {list(INIT_SCHEMES)}")
    if scheme == "balanced" or p == 1:
        return {"local_weight": 1.0, "compressor": 1.0, "decompressor": 1.0}

    def spectral(fan_in: float, fan_out: float) -> float:
        return min(1.0, math.sqrt(fan_out / fan_in)) / math.sqrt(fan_in)

    return {"local_weight": spectral(n_in / p, n_out / p) * math.sqrt(n_in),
            "compressor": spectral(n_in / p, k) * math.sqrt(n_in / p),
            "decompressor": spectral((p - 1) * k, n_out / p) / math.sqrt(3 / (p * k))}


def _gen(seed: int, salt: int) -> torch.Generator:
    return torch.Generator(device=_CPU).manual_seed((seed * 1_000_003 + salt * 7919) % (2 ** 63))


def _tile_gen(seed: int, kind: int, i: int, j: int) -> torch.Generator:
    """Generator of tile ``(i, j)`` of master ``kind``: a splitmix64 hash of the four numbers."""
    h = 0
    for part in (seed, kind, i, j):
        h = (h ^ (part % 2 ** 64)) * 0x9E3779B97F4A7C15 % 2 ** 64
        h = (h ^ (h >> 30)) * 0xBF58476D1CE4E5B9 % 2 ** 64
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB % 2 ** 64
        h ^= h >> 31
    return torch.Generator(device=_CPU).manual_seed(h % 2 ** 63)


def _uniform(gen: torch.Generator, shape, bound: float) -> torch.Tensor:
    return (torch.rand(shape, generator=gen, dtype=torch.float32, device=_CPU) * 2 - 1) * bound


def _window(seed: int, kind: int, rows: int, cols: int, bound: float,
            r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
    """``master[r0:r1, c0:c1]`` of a tiled ``U(-bound, bound)`` master ``[rows, cols]``, drawing only
    the tiles that cover the window."""
    out = torch.empty(r1 - r0, c1 - c0, dtype=torch.float32, device=_CPU)
    for i in range(r0 // _CHUNK, (r1 - 1) // _CHUNK + 1):
        t0, t1 = i * _CHUNK, min((i + 1) * _CHUNK, rows)
        for j in range(c0 // _CHUNK, (c1 - 1) // _CHUNK + 1):
            u0, u1 = j * _CHUNK, min((j + 1) * _CHUNK, cols)
            tile = _uniform(_tile_gen(seed, kind, i, j), (t1 - t0, u1 - u0), bound)
            a0, a1, b0, b1 = max(r0, t0), min(r1, t1), max(c0, u0), min(c1, u1)
            out[a0 - r0:a1 - r0, b0 - c0:b1 - c0] = tile[a0 - t0:a1 - t0, b0 - u0:b1 - u0]
    return out


_LOCAL, _COMP, _DECOMP = 1, 2, 3


def local_block(seed: int, n_in: int, n_out: int, p: int, rank: int) -> torch.Tensor:
    """``L_rank = W0[rank, rank]`` ``[n_out/p, n_in/p]``, float32 on CPU."""
    r0, r1 = rank * n_out // p, (rank + 1) * n_out // p
    c0, c1 = rank * n_in // p, (rank + 1) * n_in // p
    return _window(seed, _LOCAL, n_out, n_in, 1 / math.sqrt(n_in), r0, r1, c0, c1)


def dense_master(seed: int, n_in: int, n_out: int) -> torch.Tensor:
    """The dense master ``W0 [n_out, n_in]`` whose diagonal blocks are the ``L_i`` (float32, CPU).

    A TP baseline initialised from it with the same seed shares every phantom local block.
    """
    return local_block(seed, n_in, n_out, 1, 0)


def dense_bias(seed: int, n_in: int, n_out: int) -> torch.Tensor:
    """The dense master bias ``[n_out]`` whose slices are the ``b_i``."""
    return bias_block(seed, n_in, n_out, 1, 0)


def compressor_block(seed: int, n_in: int, k: int, p: int, rank: int) -> torch.Tensor:
    """``C_rank [k, n_in/p]``: columns of a master ``[k, n_in]``."""
    c0, c1 = rank * n_in // p, (rank + 1) * n_in // p
    return _window(seed, _COMP, k, n_in, 1 / math.sqrt(n_in / p), 0, k, c0, c1)


def decompressor_block(seed: int, n_out: int, k: int, p: int, rank: int) -> torch.Tensor:
    """``[D_rank,j for j != rank]`` side by side, ``[n_out/p, (p-1)k]``, from a master ``[n_out, p, k]``."""
    r0, r1 = rank * n_out // p, (rank + 1) * n_out // p
    rows = _window(seed, _DECOMP, n_out, p * k, math.sqrt(3 / (p * k)), r0, r1, 0, p * k)
    return torch.cat([rows[:, :rank * k], rows[:, (rank + 1) * k:]], dim=1)    # [n_out/p, (p-1)k]


def bias_block(seed: int, n_in: int, n_out: int, p: int, rank: int) -> torch.Tensor:
    """``b_rank [n_out/p]``."""
    r0, r1 = rank * n_out // p, (rank + 1) * n_out // p
    return _uniform(_gen(seed, 3), (n_out,), 1 / math.sqrt(n_in))[r0:r1].clone()


def master_blocks(seed: int, n_in: int, n_out: int, k: int, p: int,
                  scheme: str = "balanced") -> list[dict[str, torch.Tensor]]:
    """Every rank's initial parameters, for single-process references. ``k`` is ignored at ``p = 1``;
    ``scheme``: a ``PhantomLinear``'s ``init`` (:func:`init_scales`)."""
    scale = init_scales(scheme, n_in, n_out, k, p)
    out = []
    for r in range(p):
        blocks = {"local_weight": local_block(seed, n_in, n_out, p, r) * scale["local_weight"],
                  "bias": bias_block(seed, n_in, n_out, p, r)}
        if p > 1:
            blocks["compressor"] = compressor_block(seed, n_in, k, p, r) * scale["compressor"]
            blocks["decompressor"] = decompressor_block(seed, n_out, k, p, r) * scale["decompressor"]
        out.append(blocks)
    return out
