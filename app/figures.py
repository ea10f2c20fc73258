"""Plotly figures of a cached run, built as plain dicts with numpy arrays (no plotly.graph_objects validation).

Owns every chart of the dashboard: the model overview health strip, the layer view (expert x step load heatmap,
per-expert share lines, metric panels), the compare view, and the `extend_patch` that turns a figure of only the
new steps into a dash `Patch` appending to the figure the browser already has. Skipping graph_objects keeps a layer
switch on a 100k-step run within a few hundred milliseconds; dash serializes the numpy arrays with orjson.

Each builder returns (figure, info) where info says whether the figure holds every step in its range one point per
step ("raw", so a live update can append to it) and how many traces it has.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import health
from .data import RunData
from .downsample import LINE_POINTS, bin_edges, bin_sum, columns_for, downsample

FONT = {"family": "Inter, Segoe UI, Helvetica, Arial, sans-serif", "size": 12, "color": "#222"}
GRID = "#e6e6e6"
LOAD_SCALE = [[0.0, "#053061"], [0.2, "#2166ac"], [0.4, "#92c5de"], [0.5, "#f7f7f7"], [0.6, "#f4a582"],
              [0.8, "#b2182b"], [1.0, "#67001f"]]
HEALTH_SCALE = [[0.0, "#1a9850"], [0.25, "#a6d96a"], [0.5, "#fee08b"], [0.75, "#fc8d59"], [1.0, "#d73027"]]
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


def _note(text: str) -> dict[str, Any]:
    return {"text": text, "showarrow": False, "xref": "paper", "yref": "paper", "x": 1, "y": 1.0, "yanchor": "bottom",
            "xanchor": "right", "font": {"size": 11, "color": "#8a6d3b"}, "bgcolor": "#fcf8e3", "name": "note"}


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


def overview_figure(run: RunData, width_px: float | None = None, marker: dict | None = None,
                    lo: int = 0, hi: int | None = None, explicit_x: bool | None = None
                    ) -> tuple[dict[str, Any], FigureInfo]:
    """Layer x step health strip: colour = worst of CV, entropy, dead experts, drop rate (0 healthy .. 2 critical).

    Columns are step bins; each is scored on its bin-averaged metrics (`RunData.binned`), which also smooths
    single-step sampling noise."""
    with run.lock:
        hi = run.n if hi is None else hi
        names = run.layer_names
        if not names or hi <= lo:
            return empty_figure("no steps recorded yet", 200), FigureInfo(False, 0, hi)
        edges = bin_edges(hi - lo, columns_for(width_px))
        b = run.binned(edges, lo)
        steps = run.steps[lo:hi].copy()
        E = np.asarray([max(layer.num_experts, 1) for layer in run.layers], dtype=np.float64)
        k = np.asarray([max(layer.top_k, 1) for layer in run.layers], dtype=np.float64)
    n = hi - lo
    bins = len(edges) - 1
    value, _ = health.score(b, E, k)
    custom = np.stack([b["cv"], b["entropy_norm"], b["dead"], b["drop_rate"]], axis=-1).transpose(1, 0, 2)
    trace = {
        "type": "heatmap", **x_axis(_centres(steps, edges), explicit_x), "y": names, "z": _f32(value.T, 3),
        "customdata": _f32(custom, 4), "zmin": 0, "zmax": 2, "colorscale": HEALTH_SCALE,
        "hoverongaps": False,
        "colorbar": {"title": {"text": "health"}, "tickvals": [0, 1, 2], "ticktext": ["healthy", "warning",
                                                                                       "critical"], "len": 1.0},
        "hovertemplate": "%{y}<br>step %{x:.0f}<br>health %{z:.2f} (0 ok, 1 warning, 2 critical)<br>"
                         "CV %{customdata[0]:.2f} · entropy %{customdata[1]:.2f} · dead %{customdata[2]:.1f} · "
                         "drops %{customdata[3]:.1%}<extra></extra>",
    }
    note = _bins_note(n, bins)
    row = names.index(marker["layer"]) if marker and marker.get("layer") in names else None
    layout = _layout(max(180, 70 + 16 * len(names)), xaxis=_xaxis(),
                     yaxis={"autorange": "reversed", "automargin": True, "tickfont": {"size": 10}},
                     shapes=_marker_shapes(marker, layer_row=row), annotations=[_note(note)] if note else [],
                     uirevision=f"overview:{run.run_id}", clickmode="event")
    return {"data": [trace], "layout": layout}, FigureInfo(bins == n, 1, hi, note, "x" in trace)


# ---------------------------------------------------------------------------------------------------- layer view


def expert_order(tokens: np.ndarray, sort: bool) -> np.ndarray:
    """Experts top to bottom: by id, or by total load over the shown range (busiest first)."""
    E = tokens.shape[1]
    if not sort:
        return np.arange(E)
    return np.argsort(-tokens.sum(axis=0, dtype=np.int64), kind="stable")


def heatmap_figure(run: RunData, layer: str, lo: int = 0, hi: int | None = None, width_px: float | None = None,
                   sort: bool = False, marker: dict | None = None, cap: float | None = None,
                   explicit_x: bool | None = None) -> tuple[dict[str, Any], FigureInfo]:
    """Expert x step load relative to the fair share (1 = fair), log2 colour, columns binned to the plot width."""
    with run.lock:
        hi = run.n if hi is None else hi
        lay = run.layer(layer)
        if hi <= lo:
            return empty_figure("no steps recorded in this range"), FigureInfo(False, 0, hi)
        tokens = run.tokens(layer, lo, hi)
        steps = run.steps[lo:hi].copy()
        E = tokens.shape[1]
        edges = bin_edges(hi - lo, columns_for(width_px))
        binned = bin_sum(tokens, edges, np.int64)  # [bins, E]
        order = expert_order(tokens, sort)
    trace, bins = _load_trace(binned, steps, edges, E, order, cap, explicit_x=explicit_x)
    note = _bins_note(hi - lo, bins)
    layout = _layout(max(240, min(640, 70 + 9 * E)), xaxis=_xaxis(),
                     yaxis={"title": {"text": "expert (busiest first)" if sort else "expert"}, "autorange": "reversed",
                            "type": "category", "tickfont": {"size": 9}},
                     shapes=_marker_shapes(marker), annotations=[_note(note)] if note else [],
                     uirevision=f"heat:{run.run_id}:{lay.name}")
    return {"data": [trace], "layout": layout}, FigureInfo(bins == hi - lo and not sort, 1, hi, note, "x" in trace)


def _load_trace(binned: np.ndarray, steps: np.ndarray, edges: np.ndarray, E: int, order: np.ndarray,
                cap: float | None, coloraxis: str | None = None, explicit_x: bool | None = None
                ) -> tuple[dict[str, Any], int]:
    cap = cap if cap is not None else log2_ratio_cap(E)
    total = binned.sum(axis=1, keepdims=True).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(total > 0, binned * E / np.where(total > 0, total, 1.0), np.nan)[:, order].T  # [E, bins]
        z = np.log2(np.clip(ratio, 2.0 ** -cap, 2.0 ** cap))
    trace: dict[str, Any] = {
        "type": "heatmap", **x_axis(_centres(steps, edges), explicit_x), "y": [f"e{i}" for i in order],
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
    return trace, len(edges) - 1


def shares_figure(run: RunData, layer: str, lo: int = 0, hi: int | None = None, sort: bool = False,
                  marker: dict | None = None) -> tuple[dict[str, Any], FigureInfo]:
    """Each expert's share of the layer's assignments over time, with the fair share 1/E dashed."""
    with run.lock:
        hi = run.n if hi is None else hi
        lay = run.layer(layer)
        if hi <= lo:
            return empty_figure("no steps recorded in this range"), FigureInfo(False, 0, hi)
        tokens = run.tokens(layer, lo, hi)
        steps = run.steps[lo:hi].copy()
        order = expert_order(tokens, sort)
        total = tokens.sum(axis=1, dtype=np.int64).astype(np.float32)[:, None]
        share = np.full(tokens.shape, np.nan, dtype=np.float32)
        np.divide(tokens, total, out=share, where=total > 0)
    E = share.shape[1]
    xs, ys, down = downsample(steps, share, lines_budget(E))
    if not down:
        xs = np.broadcast_to(steps[:, None], share.shape)
    traces = []
    for rank, e in enumerate(order):
        traces.append({"type": "scatter", "mode": "lines",
                       "name": f"e{e}", "x": np.ascontiguousarray(xs[:, e]), "y": _f32(ys[:, e], 5),
                       "line": {"width": 1.2, "color": expert_colour(int(e), E)},
                       "hovertemplate": f"expert e{e}<br>step %{{x}}<br>share %{{y:.2%}}<extra></extra>",
                       "legendrank": rank})
    note = _lines_note(len(steps), xs.shape[0]) if down else ""
    fair = 1.0 / max(E, 1)
    shapes = [{"type": "line", "xref": "paper", "yref": "y", "x0": 0, "x1": 1, "y0": fair, "y1": fair,
               "line": {"color": "#444", "width": 1, "dash": "dot"}}, *_marker_shapes(marker)]
    annotations = [{"text": f"fair share 1/{E}", "xref": "paper", "yref": "y", "x": 0, "y": fair, "xanchor": "left",
                    "yanchor": "bottom", "showarrow": False, "font": {"size": 10, "color": "#444"}}]
    if note:
        annotations.append(_note(note))
    layout = _layout(300, xaxis=_xaxis(), yaxis={"title": {"text": "share of assignments"}, "tickformat": ".0%",
                                                 "gridcolor": GRID, "rangemode": "tozero"},
                     shapes=shapes, annotations=annotations, showlegend=E <= 16, hovermode="closest",
                     uirevision=f"shares:{run.run_id}:{lay.name}")
    return {"data": traces, "layout": layout}, FigureInfo(not down and not sort, len(traces), hi, note)


def metrics_figure(run: RunData, layer: str, lo: int = 0, hi: int | None = None, marker: dict | None = None,
                   ) -> tuple[dict[str, Any], FigureInfo]:
    """Stacked panels sharing the step axis: CV, entropy, drop rate, z-loss, max |logit|, aux loss, bias."""
    th = health.thresholds()
    with run.lock:
        hi = run.n if hi is None else hi
        lay = run.layer(layer)
        if hi <= lo:
            return empty_figure("no steps recorded in this range"), FigureInfo(False, 0, hi)
        s = run.series(layer, lo, hi)
        steps = run.steps[lo:hi].copy()
        bias = run.bias(layer, lo, hi)
        bias = None if bias is None else bias.copy()
    rows: list[tuple[str, str, str]] = list(METRIC_ROWS)
    if bias is not None:
        rows.append(("bias", "router bias per expert (aux-free balancing)", ".3g"))
    traces: list[dict[str, Any]] = []
    down_any = False
    points = len(steps)
    for i, (key, _title, fmt) in enumerate(rows):
        ax = "" if i == 0 else str(i + 1)
        if key == "bias":
            xs, ys, down = downsample(steps, bias, lines_budget(bias.shape[1]))
            if not down:
                xs = np.broadcast_to(steps[:, None], bias.shape)
            E = bias.shape[1]
            for e in range(E):
                traces.append({"type": "scatter", "mode": "lines", "name": f"bias e{e}", "x": np.ascontiguousarray(
                    xs[:, e]), "y": _f32(ys[:, e], 5), "xaxis": "x", "yaxis": f"y{ax}",
                    "line": {"width": 1, "color": expert_colour(e, E)},
                    "hovertemplate": f"e{e} bias %{{y:.4g}}<br>step %{{x}}<extra></extra>"})
        else:
            xs, ys, down = downsample(steps, s[key])
            traces.append({"type": "scatter", "mode": "lines", "name": key, "x": xs, "y": _f32(ys, 6),
                           "xaxis": "x", "yaxis": f"y{ax}", "line": {"width": 1.4, "color": "#1f4e79"},
                           "hovertemplate": f"{key} %{{y:{fmt}}}<br>step %{{x}}<extra></extra>"})
        down_any |= down
        if down:
            points = len(xs)
    layout = _stacked_layout(rows, f"metrics:{run.run_id}:{lay.name}")
    ref = {"cv": (th.cv_warning, th.cv_critical), "entropy_norm": (th.entropy_warning, th.entropy_critical),
           "drop_rate": (th.drop_warning, th.drop_critical)}
    for i, (key, _, _) in enumerate(rows):
        for level, colour in zip(ref.get(key, ()), ("#e0a800", "#d62728"), strict=False):
            layout["shapes"].append({"type": "line", "xref": "x domain", "yref": f"y{'' if i == 0 else i + 1}",
                                     "x0": 0, "x1": 1, "y0": level, "y1": level,
                                     "line": {"color": colour, "width": 1, "dash": "dot"}})
    layout["shapes"].extend(_marker_shapes(marker))
    note = _lines_note(len(steps), points) if down_any else ""
    if note:
        layout["annotations"].append(_note(note))
    return {"data": traces, "layout": layout}, FigureInfo(not down_any, len(traces), hi, note)


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


def compare_figures(items: list[tuple[str, RunData, str]], width_px: float | None = None
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(overlaid metric panels, side-by-side load heatmaps on one colour scale) for [(label, run, layer)]."""
    if len(items) < 2:
        msg = "pick two or more runs to compare"
        return empty_figure(msg), empty_figure(msg)
    rows = list(COMPARE_ROWS)
    layout = _stacked_layout(rows, "compare:" + "|".join(f"{r.run_id}:{layer}" for _, r, layer in items))
    layout["showlegend"] = True
    layout["legend"] = {"orientation": "h", "y": 1.04, "yanchor": "bottom", "x": 1, "xanchor": "right"}
    traces: list[dict[str, Any]] = []
    notes = []
    for j, (label, run, layer) in enumerate(items):
        with run.lock:
            s = run.series(layer)
            steps = run.steps.copy()
        colour = RUN_COLOURS[j % len(RUN_COLOURS)]
        for i, (key, _, fmt) in enumerate(rows):
            xs, ys, down = downsample(steps, s[key])
            if down and i == 0:
                notes.append(label)
            traces.append({"type": "scatter", "mode": "lines", "name": label, "legendgroup": label,
                           "showlegend": i == 0, "x": xs, "y": _f32(ys, 6), "xaxis": "x",
                           "yaxis": "y" if i == 0 else f"y{i + 1}", "line": {"width": 1.4, "color": colour},
                           "hovertemplate": f"{label}<br>{key} %{{y:{fmt}}}<br>step %{{x}}<extra></extra>"})
    if notes:
        layout["annotations"].append(_note("downsampled (min/max/last per bucket): " + ", ".join(notes)))
    return {"data": traces, "layout": layout}, compare_heatmaps(items, width_px)


