"""The page: one static layout holding the three views (run list, run, compare), shown or hidden by the URL.

Every component exists at all times, so callbacks never target a missing component. Small renderers for the run
list table (with a small load-over-time chart per run), the run header (verdict badge and sentence) and the alerts
panel live here too (they return dash components from plain data).
"""

from __future__ import annotations

import json
from typing import Any

from dash import dcc, html

from .catalog import RunSummary, run_href
from .figures import empty_figure, trend_figure

GRAPH_CONFIG = {"displaylogo": False,
                "modeBarButtonsToRemove": ["select2d", "lasso2d", "autoScale2d"]}
# The run list's small charts: drawn, not interactive (cheap for a long list; the row links to the run).
TREND_CONFIG = {"staticPlot": True, "displayModeBar": False, "responsive": False}
HIDDEN = {"display": "none"}
SHOWN: dict[str, str] = {}


def build(root: str, refresh_seconds: float) -> html.Div:
    return html.Div(className="app", children=[
        dcc.Location(id="url", refresh=False),
        dcc.Interval(id="tick", interval=int(refresh_seconds * 1000), n_intervals=0),
        dcc.Store(id="width"),
        dcc.Store(id="run-id"),
        dcc.Store(id="marker"),
        dcc.Store(id="xrange"),
        dcc.Store(id="view-state"),
        dcc.Store(id="overview-state"),
        dcc.Store(id="alerts-state"),
        dcc.Store(id="runs-state"),
        html.Header(className="topbar", children=[
            dcc.Link("moewatch", href="/", className="brand"),
            html.Span(root, className="root", title="the folder this server reads runs from"),
            html.Nav([dcc.Link("Runs", href="/"), dcc.Link("Compare", href="/compare")]),
        ]),
        html.Div(id="page-message", className="page-message"),
        html.Main([
            html.Section(id="page-runs", children=[
                html.H2("Runs"),
                html.Div(id="run-list", children=html.P("reading runs…", className="muted")),
            ]),
            html.Section(id="page-run", style=HIDDEN, children=[
                html.Div(id="run-header", className="run-header"),
                html.Div(className="grid", children=[
                    html.Div(className="card overview", children=[
                        html.H3("Model overview: the detector's health per layer and window"),
                        html.P(["One cell per detector window: ", html.Span("healthy", className="key key-0"), " ",
                                html.Span("warning", className="key key-1"), " ",
                                html.Span("critical", className="key key-2"), " ",
                                html.Span("collapsed", className="key key-3"),
                                ", as the alerts say; the grey band is the warm-up, where alerts are held back. "
                                "Click a layer to open it."], className="hint"),
                        dcc.Graph(id="overview", figure=empty_figure("checking…", 200), config=GRAPH_CONFIG),
                    ]),
                    html.Div(className="card alerts-card", children=[
                        html.H3("Alerts"),
                        html.Div(id="alerts", className="alerts", children=html.P("checking…", className="muted")),
                    ]),
                ]),
                html.Div(className="card", children=[
                    html.Div(className="controls", children=[
                        html.Label("Layer", htmlFor="layer"),
                        dcc.Dropdown(id="layer", clearable=False, className="layer-dropdown"),
                        dcc.Checklist(id="sort", options=[{"label": " sort experts by load", "value": "sort"}],
                                      value=[], className="sort"),
                        html.Span(title="off: windows of steps, as the detector judges them; on: raw per-step counts "
                                        "(sampling noise included)", children=dcc.Checklist(
                            id="raw", options=[{"label": " per-step counts", "value": "raw"}], value=[],
                            className="raw")),
                        html.Span(id="layer-note", className="muted"),
                    ]),
                    html.H3("Expert load over steps (1.0 = fair share)", className="chart-title"),
                    dcc.Graph(id="heatmap", figure=empty_figure("pick a layer"), config=GRAPH_CONFIG),
                    html.H3("Share of assignments per expert", className="chart-title"),
                    dcc.Graph(id="shares", figure=empty_figure("pick a layer"), config=GRAPH_CONFIG),
                    html.H3("Router metrics", className="chart-title"),
                    dcc.Graph(id="metrics", figure=empty_figure("pick a layer"), config=GRAPH_CONFIG),
                ]),
            ]),
            html.Section(id="page-compare", style=HIDDEN, children=[
                html.H2("Compare runs"),
                html.Div(className="controls", children=[
                    html.Label("Runs", htmlFor="compare-runs"),
                    dcc.Dropdown(id="compare-runs", multi=True, placeholder="pick two or more runs",
                                 className="compare-runs"),
                    html.Label("Layer", htmlFor="compare-layer"),
                    dcc.Dropdown(id="compare-layer", clearable=False, className="layer-dropdown"),
                    dcc.Checklist(id="compare-raw", options=[{"label": " per-step counts", "value": "raw"}],
                                  value=[], className="raw"),
                ]),
                html.P(id="compare-note", className="muted"),
                dcc.Graph(id="compare-metrics", figure=empty_figure("pick two or more runs to compare"),
                          config=GRAPH_CONFIG),
                html.H3("Expert load, side by side on one colour scale", className="chart-title"),
                dcc.Graph(id="compare-heatmaps", figure=empty_figure("pick two or more runs to compare"),
                          config=GRAPH_CONFIG),
            ]),
        ]),
    ])


