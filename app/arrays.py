"""Array plumbing of the dashboard cache: growable numpy arrays and the columns of one Parquet part file.

Kept apart from moewatch.app.data so the cache's logic (what a row means) reads without the mechanics (how rows
are stored and decoded).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


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

    def widen(self, axis: int, size: int) -> None:
        """Grow a trailing axis (a new layer, or an expert id past the announced count)."""
        if self._buf.shape[axis] >= size:
            return
        shape = list(self._buf.shape)
        shape[axis] = size
        buf = filled(tuple(shape), self.fill, self._buf.dtype)
        buf[tuple(slice(0, s) for s in self._buf.shape)] = self._buf
        self._buf = buf


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


def part_columns(t: pa.Table) -> dict[str, Any]:
    """Numpy columns of one part file; the layer column stays dictionary-coded (names + int codes).

    `bias` and an experts table's `dropped` are None when empty (most runs), so they cost nothing downstream."""
    out: dict[str, Any] = {}
    for name in t.column_names:
        col = t[name].combine_chunks() if t[name].num_chunks != 1 else t[name].chunk(0)
        if name == "layer":
            if not pa.types.is_dictionary(col.type):
                col = col.dictionary_encode()
            out["layer_names"] = col.dictionary.to_pylist()
            out["layer"] = col.indices.to_numpy(zero_copy_only=False)
        elif name == "bias" and col.null_count == len(col):
            out[name] = None
        elif name == "dropped" and "expert" in t.column_names and not pc.max(col).as_py():
            out[name] = None
        elif pa.types.is_floating(col.type):
            out[name] = col.to_numpy(zero_copy_only=False).astype(np.float64)
        else:
            out[name] = col.to_numpy(zero_copy_only=False)
    if "layer" not in out or "rank" not in out:
        raise ValueError("part file lacks the layer or rank column")
    return out


def by_rank(a: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    """Split rows by rank (a part file holds one rank; a re-read range may hold several)."""
    rank = a["rank"]
    lo, hi = int(rank.min()), int(rank.max())
    if lo == hi:
        return [(lo, a)]
    n = len(rank)
    out = []
    for r in np.unique(rank):
        sel = rank == r
        out.append((int(r), {k: (v[sel] if isinstance(v, np.ndarray) and len(v) == n else v) for k, v in a.items()}))
    return out


def dense_steps(steps: np.ndarray, expert: np.ndarray, num_experts: int) -> np.ndarray | None:
    """The step of each block if the rows are whole steps of experts 0..E-1 in order, steps increasing; else None."""
    n = len(steps)
    if n == 0 or n % num_experts:
        return None
    e2 = expert.reshape(-1, num_experts)
    s2 = steps.reshape(-1, num_experts)
    if not (e2 == np.arange(num_experts)).all() or not (s2 == s2[:, :1]).all():
        return None
    block = s2[:, 0]
    if len(block) > 1 and not (block[1:] > block[:-1]).all():
        return None
    return block


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"

