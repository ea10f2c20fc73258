"""Plotly figures of a cached run, built as plain dicts with numpy arrays (no plotly.graph_objects validation).

Owns every chart of the dashboard: the model overview health strip (from the detector's health frame, one cell per
detector window), the run list's load-over-time chart, the layer view (expert x step load heatmap, per-expert share
lines, metric panels; in the detector's windows, or raw per-step counts), the compare view, and the `extend_patch`
that turns a figure of only the new steps into a dash `Patch` appending to the figure the browser already has.
Skipping graph_objects keeps a layer switch on a 100k-step run within a few hundred milliseconds; dash serializes
the numpy arrays with orjson.

Each builder returns (figure, info) where info says whether the figure holds every step in its range one point per
step ("raw", so a live update can append to it) and how many traces it has.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import windows
from .data import RunData
from .detection import cell_level
from .downsample import LINE_POINTS, bin_edges, bin_sum, columns_for, downsample

FONT = {"family": "Inter, Segoe UI, Helvetica, Arial, sans-serif", "size": 12, "color": "#222"}
GRID = "#e6e6e6"
LOAD_SCALE = [[0.0, "#053061"], [0.2, "#2166ac"], [0.4, "#92c5de"], [0.5, "#f7f7f7"], [0.6, "#f4a582"],
              [0.8, "#b2182b"], [1.0, "#67001f"]]
RUN_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"]

# Rows of the layer view's metric panel: (series, title, y-axis format).
METRIC_ROWS = (
    ("cv", "load CV (std / mean of expert loads)", ".2f"),
    ("entropy_norm", "router entropy (normalized, 1 = uniform)", ".2f"),
    ("drop_rate", "drop rate (capacity overflow)", ".1%"),
    ("z_loss", "z-loss (mean logsumexp²)", ".3g"),
    ("logit_abs_max", "max |router logit|", ".3g"),
    ("aux_loss", "aux loss (E·Σ f·P, 1 = balanced)", ".3f"),
)
ROUTING_ROWS = (
    ("near_tie_frac", "tokens within ε of a different choice (fragile routing)", ".0%"),
    ("margin_mean", "mean routing margin (logit units)", ".3f"),
    ("override_frac", "assignments the balancing bias changed (balancer override)", ".0%"),
)
COMPARE_ROWS = (
    ("cv", "load CV", ".2f"),
    ("entropy_norm", "router entropy (normalized)", ".2f"),
    ("max_share", "largest expert's share", ".1%"),
    ("drop_rate", "drop rate", ".1%"),
    ("z_loss", "z-loss", ".3g"),
    ("aux_loss", "aux loss", ".3f"),
)


@dataclass(frozen=True)
class FigureInfo:
    raw: bool  # every step of the range is in the figure, one point per step (appendable)
    traces: int
    n: int  # step-axis index one past the last step shown
    note: str = ""
    explicit_x: bool = True  # heatmaps: an x array (False: x0 + dx)


# ---------------------------------------------------------------------------------------------------- helpers


def _layout(height: int, **extra: Any) -> dict[str, Any]:
    out = {"height": height, "margin": {"l": 70, "r": 30, "t": 36, "b": 40}, "font": FONT,
           "paper_bgcolor": "white", "plot_bgcolor": "white", "hovermode": "closest", "showlegend": False}
    out.update(extra)
    return out


def _xaxis(**extra: Any) -> dict[str, Any]:
    return {"title": {"text": "step"}, "gridcolor": GRID, "zeroline": False, "showline": True, "linecolor": "#bbb",
            **extra}


def empty_figure(message: str, height: int = 260) -> dict[str, Any]:
    """A blank chart that says why it is blank (never an empty box without explanation)."""
    return {"data": [], "layout": _layout(height, xaxis={"visible": False}, yaxis={"visible": False},
                                          annotations=[{"text": message, "showarrow": False, "xref": "paper",
                                                        "yref": "paper", "x": 0.5, "y": 0.5,
                                                        "font": {"size": 14, "color": "#666"}}])}


NOTE_TONES = {"warn": ("#8a6d3b", "#fcf8e3"), "info": ("#31587a", "#eef4fb")}


def _note(text: str, tone: str = "warn") -> dict[str, Any]:
    """The chart's top-right note: what it shows (detector windows, raw counts) and how it was binned."""
    colour, background = NOTE_TONES[tone]
    return {"text": text, "showarrow": False, "xref": "paper", "yref": "paper", "x": 1, "y": 1.0, "yanchor": "bottom",
            "xanchor": "right", "font": {"size": 11, "color": colour}, "bgcolor": background, "name": "note"}


def _marker_shapes(marker: dict | None, yref: str = "paper", layer_row: int | None = None) -> list[dict[str, Any]]:
    """The onset of a clicked alert: a dashed line at its first step and a light band to its last step."""
    if not marker or marker.get("first") is None:
        return []
    first, last = marker["first"], marker.get("last", marker["first"])
    shapes: list[dict[str, Any]] = []
    if last is not None and last > first:
        y0, y1 = (0, 1) if layer_row is None else (layer_row - 0.5, layer_row + 0.5)
        shapes.append({"type": "rect", "xref": "x", "yref": "paper" if layer_row is None else "y", "x0": first,
                       "x1": last, "y0": y0, "y1": y1, "fillcolor": "rgba(214,39,40,0.08)",
                       "line": {"width": 1 if layer_row is not None else 0, "color": "#d62728"}, "layer": "above"})
    shapes.append({"type": "line", "xref": "x", "yref": "paper", "x0": first, "x1": first, "y0": 0, "y1": 1,
                   "line": {"color": "#d62728", "width": 2, "dash": "dash"}, "name": "onset"})
    return shapes


def log2_ratio_cap(num_experts: int) -> float:
    """Colour range of the load heatmap: an expert can hold at most all the load, E times its fair share."""
    return max(1.0, math.log2(max(num_experts, 2)))


def with_marker(fig: dict[str, Any], marker: dict | None, layer_row: int | None = None) -> dict[str, Any]:
    """`fig` plus the onset marker of a clicked alert (a new dict: cached figures are shared, never mutated)."""
    shapes = _marker_shapes(marker, layer_row=layer_row)
    if not shapes or "layout" not in fig:
        return fig
    return {**fig, "layout": {**fig["layout"], "shapes": [*fig["layout"].get("shapes", []), *shapes]}}


def _f32(a: np.ndarray, digits: int = 4) -> np.ndarray:
    # float32 and rounded: orjson then writes short numbers, so a large heatmap stays a small payload.
    return np.ascontiguousarray(np.round(np.asarray(a, dtype=np.float64), digits).astype(np.float32))


