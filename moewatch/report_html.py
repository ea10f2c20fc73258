"""The HTML rendering of `moewatch report`: one self-contained page a team can mail or attach to a CI job.

Owns the page: a header saying when, from which path and by which moewatch it was made; a summary table of the runs,
worst first, each row linking to the run's section; per run its verdict, layer and alert tables and its charts (load
imbalance and largest share per window, one line per layer; expert load over fair share for the worst layers).

Charts draw in any browser, however many a page holds: they are SVG plotly traces, never WebGL (browsers keep only a
handful of WebGL contexts per page, and a folder report has hundreds of charts), downsampled with the dashboard's
min/max/last buckets (``moewatch.app.downsample``) and step bins to about the pixels of a chart, so a run's share of
the file stops growing with its length. plotly.js is inlined once, in the head, so the page works offline; each chart
is a JSON island that one small script draws, the charts near the viewport first and the rest in the background.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Iterable
from dataclasses import fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from moewatch.app.downsample import LINE_POINTS, bin_edges, bin_sum, columns_for, downsample
from moewatch.detect import STATUS_RANK, DetectorConfig
from moewatch.detect.alerts import CRITICAL, WARNING
from moewatch.report import _COLUMNS, RunReport, _groups, _header, _layer_rows, _tally, overall_status

# A chart is at most half of a page that is at most PAGE_PX wide: its heatmap needs no more columns than that.
PAGE_PX = 1500
CHART_PX = PAGE_PX // 2
MAX_HEATMAPS = 8  # per run: the worst layers (a 32-layer run would otherwise be 32 heatmaps)

FONT = {"family": "Inter, Segoe UI, Helvetica, Arial, sans-serif", "size": 12, "color": "#222"}
GRID = "#e6e6e6"
# One template for every chart, written once per page: plotly.py's default template is ~7 kB per chart, which for a
# 100-run report is more than all its data.
TEMPLATE = {"layout": {
    "font": FONT, "paper_bgcolor": "white", "plot_bgcolor": "white", "hovermode": "closest",
    "margin": {"l": 55, "r": 20, "t": 40, "b": 40}, "title": {"font": {"size": 13}, "x": 0.02},
    "xaxis": {"gridcolor": GRID, "zeroline": False, "showline": True, "linecolor": "#bbb"},
    "yaxis": {"gridcolor": GRID, "zeroline": False, "showline": True, "linecolor": "#bbb"},
    "colorway": ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"],
    "legend": {"font": {"size": 10}},
}}
MARKS = ((WARNING, "#b36b00"), (CRITICAL, "#b00020"))

CSS = f"""
body{{font-family:system-ui,sans-serif;margin:20px auto;padding:0 16px;max-width:{PAGE_PX}px;color:#222}}
h1{{margin:0 0 4px}}h2{{margin:28px 0 4px;padding-top:12px;border-top:2px solid #ddd}}
p.meta{{color:#555;margin:0 0 12px;font-size:13px}}
table{{border-collapse:collapse;margin:8px 0}}td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px}}
th{{background:#f3f3f3;text-align:left}}td.num{{text-align:right}}td.nowrap{{white-space:nowrap}}
.collapsed,.critical{{color:#b00020;font-weight:bold}}.warning{{color:#b36b00;font-weight:bold}}
.recovered{{color:#1565c0;font-weight:bold}}.healthy{{color:#2e7d32}}
a.top{{font-size:12px;margin-left:12px;font-weight:normal}}
.charts{{display:grid;grid-template-columns:repeat(auto-fill,minmax(480px,1fr));gap:6px;margin:8px 0}}
.mw-chart{{border:1px solid #eee;min-height:300px}}
"""

# Draws each chart from its JSON island (the <script type=application/json> right after its div): those within a
# screen of the viewport at once, the others one per task in the background, so a 100-run page opens at its top
# without waiting for a thousand charts and is fully drawn soon after (and before printing).
DRAW_JS = """
(function () {
  const template = JSON.parse(document.getElementById('mw-template').textContent);
  const config = {displaylogo: false, responsive: true};
  const pending = new Set(document.querySelectorAll('div.mw-chart'));
  function draw(div) {
    if (!pending.delete(div)) return;
    const fig = JSON.parse(div.nextElementSibling.textContent);
    fig.layout.template = template;
    Plotly.newPlot(div, fig.data, fig.layout, config);
  }
  const seen = new IntersectionObserver(function (entries) {
    entries.forEach(function (e) { if (e.isIntersecting) { seen.unobserve(e.target); draw(e.target); } });
  }, {rootMargin: '100% 0px'});
  pending.forEach(function (div) { seen.observe(div); });
  function rest() {
    const next = pending.values().next();
    if (next.done) return;
    setTimeout(rest, 0);  // first: a chart that fails to draw must not stop the others
    draw(next.value);
  }
  window.addEventListener('load', function () { setTimeout(rest, 0); });
  window.addEventListener('beforeprint', function () { Array.from(pending).forEach(draw); });
})();
"""


def render_html(reports: list[RunReport], config: DetectorConfig, *, sources: Iterable[Path] | None = None,
                made: datetime | None = None) -> str:
    """One self-contained page for ``reports``: a summary of the runs, worst first, then a section per run.

    ``sources`` are the paths the report was asked for (shown in the header; by default the runs' common folder),
    ``made`` when it was made (default: now).
    """
    from plotly.offline import get_plotlyjs

    import moewatch

    sources = [Path(p) for p in sources or []]
    root = _root(reports, sources)
    made = made or datetime.now(timezone.utc)
    # Worst first, in the existing status order; sorted() is stable, so ties keep the order the runs were found in.
    ranked = [(f"run-{i}", rep) for i, rep in enumerate(sorted(reports, key=lambda r: -STATUS_RANK[r.status]), 1)]
    status = overall_status(reports)
    if not sources:
        sources = [reports[0].path] if len(reports) == 1 else [root]
    where = ", ".join(str(p) for p in sources)
    runs = "1 run" if len(reports) == 1 else f"{len(reports)} runs" + (f": {_tally(reports)}" if reports else "")
    parts = [
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>",
        f"<title>moewatch report: {status} ({runs})</title>",
        f"<style>{CSS}</style>",
        f"<script>{get_plotlyjs()}</script>",  # once per file, however many charts
        "</head><body>",
        f"<h1 id='summary'>moewatch report: <span class='{status}'>{status}</span></h1>",
        f"<p class='meta'>Made {made.astimezone(timezone.utc):%Y-%m-%d %H:%M} UTC from <code>{html.escape(where)}"
        f"</code> by moewatch {html.escape(moewatch.__version__)} &middot; {html.escape(runs)} &middot; detector "
        f"settings: {html.escape(_settings(config))}</p>",
    ]
    if len(reports) > 1:
        parts.append(_summary(ranked, root))
    for anchor, rep in ranked:
        parts.append(_section(rep, anchor, root, top=len(reports) > 1))
    parts.append(f"<script type='application/json' id='mw-template'>{_json(TEMPLATE)}</script>")
    parts.append(f"<script>{DRAW_JS}</script>\n</body></html>\n")
    return "\n".join(parts)


def _root(reports: list[RunReport], sources: list[Path]) -> Path:
    """The folder the runs are named relative to: the one folder of runs asked for, else the runs' common folder."""
    if len(sources) == 1 and Path(sources[0]).is_dir() and not (Path(sources[0]) / "run.json").is_file():
        return Path(sources[0])
    paths = [str(r.path) for r in reports]
    try:
        common = Path(os.path.commonpath(paths)) if paths else Path(".")
    except ValueError:  # absolute and relative paths mixed
        return Path(".")
    return common.parent if len(paths) == 1 else common


def _name(rep: RunReport, root: Path) -> str:
    try:
        rel = os.path.relpath(rep.path, root)
    except ValueError:  # another drive (Windows)
        return str(rep.path)
    return str(rep.path) if rel.startswith("..") or rel == "." else rel


def _settings(config: DetectorConfig) -> str:
    """'defaults', or the settings that differ from them (the report's verdicts depend on them)."""
    default = DetectorConfig()
    changed = [f"{f.name}={getattr(config, f.name)}" for f in fields(config)
               if getattr(config, f.name) != getattr(default, f.name)]
    return ", ".join(changed) if changed else "defaults"


# --------------------------------------------------------------------------------------------------- tables


def _summary(ranked: list[tuple[str, RunReport]], root: Path) -> str:
    """One row per run, worst first, each linking to its section."""
    header = ("run", "status", "worst layer", "what is wrong", "first critical step", "steps", "model")
    head = "".join(f"<th>{h}</th>" for h in header)
    rows = []
    for anchor, rep in ranked:
        worst = _worst_layer(rep)
        critical = [a.first_step for a in rep.analysis.alerts if a.severity == CRITICAL]
        model = str(rep.meta.get("model_class") or "?")
        rows.append(
            f"<tr><td class='nowrap'><a href='#{anchor}'>{html.escape(_name(rep, root))}</a></td>"
            f"<td class='{rep.status}'>{rep.status}</td>"
            f"<td class='nowrap'>{html.escape(worst[0])} <span class='{worst[1]}'>{worst[1]}</span></td>"
            f"<td>{html.escape(_what(rep))}</td>"
            f"<td class='num'>{min(critical) if critical else '-'}</td><td class='num'>{rep.steps}</td>"
            f"<td title='{html.escape(model)}'>{html.escape(model.rsplit('.', 1)[-1])}</td></tr>")
    return f"<table class='summary'><tr>{head}</tr>{''.join(rows)}</table>"


def _worst_layer(rep: RunReport) -> tuple[str, str]:
    """(layer, status) of the run's worst layer: worst status, then the highest load imbalance."""
    layer = _ranked_layers(rep)[0]
    return layer.layer, layer.status


def _ranked_layers(rep: RunReport) -> list:
    return sorted(rep.analysis.layers, key=lambda r: (-STATUS_RANK[r.status], -_nan0(r.summary()["cv"])))


def _what(rep: RunReport) -> str:
    """The verdict sentence without its 'STATUS: ' lead (the status has its own column)."""
    text = rep.verdict
    lead = f"{rep.status.upper()}: "
    return text[len(lead):] if text.startswith(lead) else text


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td class='{c if c in STATUS_RANK else ''}'>{html.escape(c)}</td>" for c in row) + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _section(rep: RunReport, anchor: str, root: Path, top: bool) -> str:
    back = "<a class='top' href='#summary'>&uarr; summary</a>" if top else ""
    parts = [
        f"<h2 id='{anchor}'>{html.escape(_name(rep, root))}: <span class='{rep.status}'>{rep.status}</span>{back}</h2>",
        f"<p>{html.escape(_header(rep))}</p><p><b>Verdict:</b> {html.escape(rep.verdict)}</p>",
    ]
    if rep.problems:
        items = "".join(f"<li>{html.escape(p)}</li>" for p in rep.problems)
        parts.append(f"<p class='warning'>Capture problems (run.json): what moewatch could not record</p>"
                     f"<ul>{items}</ul>")
    parts.append(_table(_COLUMNS, _layer_rows(rep)))
    parts.append("<div class='charts'>" + "".join(_chart(fig) for fig in _figures(rep)) + "</div>")
    groups = _groups(rep.analysis.alerts)
    if groups:
        rows = [(g.head.severity, g.head.kind, g.head.layer, g.span(), g.head.message, g.head.lever) for g in groups]
        parts.append(_table(("severity", "kind", "layer", "when", "message", "lever"), rows))
    else:
        parts.append("<p>No alerts.</p>")
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------------- charts


def _chart(fig: dict[str, Any]) -> str:
    return f"<div class='mw-chart'></div><script type='application/json'>{_json(fig)}</script>"


def _json(obj: Any) -> str:
    import plotly.io as pio

    # plotly's encoder writes numpy arrays as lists, NaN as null (a gap), and escapes '<' and '/' so that a layer
    # named '</script>' cannot end the island early.
    return pio.to_json(obj, validate=False)


def _round(a: np.ndarray, digits: int) -> np.ndarray:
    # float64 rounded: the JSON holds '0.4321', not float32's '0.43210000824928284'.
    return np.round(np.asarray(a, dtype=np.float64), digits)


def _figures(rep: RunReport) -> list[dict[str, Any]]:
    layers = rep.analysis.layers
    figs = []
    for metric, title, fmt in (("cv", "Load imbalance (CV of expert loads per window)", ".2f"),
                               ("max_share", "Largest expert's share of assignments", ".1%")):
        traces = []
        for layer in layers:
            s = layer.series
            if not len(s["last"]):
                continue
            # min/max/last buckets: a one-window spike survives; beyond LINE_POINTS the line stops growing.
            x, y, _ = downsample(s["last"].astype(np.int64), _round(s[metric], 4), LINE_POINTS)
            traces.append({"type": "scatter", "mode": "lines", "name": html.escape(layer.layer), "x": x, "y": y,
                           "hovertemplate": f"{html.escape(layer.layer)}<br>step %{{x}}<br>%{{y:{fmt}}}<extra></extra>"})
        if not traces:  # no layer has a whole detector window yet: no empty chart boxes (the verdict says why)
            continue
        layout = {"title": {"text": title}, "height": 340, "xaxis": {"title": {"text": "step"}},
                  "yaxis": {"tickformat": fmt}, "showlegend": len(traces) > 1}
        layout.update(_marks(rep))
        figs.append({"data": traces, "layout": layout})
    # Heatmaps of each expert's load relative to its fair share, for the layers most worth a look.
    for layer in _ranked_layers(rep)[:MAX_HEATMAPS]:
        s = layer.series
        if not len(s["last"]):
            continue
        edges = bin_edges(len(s["last"]), columns_for(CHART_PX))
        width = np.diff(edges)[:, None]
        z = bin_sum(s["share"], edges) / width * layer.num_experts  # [bins, E], mean share over the bin's windows
        x = bin_sum(s["last"].astype(np.float64)[:, None], edges)[:, 0] / width[:, 0]  # each bin's mean end step
        zmax = max(3.0, float(np.nanmax(z)) if z.size else 3.0)
        figs.append({"data": [{
            "type": "heatmap", "z": _round(z.T, 2), "x": _round(x, 0), "y": np.arange(layer.num_experts),
            "colorscale": "Viridis", "zmin": 0, "zmax": round(zmax, 2), "colorbar": {"title": {"text": "× fair"}},
            "hovertemplate": "expert %{y}<br>step %{x}<br>load %{z:.2f}× fair share<extra></extra>",
        }], "layout": {
            "title": {"text": f"{html.escape(layer.layer)}: expert load / fair share ({layer.status})"},
            "height": max(300, min(560, 110 + 6 * layer.num_experts)),
            "xaxis": {"title": {"text": "step"}}, "yaxis": {"title": {"text": "expert"}},
        }})
    return figs


def _marks(rep: RunReport) -> dict[str, Any]:
    """Where the first warning and the first critical alert were raised: how much notice the run gave."""
    shapes, notes = [], []
    for severity, color in MARKS:
        raised = [a.detected_step for a in rep.analysis.alerts if a.severity == severity]
        if raised:
            step = min(raised)
            shapes.append({"type": "line", "xref": "x", "yref": "paper", "x0": step, "x1": step, "y0": 0, "y1": 1,
                           "line": {"color": color, "dash": "dot", "width": 1.5}, "opacity": 0.7})
            notes.append({"x": step, "xref": "x", "y": 1, "yref": "paper", "yanchor": "bottom", "showarrow": False,
                          "text": f"{severity} raised", "font": {"size": 10, "color": color}})
    return {"shapes": shapes, "annotations": notes}


def _nan0(v: float | None) -> float:
    return 0.0 if v is None or not math.isfinite(v) else v
