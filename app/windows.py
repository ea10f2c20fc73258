"""The detector's windows, for the charts: a layer's rows cut where the detector cuts them, summed per window.

The detector (moewatch.detect) never judges one step: it sums a layer's consecutive recorded steps into windows
wide enough that every expert expects `min_window_load` assignments, so sampling noise cannot pass for imbalance.
The layer view draws the same windows by default: window j of a layer holds its recorded rows [j*w, (j+1)*w),
counted from the layer's first recorded step. A short tail (under half a window, which the detector leaves for the
next window) is added to the last window, so every step is drawn. When there are more windows than the plot has
room for, `group` whole windows share a column (groups aligned to multiples of `group` windows).

Window metrics are the detector's own (`moewatch.detect.rules.window_metrics`, CV with the multinomial sampling
noise removed) computed on these windows, so the charts read what the alerts read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .data import RunData
from .downsample import bin_sum


@dataclass(frozen=True)
class Bins:
    """Which rows of a layer a windowed chart sums, and where each bin (`group` windows) begins and ends."""

    window: int  # the detector's window: recorded steps per window
    group: int  # windows per bin
    rows: Any  # step-axis indices of the rows binned: a slice, or an index array when the layer skips steps
    edges: np.ndarray  # bin edges into `rows` (strictly increasing, edges[0] == 0)

    @property
    def count(self) -> int:
        return len(self.edges) - 1


def config_of(run: RunData) -> Any:
    """The detector thresholds the server judges `run` with (`moewatch serve --config/--set`; else the defaults)."""
    from moewatch.detect.config import DetectorConfig

    return getattr(run, "detector_config", None) or DetectorConfig()


def detector_window(run: RunData, layer: str, detection: Any = None) -> int | None:
    """The detector's window (recorded steps) for `layer`: from its result when ready, else computed the same way
    (`moewatch.detect.windows.window_size` on the layer's first recorded steps). None when the detector is not
    importable or `detection` says it is unavailable (the charts then show raw per-step counts)."""
    if getattr(detection, "state", None) == "unavailable":
        return None
    result = detection.layer(layer) if detection is not None and hasattr(detection, "layer") else None
    if result is not None and getattr(result, "window", 0) > 0:
        return int(result.window)
    try:
        from moewatch.detect.windows import window_size

        config = config_of(run)
    except ImportError:
        return None
    with run.lock:
        rows = run.layer_rows(layer)
        n_rows = run.n if rows is None else len(rows)
        blocks = run.blocks(layer)  # a rollup keeps the first steps per step: no per-step read for this
        if blocks is not None and len(blocks.head) >= min(config.window_steps, n_rows):
            head = blocks.head[: config.window_steps]
        else:
            head = run.tokens(layer, 0, config.window_steps) if rows is None else \
                run.tokens(layer)[rows[: config.window_steps]]
        return int(window_size(head, config))


def window_bounds(n_rows: int, window: int) -> np.ndarray:
    """Row boundaries of a layer's windows over its `n_rows` recorded rows (a short tail joins the last window)."""
    w = max(1, int(window))
    full, tail = divmod(n_rows, w)
    if full == 0:
        return np.array([0, n_rows], dtype=np.int64)
    if tail == 0:
        return np.arange(0, n_rows + 1, w, dtype=np.int64)
    if tail >= max(1, (w + 1) // 2):  # the detector judges a tail of at least half a window on its own
        return np.r_[np.arange(0, full * w + 1, w, dtype=np.int64), n_rows]
    return np.r_[np.arange(0, full * w, w, dtype=np.int64), n_rows]


def plan(run: RunData, layer: str, lo: int, hi: int, window: int, max_bins: int) -> Bins | None:
    """Bins of whole windows covering the layer's rows within step indices [lo, hi), at most `max_bins` of them;
    None when the layer has no recorded row there."""
    with run.lock:
        rows = run.layer_rows(layer)
        n_rows = run.n if rows is None else len(rows)
    if rows is None:
        r_lo, r_hi = lo, min(hi, n_rows)
    else:
        r_lo, r_hi = int(np.searchsorted(rows, lo)), int(np.searchsorted(rows, hi))
    if r_hi <= r_lo:
        return None
    bounds = window_bounds(n_rows, window)
    n_win = len(bounds) - 1
    j0 = int(np.searchsorted(bounds, r_lo, side="right")) - 1
    j1 = int(np.searchsorted(bounds, r_hi - 1, side="right")) - 1
    group = max(1, math.ceil((j1 - j0 + 1) / max(1, max_bins)))
    while True:
        a = (j0 // group) * group
        b = min(n_win, -(-(j1 + 1) // group) * group)
        if -(-(b - a) // group) <= max_bins or group >= n_win:
            break
        group += 1
    sel = bounds[a:b + 1:group]
    if sel[-1] != bounds[b]:
        sel = np.r_[sel, bounds[b]]
    r0, r1 = int(bounds[a]), int(bounds[b])
    idx: Any = slice(r0, r1) if rows is None else rows[r0:r1]
    return Bins(int(window), group, idx, (sel - r0).astype(np.int64))


def _aligned_blocks(run: RunData, layer: str, bins: Bins) -> tuple[Any, np.ndarray] | None:
    """The layer's rollup and each bin's first block (plus the end), when every bin is whole rollup blocks (the
    usual case at full zoom-out: detector windows are multiples of the block); else None."""
    blocks = run.blocks(layer)
    if blocks is None:
        return None
    rows = run.layer_rows(layer)
    n_rows = run.n if rows is None else len(rows)
    r0 = bins.rows.start if isinstance(bins.rows, slice) else int(np.searchsorted(rows, bins.rows[0]))
    edges = r0 + bins.edges
    B = blocks.block
    if (edges[:-1] % B).any() or not (edges[-1] % B == 0 or edges[-1] == n_rows):
        return None
    return blocks, -(-edges // B)


def bin_load(run: RunData, layer: str, bins: Bins) -> np.ndarray:
    """Assignments per bin and expert ``[B, E]`` int64: exact sums of rollup blocks where the bins are whole
    blocks, else of the per-step counts (which the layer's first view at a finer zoom reads)."""
    with run.lock:
        found = _aligned_blocks(run, layer, bins)
        if found is not None:
            blocks, at = found
            return np.add.reduceat(blocks.tokens[at[0]: at[-1]], at[:-1] - at[0], axis=0, dtype=np.int64)
        return bin_sum(run.layer(layer).tokens.a[bins.rows], bins.edges, np.int64)


def bin_grads(run: RunData, layer: str, bins: Bins) -> np.ndarray | None:
    """Each expert's mean gradient norm per bin ``[B, E]`` (NaN: none recorded in it), or None when the layer
    records none: the rollup's block sums over their recorded-step counts where the bins are whole blocks (no
    per-step read), else the per-step norms averaged as the detector's windows average them."""
    from moewatch.detect.windows import nanmean_bins

    with run.lock:
        found = _aligned_blocks(run, layer, bins)
        if found is not None:
            blocks, at = found
            if blocks.grad_sum is None:
                return None
            span, starts = slice(at[0], at[-1]), at[:-1] - at[0]
            with np.errstate(invalid="ignore", divide="ignore"):
                return (np.add.reduceat(blocks.grad_sum[span], starts, axis=0)
                        / np.add.reduceat(blocks.grad_steps[span], starts, axis=0))
        grads = run.grads(layer)
        return None if grads is None else nanmean_bins(grads[bins.rows], bins.edges[:-1])


def bins_gate_mass(run: RunData, layer: str, bins: Bins) -> np.ndarray | None:
    """Each expert's gate mass summed over all the bins ``[E]``, or None when the layer records none: rollup blocks
    where the bins are whole blocks, else the per-step values."""
    with run.lock:
        found = _aligned_blocks(run, layer, bins)
        if found is not None:
            blocks, at = found
            return None if blocks.gate_mass is None else blocks.gate_mass[at[0]: at[-1]].sum(axis=0)
        gate = run.gate_mass(layer)
        if gate is None:
            return None
        return gate[bins.rows][bins.edges[0]: bins.edges[-1]].sum(axis=0)


def binned_load(run: RunData, layer: str, bins: Bins) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(assignments per bin and expert [B, E] int64, first step, last step of each bin)."""
    with run.lock:
        load = bin_load(run, layer, bins)
        steps = run.steps[bins.rows]
    return load, steps[bins.edges[:-1]].copy(), steps[bins.edges[1:] - 1].copy()


def window_series(run: RunData, layer: str, bins: Bins) -> dict[str, Any]:
    """Per bin: first/last step, the detector's window metrics (cv with sampling noise removed, max_share, dead,
    entropy_norm, drop_rate, z_loss, logit_abs_max), aux_loss (token-weighted), bias at the bin's last step."""
    from moewatch.detect.config import LayerThresholds
    from moewatch.detect.rules import window_metrics
    from moewatch.detect.windows import ROUTING_STATS, Windows, routing_windows

    starts, ends = bins.edges[:-1], bins.edges[1:] - 1
    with run.lock:
        lay = run.layer_info(layer)
        E, k = max(lay.num_experts, 1), max(lay.top_k, 1)
        load = bin_load(run, layer, bins).astype(np.float64)
        col = run.layer_column
        sums = {name: np.add.reduceat(col(layer, name, bins.rows), starts, dtype=np.float64)
                for name in ("tokens", "dropped", "ent_w", "z_w", "aux_w", "nonfinite")}
        # The routing diagnostics per bin, from their per-step counts, as the detector's windows compute them.
        routing = routing_windows({name: col(layer, name, bins.rows) for name in ROUTING_STATS}, starts,
                                  int(bins.edges[-1]))
        placement = run.placement(layer)
        logit = np.fmax.reduceat(col(layer, "logit_abs_max", bins.rows).astype(np.float64), starts)
        steps = run.steps[bins.rows]
        first, last = steps[starts].copy(), steps[ends].copy()
        found = _aligned_blocks(run, layer, bins)
        if found is not None:  # the bias at each bin's last step is its last block's (a rollup keeps it)
            bias = None if found[0].bias is None else found[0].bias[found[1][1:] - 1]
        else:
            held = run.layer(layer).bias
            bias = None if held is None else held.a[bins.rows][ends].astype(np.float64)
    tok = sums["tokens"]
    with np.errstate(invalid="ignore", divide="ignore"):
        per_tok = np.where(tok > 0, 1.0 / np.where(tok > 0, tok, 1.0), np.nan)
    win = Windows(first=first, last=last, load=load, tokens=tok, dropped=sums["dropped"],
                  entropy_norm=sums["ent_w"] * per_tok / math.log(max(E, 2)), z_loss=sums["z_w"] * per_tok,
                  logit_abs_max=logit, nonfinite=sums["nonfinite"], bias=None, extra=routing, placement=placement)
    config = config_of(run)
    m = window_metrics(win, E, k, LayerThresholds.resolve(config, E, k), config)
    return {"first": first, "last": last, "cv": m["cv"], "max_share": m["max_share"],
            "dead": m["dead"].sum(axis=1).astype(np.float64), "entropy_norm": m["entropy_norm"],
            "drop_rate": m["drop_rate"], "z_loss": m["z_loss"], "logit_abs_max": m["logit_abs_max"],
            "aux_loss": sums["aux_w"] * per_tok, "tokens": tok, "bias": bias,
            "device_ratio": m["device_ratio"] if m["busiest_experts"] is not None else None,
            "near_tie_frac": m["near_tie_frac"], "margin_mean": m["margin_mean"],
            "override_frac": m["override_frac"]}


def device_ratio(run: RunData, layer: str, load: np.ndarray) -> np.ndarray | None:
    """Busiest expert-parallel device's load / mean device load per row of ``load`` ([rows, E] expert loads), or
    None when the run records no placement (what the detector's ep_straggler rule reads, on the same loads)."""
    placement = run.placement(layer)
    if placement is None or load.shape[1] != len(placement):
        return None
    from moewatch.store.placement import device_load, straggler_ratio

    return straggler_ratio(device_load(load, placement))[0]


def describe(bins: Bins) -> str:
    """What a windowed chart shows, for its note."""
    text = f"windows of {bins.window:,} steps, as the detector judges"
    if bins.group > 1:
        text += f"; {bins.group} windows ({bins.group * bins.window:,} steps) per column at this zoom"
    return text


RAW_NOTE = "raw per-step counts: sampling noise included"
