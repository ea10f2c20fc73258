"""Downsampling for charts: min/max/last buckets for lines, sums over step bins for heatmaps.

Pure numpy. A line never carries more than about `LINE_POINTS` points and a heatmap never has more columns than the
plot has pixels, whatever the run length. Never random sampling: a one-step spike (a NaN burst, a logit blow-up)
must survive, so each bucket keeps its minimum, its maximum and its last point.
"""

from __future__ import annotations

import numpy as np

LINE_POINTS = 2000
MAX_COLUMNS = 2000
DEFAULT_COLUMNS = 1200


def bin_edges(n: int, bins: int) -> np.ndarray:
    """Edges (length b+1, strictly increasing, 0 .. n) of b = min(bins, n) contiguous near-equal bins over n items."""
    b = max(1, min(int(bins), n))
    if n == 0:
        return np.zeros(1, dtype=np.int64)
    return (np.arange(b + 1, dtype=np.int64) * n) // b


def bin_sum(values: np.ndarray, edges: np.ndarray, dtype: type = np.float64) -> np.ndarray:
    """Sums over each bin along axis 0 (NaN counts as 0). Integer input is summed in its own width when no bin can
    overflow it (int32 sums of int32 counts are several times faster than widening every element)."""
    if len(edges) < 2:
        return np.zeros((0, *values.shape[1:]), dtype=dtype)
    if np.issubdtype(values.dtype, np.integer):
        width = int(np.diff(edges).max())
        peak = int(np.abs(values).max()) if values.size else 0
        native = peak * width < np.iinfo(values.dtype).max
        out = np.add.reduceat(values, edges[:-1], axis=0, dtype=values.dtype if native else np.int64)
        return out.astype(dtype, copy=False)
    return np.add.reduceat(np.nan_to_num(values), edges[:-1], axis=0, dtype=dtype)


def minmax_last(y: np.ndarray, max_points: int = LINE_POINTS) -> np.ndarray:
    """Indices (along axis 0) of the points to draw: all of them if few, else per bucket the min, max and last.

    `y` is ``[n]`` or ``[n, k]`` (k traces sharing an x axis). Returns ``[m]`` or ``[m, k]`` indices in time order
    per trace, m <= max_points; NaNs are skipped when choosing the min and max (a bucket of only NaNs yields NaN).
    """
    n = y.shape[0]
    one = y.ndim == 1
    y2 = y.reshape(n, -1)
    k = y2.shape[1]
    if n <= max_points:
        idx = np.broadcast_to(np.arange(n)[:, None], (n, k))
        return idx[:, 0].copy() if one else idx.copy()
    buckets = max(1, max_points // 3)
    w = -(-n // buckets)
    full = n // w
    parts = [_bucket_picks(y2[: full * w].reshape(full, w, k), 0)]
    if full * w < n:
        tail = y2[full * w:]
        parts.append(_bucket_picks(tail.reshape(1, len(tail), k), full * w))
    idx = np.concatenate(parts)
    return idx[:, 0] if one else idx


def _bucket_picks(blocks: np.ndarray, offset: int) -> np.ndarray:
    """Indices of the min, max and last finite point of each bucket of ``blocks [buckets, width, traces]``."""
    nb, w, k = blocks.shape
    finite = np.isfinite(blocks)
    if finite.all():
        lo, hi = blocks.argmin(axis=1), blocks.argmax(axis=1)
        last = np.full((nb, k), w - 1)
    else:
        # One scratch copy: NaN read as +inf for the min, then as -inf for the max.
        scratch = np.where(finite, blocks, np.inf)
        lo = scratch.argmin(axis=1)
        scratch[~finite] = -np.inf
        hi = scratch.argmax(axis=1)
        last = (w - 1) - finite[:, ::-1, :].argmax(axis=1)  # last finite point (the bucket's last if none)
    idx = np.stack([lo, hi, last], axis=1) + (offset + np.arange(nb) * w)[:, None, None]
    idx.sort(axis=1)
    return idx.reshape(nb * 3, k)


def downsample(x: np.ndarray, y: np.ndarray, max_points: int = LINE_POINTS) -> tuple[np.ndarray, np.ndarray, bool]:
    """(x, y, downsampled?) for one trace, or for ``[n, k]`` y with per-trace x of the same shape."""
    if len(x) <= max_points:
        return x, y, False
    idx = minmax_last(y, max_points)
    if y.ndim == 1:
        return x[idx], y[idx], True
    return x[idx], np.take_along_axis(y, idx, axis=0), True


def columns_for(width_px: int | float | None) -> int:
    """Heatmap columns for a plot `width_px` wide: about one per pixel, within [50, MAX_COLUMNS]."""
    if not width_px or not np.isfinite(width_px):
        return DEFAULT_COLUMNS
    return int(min(MAX_COLUMNS, max(50, width_px)))