def compare_heatmaps(items: list[tuple[str, RunData, str]], width_px: float | None = None) -> dict[str, Any]:
    """Load heatmaps side by side, one shared colour axis (the widest expert count sets the range)."""
    caps = []
    for _, run, layer in items:
        with run.lock:
            caps.append(log2_ratio_cap(run.layer(layer).num_experts))
    cap = max(caps)
    n = len(items)
    gap = 0.04
    w = (1 - gap * (n - 1)) / n
    per_panel = columns_for((width_px or 1200) / n)
    traces, annotations, notes = [], [], []
    layout: dict[str, Any] = _layout(420, annotations=annotations)
    for j, (label, run, layer) in enumerate(items):
        with run.lock:
            tokens = run.tokens(layer)
            steps = run.steps.copy()
            if len(steps) == 0:
                continue
            edges = bin_edges(len(steps), per_panel)
            binned = bin_sum(tokens, edges, np.int64)
            E = tokens.shape[1]
        ax = "" if j == 0 else str(j + 1)
        trace, bins = _load_trace(binned, steps, edges, E, np.arange(E), cap, coloraxis="coloraxis")
        trace.update({"xaxis": f"x{ax}", "yaxis": f"y{ax}",
                      "hovertemplate": f"{label}<br>" + trace["hovertemplate"]})
        traces.append(trace)
        x0 = j * (w + gap)
        layout[f"xaxis{ax}"] = _xaxis(domain=[x0, x0 + w], anchor=f"y{ax}")
        layout[f"yaxis{ax}"] = {"anchor": f"x{ax}", "autorange": "reversed", "type": "category",
                                "tickfont": {"size": 9}, "showticklabels": j == 0}
        annotations.append({"text": f"<b>{label}</b> · {layer}", "xref": "paper", "yref": "paper", "x": x0 + w / 2,
                            "y": 1.0, "yanchor": "bottom", "showarrow": False, "font": {"size": 11}})
        if bins < len(steps):
            notes.append(f"{label}: ~{math.ceil(len(steps) / bins):,} steps per column")
    vals, text = log_ticks(cap)
    layout["coloraxis"] = {"cmin": -cap, "cmax": cap, "colorscale": LOAD_SCALE,
                           "colorbar": {"title": {"text": "load ÷ fair"}, "tickvals": vals, "ticktext": text}}
    if notes:
        annotations.append({**_note("binned: " + "; ".join(notes)), "y": -0.16, "yanchor": "top"})
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