def x_axis(centres: np.ndarray, explicit: bool | None = None) -> dict[str, Any]:
    """A heatmap's x: `x0` + `dx` when the columns are evenly spaced (plotly then draws several times faster than
    with an x array), else the explicit centres. `explicit` forces one form (a live append must match)."""
    if explicit is None:
        explicit = not is_uniform(centres)
    if explicit or len(centres) == 0:
        return {"x": centres}
    dx = float(centres[1] - centres[0]) if len(centres) > 1 else 1.0
    if len(centres) > 2:
        dx = float(centres[-1] - centres[0]) / (len(centres) - 1)
    return {"x0": float(centres[0]), "dx": dx}


def is_uniform(centres: np.ndarray) -> bool:
    """Evenly spaced: exactly for steps (integers), within a quarter column for bin centres (bins of 71 and 72
    steps are; a jump in the steps is not)."""
    c = np.asarray(centres)
    if len(c) < 3:
        return len(c) < 2 or bool(c[1] > c[0])
    d = np.diff(c.astype(np.float64))
    mean = float(d.mean())
    slack = 0.0 if np.issubdtype(c.dtype, np.integer) else 0.25 * mean
    return mean > 0 and float(np.abs(d - mean).max()) <= slack


def heatmap_x(trace: dict[str, Any]) -> np.ndarray:
    """The x of each column of a heatmap trace, whichever form it was given in."""
    if "x" in trace:
        return np.asarray(trace["x"], dtype=np.float64)
    n = np.asarray(trace["z"]).shape[-1]
    return trace["x0"] + trace["dx"] * np.arange(n)


