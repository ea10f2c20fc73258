"""Vectorized time-series primitives the rules are built from: run lengths, hysteresis, sliding Theil-Sen fits.

All functions work on whole arrays (axis 0 = windows) and take the state carried over from the previous batch, so a
live tracker fed one flush at a time gets exactly what one call on the whole run gets.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np


def run_lengths(flags: np.ndarray, carry: np.ndarray | int) -> np.ndarray:
    """Number of consecutive True values ending at each index along axis 0; ``carry`` continues a previous run."""
    n = flags.shape[0]
    idx = np.arange(n).reshape((n,) + (1,) * (flags.ndim - 1))
    last_false = np.maximum.accumulate(np.where(flags, -1, idx), axis=0)
    return np.where(last_false >= 0, idx - last_false, idx + 1 + np.asarray(carry))


@dataclass
class Hysteresis:
    """Carried state of one on/off condition (or an array of them, one per expert)."""

    active: np.ndarray
    run_true: np.ndarray
    run_false: np.ndarray

    @classmethod
    def new(cls, shape: tuple[int, ...] = ()) -> Hysteresis:
        return cls(np.zeros(shape, bool), np.zeros(shape, np.int64), np.zeros(shape, np.int64))


def hysteresis(flags: np.ndarray, state: Hysteresis, fire: int, clear: int) -> tuple[np.ndarray, np.ndarray]:
    """On after ``fire`` consecutive breaching windows, off after ``clear`` consecutive clean ones.

    Returns (active per window, run length of breaching windows per window) and updates ``state`` in place.
    """
    n = flags.shape[0]
    if n == 0:
        return np.zeros_like(flags, dtype=bool), np.zeros(flags.shape, np.int64)
    rt = run_lengths(flags, state.run_true)
    rf = run_lengths(~flags, state.run_false)
    # Each window is an "on" event, an "off" event or neither; the state is the latest event, carried forward.
    event = np.where(rt >= fire, 1, np.where(rf >= clear, 0, -1))
    idx = np.arange(n).reshape((n,) + (1,) * (flags.ndim - 1))
    last = np.maximum.accumulate(np.where(event >= 0, idx, -1), axis=0)
    taken = np.take_along_axis(event, np.maximum(last, 0), axis=0)
    active = np.where(last >= 0, taken == 1, state.active)
    state.active, state.run_true, state.run_false = active[-1].copy(), rt[-1].copy(), rf[-1].copy()
    return active, rt


@dataclass
class Fit:
    """Theil-Sen fits of sliding windows of points: one entry per window position."""

    slope: np.ndarray
    up: np.ndarray  # fraction of point pairs that rise
    down: np.ndarray  # fraction of point pairs that fall
    first: np.ndarray  # fitted value at the window's first point
    last: np.ndarray  # fitted value at the window's last point
    span: np.ndarray  # x distance from first to last point


def theil_sen(x: np.ndarray, y: np.ndarray, m: int, rows: np.ndarray | None = None) -> Fit:
    """Robust line through each run of ``m`` consecutive points (x increasing), evaluated for every end position
    (or only the end positions ``rows`` index, counted from the first complete run).

    The slope is the median of all pairwise slopes, so a spike moves it no more than any other single point; ``up``
    and ``down`` say how consistently the points agree on the direction. NaN anywhere in a window gives NaN.
    """
    n = len(y) - m + 1
    if n <= 0:
        empty = np.zeros(0)
        return Fit(empty, empty, empty, empty, empty, empty)
    xv = np.lib.stride_tricks.sliding_window_view(x.astype(np.float64), m)
    yv = np.lib.stride_tricks.sliding_window_view(y.astype(np.float64), m)
    if rows is not None:
        xv, yv = xv[rows], yv[rows]
    i, j = _pairs(m)
    dy = yv[:, j] - yv[:, i]
    dx = xv[:, j] - xv[:, i]
    with np.errstate(invalid="ignore", divide="ignore"):
        slope = np.median(dy / dx, axis=1)
        intercept = np.median(yv - slope[:, None] * xv, axis=1)
        pairs = float(len(i))
        up = (dy > 0).sum(axis=1) / pairs
        down = (dy < 0).sum(axis=1) / pairs
    bad = np.isnan(dy).any(axis=1)
    up[bad] = np.nan
    down[bad] = np.nan
    return Fit(
        slope=slope,
        up=up,
        down=down,
        first=intercept + slope * xv[:, 0],
        last=intercept + slope * xv[:, -1],
        span=xv[:, -1] - xv[:, 0],
    )


@lru_cache(maxsize=8)
def _pairs(m: int) -> tuple[np.ndarray, np.ndarray]:
    return np.triu_indices(m, 1)


def forward_fill(positions: np.ndarray, values: np.ndarray, n: int, fill: float | bool) -> np.ndarray:
    """Length-``n`` array holding ``values[k]`` from index ``positions[k]`` (increasing) until the next position.

    Positions before 0 (evaluations made on history) carry into the start; the latest of them wins.
    """
    out_idx = np.full(n, -1, np.int64)
    keep = np.flatnonzero(positions < n)
    pos = np.maximum(positions[keep], 0)
    # Several evaluations clamped onto index 0: only the latest (last in order) may be written.
    last = np.append(pos[1:] != pos[:-1], True) if len(pos) else np.zeros(0, bool)
    out_idx[pos[last]] = keep[last]
    out_idx = np.maximum.accumulate(out_idx)
    if len(values) == 0:
        return np.full(n, fill)
    return np.where(out_idx >= 0, values[np.maximum(out_idx, 0)], fill)
