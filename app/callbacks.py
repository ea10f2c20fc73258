"""Dash callbacks: plain functions of (catalog, inputs) -> outputs, and `register` that wires them to the page.

The functions take what triggered them as an argument (instead of reading `dash.ctx`), so tests call them
directly. Every view catches its own failures and answers with a message in the page: a broken run shows what is
wrong with it, never a stack trace. Run pages are addressed by the run's path under the root (/run/team/exp%201).
The verdict, the alerts and the health strip all come from the detector's one `Analysis` of the run
(moewatch.app.detection); the layer view counts in the detector's windows unless the user asks for raw per-step
counts. Live updates (the `tick` interval) append only the new steps through a dash `Patch` while a raw figure still
shows every step one point per step; otherwise the figure is rebuilt, at most `LINE_POINTS` points per trace.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

from dash import ALL, Dash, Input, Output, State, ctx, no_update
from dash.exceptions import PreventUpdate

from moewatch.store.manifest import problem_lines

from . import figures
from .arrays import human_bytes
from .catalog import Catalog, UnknownRun, run_href
from .detection import OK, PENDING
from .downsample import columns_for
from .layout import HIDDEN, SHOWN, alerts_panel, message, run_header, run_list
from .windows import detector_window

log = logging.getLogger("moewatch.app")

VIEW_FIGS = ("heatmap", "shares", "metrics")


class FigureMemo:
    """The last figures built, keyed by run instance + generation + view: switching back to a layer, a second
    tab, or an alert click (which only adds a marker) costs nothing. Figures here are never mutated."""

    def __init__(self, size: int = 32):
        self.size = size
        self._items: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple, build: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = build()
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return value


MEMO = FigureMemo()


# ---------------------------------------------------------------------------------------------------- routing


def route(catalog: Catalog, pathname: str | None) -> tuple[Any, ...]:
    """(runs style, run style, compare style, run id, page message) for a URL.

    A run page is /run/<the run's path under the root, URL-quoted>; the path only ever selects one of the runs found
    under the root (never a file to open), so ../ and absolute paths are just unknown runs."""
    path = (pathname or "/").rstrip("/") or "/"
    if path == "/":
        return SHOWN, HIDDEN, HIDDEN, None, None
    if path.startswith("/run/"):
        run_id = unquote(path[len("/run/"):])
        try:
            catalog.entry(run_id)
        except UnknownRun as e:
            return SHOWN, HIDDEN, HIDDEN, None, message(str(e), "warning")
        return HIDDEN, SHOWN, HIDDEN, run_id, None
    if path == "/compare":
        return HIDDEN, HIDDEN, SHOWN, None, None
    return SHOWN, HIDDEN, HIDDEN, None, message(f"no page {pathname!r}: here are the runs", "warning")


def run_list_view(catalog: Catalog, pathname: str | None, state: str | None = None, wait: float = 1.0
                  ) -> tuple[Any, Any]:
    """(run list, its key): the table is only re-sent when a row changed."""
    if (pathname or "/").rstrip("/") not in ("", "/"):
        raise PreventUpdate
    try:
        rows = catalog.summaries(wait=wait)
    except Exception as e:  # the list must render whatever one run does
        log.exception("moewatch: run list failed")
        return message(f"could not list runs under {catalog.root}: {type(e).__name__}: {e}", "error"), None
    key = json.dumps([list(map(str, rows)), catalog.scan_error])
    if key == state:
        raise PreventUpdate
    return run_list(rows, str(catalog.root), catalog.scan_error), key


# ---------------------------------------------------------------------------------------------------- run page


def header_view(catalog: Catalog, run_id: str | None, refresh_seconds: float) -> Any:
    if not run_id:
        raise PreventUpdate
    try:
        entry = catalog.entry(run_id)
        run = catalog.run(run_id)
    except UnknownRun as e:
        return message(str(e), "warning")
    except Exception as e:
        log.exception("moewatch: reading run %s failed", run_id)
        return message(f"cannot read this run: {type(e).__name__}: {e}", "error")
    det = catalog.detector.get(run)
    meta = run.meta
    with run.lock:
        layers = run.layers
        steps = run.steps
        span = f"steps {int(steps[0]):,}–{int(steps[-1]):,}" if len(steps) else "no steps yet"
        details = [f"{run.n:,} steps ({span})", str(meta.get("model_class") or "model ?"),
                   f"{len(layers)} router layers"]
        counts = sorted({layer.num_experts for layer in layers})
        if counts:
            details.append(f"{counts[0] if len(counts) == 1 else f'{counts[0]}–{counts[-1]}'} experts")
        if len(run.ranks) > 1:
            details.append(f"{len(run.ranks)} ranks summed")
        details.append(f"{human_bytes(run.nbytes)} in memory")
        notices = [("warning", s) for s in run.skipped]
        notices += [("warning", f"capture problem: {p}") for p in problem_lines(meta)]
        if run.meta_error:
            notices.append(("error", run.meta_error))
        generation = run.generation
    if det.state not in (OK, PENDING):
        notices.append(("info", det.message))
    sentence = det.sentence if det.state == OK else (det.message if det.state == PENDING else "")
    if det.state == OK and det.generation != generation:
        sentence += " (updating with the newest steps…)"
    live = f"live · refreshing every {refresh_seconds:g} s" if run.status == "running" else ""
    return run_header(entry.name, run.status, det.status, details, notices, live,
                      "/compare?runs=" + run_href(run_id)[len("/run/"):], sentence)


def default_layer(catalog: Catalog, run_id: str) -> str | None:
    """The layer that needs attention: the worst layer status once the detector has answered (its most severe
    alert's layer among equals), else the layer whose load over its recent steps is most uneven."""
    run = catalog.run(run_id)
    names = run.layer_names
    if not names:
        return None
    det = catalog.detector.get(run, wait=0.25)  # a large run's verdict comes later: do not hold the first paint
    if det.state == OK and det.analysis is not None:
        from moewatch.detect import STATUS_RANK

        first_alert = {}
        for i, a in enumerate(det.alerts):
            first_alert.setdefault(a.layer, i)
        judged = [r for r in det.analysis.layers if r.layer in names]
        if judged:
            worst = min(judged, key=lambda r: (-STATUS_RANK.get(r.status, 0), first_alert.get(r.layer, 1 << 30),
                                               names.index(r.layer)))
            return worst.layer
    with run.lock:
        if run.n == 0:
            return names[0]
        spread = run.mean_cv(max(0, run.n - 500))  # from the layers table: no layer's counts are read for this
    return max(names, key=lambda name: spread.get(name, -1.0))


def select_layer(catalog: Catalog, trigger: Any, run_id: str | None, alert_clicks: list | None,
                 click_data: dict | None, current: str | None) -> tuple[Any, Any, Any]:
    """(layer options, selected layer, onset marker) after a run is opened, an alert or an overview row clicked."""
    if not run_id:
        raise PreventUpdate
    try:
        run = catalog.run(run_id)
    except UnknownRun:
        return [], None, None
    names = run.layer_names
    options = [{"label": n, "value": n} for n in names]
    if isinstance(trigger, dict) and trigger.get("type") == "alert":
        if not any(alert_clicks or []):
            raise PreventUpdate  # the panel was re-rendered, nobody clicked
        layer, first, last, _ = json.loads(trigger["index"])
        if layer not in names:
            raise PreventUpdate
        return no_update, layer, {"layer": layer, "first": first, "last": last}
    if trigger == "overview":
        point = (click_data or {}).get("points", [{}])[0]
        layer = point.get("y")
        if layer not in names:
            raise PreventUpdate
        return no_update, layer, no_update
    # A run just opened: show the layer that needs attention (not whatever layer the previous run showed).
    return options, default_layer(catalog, run_id), None


def xrange_from_relayout(relayout: dict | None) -> Any:
    """The zoomed step range from a plotly relayout event: [lo, hi], None for autorange, no_update otherwise."""
    if not relayout:
        return no_update
    if relayout.get("xaxis.autorange"):
        return None
    if "xaxis.range[0]" in relayout and "xaxis.range[1]" in relayout:
        lo, hi = relayout["xaxis.range[0]"], relayout["xaxis.range[1]"]
    elif isinstance(relayout.get("xaxis.range"), list) and len(relayout["xaxis.range"]) == 2:
        lo, hi = relayout["xaxis.range"]
    else:
        return no_update
    try:
        lo, hi = float(lo), float(hi)
    except (TypeError, ValueError):
        return no_update
    return [min(lo, hi), max(lo, hi)]


def overview_view(catalog: Catalog, trigger: Any, run_id: str | None, marker: dict | None, width: float | None,
                  state: dict | None, wait: float = 1.0) -> tuple[Any, Any]:
    """The health strip, drawn from the detector's health frame; "checking…" until the detector has answered,
    redrawn when it answers for newer steps."""
    if not run_id:
        raise PreventUpdate
    try:
        run = catalog.run(run_id)
        det = catalog.detector.get(run, wait=0.0 if trigger == "tick" else wait)
        cols = columns_for(width)
        key = json.dumps([run_id, marker, cols, det.state, det.generation, det.seconds])
        if state and state.get("key") == key:
            raise PreventUpdate
        if det.state != OK:
            text = "checking the run for collapse…" if det.state == PENDING else det.message
            return figures.empty_figure(text, 200), {"key": key}
        names = run.layer_names
        fig, info = MEMO.get(("overview", run.instance, det.generation, det.seconds, cols),
                             lambda: figures.overview_figure(names, det.health, width,
                                                             uirevision=f"overview:{run_id}"))
        shown = fig["data"][0]["y"] if fig["data"] else []
        row = list(shown).index(marker["layer"]) if marker and marker.get("layer") in shown else None
        return figures.with_marker(fig, marker, row), {"key": key}
    except PreventUpdate:
        raise
    except UnknownRun as e:
        return figures.empty_figure(str(e)), None
    except Exception as e:
        log.exception("moewatch: overview failed for %s", run_id)
        return figures.empty_figure(f"could not draw the overview: {type(e).__name__}: {e}"), None


def _range(run, xrange: list | None) -> tuple[int, int]:
    if not xrange:
        return 0, run.n
    return run.index_range(xrange[0], xrange[1])


def _build(kind: str, run, layer: str, lo: int, hi: int, width, sort: bool, marker, explicit_x: bool | None = None,
           window: int | None = None) -> tuple[dict, Any]:
    def build() -> tuple[dict, Any]:
        if kind == "heatmap":
            return figures.heatmap_figure(run, layer, lo, hi, width, sort, explicit_x=explicit_x, window=window)
        if kind == "shares":
            return figures.shares_figure(run, layer, lo, hi, sort, window=window)
        return figures.metrics_figure(run, layer, lo, hi, window=window)

    key = (kind, run.instance, run.generation, layer, lo, hi, columns_for(width) if kind == "heatmap" else 0,
           sort and kind != "metrics", explicit_x, window)
    fig, info = MEMO.get(key, build)
    return figures.with_marker(fig, marker), info


def chart_window(catalog: Catalog, run, layer: str, raw: list | None) -> int | None:
    """The window the layer view bins by: the detector's for this layer (None: raw per-step counts, when the user
    asked for them or the detector is not installed)."""
    if raw:
        return None
    return detector_window(run, layer, catalog.detector.get(run))


def layer_view(catalog: Catalog, trigger: Any, run_id: str | None, layer: str | None, sort: list | None,
               xrange: list | None, marker: dict | None, width: float | None, state: dict | None,
               raw: list | None = None) -> tuple[Any, Any, Any, Any, Any]:
    """(heatmap, shares, metrics, view state, note) for the selected layer, zoom range, sort, marker and counting
    (the detector's windows by default; `raw` truthy: raw per-step counts)."""
    if not run_id or not layer:
        raise PreventUpdate
    sorting = bool(sort)
    try:
        run = catalog.run(run_id)
        if layer not in run.layer_names:
            msg = figures.empty_figure(f"this run has no layer {layer!r}")
            return msg, msg, msg, None, ""
        cols = columns_for(width)
        window = chart_window(catalog, run, layer, raw)
        mark = marker if marker and marker.get("layer") == layer else None
        base = json.dumps([run_id, layer, xrange, mark, cols, window])
        key = json.dumps([base, sorting])
        if trigger == "tick":
            if xrange:
                raise PreventUpdate  # a zoomed view stays still; zooming out resumes live updates
            if state and state.get("key") == key:
                return _live_update(run, layer, cols, width, sorting, mark, state, window)
        lo, hi = _range(run, xrange)
        gen = run.generation
        out, figs = {}, {}
        for kind in VIEW_FIGS:
            if trigger == "sort" and kind == "metrics" and state and state.get("base") == base \
                    and state.get("gen") == gen:
                out[kind] = no_update  # sorting experts does not change the metric panels
                figs[kind] = state["figs"][kind]
                continue
            fig, info = _build(kind, run, layer, lo, hi, width, sorting, mark, window=window)
            out[kind] = fig
            figs[kind] = {"raw": info.raw, "n": info.n, "traces": info.traces, "explicit_x": info.explicit_x}
        note = f"{hi - lo:,} steps shown" + (" (zoomed: double-click a chart to zoom out)" if xrange else "")
        state = {"key": key, "base": base, "gen": gen, "n": hi, "figs": figs}
        return out["heatmap"], out["shares"], out["metrics"], state, note
    except PreventUpdate:
        raise
    except UnknownRun as e:
        msg = figures.empty_figure(str(e))
        return msg, msg, msg, None, ""
    except Exception as e:
        log.exception("moewatch: layer view failed for %s / %s", run_id, layer)
        msg = figures.empty_figure(f"could not draw this layer: {type(e).__name__}: {e}")
        return msg, msg, msg, None, ""


def _live_update(run, layer: str, cols: int, width, sorting: bool, mark, state: dict, window: int | None
                 ) -> tuple[Any, ...]:
    """New steps on a live tick: appended (a dash Patch) to raw per-step figures that still show every step,
    else the figure is rebuilt (windowed figures always are: their last window grows)."""
    dirty = run.dirty_since(state["gen"])
    if dirty is None:
        raise PreventUpdate
    n_old, n_new = state["n"], run.n
    gen = run.generation
    out, figs = {}, {}
    for kind in VIEW_FIGS:
        prev = state["figs"][kind]
        budget = cols if kind == "heatmap" else figures.lines_budget(prev["traces"])
        # x0 + dx heatmap columns can only be appended to while the steps stay evenly spaced.
        same_x = kind != "heatmap" or figures.is_uniform(run.steps[:n_new]) != prev["explicit_x"]
        if window is None and prev["raw"] and dirty >= n_old and n_new <= budget and same_x:
            tail, info = _build(kind, run, layer, n_old, n_new, width, sorting, None, prev.get("explicit_x"))
            if info.raw and info.traces == prev["traces"]:
                out[kind] = figures.extend_patch(tail)
                figs[kind] = {**prev, "n": n_new}
                continue
        fig, info = _build(kind, run, layer, 0, n_new, width, sorting, mark, window=window)
        out[kind] = fig
        figs[kind] = {"raw": info.raw, "n": info.n, "traces": info.traces, "explicit_x": info.explicit_x}
    new_state = {**state, "gen": gen, "n": n_new, "figs": figs}
    return out["heatmap"], out["shares"], out["metrics"], new_state, f"{n_new:,} steps shown"


def alerts_view(catalog: Catalog, run_id: str | None, marker: dict | None, state: dict | None,
                wait: float = 0.5) -> tuple[Any, Any]:
    if not run_id:
        raise PreventUpdate
    try:
        run = catalog.run(run_id)
        det = catalog.detector.get(run, wait=wait)
    except UnknownRun as e:
        return message(str(e), "warning"), None
    key = json.dumps([run_id, det.state, det.generation, len(det.alerts), marker])
    if state and state.get("key") == key:
        raise PreventUpdate
    note = det.message if det.state != OK else ""
    if det.state == OK and det.generation != run.generation:
        note = "updating with the newest steps…"
    elif det.state == OK and not det.alerts and (det.health is None or len(det.health) == 0):
        # Nothing judged yet (fewer steps than half a detector window): "healthy on every layer" would overclaim.
        note = det.sentence or "No alerts yet: too few steps for the detector's first window."
    return alerts_panel(list(det.alerts), note, marker), {"key": key}


# ---------------------------------------------------------------------------------------------------- compare


def compare_runs(catalog: Catalog, trigger: Any, pathname: str | None, search: str | None) -> tuple[Any, Any]:
    """(options, selection) of the compare page's run picker; `?runs=a,team/exp%201` preselects runs by their
    quoted paths under the root (only runs found there)."""
    if (pathname or "").rstrip("/") != "/compare":
        raise PreventUpdate
    options = [{"label": e.name, "value": e.run_id} for e in catalog.entries()]
    if trigger == "tick":
        return options, no_update
    wanted = wanted_runs(search)
    known = {o["value"] for o in options}
    return options, [r for r in wanted if r in known]


def wanted_runs(search: str | None) -> list[str]:
    """The run paths of a ?runs= query: comma-separated, each URL-quoted (a comma inside a name is %2C)."""
    out: list[str] = []
    for part in (search or "").lstrip("?").split("&"):
        name, _, value = part.partition("=")
        if name == "runs":
            out.extend(unquote(v) for v in value.split(",") if v)
    return out


def compare_layers(catalog: Catalog, run_ids: list[str] | None, current: str | None) -> tuple[Any, Any]:
    ids = [r for r in (run_ids or []) if r]
    if not ids:
        return [], None
    try:
        names = catalog.run(ids[0]).layer_names
    except UnknownRun:
        return [], None
    options = [{"label": n, "value": n} for n in names]
    return options, current if current in names else (names[0] if names else None)


def compare_view(catalog: Catalog, run_ids: list[str] | None, layer: str | None, width: float | None,
                 raw: list | None = None) -> tuple[Any, Any, Any]:
    ids = [r for r in (run_ids or []) if r]
    if len(ids) < 2 or not layer:
        msg = figures.empty_figure("pick two or more runs to compare")
        return msg, msg, ""
    try:
        first = catalog.run(ids[0])
        position = first.layer_names.index(layer) if layer in first.layer_names else 0
        items, notes = [], []
        for rid in ids:
            entry = catalog.entry(rid)
            run = catalog.run(rid)
            matched = figures.match_layer(run, layer, position)
            if matched is None:
                notes.append(f"{entry.name} has no steps yet")
                continue
            if matched != layer:
                notes.append(f"{entry.name}: compared on {matched} (no layer {layer})")
            items.append((entry.name, run, matched))
        metrics, heat = figures.compare_figures(items, width, bool(raw))
        return metrics, heat, "; ".join(notes)
    except UnknownRun as e:
        msg = figures.empty_figure(str(e))
        return msg, msg, ""
    except Exception as e:
        log.exception("moewatch: compare failed")
        msg = figures.empty_figure(f"could not compare: {type(e).__name__}: {e}")
        return msg, msg, ""


# ---------------------------------------------------------------------------------------------------- wiring


def _trigger() -> Any:
    return ctx.triggered_id


def register(app: Dash, catalog: Catalog, refresh_seconds: float) -> None:
    """Wire the functions above to the layout of moewatch.app.layout."""

    @app.callback(Output("page-runs", "style"), Output("page-run", "style"), Output("page-compare", "style"),
                  Output("run-id", "data"), Output("page-message", "children"), Input("url", "pathname"))
    def _route(pathname):
        return route(catalog, pathname)

    # The plot area's width in pixels, for one heatmap column per pixel: the page (at most 1600 px wide) less its
    # padding, the axis margins and the colour bar.
    app.clientside_callback("function(p) { return Math.max(300, Math.min(window.innerWidth || 1400, 1600) - 250); }",
                            Output("width", "data"), Input("url", "pathname"))

    @app.callback(Output("run-list", "children"), Output("runs-state", "data"), Input("tick", "n_intervals"),
                  Input("url", "pathname"), State("runs-state", "data"))
    def _run_list(_n, pathname, state):
        return run_list_view(catalog, pathname, state)

    @app.callback(Output("run-header", "children"), Input("run-id", "data"), Input("tick", "n_intervals"))
    def _header(run_id, _n):
        return header_view(catalog, run_id, refresh_seconds)

    @app.callback(Output("layer", "options"), Output("layer", "value"), Output("marker", "data"),
                  Input("run-id", "data"), Input({"type": "alert", "index": ALL}, "n_clicks"),
                  Input("overview", "clickData"), State("layer", "value"))
    def _select(run_id, clicks, click_data, current):
        trigger = _trigger()
        if trigger == "overview" and click_data is None:
            raise PreventUpdate
        return select_layer(catalog, trigger, run_id, clicks, click_data, current)

    @app.callback(Output("xrange", "data"), Input("heatmap", "relayoutData"), Input("shares", "relayoutData"),
                  Input("metrics", "relayoutData"), Input("run-id", "data"), prevent_initial_call=True)
    def _xrange(r1, r2, r3, _run_id):
        trigger = _trigger()
        if trigger == "run-id":
            return None
        return xrange_from_relayout({"heatmap": r1, "shares": r2, "metrics": r3}.get(trigger))

    @app.callback(Output("overview", "figure"), Output("overview-state", "data"), Input("run-id", "data"),
                  Input("tick", "n_intervals"), Input("marker", "data"), Input("width", "data"),
                  State("overview-state", "data"))
    def _overview(run_id, _n, marker, width, state):
        return overview_view(catalog, _trigger(), run_id, marker, width, state)

    @app.callback(Output("heatmap", "figure"), Output("shares", "figure"), Output("metrics", "figure"),
                  Output("view-state", "data"), Output("layer-note", "children"),
                  Input("run-id", "data"), Input("layer", "value"), Input("sort", "value"), Input("xrange", "data"),
                  Input("marker", "data"), Input("width", "data"), Input("tick", "n_intervals"),
                  Input("raw", "value"), State("view-state", "data"))
    def _layer_view(run_id, layer, sort, xrange, marker, width, _n, raw, state):
        return layer_view(catalog, _trigger(), run_id, layer, sort, xrange, marker, width, state, raw)

    @app.callback(Output("alerts", "children"), Output("alerts-state", "data"), Input("run-id", "data"),
                  Input("tick", "n_intervals"), Input("marker", "data"), State("alerts-state", "data"))
    def _alerts(run_id, _n, marker, state):
        return alerts_view(catalog, run_id, marker, state)

    @app.callback(Output("compare-runs", "options"), Output("compare-runs", "value"), Input("url", "pathname"),
                  Input("tick", "n_intervals"), State("url", "search"))
    def _compare_runs(pathname, _n, search):
        return compare_runs(catalog, _trigger(), pathname, search)

    @app.callback(Output("compare-layer", "options"), Output("compare-layer", "value"),
                  Input("compare-runs", "value"), State("compare-layer", "value"))
    def _compare_layers(run_ids, current):
        return compare_layers(catalog, run_ids, current)

    @app.callback(Output("compare-metrics", "figure"), Output("compare-heatmaps", "figure"),
                  Output("compare-note", "children"), Input("compare-runs", "value"),
                  Input("compare-layer", "value"), Input("width", "data"), Input("compare-raw", "value"))
    def _compare(run_ids, layer, width, raw):
        return compare_view(catalog, run_ids, layer, width, raw)

