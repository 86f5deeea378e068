"""The text of ``phantom-bench --task lm``: byte-level tokens of a corpus, a held-out split, and
the windows both models train and evaluate on.

* :func:`read_corpus`: a text file, or the text files of a folder (sorted walk), as bytes; the
  default is this Python's standard-library sources (:func:`phantom_plugin.megatron.data.stdlib_bytes`'s
  corpus, which every Python ships).
* :func:`split_heldout`: the last ``fraction`` of the bytes is held out (never trained on).
* :func:`train_batch`: the ``step``-th batch of random windows of the training part, a function of
  ``(seed, step)`` only, so both models see the same data in the same order.
* :func:`heldout_batches`: fixed, evenly spaced windows of the held-out part (the same for both models
  and every evaluation).

Tokens are bytes (``int64`` in ``[0, 256)``); a window is ``seq + 1`` bytes: inputs ``[:-1]``,
labels ``[1:]``. Torch only; no process group.
"""
from __future__ import annotations

import math
import os
import sysconfig
from typing import Optional

import torch

__all__ = ["TEXT_SUFFIXES", "read_corpus", "split_heldout", "train_batch", "heldout_batches", "check_sizes"]

# what a folder's walk reads; a file given by name is read whatever its suffix
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".tex", ".text")


def _stdlib_files() -> list[str]:
    root, out = sysconfig.get_paths()["stdlib"], []
    for dirpath, dirnames, files in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages"))
        out += [os.path.join(dirpath, f) for f in sorted(files) if f.endswith(".py")]
    return out


def _folder_files(root: str) -> list[str]:
    out = []
    for dirpath, dirnames, files in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [os.path.join(dirpath, f) for f in sorted(files) if f.lower().endswith(TEXT_SUFFIXES)]
    return out


def read_corpus(path: Optional[str], limit: int) -> tuple[bytes, str]:
    """``(up to limit bytes, description)`` of ``path`` (a file, or a folder's text files in sorted
    order; ``None``: the standard library's ``.py`` sources).

    Raises ``ValueError`` naming ``--corpus`` when the path does not exist, a folder holds no text
    file (:data:`TEXT_SUFFIXES`), or the files are empty.
    """
    if limit < 1:
        raise ValueError(f"--corpus-limit must be >= 1 byte, got {limit}")
    if path is None:
        files, what = _stdlib_files(), f"the standard library's .py sources ({sysconfig.get_paths()['stdlib']})"
    elif os.path.isdir(path):
        files, what = _folder_files(path), f"text files of {path}"
        if not files:
            raise ValueError(f"--corpus {path}: the folder holds no text file (read: {', '.join(TEXT_SUFFIXES)}); "
                             "give a file or a folder of text files")
    elif os.path.isfile(path):
        files, what = [path], path
    else:
        raise ValueError(f"--corpus {path}: no such file or folder; give a text file or a folder of text files "
                         "(omit --corpus for the standard library's sources)")
    buf = bytearray()
    for f in files:
        with open(f, "rb") as fh:
            buf += fh.read(limit - len(buf))
        if len(buf) >= limit:
            break
    if not buf:
        raise ValueError(f"--corpus {path}: the text is empty; give a file or folder with text in it")
    n_files = files.index(f) + 1
    return bytes(buf), f"{what}: {len(buf):,} bytes from {n_files} file(s)"


def split_heldout(data: bytes, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, heldout)`` int64 token tensors: the last ``fraction`` of the bytes is held out."""
    if not 0 < fraction < 1:
        raise ValueError(f"--heldout must be in (0, 1), got {fraction}")
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)
    cut = len(data) - int(round(fraction * len(data)))
    return tokens[:cut], tokens[cut:]


def check_sizes(n_bytes: int, fraction: float, seq: int) -> Optional[str]:
    """``None`` when both parts of ``n_bytes`` hold a window of ``seq + 1`` tokens, else the message."""
    heldout = int(round(fraction * n_bytes))
    train = n_bytes - heldout
    if min(train, heldout) >= seq + 1:
        return None
    need = math.ceil((seq + 1) / min(fraction, 1 - fraction)) + 1
    return (f"--corpus: {n_bytes:,} bytes give a training part of {train:,} and a held-out part of {heldout:,} "
            f"bytes (--heldout {fraction}); each must hold one window of --seq + 1 = {seq + 1} bytes. "
            f"Give a corpus of at least {need:,} bytes, or lower --seq")


def train_batch(train: torch.Tensor, step: int, batch: int, seq: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens, labels)``, each ``[batch, seq]``: ``batch`` random windows of ``train`` for ``step``
    (a function of ``seed`` and ``step`` only: the same on every rank and for both models)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, train.numel() - seq, (batch,), generator=g)
    windows = train[starts[:, None] + torch.arange(seq + 1)]             # [batch, seq+1]
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def heldout_batches(heldout: torch.Tensor, n_batches: int, batch: int, seq: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n_batches`` batches of ``[batch, seq]`` windows at evenly spaced starts over ``heldout``
    (they overlap only when the held-out part is shorter than ``n_batches * batch`` windows)."""
    n = n_batches * batch
    last = heldout.numel() - seq - 1
    starts = torch.linspace(0, last, n).round().to(torch.int64) if n > 1 else torch.zeros(1, dtype=torch.int64)
    windows = heldout[starts[:, None] + torch.arange(seq + 1)].view(n_batches, batch, seq + 1)
    return [(w[:, :-1].contiguous(), w[:, 1:].contiguous()) for w in windows]