def _centres(steps: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Step at the middle of each bin (the step itself for one-step bins)."""
    if len(edges) < 2:
        return np.zeros(0)
    first, last = steps[edges[:-1]], steps[edges[1:] - 1]
    out = (first + last) / 2
    return out.astype(np.int64) if np.all(first == last) else out


def lines_budget(traces: int) -> int:
    """Points per line when one chart has a line per expert: LINE_POINTS up to 16 lines, then about 32k points
    shared out (a browser takes ~0.5 s to draw 64 lines x 1000 points, and nobody reads them at that density)."""
    return LINE_POINTS if traces <= 16 else max(400, 32_000 // traces)


def expert_colour(i: int, n: int) -> str:
    return f"hsl({int(round(330 * i / max(n - 1, 1)))},65%,45%)"


def _bins_note(n: int, bins: int) -> str:
    if bins >= n:
        return ""
    return f"binned: {n:,} steps in {bins:,} columns ({n / bins:,.1f} steps each); zoom to re-bin"


def _lines_note(n: int, points: int) -> str:
    return (f"downsampled: {n:,} steps → {points:,} points per line (min/max/last per bucket); "
            "zoom to see every step")


def log_ticks(cap: float) -> tuple[list[float], list[str]]:
    """Colour-bar ticks of the log2 load ratio, labelled as multiples of the fair share."""
    vals, text = [], []
    step = 1 if cap <= 4 else 2
    for p in range(-int(cap), int(cap) + 1):
        if p % step:
            continue
        vals.append(float(p))
        text.append("fair" if p == 0 else (f"{2 ** p:g}×" if p > 0 else f"1/{2 ** -p:g}"))
    return vals, text


# ---------------------------------------------------------------------------------------------------- overview

# The strip's colours by level: healthy, warning, critical (drops, NaN logits, ...), collapsed (routing collapse).
LEVEL_COLOURS = ("#2ca25f", "#fec44f", "#f16913", "#99000d")
LEVEL_NAMES = ("healthy", "warning", "critical", "collapsed")
LEVEL_SCALE = [[i / 4 + d, c] for i, c in enumerate(LEVEL_COLOURS) for d in (0.0, 0.25)]
WARMUP_FILL = "rgba(110,110,110,0.38)"
# Signals shown on hover, from the health frame (moewatch.detect.health.SIGNALS).
HOVER_SIGNALS = ("cv", "max_share", "dead", "entropy_norm", "drop_rate")
HOVER_DIGITS = {"cv": 2, "max_share": 3, "dead": 0, "entropy_norm": 2, "drop_rate": 3}


def _columns(layers: list[tuple[np.ndarray, np.ndarray]], cols: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(first step, last step of each strip column, windows per column) for layers' windows [(start, end)].

    When every layer has the same windows (the usual case), a column is one window, or `g` whole windows when
    there are more windows than columns. Otherwise columns split the step range evenly."""
    ref = max(layers, key=lambda se: len(se[0]))
    same = all(len(s) == len(ref[0]) and np.array_equal(s, ref[0]) and np.array_equal(e, ref[1]) for s, e in layers)
    if same:
        n = len(ref[0])
        g = max(1, math.ceil(n / cols))
        first = ref[0][::g]
        last = np.r_[ref[1][g - 1::g], ref[1][-1]][: len(first)] if n % g else ref[1][g - 1::g]
        return first, last, g
    lo = min(int(s[0]) for s, _ in layers)
    hi = max(int(e[-1]) for _, e in layers)
    c = max(1, min(cols, max(len(s) for s, _ in layers), hi - lo + 1))
    edges = lo + (np.arange(c + 1, dtype=np.int64) * (hi - lo + 1)) // c
    return edges[:-1], edges[1:] - 1, 0


def _cells(start: np.ndarray, end: np.ndarray, level: np.ndarray, first: np.ndarray, last: np.ndarray
           ) -> np.ndarray:
    """Per column, the index of the window (of one layer) that colours it: the worst window overlapping the column
    (the latest of equals), -1 where none does. Merging by the maximum never hides a critical window."""
    W = len(start)
    key = np.full(len(first), -1, dtype=np.int64)
    if W == 0:
        return key
    k = level.astype(np.int64) * (W + 1) + np.arange(W)
    # Windows ending inside a column, and the window covering each column's last step: together every window that
    # overlaps the column.
    col = np.searchsorted(first, end, side="right") - 1
    ok = (col >= 0) & (end <= last[np.clip(col, 0, None)])
    np.maximum.at(key, col[ok], k[ok])
    cover = np.searchsorted(start, last, side="right") - 1
    good = (cover >= 0) & (end[np.clip(cover, 0, None)] >= last)
    key[good] = np.maximum(key[good], k[cover[good]])
    return np.where(key >= 0, key % (W + 1), -1)


def overview_figure(names: list[str], health: Any, width_px: float | None = None, marker: dict | None = None,
                    uirevision: str = "overview") -> tuple[dict[str, Any], FigureInfo]:
    """Layer x window health strip from the detector's health frame (`analysis.health()`, see
    moewatch.detect.health): one cell per detector window, coloured by its level (green healthy, amber warning,
    orange critical, dark red collapsed), the warm-up greyed; columns hold several whole windows (the worst one
    colours the cell) when there are more windows than pixels."""
    if health is None or len(health) == 0 or not names:
        return empty_figure("no detector windows yet", 200), FigureInfo(False, 0, 0)
    by_layer: dict[str, dict[str, np.ndarray]] = {}
    level_all = cell_level(health)
    for layer, rows in health.groupby("layer", sort=False).indices.items():
        by_layer[str(layer)] = {"i": rows, "start": health["start_step"].to_numpy(np.int64)[rows],
                                "end": health["end_step"].to_numpy(np.int64)[rows], "z": level_all[rows]}
    shown = [n for n in names if n in by_layer] + [n for n in by_layer if n not in names]
    first, last, group = _columns([(by_layer[n]["start"], by_layer[n]["end"]) for n in shown], columns_for(width_px))
    C = len(first)
    z = np.full((len(shown), C), np.nan, dtype=np.float32)
    pick = np.full((len(shown), C), -1, dtype=np.int64)
    for r, name in enumerate(shown):
        d = by_layer[name]
        at = _cells(d["start"], d["end"], d["z"], first, last)
        ok = at >= 0
        z[r, ok] = d["z"][at[ok]]
        pick[r, ok] = d["i"][at[ok]]
    have = pick >= 0
    rows = np.where(have, pick, 0)
    signal = {s: np.where(have, health[s].to_numpy(np.float64)[rows], np.nan) for s in HOVER_SIGNALS}
    starts = np.where(have, health["start_step"].to_numpy(np.float64)[rows], np.nan)
    ends = np.where(have, health["end_step"].to_numpy(np.float64)[rows], np.nan)
    # Rounded to what the hover shows: a strip of 32 layers x 1000 columns stays a small payload.
    custom = np.stack([starts, ends, *(np.round(signal[s], HOVER_DIGITS[s]) for s in HOVER_SIGNALS)], axis=-1)
    text = _cell_text(health, rows, have, z)
    centres = (first + last) / 2
    trace = {
        "type": "heatmap", **x_axis(centres), "y": shown, "z": z, "customdata": custom.astype(np.float32), "text": text,
        "zmin": -0.5, "zmax": 3.5, "colorscale": LEVEL_SCALE, "hoverongaps": False, "xgap": 0, "ygap": 1,
        "colorbar": {"tickvals": [0, 1, 2, 3], "ticktext": list(LEVEL_NAMES), "len": 1.0, "thickness": 14},
        "hovertemplate": "%{y}<br><b>%{text}</b><br>window steps %{customdata[0]:.0f}–%{customdata[1]:.0f}<br>"
                         "CV %{customdata[2]:.2f} (noise removed) · top expert %{customdata[3]:.1%} · "
                         "starved %{customdata[4]:.0f}<br>entropy %{customdata[5]:.2f} · "
                         "drops %{customdata[6]:.1%}<extra></extra>",
    }
    shapes, annotations = _warmup_marks(health, first, last)
    note = ""
    if group > 1:
        note = f"{group} windows per column (the worst one colours it); zoom in for single windows"
    elif group == 0:
        note = f"layers' windows differ: {C:,} step columns, each coloured by the worst window it overlaps"
    if note:
        annotations.append(_note(note))
    row = shown.index(marker["layer"]) if marker and marker.get("layer") in shown else None
    layout = _layout(max(150, 70 + 18 * len(shown)), xaxis=_xaxis(), shapes=[*shapes, *_marker_shapes(marker,
                     layer_row=row)], yaxis={"autorange": "reversed", "automargin": True, "tickfont": {"size": 10}},
                     annotations=annotations, uirevision=uirevision, clickmode="event")
    return {"data": [trace], "layout": layout}, FigureInfo(False, 1, C, note, "x" in trace)


def _cell_text(health: Any, rows: np.ndarray, have: np.ndarray, z: np.ndarray) -> list[list[str]]:
    """Hover headline per cell: 'critical: dead expert, imbalance', with '(warm-up)' in the warm-up."""
    kinds = health["kinds"].to_numpy(object)
    warm = health["warmup"].to_numpy(bool)
    out = []
    for r in range(z.shape[0]):
        line = []
        for c in range(z.shape[1]):
            if not have[r, c]:
                line.append("")
                continue
            i = rows[r, c]
            k = kinds[i]
            text = LEVEL_NAMES[int(z[r, c])] + (": " + k.replace("_", " ").replace(",", ", ") if k else "")
            line.append(text + " (warm-up)" if warm[i] else text)
        out.append(line)
    return out


def _warmup_marks(health: Any, first: np.ndarray, last: np.ndarray) -> tuple[list[dict], list[dict]]:
    """A grey band over the warm-up columns (alerts held back there) and its label."""
    warm = health["warmup"].to_numpy(bool)
    if not warm.any():
        return [], []
    end = int(health["end_step"].to_numpy(np.int64)[warm].max())
    n = int(np.searchsorted(last, end, side="right"))  # columns ending within the warm-up
    if n == 0:
        return [], []
    centres = (first + last) / 2
    x0 = float(centres[0] - ((centres[1] - centres[0]) / 2 if len(centres) > 1 else 0.5))
    x1 = float((centres[n - 1] + centres[n]) / 2 if n < len(centres) else centres[-1] + (
        (centres[-1] - centres[-2]) / 2 if len(centres) > 1 else 0.5))
    shape = {"type": "rect", "xref": "x", "yref": "paper", "x0": x0, "x1": x1, "y0": 0, "y1": 1,
             "fillcolor": WARMUP_FILL, "line": {"width": 0}, "layer": "above", "name": "warm-up"}
    label = {"text": "warm-up", "xref": "x", "yref": "paper", "x": (x0 + x1) / 2, "y": 1.0, "yanchor": "bottom",
             "showarrow": False, "font": {"size": 10, "color": "#555"}, "name": "warm-up"}
    return [shape], [label]


def trend_figure(trend: Any) -> dict[str, Any]:
    """The run list's small chart: per group of detector windows, one bar whose height is how far the worst layer's
    largest expert is above its fair share (log2 of load ÷ fair: 0 balanced, 1 twice, 3 eight times; a sliver at
    least, so every window shows its colour), coloured by the health level there (warm-up bars faded)."""
    if trend is None or len(trend) == 0:
        return {"data": [], "layout": {**_spark_layout(), "annotations": [
            {"text": "no windows yet", "showarrow": False, "xref": "paper", "yref": "paper", "x": 0.5, "y": 0.5,
             "font": {"size": 10, "color": "#888"}}]}}
    x = [(a + b) / 2 for a, b in zip(trend.first, trend.last, strict=True)]
    width = [max(b - a + 1, 1) for a, b in zip(trend.first, trend.last, strict=True)]
    height = [max(math.log2(max(r, 1.0)), TREND_FLOOR) for r in trend.ratio]
    trace = {"type": "bar", "x": x, "y": height, "width": width, "customdata": list(trend.ratio),
             "marker": {"color": [LEVEL_COLOURS[v] for v in trend.level],
                        "opacity": [0.35 if w else 1.0 for w in trend.warmup], "line": {"width": 0}}}
    layout = _spark_layout()
    layout["yaxis"]["range"] = [0, max(3.0, max(height) * 1.05)]  # a common scale up to 8x fair: runs compare
    return {"data": [trace], "layout": layout}


TREND_FLOOR = 0.2


def _spark_layout() -> dict[str, Any]:
    return {"height": 46, "width": 240, "margin": {"l": 2, "r": 2, "t": 2, "b": 2}, "bargap": 0.08,
            "paper_bgcolor": "rgba(0,0,0,0)", "plot_bgcolor": "#fafbfc", "showlegend": False,
            "xaxis": {"visible": False, "fixedrange": True}, "yaxis": {"visible": False, "fixedrange": True}}


# ---------------------------------------------------------------------------------------------------- layer view


def expert_order(tokens: np.ndarray, sort: bool) -> np.ndarray:
    """Experts top to bottom: by id, or by total load over the shown range (busiest first)."""
    E = tokens.shape[1]
    if not sort:
        return np.arange(E)
    return np.argsort(-tokens.sum(axis=0, dtype=np.int64), kind="stable")


def _window_centres(first: np.ndarray, last: np.ndarray) -> np.ndarray:
    out = (first + last) / 2
    return out.astype(np.int64) if np.all(first == last) else out


def _windowed_load(run: RunData, layer: str, lo: int, hi: int, window: int, budget: int
                   ) -> tuple[np.ndarray, np.ndarray, Any] | None:
    """([columns, E] expert loads, the step at each column's centre, the bins) in detector windows, grouped into
    whole windows to at most `budget` columns; None when the layer recorded no step in [lo, hi)."""
    bins = windows.plan(run, layer, lo, hi, window, budget)
    if bins is None:
        return None
    load, first, last = windows.binned_load(run, layer, bins)
    return load, _window_centres(first, last), bins


def heatmap_figure(run: RunData, layer: str, lo: int = 0, hi: int | None = None, width_px: float | None = None,
                   sort: bool = False, marker: dict | None = None, cap: float | None = None,
                   explicit_x: bool | None = None, window: int | None = None) -> tuple[dict[str, Any], FigureInfo]:
    """Expert x step load relative to the fair share (1 = fair), log2 colour. With `window` (the detector's, in
    recorded steps) a column is a detector window, or several whole windows when they outnumber the plot's pixels;
    without it, raw per-step counts binned to the plot width."""
    with run.lock:
        hi = run.n if hi is None else hi
        lay = run.layer_info(layer)
        if hi <= lo:
            return empty_figure("no steps recorded in this range"), FigureInfo(False, 0, hi)
        if window:
            found = _windowed_load(run, layer, lo, hi, window, columns_for(width_px))
            if found is None:
                return empty_figure("this layer recorded no steps in this range"), FigureInfo(False, 0, hi)
            binned, centres, bins = found
        else:
            tokens = run.tokens(layer, lo, hi)
            steps = run.steps[lo:hi].copy()
            edges = bin_edges(hi - lo, columns_for(width_px))
            binned = bin_sum(tokens, edges, np.int64)  # [bins, E]
            centres = _centres(steps, edges)
        E = binned.shape[1]
        order = expert_order(binned, sort)
        if run.has_grads or run.has_margins(layer):
            # The detector's averaging, so the panels match it (imported only here: other charts need no detector).
            from moewatch.detect.windows import nanmean_bins

        grad_cols = None  # the same columns as the load: windows (or pixel bins) of per-step norms
        if run.has_grads:  # (a run without them: no per-step read for this)
            if window:  # from the rollups at full zoom-out, as the load
                grad_cols = windows.bin_grads(run, layer, bins)
            else:
                grads = run.grads(layer)
                grad_cols = None if grads is None else nanmean_bins(grads[lo:hi], edges[:-1])
            if grad_cols is not None and not np.isfinite(grad_cols).any():
                grad_cols = None
    trace, n_cols = _load_trace(binned, centres, E, order, cap, explicit_x=explicit_x)
    if window:
        trace["hovertemplate"] = ("expert %{y}<br>window around step %{x:.0f}<br>load %{customdata:.2f}× fair share"
                                  "<extra></extra>")
        note, tone, raw = windows.describe(bins), "info", False
    else:
        binned_note = _bins_note(hi - lo, n_cols)
        note = windows.RAW_NOTE + (f"; {binned_note}" if binned_note else "")
        tone, raw = "warn", n_cols == hi - lo and not sort
    height = max(240, min(640, 70 + 9 * E))
    layout = _layout(height, xaxis=_xaxis(),
                     yaxis={"title": {"text": "expert (busiest first)" if sort else "expert"}, "autorange": "reversed",
                            "type": "category", "tickfont": {"size": 9}},
                     shapes=_marker_shapes(marker), annotations=[_note(note, tone)],
                     uirevision=f"heat:{run.run_id}:{lay.name}")
    data = [trace]
    margins = None
    if run.has_margins(layer):
        hist = run.margin_hist(layer)
        if hist is not None:
            margins = nanmean_bins(hist[bins.rows], bins.edges[:-1]) if window else \
                nanmean_bins(hist[lo:hi], edges[:-1])
            if not np.isfinite(margins).any():
                margins = None
    if margins is not None:
        data.append(_margin_trace(margins, trace))
    if grad_cols is not None:
        data.append(_grad_trace(grad_cols, trace, order))
        # Two panels on one step axis: load on top, gradient norm below, so a starved expert shows in both.
        layout["height"] = 2 * height - 40
        layout["yaxis"]["domain"] = [0.53, 1.0]
        layout["yaxis2"] = {**layout["yaxis"], "domain": [0.0, 0.45],
                            "title": {"text": "expert: gradient norm ÷ layer median"}}
        layout["xaxis"]["anchor"] = "y2"
        layout["annotations"].append({"text": "each expert's gradient norm ÷ the layer's median expert's (log "
                                      "colour): an expert that stopped learning is blue here, as in the load above",
                                      "xref": "paper", "yref": "paper", "x": 0, "y": 0.46, "xanchor": "left",
                                      "yanchor": "bottom", "showarrow": False, "font": {"size": 10, "color": "#555"}})
        raw = False  # live ticks rebuild both panels rather than patching one
    if margins is not None:
        _add_panel(layout, "y3", "routing margin (logit units)", 0.30)
        raw = False
    if len(data) > 1:
        _fit_colorbars(data, layout)
    return {"data": data, "layout": layout}, FigureInfo(raw, len(data), hi, note, "x" in trace)


def _fit_colorbars(data: list[dict[str, Any]], layout: dict[str, Any]) -> None:
    """Each panel's colour bar beside its own panel, not stacked over the others'."""
    for tr in data:
        axis = "yaxis" + tr.get("yaxis", "y")[1:]
        lo, hi = layout.get(axis, {}).get("domain", [0.0, 1.0])
        tr.setdefault("colorbar", {}).update({"y": (lo + hi) / 2, "len": max(hi - lo, 0.1), "yanchor": "middle",
                                              "thickness": 14})


def _add_panel(layout: dict[str, Any], axis: str, title: str, share: float) -> None:
    """Squeeze the panels above into 1 - share of the height and put a new one (y axis ``axis``) at the bottom."""
    k = "yaxis" + axis[1:]
    scale = 1.0 - share
    for name in [n for n in layout if n.startswith("yaxis")]:
        lo, hi = layout[name].get("domain", [0.0, 1.0])
        layout[name]["domain"] = [share + lo * scale, share + hi * scale]
    for a in layout["annotations"]:
        if a.get("yref") == "paper" and a.get("y", 1) < 1:
            a["y"] = share + a["y"] * scale
    layout[k] = {"domain": [0.0, share - 0.06], "title": {"text": title}, "tickfont": {"size": 9},
                 "type": "category"}
    layout["height"] = int(layout["height"] / scale)
    layout["xaxis"]["anchor"] = axis


def _margin_trace(hist_BM: np.ndarray, load_trace: dict[str, Any]) -> dict[str, Any]:
    """Share of tokens per routing-margin bin per column (the bottom row: near-ties, within ε of flipping)."""
    from moewatch.metrics import margin_edges

    edges = margin_edges()
    labels = [f"< {edges[0]:g}"] + [f"{a:.2g}–{b:.2g}" for a, b in zip(edges[:-1], edges[1:], strict=True)] + \
        [f"≥ {edges[-1]:.2g}"]
    with np.errstate(invalid="ignore", divide="ignore"):
        total_B = np.nansum(hist_BM, axis=1, keepdims=True)
        share_BM = np.where(total_B > 0, hist_BM / np.where(total_B > 0, total_B, 1.0), np.nan)
    x_keys = {k: v for k, v in load_trace.items() if k in ("x", "x0", "dx")}
    return {"type": "heatmap", **x_keys, "y": labels, "z": _f32(share_BM.T, 4), "yaxis": "y3", "zmin": 0,
            "colorscale": "Viridis", "hoverongaps": False,
            "colorbar": {"title": {"text": "share of tokens"}, "tickformat": ".0%"},
            "hovertemplate": "margin %{y}<br>step %{x:.0f}<br>%{z:.1%} of tokens<extra></extra>"}


def _grad_trace(grad_BE: np.ndarray, load_trace: dict[str, Any], order: np.ndarray) -> dict[str, Any]:
    """Gradient norm ÷ the column's median expert, log10 colour clipped at 100× either way, experts as the load."""
    with np.errstate(invalid="ignore", divide="ignore"):
        median_B = np.nanmedian(grad_BE, axis=1, keepdims=True)
        ratio_BE = np.where(median_B > 0, grad_BE / np.where(median_B > 0, median_B, 1.0), np.nan)
        z = np.log10(np.clip(ratio_BE, 1e-2, 1e2))[:, order].T
    x_keys = {k: v for k, v in load_trace.items() if k in ("x", "x0", "dx")}
    return {"type": "heatmap", **x_keys, "y": load_trace["y"], "z": _f32(z, 3),
            "customdata": _f32(ratio_BE[:, order].T, 3), "yaxis": "y2", "zmin": -2, "zmax": 2,
            "colorscale": "RdBu", "hoverongaps": False,
            "colorbar": {"title": {"text": "grad ÷ median"}, "tickvals": [-2, -1, 0, 1, 2],
                         "ticktext": ["1/100", "1/10", "1", "10", "100"]},
            "hovertemplate": "expert %{y}<br>step %{x:.0f}<br>gradient %{customdata:.3g}× the median expert's"
                             "<extra></extra>"}


def _load_trace(binned: np.ndarray, centres: np.ndarray, E: int, order: np.ndarray, cap: float | None,
                coloraxis: str | None = None, explicit_x: bool | None = None) -> tuple[dict[str, Any], int]:
    cap = cap if cap is not None else log2_ratio_cap(E)
    total = binned.sum(axis=1, keepdims=True).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(total > 0, binned * E / np.where(total > 0, total, 1.0), np.nan)[:, order].T  # [E, bins]
        z = np.log2(np.clip(ratio, 2.0 ** -cap, 2.0 ** cap))
    trace: dict[str, Any] = {
        "type": "heatmap", **x_axis(centres, explicit_x), "y": [f"e{i}" for i in order],
        "z": _f32(z, 3),
        "customdata": _f32(ratio, 3), "hoverongaps": False,
        "hovertemplate": "expert %{y}<br>step %{x:.0f}<br>load %{customdata:.2f}× fair share<extra></extra>",
    }
    vals, text = log_ticks(cap)
    colour = {"cmin": -cap, "cmax": cap, "colorscale": LOAD_SCALE,
              "colorbar": {"title": {"text": "load ÷ fair"}, "tickvals": vals, "ticktext": text}}
    if coloraxis:
        trace["coloraxis"] = coloraxis
    else:
        trace.update({"zmin": -cap, "zmax": cap, "colorscale": LOAD_SCALE, "colorbar": colour["colorbar"]})
    return trace, binned.shape[0]


def shares_figure(run: RunData, layer: str, lo: int = 0, hi: int | None = None, sort: bool = False,
                  marker: dict | None = None, window: int | None = None) -> tuple[dict[str, Any], FigureInfo]:
    """Each expert's share of the layer's assignments over time, with the fair share 1/E dashed: one point per
    detector window (or group of whole windows) with `window`, else per step."""
    with run.lock:
        hi = run.n if hi is None else hi
        lay = run.layer_info(layer)
        if hi <= lo:
            return empty_figure("no steps recorded in this range"), FigureInfo(False, 0, hi)
        if window:
            found = _windowed_load(run, layer, lo, hi, window, lines_budget(max(lay.num_experts, 1)))
            if found is None:
                return empty_figure("this layer recorded no steps in this range"), FigureInfo(False, 0, hi)
            tokens, steps, bins = found
        else:
            tokens = run.tokens(layer, lo, hi)
            steps = run.steps[lo:hi].copy()
        order = expert_order(tokens, sort)
        total = tokens.sum(axis=1, dtype=np.int64).astype(np.float32)[:, None]
        share = np.full(tokens.shape, np.nan, dtype=np.float32)
        np.divide(tokens, total, out=share, where=total > 0)
        # Gate mass vs load over the shown range (routers that record combine weights): per expert, its share of
        # the combine weight next to its share of the assignments.
        gate = None
        if run.has_gate:  # over the windows shown (from the rollups at full zoom-out), else the steps shown
            if window:
                mass, counts = windows.bins_gate_mass(run, layer, bins), tokens.sum(axis=0, dtype=np.float64)
            else:
                held = run.gate_mass(layer, lo, hi)
                mass = None if held is None else held.sum(axis=0)
                counts = tokens.sum(axis=0, dtype=np.float64)
            if mass is not None and mass.sum() > 0:
                gate = (counts / max(counts.sum(), 1.0), mass / mass.sum())
    E = share.shape[1]
    xs, ys, down = downsample(steps, share, lines_budget(E))
    if not down:
        xs = np.broadcast_to(steps[:, None], share.shape)
    markers = bool(window) and len(steps) <= 80
    traces = []
    for rank, e in enumerate(order):
        traces.append({"type": "scatter", "mode": "lines+markers" if markers else "lines",
                       "name": f"e{e}", "x": np.ascontiguousarray(xs[:, e]), "y": _f32(ys[:, e], 5),
                       "line": {"width": 1.2, "color": expert_colour(int(e), E)},
                       **({"marker": {"size": 3}} if markers else {}),
                       "hovertemplate": f"expert e{e}<br>step %{{x}}<br>share %{{y:.2%}}<extra></extra>",
                       "legendrank": rank})
    if window:
        note, tone = windows.describe(bins), "info"
    else:
        note, tone = windows.RAW_NOTE + (f"; {_lines_note(len(steps), xs.shape[0])}" if down else ""), "warn"
    fair = 1.0 / max(E, 1)
    shapes = [{"type": "line", "xref": "paper", "yref": "y", "x0": 0, "x1": 1, "y0": fair, "y1": fair,
               "line": {"color": "#444", "width": 1, "dash": "dot"}}, *_marker_shapes(marker)]
    annotations = [{"text": f"fair share 1/{E}", "xref": "paper", "yref": "y", "x": 0, "y": fair, "xanchor": "left",
                    "yanchor": "bottom", "showarrow": False, "font": {"size": 10, "color": "#444"}},
                   _note(note, tone)]
    layout = _layout(300, xaxis=_xaxis(), yaxis={"title": {"text": "share of assignments"}, "tickformat": ".0%",
                                                 "gridcolor": GRID, "rangemode": "tozero"},
                     shapes=shapes, annotations=annotations, showlegend=E <= 16, hovermode="closest",
                     uirevision=f"shares:{run.run_id}:{lay.name}")
    raw = not down and not sort and not window
    if gate is not None:
        load_E, mass_E = gate
        layout["xaxis"]["domain"] = [0.0, 0.7]
        top = float(max(load_E.max(), mass_E.max(), fair)) * 1.1
        layout["xaxis2"] = {"domain": [0.78, 1.0], "anchor": "y2", "title": {"text": "share of assignments"},
                            "tickformat": ".0%", "range": [0, top], "gridcolor": GRID}
        layout["yaxis2"] = {"anchor": "x2", "title": {"text": "share of gate mass"}, "tickformat": ".0%",
                            "range": [0, top], "gridcolor": GRID}
        layout["shapes"].append({"type": "line", "xref": "x2", "yref": "y2", "x0": 0, "y0": 0, "x1": top, "y1": top,
                                 "line": {"color": "#888", "width": 1, "dash": "dot"}})
        traces.append({"type": "scatter", "mode": "markers", "x": load_E, "y": mass_E, "xaxis": "x2", "yaxis": "y2",
                       "text": [f"e{e}" for e in range(E)], "name": "gate mass vs load",
                       "marker": {"size": 7, "color": [expert_colour(e, E) for e in range(E)]},
                       "hovertemplate": "expert %{text}<br>%{x:.1%} of assignments<br>%{y:.1%} of the gate mass"
                                        "<extra></extra>", "showlegend": False})
        raw = False  # the scatter covers the shown range: live ticks rebuild it
    return {"data": traces, "layout": layout}, FigureInfo(raw, len(traces), hi, note)


def detector_thresholds(num_experts: int, top_k: int, windowed: bool, config: Any = None
                        ) -> dict[str, tuple[float, float]]:
    """(warning, critical) lines for the metric panels, the detector's own (moewatch.detect.config). The CV
    thresholds apply to window CV with sampling noise removed, so raw per-step CV gets none."""
    try:
        from moewatch.detect.config import DetectorConfig, LayerThresholds
    except ImportError:
        return {}
    config = config or DetectorConfig()
    th = LayerThresholds.resolve(config, num_experts, top_k)
    out = {"entropy_norm": (config.entropy_warning, config.entropy_critical),
           "drop_rate": (config.drop_warning, config.drop_critical),
           "device_ratio": (config.ep_warning, config.ep_critical),
           "near_tie_frac": (config.fragile_warning,), "override_frac": (config.override_warning,)}
    if windowed and math.isfinite(th.cv_critical):
        out["cv"] = (th.cv_warning, th.cv_critical)
    return out


def metrics_figure(run: RunData, layer: str, lo: int = 0, hi: int | None = None, marker: dict | None = None,
                   window: int | None = None) -> tuple[dict[str, Any], FigureInfo]:
    """Stacked panels sharing the step axis: CV, entropy, drop rate, z-loss, max |logit|, aux loss, bias. With
    `window`, one point per detector window and the detector's window metrics (CV with sampling noise removed)."""
    with run.lock:
        hi = run.n if hi is None else hi
        lay = run.layer_info(layer)
        if hi <= lo:
            return empty_figure("no steps recorded in this range"), FigureInfo(False, 0, hi)
        E, k = lay.num_experts, lay.top_k
        if window:
            bins = windows.plan(run, layer, lo, hi, window, 1 << 40)
            if bins is None:
                return empty_figure("this layer recorded no steps in this range"), FigureInfo(False, 0, hi)
            s = windows.window_series(run, layer, bins)
            steps = _window_centres(s["first"], s["last"])
            bias = s["bias"]
        else:
            s = run.series(layer, lo, hi)
            steps = run.steps[lo:hi].copy()
            bias = run.bias(layer, lo, hi)
            bias = None if bias is None else bias.copy()
            if run.placement(layer) is not None:
                s["device_ratio"] = windows.device_ratio(run, layer, run.tokens(layer, lo, hi).astype(np.float64))
    if bias is not None and not _moves(bias):
        bias = None  # a constant buffer (a router without bias balancing): nothing to chart
    rows: list[tuple[str, str, str]] = list(METRIC_ROWS)
    if window:
        rows[0] = ("cv", "load CV per window (sampling noise removed, as the detector reads it)", ".2f")
    for key, title, fmt in ROUTING_ROWS:  # only where the router recorded them (schema 2, routers that expose them)
        if key in s and np.isfinite(s[key]).any():
            rows.append((key, title, fmt))
    if s.get("device_ratio") is not None:
        rows.append(("device_ratio", "busiest expert-parallel device ÷ mean device load (1 = even)", ".2f"))
    if bias is not None:
        rows.append(("bias", "router bias per expert (aux-free balancing)", ".3g"))
    traces: list[dict[str, Any]] = []
    down_any = False
    points = len(steps)
    mode = "lines+markers" if window and len(steps) <= 80 else "lines"
    for i, (key, _title, fmt) in enumerate(rows):
        ax = "" if i == 0 else str(i + 1)
        if key == "bias":
            xs, ys, down = downsample(steps, bias, lines_budget(bias.shape[1]))
            if not down:
                xs = np.broadcast_to(steps[:, None], bias.shape)
            nb = bias.shape[1]
            for e in range(nb):
                traces.append({"type": "scatter", "mode": "lines", "name": f"bias e{e}", "x": np.ascontiguousarray(
                    xs[:, e]), "y": _f32(ys[:, e], 5), "xaxis": "x", "yaxis": f"y{ax}",
                    "line": {"width": 1, "color": expert_colour(e, nb)},
                    "hovertemplate": f"e{e} bias %{{y:.4g}}<br>step %{{x}}<extra></extra>"})
        else:
            xs, ys, down = downsample(steps, s[key])
            traces.append({"type": "scatter", "mode": mode, "name": key, "x": xs, "y": _f32(ys, 6),
                           "xaxis": "x", "yaxis": f"y{ax}", "line": {"width": 1.4, "color": "#1f4e79"},
                           **({"marker": {"size": 3}} if mode != "lines" else {}),
                           "hovertemplate": f"{key} %{{y:{fmt}}}<br>step %{{x}}<extra></extra>"})
        down_any |= down
        if down:
            points = len(xs)
    layout = _stacked_layout(rows, f"metrics:{run.run_id}:{lay.name}")
    ref = detector_thresholds(E, k, bool(window), getattr(run, "detector_config", None))
    for i, (key, _, _) in enumerate(rows):
        for level, colour in zip(ref.get(key, ()), ("#e0a800", "#d62728"), strict=False):
            layout["shapes"].append({"type": "line", "xref": "x domain", "yref": f"y{'' if i == 0 else i + 1}",
                                     "x0": 0, "x1": 1, "y0": level, "y1": level,
                                     "line": {"color": colour, "width": 1, "dash": "dot"}})
    layout["shapes"].extend(_marker_shapes(marker))
    down_note = _lines_note(len(steps), points) if down_any else ""
    if window:
        note, tone = windows.describe(bins) + (f"; {down_note}" if down_note else ""), "info"
    else:
        note, tone = "raw per-step values: sampling noise included" + (f"; {down_note}" if down_note else ""), "warn"
    layout["annotations"].append(_note(note, tone))
    return {"data": traces, "layout": layout}, FigureInfo(not down_any and not window, len(traces), hi, note)


def _moves(bias: np.ndarray) -> bool:
    finite = np.isfinite(bias)
    return bool(finite.any()) and bool(np.max(bias[finite]) > np.min(bias[finite]))


def _stacked_layout(rows, uirevision: str) -> dict[str, Any]:
    """One x axis at the bottom and a y axis per row, so zooming any panel zooms them all."""
    n = len(rows)
    gap = 0.045
    h = (1 - gap * (n - 1)) / n
    layout = _layout(140 * n + 60, xaxis=_xaxis(anchor=f"y{n if n > 1 else ''}"), shapes=[], annotations=[],
                     uirevision=uirevision, hovermode="x unified" if n <= 8 else "closest")
    layout["margin"] = {"l": 70, "r": 30, "t": 30, "b": 40}
    for i, (_key, title, fmt) in enumerate(rows):
        top = 1 - i * (h + gap)
        name = "yaxis" if i == 0 else f"yaxis{i + 1}"
        layout[name] = {"domain": [max(0.0, top - h), top], "gridcolor": GRID, "zeroline": False,
                        "tickformat": fmt if "%" in fmt else "", "automargin": True, "nticks": 4,
                        "rangemode": "normal" if _key == "bias" else "tozero"}
        layout["annotations"].append({"text": title, "xref": "paper", "yref": "paper", "x": 0, "y": top,
                                      "xanchor": "left", "yanchor": "bottom", "showarrow": False,
                                      "font": {"size": 11, "color": "#555"}})
    return layout


# ---------------------------------------------------------------------------------------------------- compare


def match_layer(run: RunData, name: str | None, position: int) -> str | None:
    """The layer of `run` to compare with `name`: the same name if it has one, else the same position."""
    names = run.layer_names
    if not names:
        return None
    if name in names:
        return name
    return names[min(position, len(names) - 1)]


def compare_figures(items: list[tuple[str, RunData, str]], width_px: float | None = None, raw: bool = False
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(overlaid metric panels, side-by-side load heatmaps on one colour scale) for [(label, run, layer)], each run
    in its layer's detector windows (CV with sampling noise removed), or per step with `raw`."""
    if len(items) < 2:
        msg = "pick two or more runs to compare"
        return empty_figure(msg), empty_figure(msg)
    rows = list(COMPARE_ROWS)
    layout = _stacked_layout(rows, "compare:" + "|".join(f"{r.run_id}:{layer}" for _, r, layer in items))
    layout["showlegend"] = True
    layout["legend"] = {"orientation": "h", "y": 1.04, "yanchor": "bottom", "x": 1, "xanchor": "right"}
    traces: list[dict[str, Any]] = []
    notes, counted = [], []
    for j, (label, run, layer) in enumerate(items):
        window = None if raw else windows.detector_window(run, layer)
        with run.lock:
            bins = windows.plan(run, layer, 0, run.n, window, 1 << 40) if window else None
            if bins is not None:
                s = windows.window_series(run, layer, bins)
                steps = _window_centres(s["first"], s["last"])
            else:
                s = run.series(layer)
                steps = run.steps.copy()
        counted.append(f"{label}: windows of {window:,} steps" if bins is not None else f"{label}: per step")
        colour = RUN_COLOURS[j % len(RUN_COLOURS)]
        for i, (key, _, fmt) in enumerate(rows):
            xs, ys, down = downsample(steps, s[key])
            if down and i == 0:
                notes.append(label)
            traces.append({"type": "scatter", "mode": "lines", "name": label, "legendgroup": label,
                           "showlegend": i == 0, "x": xs, "y": _f32(ys, 6), "xaxis": "x",
                           "yaxis": "y" if i == 0 else f"y{i + 1}", "line": {"width": 1.4, "color": colour},
                           "hovertemplate": f"{label}<br>{key} %{{y:{fmt}}}<br>step %{{x}}<extra></extra>"})
    text = "; ".join(counted) + (" (CV with sampling noise removed, as the detector judges)" if not raw else
                                 " (raw: sampling noise included)")
    if notes:
        text += "; downsampled (min/max/last per bucket): " + ", ".join(notes)
    layout["annotations"].append(_note(text, "warn" if raw else "info"))
    return {"data": traces, "layout": layout}, compare_heatmaps(items, width_px, raw)


def compare_heatmaps(items: list[tuple[str, RunData, str]], width_px: float | None = None, raw: bool = False
                     ) -> dict[str, Any]:
    """Load heatmaps side by side, one shared colour axis (the widest expert count sets the range); columns are
    each run's detector windows (whole windows merged past the panel's width), or step bins with `raw`."""
    caps = []
    for _, run, layer in items:
        with run.lock:
            caps.append(log2_ratio_cap(run.layer_info(layer).num_experts))
    cap = max(caps)
    n = len(items)
    gap = 0.04
    w = (1 - gap * (n - 1)) / n
    per_panel = columns_for((width_px or 1200) / n)
    traces, annotations, notes = [], [], []
    layout: dict[str, Any] = _layout(420, annotations=annotations)
    for j, (label, run, layer) in enumerate(items):
        window = None if raw else windows.detector_window(run, layer)
        with run.lock:
            if run.n == 0:
                continue
            bins = windows.plan(run, layer, 0, run.n, window, per_panel) if window else None
            if bins is not None:
                binned, first, last = windows.binned_load(run, layer, bins)
                centres = _window_centres(first, last)
                notes.append(f"{label}: {bins.group * bins.window:,} steps per column")
            else:
                tokens = run.tokens(layer)
                edges = bin_edges(run.n, per_panel)
                binned = bin_sum(tokens, edges, np.int64)
                centres = _centres(run.steps, edges)
                if len(edges) - 1 < run.n:
                    notes.append(f"{label}: ~{math.ceil(run.n / (len(edges) - 1)):,} steps per column")
        E = binned.shape[1]
        ax = "" if j == 0 else str(j + 1)
        trace, _ = _load_trace(binned, centres, E, np.arange(E), cap, coloraxis="coloraxis")
        trace.update({"xaxis": f"x{ax}", "yaxis": f"y{ax}",
                      "hovertemplate": f"{label}<br>" + trace["hovertemplate"]})
        traces.append(trace)
        x0 = j * (w + gap)
        layout[f"xaxis{ax}"] = _xaxis(domain=[x0, x0 + w], anchor=f"y{ax}")
        layout[f"yaxis{ax}"] = {"anchor": f"x{ax}", "autorange": "reversed", "type": "category",
                                "tickfont": {"size": 9}, "showticklabels": j == 0}
        annotations.append({"text": f"<b>{label}</b> · {layer}", "xref": "paper", "yref": "paper", "x": x0 + w / 2,
                            "y": 1.0, "yanchor": "bottom", "showarrow": False, "font": {"size": 11}})
    vals, text = log_ticks(cap)
    layout["coloraxis"] = {"cmin": -cap, "cmax": cap, "colorscale": LOAD_SCALE,
                           "colorbar": {"title": {"text": "load ÷ fair"}, "tickvals": vals, "ticktext": text}}
    if notes:
        head = "raw per-step counts, binned: " if raw else "detector windows: "
        annotations.append({**_note(head + "; ".join(notes), "warn" if raw else "info"), "y": -0.16,
                            "yanchor": "top"})
    return {"data": traces, "layout": layout}


# ---------------------------------------------------------------------------------------------------- live


def extend_patch(tail: dict[str, Any]) -> Any:
    """A dash Patch appending a figure of only the new steps (same builder, same traces) to the shown one."""
    from dash import Patch

    patch = Patch()
    for i, trace in enumerate(tail["data"]):
        p = patch["data"][i]
        if trace["type"] == "heatmap":
            if "x" in trace:  # x0 + dx columns need no x: the new columns continue the spacing
                p["x"].extend(_list(trace["x"]))
            for r, row in enumerate(np.asarray(trace["z"])):
                p["z"][r].extend(_list(row))
            if "customdata" in trace:
                for r, row in enumerate(np.asarray(trace["customdata"])):
                    p["customdata"][r].extend(_list(row))
        else:
            p["x"].extend(_list(trace["x"]))
            p["y"].extend(_list(trace["y"]))
    return patch


def _list(a: Any) -> list:
    arr = np.asarray(a)
    if arr.dtype.kind == "f":
        return [None if not math.isfinite(v) else v for v in arr.astype(np.float64).tolist()] if arr.ndim == 1 \
            else [_list(r) for r in arr]
    return arr.tolist()

