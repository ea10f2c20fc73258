"""Array plumbing of the dashboard's run view: growable numpy arrays, and count metrics of summed counts.

Kept apart from moewatch.app.data so the cache's logic (what a row means) reads without the mechanics (how rows
are stored and decoded).
"""

from __future__ import annotations

from typing import Any

import numpy as np


class Rows:
    """A numpy array that grows along axis 0 (amortized, so appending a flush never copies the whole run)."""

    def __init__(self, tail: tuple[int, ...], dtype: Any, fill: Any = 0, n: int = 0, capacity: int = 0):
        self.fill = fill
        self._buf = filled((max(n, capacity, 16), *tail), fill, dtype)
        self.n = n

    @property
    def a(self) -> np.ndarray:
        return self._buf[: self.n]

    @property
    def nbytes(self) -> int:
        return int(self._buf.nbytes)

    def resize(self, n: int) -> None:
        if n > len(self._buf):
            # 1.25x growth: a huge run's first live append must not double its memory.
            self.reserve(max(n, int(len(self._buf) * 1.25) + 1024))
        self.n = n

    def reserve(self, capacity: int) -> None:
        """Make room for `capacity` rows at once (a first load knows its size: one allocation, no regrowth)."""
        if capacity > len(self._buf):
            buf = filled((capacity, *self._buf.shape[1:]), self.fill, self._buf.dtype)
            buf[: self.n] = self._buf[: self.n]
            self._buf = buf

    def remap(self, positions: np.ndarray, n: int) -> None:
        """Move the current rows to `positions` of a new array of `n` rows (steps were inserted in the middle)."""
        buf = filled((max(n, 16), *self._buf.shape[1:]), self.fill, self._buf.dtype)
        buf[positions] = self._buf[: self.n]
        self._buf, self.n = buf, n


def filled(shape: tuple[int, ...], fill: Any, dtype: Any) -> np.ndarray:
    # np.zeros maps fresh zero pages lazily: reserving room for a long run costs nothing until it is written.
    if fill == 0 or fill is False:
        return np.zeros(shape, dtype=dtype)
    return np.full(shape, fill, dtype=dtype)


def count_metrics(counts_SE: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """cv, max share and dead experts per row: moewatch.metrics' definitions, on numpy arrays."""
    import torch

    from moewatch import metrics

    c = torch.from_numpy(np.ascontiguousarray(counts_SE, dtype=np.float64))
    return metrics.cv(c).numpy(), metrics.max_share(c).numpy(), metrics.dead(c).numpy().astype(np.float64)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"