def badge(text: str | None, kind: str) -> html.Span:
    label = text or "…"
    return html.Span(label, className=f"badge {kind}-{label if text else 'unknown'}")


def run_list(rows: list[RunSummary], root: str, scan_error: str = "") -> Any:
    if scan_error:
        return message(scan_error, "error")
    if not rows:
        return message(f"No runs found under {root}. A run is a folder holding run.json, written by "
                       "moewatch.attach(model, run_dir); point `moewatch serve` at one run or at a folder of runs.",
                       "warning")
    head = html.Thead(html.Tr([html.Th(h) for h in ("run", "status", "verdict", "load over time", "steps",
                                                      "model", "experts × layers", "")]))
    body = []
    for r in rows:
        body.append(html.Tr(className="run-row", id={"type": "run-row", "index": r.run_id}, children=[
            html.Td(dcc.Link(r.name, href=run_href(r.run_id), className="run-link")),
            html.Td(badge(r.status, "status")),
            html.Td(className="verdict-cell", children=[
                badge(r.verdict, "verdict"),
                html.Span(r.verdict_note, className="muted small") if r.verdict_note else None,
                html.Div(r.sentence, className="sentence") if r.sentence else None]),
            html.Td(className="trend-cell", title="per detector window: how far the worst layer's largest expert "
                                                  "is above its fair share (log scale, up to 8x), coloured by health",
                    children=dcc.Graph(className="run-chart", figure=trend_figure(r.trend), config=TREND_CONFIG,
                                       style={"height": "46px", "width": "240px"})
                    if len(r.trend) else html.Span("…" if r.verdict is None else "–", className="muted")),
            html.Td(f"{r.steps:,}" if r.steps is not None else "…", className="num"),
            html.Td(r.model, title=r.model_full),
            html.Td(r.shape, className="num"),
            html.Td(html.Span(r.problem, className="problem") if r.problem else None),
        ]))
    return html.Table(className="runs", children=[head, html.Tbody(body)])


def message(text: str, level: str = "info") -> html.Div:
    return html.Div(text, className=f"message message-{level}", role="status")


def run_header(name: str, status: str, verdict: str | None, details: list[str], notices: list[tuple[str, str]],
               live_note: str, compare_href: str = "", sentence: str = "") -> list[Any]:
    out: list[Any] = [
        html.Div(className="title-row", children=[
            html.H2(name, className="run-name"), badge(status, "status"), badge(verdict, "verdict"),
            html.Span(live_note, className="live") if live_note else None,
            dcc.Link("compare with other runs →", href=compare_href, className="compare-link")
            if compare_href else None,
        ]),
        html.P(sentence, className=f"sentence verdict-text-{verdict or 'unknown'}") if sentence else None,
        html.P(" · ".join(details), className="details"),
    ]
    out.extend(message(text, level) for level, text in notices)
    return out


def alert_id(i: int, alert: Any) -> dict[str, str]:
    # The click target carries its own layer and steps, so a click never depends on a list re-read server-side.
    payload = [str(alert.layer), int(alert.first_step), int(alert.last_step), i]
    return {"type": "alert", "index": json.dumps(payload)}


def alerts_panel(alerts: list[Any], state_message: str, selected: dict | None) -> Any:
    if state_message and not alerts:
        return html.P(state_message, className="muted")
    if not alerts:
        return html.P("No alerts: the detector finds routing healthy on every layer.", className="healthy-note")
    items = []
    for i, a in enumerate(alerts):
        experts = list(getattr(a, "experts", ()) or ())
        ex = ""
        if experts:
            shown = ", ".join(f"e{e}" for e in experts[:6]) + (f" +{len(experts) - 6}" if len(experts) > 6 else "")
            ex = f" · experts {shown}"
        is_sel = bool(selected and selected.get("layer") == a.layer and selected.get("first") == a.first_step)
        items.append(html.Button(id=alert_id(i, a), n_clicks=0,
                                 className=f"alert alert-{a.severity}" + (" selected" if is_sel else ""),
                                 title="show this layer and mark the onset on the charts", children=[
            html.Div(className="alert-head", children=[
                html.Span(a.severity, className=f"badge severity-{a.severity}"),
                html.Span(a.kind.replace("_", " "), className="kind"),
                html.Span("holds at the end" if getattr(a, "ongoing", False) else "over", className="holds"
                          + (" ongoing" if getattr(a, "ongoing", False) else "")),
                html.Span(f"steps {a.first_step:,}–{a.last_step:,}", className="steps"),
            ]),
            html.Div(f"{a.layer}{ex}", className="alert-layer"),
            html.Div(a.message, className="alert-message"),
            html.Div(f"Lever: {a.lever}", className="alert-lever") if getattr(a, "lever", "") else None,
        ]))
    if state_message:
        items.append(html.P(state_message, className="muted small"))
    return items
