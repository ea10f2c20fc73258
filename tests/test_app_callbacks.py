"""Dashboard callbacks called directly: routing by run path, the run list and its charts, the verdict, layer
selection, the health strip from the detector's health frame, windowed and raw charts, live updates, compare, and the
messages shown for unknown, empty or broken input."""

from __future__ import annotations

import importlib
import json
import sys

import numpy as np
import pandas as pd
import pytest
from dash import Patch, no_update
from dash.exceptions import PreventUpdate
from moewatch.app import callbacks as cb
from moewatch.app import create_app, figures
from moewatch.app.catalog import Catalog
from moewatch.app.data import RunData
from moewatch.app.detection import Detection
from moewatch.app.downsample import LINE_POINTS
from plotly.io.json import to_json_plotly

from moewatch.detect import DetectorConfig, LayerThresholds
from tests.test_app_data import SAMPLES, random_counts, synthetic_collapse, write_manifest, write_part


def text_of(component) -> str:
    """All text in a dash component tree (what the user reads)."""
    if component is None or component is no_update:
        return ""
    if isinstance(component, (str, int, float)):
        return str(component)
    if isinstance(component, (list, tuple)):
        return " ".join(text_of(c) for c in component)
    return text_of(getattr(component, "children", None))


def walk(component):
    """Every component in a dash component tree."""
    if isinstance(component, (list, tuple)):
        for c in component:
            yield from walk(c)
    elif component is not None and hasattr(component, "to_plotly_json"):
        yield component
        yield from walk(getattr(component, "children", None))


def ops(patch: Patch) -> list[dict]:
    return patch.to_plotly_json()["operations"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    synthetic_collapse(root, 1800, "collapse")
    synthetic_collapse(root, 1800, "healthy", shape="healthy", label="healthy")
    return root


@pytest.fixture(scope="module")
def catalog(root):
    return Catalog(root, background=False, min_refresh_seconds=0)


def rid(catalog: Catalog, name: str) -> str:
    return next(e.run_id for e in catalog.entries() if e.name == name)


def live_run(tmp_path, steps: int = 30):
    run = tmp_path / "live"
    write_manifest(run, ["l0", "l1"], 4, status="running")
    write_part(run, {"l0": random_counts(np.random.default_rng(0), steps, 4),
                     "l1": random_counts(np.random.default_rng(1), steps, 4)}, np.arange(steps), n=0)
    return run


def append(run, lo: int, hi: int, n: int) -> None:
    rng = np.random.default_rng(n)
    write_part(run, {"l0": random_counts(rng, hi - lo, 4), "l1": random_counts(rng, hi - lo, 4)},
               np.arange(lo, hi), n=n)


# ---------------------------------------------------------------------------------------------------- routing + list


def test_route_maps_run_paths_to_views_and_rejects_anything_else(catalog):
    shown, hidden = {}, {"display": "none"}
    r = cb.route(catalog, "/")
    assert r[:4] == (shown, hidden, hidden, None)
    r = cb.route(catalog, "/run/collapse")
    assert r[1] == shown and r[3] == "collapse" and r[4] is None
    for bad in ("/run/../../etc/passwd", "/run/%2E%2E/collapse", f"/run/{catalog.root}", f"/run/{catalog.root.name}",
                "/run/0000000000", "/run/collapse/layers"):
        r = cb.route(catalog, bad)
        assert r[0] == shown and r[3] is None and "unknown run" in text_of(r[4]), bad
    assert cb.route(catalog, "/compare")[2] == shown
    assert "no page" in text_of(cb.route(catalog, "/nope")[4])


def test_nested_run_paths_are_quoted_in_urls(tmp_path):
    for name in ("team/exp 1", "team/a,b#2"):
        write_manifest(tmp_path / name, ["l0"], 4)
        write_part(tmp_path / name, {"l0": random_counts(np.random.default_rng(0), 30, 4)}, np.arange(30))
    cat = Catalog(tmp_path, background=False)
    table, _ = cb.run_list_view(cat, "/")
    hrefs = [c.href for c in walk(table) if getattr(c, "className", "") == "run-link"]
    assert hrefs == ["/run/team/a%2Cb%232", "/run/team/exp%201"]
    for href, name in zip(hrefs, ("team/a,b#2", "team/exp 1"), strict=True):
        assert cb.route(cat, href)[3] == name
    assert "team/exp 1" in text_of(cb.header_view(cat, "team/exp 1", 5))
    compare = [c.href for c in walk(cb.header_view(cat, "team/a,b#2", 5)) if getattr(c, "className", "") ==
               "compare-link"]
    assert compare == ["/compare?runs=team/a%2Cb%232"]
    _, value = cb.compare_runs(cat, "url", "/compare", "?runs=team/a%2Cb%232,team/exp%201")
    assert value == ["team/a,b#2", "team/exp 1"]


def test_compare_link_preselects_only_runs_found_under_the_root(catalog):
    options, value = cb.compare_runs(catalog, "url", "/compare", "?runs=collapse,healthy,bogus,../x,%2Fetc")
    assert {o["label"] for o in options} == {"collapse", "healthy"} and value == ["collapse", "healthy"]
    _, value = cb.compare_runs(catalog, "tick", "/compare", "?runs=collapse")
    assert value is no_update  # a live tick never overrides the user's picks
    with pytest.raises(PreventUpdate):
        cb.compare_runs(catalog, "url", "/", "")


def test_run_list_shows_each_run_with_status_verdict_sentence_and_a_chart(catalog):
    table, key = cb.run_list_view(catalog, "/")
    text = text_of(table)
    for expected in ("collapse", "healthy", "finished", "collapsed", "COLLAPSED: ", "HEALTHY: no warning on any of 3 "
                     "layers", "1,800", "SyntheticMoE", "8 × 3"):
        assert expected in text
    charts = [c for c in walk(table) if getattr(c, "className", "") == "run-chart"]
    assert len(charts) == 2
    for chart in charts:
        bars = chart.figure["data"][0]
        assert bars["type"] == "bar" and len(bars["x"]) == len(bars["y"]) == len(bars["marker"]["color"]) > 10
        to_json_plotly(chart.figure)
    colours = {tuple(c.figure["data"][0]["marker"]["color"][-3:]) for c in charts}
    assert (figures.LEVEL_COLOURS[3],) * 3 in colours and (figures.LEVEL_COLOURS[0],) * 3 in colours
    with pytest.raises(PreventUpdate):  # nothing changed: the table is not re-sent
        cb.run_list_view(catalog, "/", key)
    with pytest.raises(PreventUpdate):  # another page is shown
        cb.run_list_view(catalog, "/compare")


def test_empty_folder_says_no_runs_found(tmp_path):
    out, _ = cb.run_list_view(Catalog(tmp_path, background=False), "/")
    assert "No runs found under" in text_of(out) and str(tmp_path) in text_of(out)


def test_broken_manifest_is_listed_with_its_problem(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "run.json").write_text("{not json")
    out, _ = cb.run_list_view(Catalog(tmp_path, background=False), "/")
    assert "bad" in text_of(out) and "unreadable run.json" in text_of(out)


# ---------------------------------------------------------------------------------------------------- run page


def test_header_says_the_verdict_and_default_layer_points_at_the_collapse(catalog):
    run_id = rid(catalog, "collapse")
    det = catalog.detector.get(catalog.run(run_id), wait=30)
    header = cb.header_view(catalog, run_id, 5)
    text = text_of(header)
    assert "collapse" in text and "1,800 steps" in text and "collapsed" in text and "SyntheticMoE" in text
    assert det.sentence.startswith("COLLAPSED: ") and det.sentence in text  # the report's verdict sentence
    assert [c.className for c in walk(header) if "badge" in str(getattr(c, "className", ""))][-1] == \
        "badge verdict-collapsed"
    options, value, marker = cb.select_layer(catalog, "run-id", run_id, [], None, None)
    assert [o["value"] for o in options] == catalog.run(run_id).layer_names
    assert value == "model.layers.0.mlp.gate" and marker is None  # the layer whose status is worst
    healthy = text_of(cb.header_view(catalog, rid(catalog, "healthy"), 5))
    assert "HEALTHY: no warning on any of 3 layers." in healthy


def test_default_layer_before_the_detector_answers_is_the_most_uneven_one(catalog, monkeypatch):
    run_id = rid(catalog, "collapse")
    monkeypatch.setattr(catalog.detector, "get", lambda run, wait=0.0: Detection("pending"))
    assert cb.default_layer(catalog, run_id) == "model.layers.0.mlp.gate"
    fig, _ = cb.overview_view(catalog, "run-id", run_id, None, 1200, None)
    assert "checking" in fig["layout"]["annotations"][0]["text"] and not fig["data"]
    heat, *_ = cb.layer_view(catalog, "layer", run_id, "model.layers.1.mlp.gate", [], None, None, 1200, None)
    assert "windows of 20 steps" in heat["layout"]["annotations"][0]["text"]  # the charts do not wait for it


def test_clicking_an_alert_selects_its_layer_and_marks_its_onset(catalog):
    run_id = rid(catalog, "collapse")
    panel, _ = cb.alerts_view(catalog, run_id, None, None)
    buttons = [c for c in panel if getattr(c, "id", None)]
    assert buttons and "critical" in text_of(buttons[0]) and "Lever" in text_of(buttons[0])
    severities = [b.className.split()[1] for b in buttons]
    assert severities == sorted(severities, key=["alert-critical", "alert-warning", "alert-info"].index)
    target = buttons[0].id
    layer, first, last, _ = json.loads(target["index"])
    _, value, marker = cb.select_layer(catalog, target, run_id, [1], None, "model.layers.2.mlp.gate")
    assert value == layer and marker == {"layer": layer, "first": first, "last": last}
    with pytest.raises(PreventUpdate):  # the panel re-rendered with fresh buttons: no click happened
        cb.select_layer(catalog, target, run_id, [0, 0], None, "model.layers.2.mlp.gate")
    heat, shares, metrics, _, _ = cb.layer_view(catalog, "marker", run_id, layer, [], None, marker, 1200, None)
    for fig in (heat, shares, metrics):
        onset = [s for s in fig["layout"]["shapes"] if s.get("name") == "onset"]
        assert onset and onset[0]["x0"] == first
    panel, _ = cb.alerts_view(catalog, run_id, marker, None)
    assert "selected" in panel[0].className


def test_overview_click_selects_a_layer(catalog):
    run_id = rid(catalog, "collapse")
    click = {"points": [{"x": 100, "y": "model.layers.1.mlp.gate", "z": 0.2}]}
    _, value, marker = cb.select_layer(catalog, "overview", run_id, [], click, "model.layers.0.mlp.gate")
    assert value == "model.layers.1.mlp.gate" and marker is no_update


def test_overview_strip_is_the_detectors_health_window_by_window(catalog):
    run_id = rid(catalog, "collapse")
    det = catalog.detector.get(catalog.run(run_id), wait=30)
    h = det.health
    fig, state = cb.overview_view(catalog, "run-id", run_id, None, 1200, None)
    trace = fig["data"][0]
    z = np.asarray(trace["z"], dtype=float)
    names = catalog.run(run_id).layer_names
    assert trace["y"] == names and z.shape == (3, 90)  # 1800 steps in windows of 20: one column per window
    for i, name in enumerate(names):
        rows = h[h["layer"] == name]
        expected = rows["level"].to_numpy() + (rows["status"] == "collapsed").to_numpy()
        np.testing.assert_array_equal(z[i], expected)  # exactly the detector's level, collapsed apart
    assert z[0, -1] == 3 and (z[1:, -1] == 0).all()  # layer 0 collapsed at its end, the others healthy
    custom = np.asarray(trace["customdata"], dtype=float)
    np.testing.assert_allclose(custom[0, :, 0], h[h["layer"] == names[0]]["start_step"])  # hover: window steps
    np.testing.assert_allclose(custom[0, :, 2], h[h["layer"] == names[0]]["cv"], atol=0.005)  # as the hover rounds
    kinds = h[h["layer"] == names[0]]["kinds"].iloc[-1]
    assert kinds and trace["text"][0][-1] == "collapsed: " + kinds.replace("_", " ").replace(",", ", ")
    assert trace["text"][1][0].endswith("(warm-up)")
    band = [s for s in fig["layout"]["shapes"] if s.get("name") == "warm-up"]
    warm = int(h[h["warmup"]]["end_step"].max())
    assert len(band) == 1 and band[0]["x0"] < 0 < warm < band[0]["x1"] < warm + 20
    assert any(a["text"] == "warm-up" for a in fig["layout"]["annotations"])
    to_json_plotly(fig)
    with pytest.raises(PreventUpdate):  # a tick with nothing new sends nothing
        cb.overview_view(catalog, "tick", run_id, None, 1200, state)


def test_overview_merges_windows_past_the_width_by_their_worst(catalog):
    run_id = rid(catalog, "collapse")
    full, _ = cb.overview_view(catalog, "run-id", run_id, None, 1200, None)
    z = np.asarray(full["data"][0]["z"], dtype=float)
    narrow, _ = cb.overview_view(catalog, "run-id", run_id, None, 10, None)  # 50 columns for 90 windows
    zn = np.asarray(narrow["data"][0]["z"], dtype=float)
    assert zn.shape == (3, 45)  # two whole windows per column
    np.testing.assert_array_equal(zn, np.maximum(z[:, 0::2], z[:, 1::2]))  # never hides the worse window
    assert "2 windows per column" in narrow["layout"]["annotations"][-1]["text"]


def test_strip_of_layers_with_different_windows_keeps_every_critical_window():
    rows = [("a", 20 * i, 20 * i + 19, 2 if i == 3 else 0, "critical" if i == 3 else "healthy",
             "drops" if i == 3 else "", i < 5) for i in range(10)]
    rows += [("b", 40 * i, 40 * i + 39, 2 if i == 4 else 0, "collapsed" if i == 4 else "healthy",
              "imbalance" if i == 4 else "", i < 2) for i in range(5)]
    h = pd.DataFrame(rows, columns=["layer", "start_step", "end_step", "level", "status", "kinds", "warmup"])
    for signal in ("cv", "max_share", "dead", "entropy_norm", "drop_rate"):
        h[signal] = 0.1
    fig, _ = figures.overview_figure(["b", "a"], h, 1200)
    z = np.asarray(fig["data"][0]["z"], dtype=float)
    assert fig["data"][0]["y"] == ["b", "a"] and z.shape == (2, 10)  # 200 steps in 10 even step columns
    assert z[1].tolist() == [0, 0, 0, 2, 0, 0, 0, 0, 0, 0]  # layer a's critical window (steps 60-79)
    assert z[0].tolist() == [0] * 8 + [3, 3]  # layer b's collapsed window (steps 160-199) spans two columns
    assert "layers' windows differ" in fig["layout"]["annotations"][-1]["text"]


def test_sample_runs_reported_healthy_show_no_critical_cell_after_warm_up():
    root = SAMPLES if SAMPLES.is_dir() else pytest.skip("sample_runs/ is not in this checkout")
    cat = Catalog(root, background=False)
    warm = DetectorConfig().warmup_steps
    for name in ("aux-loss", "z-loss+aux", "collapse", "capacity-1.0"):
        det = cat.detector.get(cat.run(name), wait=30)
        fig, _ = cb.overview_view(cat, "run-id", name, None, 1200, None)
        z = np.asarray(fig["data"][0]["z"], dtype=float)
        first = np.asarray(fig["data"][0]["customdata"], dtype=float)[0, :, 0]
        after = z[:, first >= warm]
        if name in ("aux-loss", "z-loss+aux"):
            assert det.status == "healthy" and (after == 0).all(), name  # calm: green everywhere past warm-up
        elif name == "collapse":
            assert det.status == "collapsed" and (z[:, -1] == 3).all()  # collapsed on both layers at the end
        else:
            assert det.status == "critical" and (z[:, -1] == 2).all()  # drops: critical, not a collapse
        heat, shares, metrics, _, _ = cb.layer_view(cat, "layer", name, cat.run(name).layer_names[0], [], None,
                                                    None, 1200, None)
        ratio = np.asarray(heat["data"][0]["customdata"], dtype=float)  # [experts, windows]
        assert ratio.shape == (16, 20)
        if name == "aux-loss":
            late = ratio[:, 5:]  # windows past the warm-up
            assert ((late >= 0.5) & (late <= 2)).mean() >= 0.95 and (late < 0.25).mean() < 0.01
        if name == "collapse":
            assert (ratio[:, -1] < 0.1).sum() >= 8 and ratio[:, -1].max() > 5  # starved experts, one dominant


def test_the_detectors_answer_replaces_checking_and_errors_are_said(catalog, monkeypatch):
    run_id = rid(catalog, "healthy")
    monkeypatch.setattr(catalog.detector, "get", lambda run, wait=0.0: Detection(
        "error", message="collapse detection failed on this run: ValueError: boom", generation=1))
    fig, state = cb.overview_view(catalog, "run-id", run_id, None, 1200, None)
    assert "ValueError: boom" in fig["layout"]["annotations"][0]["text"]
    assert "ValueError: boom" in text_of(cb.header_view(catalog, run_id, 5))
    monkeypatch.undo()
    fig, _ = cb.overview_view(catalog, "tick", run_id, None, 1200, state)  # the answer arrives on a tick
    assert fig["data"] and np.nanmax(np.asarray(fig["data"][0]["z"], dtype=float)) == 0


def test_layer_view_defaults_to_the_detectors_windows_with_raw_counts_one_toggle_away(catalog):
    run_id = rid(catalog, "collapse")
    layer = "model.layers.0.mlp.gate"
    heat, shares, metrics, state, note = cb.layer_view(catalog, "layer", run_id, layer, [], None, None, 3000, None)
    z = np.asarray(heat["data"][0]["z"], dtype=float)
    ratio = np.asarray(heat["data"][0]["customdata"], dtype=float)
    tokens = catalog.run(run_id).tokens(layer).reshape(90, 20, 8).sum(axis=1)
    assert z.shape == (8, 90) and not state["figs"]["heatmap"]["raw"]  # one column per window of 20 steps
    np.testing.assert_allclose(ratio, (tokens * 8 / tokens.sum(axis=1, keepdims=True)).T, atol=1e-3)
    assert figures.heatmap_x(heat["data"][0]).tolist() == [20 * i + 9.5 for i in range(90)]  # window centres
    assert len(shares["data"]) == 8 and len(shares["data"][0]["x"]) == 90
    assert shares["layout"]["shapes"][0]["y0"] == pytest.approx(1 / 8)
    for fig in (heat, shares, metrics):
        assert "windows of 20 steps, as the detector judges" in fig["layout"]["annotations"][-1]["text"]
        to_json_plotly(fig)
    det = catalog.detector.get(catalog.run(run_id), wait=30)
    cv = det.layer(layer).series["cv"]
    np.testing.assert_allclose(np.asarray(metrics["data"][0]["y"], dtype=float), cv, rtol=1e-4, atol=1e-5)
    titles = " ".join(a["text"] for a in metrics["layout"]["annotations"])
    for t in ("load CV per window (sampling noise removed", "entropy", "drop rate", "z-loss", "max |router logit|",
              "aux loss"):
        assert t in titles
    lines = {(s["yref"], s["y0"]) for s in metrics["layout"]["shapes"] if s.get("xref") == "x domain"}
    th = LayerThresholds.resolve(DetectorConfig(), 8, 2)
    assert {("y", th.cv_warning), ("y", th.cv_critical)} <= lines  # the detector's thresholds for this layer
    assert "1,800 steps shown" in note

    heat, shares, metrics, state, _ = cb.layer_view(catalog, "raw", run_id, layer, [], None, None, 3000, state,
                                                    ["raw"])
    z = np.asarray(heat["data"][0]["z"], dtype=float)
    assert z.shape == (8, 1800) and state["figs"]["heatmap"]["raw"]  # 1800 steps fit 2000 columns: one per step
    ratio = np.asarray(heat["data"][0]["customdata"], dtype=float)
    np.testing.assert_allclose(np.nanmean(ratio[:, -100:], axis=0), 1.0, rtol=1e-3)  # shares of fair average 1
    assert len(shares["data"][0]["x"]) == 1800
    for fig in (heat, shares):
        assert "raw per-step counts: sampling noise included" in fig["layout"]["annotations"][-1]["text"]
    assert "raw per-step values" in metrics["layout"]["annotations"][-1]["text"]
    assert not [s for s in metrics["layout"]["shapes"] if s.get("yref") == "y"]  # no CV thresholds on raw CV


def test_sorting_puts_the_busiest_expert_first(catalog):
    run_id = rid(catalog, "collapse")
    layer = "model.layers.0.mlp.gate"
    heat, shares, metrics, state, _ = cb.layer_view(catalog, "layer", run_id, layer, [], None, None, 1200, None)
    heat2, shares2, metrics2, _, _ = cb.layer_view(catalog, "sort", run_id, layer, ["sort"], None, None, 1200, state)
    tokens = catalog.run(run_id).tokens(layer).sum(axis=0)
    assert heat2["data"][0]["y"][0] == f"e{int(np.argmax(tokens))}"
    assert shares2["data"][0]["name"] == f"e{int(np.argmax(tokens))}"
    assert metrics2 is no_update  # sorting experts leaves the metric panels alone


def test_zoom_rebins_the_range_and_autorange_resets(catalog):
    run_id = rid(catalog, "collapse")
    layer = "model.layers.0.mlp.gate"
    xr = cb.xrange_from_relayout({"xaxis.range[0]": 600.4, "xaxis.range[1]": 700})
    assert xr == [600.4, 700]
    assert cb.xrange_from_relayout({"xaxis.range": [9, 3]}) == [3, 9]
    assert cb.xrange_from_relayout({"xaxis.autorange": True}) is None
    assert cb.xrange_from_relayout({"autosize": True}) is no_update
    assert cb.xrange_from_relayout({"yaxis.range[0]": 1, "yaxis.range[1]": 2}) is no_update
    heat, shares, metrics, _, note = cb.layer_view(catalog, "xrange", run_id, layer, [], xr, None, 1200, None,
                                                   ["raw"])
    x = figures.heatmap_x(heat["data"][0])
    assert x.min() == 601 and x.max() == 700 and len(x) == 100 and "zoomed" in note
    assert np.asarray(metrics["data"][0]["x"]).min() == 601
    heat, *_ = cb.layer_view(catalog, "xrange", run_id, layer, [], xr, None, 1200, None)
    x = figures.heatmap_x(heat["data"][0])  # windowed: the windows the range touches, whole
    assert x.tolist() == [609.5 + 20 * i for i in range(6)]  # steps 601-700: windows 600-619 .. 700-719
    with pytest.raises(PreventUpdate):  # a zoomed view stays still on live ticks
        cb.layer_view(catalog, "tick", run_id, layer, [], xr, None, 1200, None)


def test_long_runs_are_binned_and_downsampled_and_say_so(tmp_path):
    run = tmp_path / "long"
    write_manifest(run, ["l0"], 4)
    rng = np.random.default_rng(0)
    counts = random_counts(rng, 9000, 4)
    counts[4321] = [0, 0, 0, 256]  # a one-step spike
    write_part(run, {"l0": counts}, np.arange(9000))
    cat = Catalog(tmp_path, background=False)
    run_id = cat.entries()[0].run_id
    heat, shares, metrics, state, _ = cb.layer_view(cat, "layer", run_id, "l0", [], None, None, 900, None, ["raw"])
    assert np.asarray(heat["data"][0]["z"]).shape == (4, 900)
    assert "binned: 9,000 steps in 900 columns" in heat["layout"]["annotations"][0]["text"]
    for fig in (shares, metrics):
        assert all(len(t["x"]) <= LINE_POINTS for t in fig["data"])
        assert any("downsampled" in a["text"] for a in fig["layout"]["annotations"])
    y3 = np.asarray(shares["data"][3]["y"], dtype=float)
    assert y3.max() == 1.0  # the spike survived downsampling
    assert not any(state["figs"][k]["raw"] for k in ("heatmap", "shares", "metrics"))
    heat, *_ = cb.layer_view(cat, "layer", run_id, "l0", [], None, None, 300, None)  # 450 windows, 300 columns
    assert np.asarray(heat["data"][0]["z"]).shape == (4, 225)  # never more columns than pixels
    assert "2 windows (40 steps) per column" in heat["layout"]["annotations"][0]["text"]


# ---------------------------------------------------------------------------------------------------- live


def test_live_tick_appends_new_steps_with_patch_to_raw_counts(tmp_path):
    run = live_run(tmp_path)
    cat = Catalog(tmp_path, background=False, min_refresh_seconds=0)
    run_id = cat.entries()[0].run_id
    raw = ["raw"]
    heat, shares, metrics, state, _ = cb.layer_view(cat, "raw", run_id, "l0", [], None, None, 1200, None, raw)
    with pytest.raises(PreventUpdate):  # no new part: nothing is sent
        cb.layer_view(cat, "tick", run_id, "l0", [], None, None, 1200, state, raw)
    append(run, 30, 37, 1)
    heat2, shares2, metrics2, state2, _ = cb.layer_view(cat, "tick", run_id, "l0", [], None, None, 1200, state, raw)
    assert all(isinstance(p, Patch) for p in (heat2, shares2, metrics2))
    heat_ops = ops(heat2)
    assert all(op["operation"] == "Extend" for op in heat_ops)
    assert not [op for op in heat_ops if op["location"][2] == "x"]  # evenly spaced steps: x0 + dx, no x array
    z_ops = [op for op in heat_ops if op["location"][2] == "z"]
    assert len(z_ops) == 4 and all(len(op["params"]["value"]) == 7 for op in z_ops)  # 7 new columns per expert
    tok = cat.run(run_id).tokens("l0")[30:37]
    np.testing.assert_allclose(z_ops[0]["params"]["value"], np.log2(tok[:, 0] * 4 / tok.sum(axis=1)), atol=1e-3)
    share_x = [op for op in ops(shares2) if op["location"][-1] == "x"]
    assert len(share_x) == 4 and share_x[0]["params"]["value"] == list(range(30, 37))
    expected = cat.run(run_id).tokens("l0")[30:37]
    got = [op["params"]["value"] for op in ops(shares2) if op["location"][-1] == "y"][0]
    np.testing.assert_allclose(got, expected[:, 0] / expected.sum(axis=1), rtol=1e-4)
    assert state2["n"] == 37
    # JSON as dash sends it
    json.loads(to_json_plotly(heat2))


def test_live_tick_rebuilds_windowed_charts_and_the_strip_with_the_newest_windows(tmp_path):
    run = live_run(tmp_path)
    cat = Catalog(tmp_path, background=False, min_refresh_seconds=0)
    cat.detector.min_interval = cat.detector.slow_factor = 0  # re-judge at once (the server waits 2 s at least)
    run_id = cat.entries()[0].run_id
    heat, shares, metrics, state, _ = cb.layer_view(cat, "layer", run_id, "l0", [], None, None, 1200, None)
    assert figures.heatmap_x(heat["data"][0]).tolist() == [9.5, 24.5]  # windows of 20: steps 0-19 and 20-29
    ov, ov_state = cb.overview_view(cat, "run-id", run_id, None, 1200, None)
    assert np.asarray(ov["data"][0]["customdata"])[0, :, 1].tolist() == [19, 29]
    with pytest.raises(PreventUpdate):
        cb.layer_view(cat, "tick", run_id, "l0", [], None, None, 1200, state)
    append(run, 30, 55, 1)
    heat2, shares2, metrics2, state2, _ = cb.layer_view(cat, "tick", run_id, "l0", [], None, None, 1200, state)
    assert all(isinstance(f, dict) for f in (heat2, shares2, metrics2))  # the last window grew: rebuilt
    np.testing.assert_allclose(figures.heatmap_x(heat2["data"][0]), [9.5, 29.5, 47.0], atol=20 / 4)
    tok = cat.run(run_id).tokens("l0")[40:55].sum(axis=0)
    np.testing.assert_allclose(np.asarray(heat2["data"][0]["customdata"], dtype=float)[:, -1],
                               tok * 4 / tok.sum(), rtol=1e-3)
    ov2, _ = cb.overview_view(cat, "tick", run_id, None, 1200, ov_state)
    assert np.asarray(ov2["data"][0]["customdata"])[0, :, 1].tolist() == [19, 39, 54]


def test_live_heatmap_with_uneven_steps_appends_its_x(tmp_path):
    run = tmp_path / "live"
    write_manifest(run, ["l0"], 4, status="running")
    write_part(run, {"l0": random_counts(np.random.default_rng(0), 3, 4)}, np.array([0, 1, 5]), n=0)
    cat = Catalog(tmp_path, background=False, min_refresh_seconds=0)
    run_id = cat.entries()[0].run_id
    heat, *_, state, _ = cb.layer_view(cat, "layer", run_id, "l0", [], None, None, 1200, None, ["raw"])
    assert heat["data"][0]["x"].tolist() == [0, 1, 5]
    write_part(run, {"l0": random_counts(np.random.default_rng(1), 2, 4)}, np.array([6, 9]), n=1)
    heat2, *_ = cb.layer_view(cat, "tick", run_id, "l0", [], None, None, 1200, state, ["raw"])
    x_ops = [op for op in ops(heat2) if op["location"][-1] == "x"]
    assert x_ops[0]["params"]["value"] == [6, 9]


def test_live_tick_rebuilds_when_the_budget_is_exceeded_or_history_changed(tmp_path):
    run = live_run(tmp_path, steps=1990)
    cat = Catalog(tmp_path, background=False, min_refresh_seconds=0)
    run_id = cat.entries()[0].run_id
    *_, state, _ = cb.layer_view(cat, "layer", run_id, "l0", [], None, None, 1200, None, ["raw"])
    assert not state["figs"]["heatmap"]["raw"] and state["figs"]["shares"]["raw"]
    append(run, 1990, 2020, 1)  # the lines now exceed LINE_POINTS: rebuilt downsampled, not appended
    heat, shares, metrics, state, _ = cb.layer_view(cat, "tick", run_id, "l0", [], None, None, 1200, state, ["raw"])
    assert isinstance(shares, dict) and len(shares["data"][0]["x"]) <= LINE_POINTS
    assert isinstance(heat, dict)
    # A resumed run re-writes old steps: the figures are rebuilt, never appended to.
    write_part(run, {"l0": random_counts(np.random.default_rng(9), 10, 4),
                     "l1": random_counts(np.random.default_rng(8), 10, 4)}, np.arange(100, 110), session=2)
    heat, shares, metrics, state, _ = cb.layer_view(cat, "tick", run_id, "l0", [], None, None, 1200, state, ["raw"])
    assert all(isinstance(f, dict) for f in (heat, shares, metrics))


def test_a_new_run_appearing_under_the_root_is_listed(tmp_path):
    cat = Catalog(tmp_path, background=False, rescan_seconds=0)
    assert "No runs found" in text_of(cb.run_list_view(cat, "/")[0])
    live_run(tmp_path)
    assert "live" in text_of(cb.run_list_view(cat, "/")[0])


# ---------------------------------------------------------------------------------------------------- compare


def test_compare_overlays_runs_and_shares_one_colour_scale(catalog):
    a, b = rid(catalog, "collapse"), rid(catalog, "healthy")
    options, value = cb.compare_layers(catalog, [a, b], None)
    assert value == "model.layers.0.mlp.gate" and len(options) == 3
    metrics, heat, note = cb.compare_view(catalog, [a, b], value, 1200)
    names = {t["name"] for t in metrics["data"]}
    assert names == {"collapse", "healthy"} and len(metrics["data"]) == 2 * len(figures.COMPARE_ROWS)
    assert [t["coloraxis"] for t in heat["data"]] == ["coloraxis", "coloraxis"]
    assert heat["layout"]["coloraxis"]["cmin"] == -3 and heat["layout"]["coloraxis"]["cmax"] == 3
    assert heat["layout"]["xaxis"]["domain"][1] < heat["layout"]["xaxis2"]["domain"][0]  # side by side
    # Both runs in their detector windows: CV with sampling noise removed, as the alerts read it.
    cv = {t["name"]: np.asarray(t["y"], dtype=float) for t in metrics["data"] if t["yaxis"] == "y"}
    for name in ("collapse", "healthy"):
        det = catalog.detector.get(catalog.run(name), wait=30)
        np.testing.assert_allclose(cv[name], det.layer(value).series["cv"], rtol=1e-4, atol=1e-5)
    assert [np.asarray(t["z"]).shape for t in heat["data"]] == [(8, 90), (8, 90)]
    assert "windows of 20 steps" in metrics["layout"]["annotations"][-1]["text"]
    metrics, heat, _ = cb.compare_view(catalog, [a, b], value, 1200, ["raw"])
    assert [len(t["x"]) for t in metrics["data"][:1]] == [1800]
    assert "raw" in metrics["layout"]["annotations"][-1]["text"]
    one, _, _ = cb.compare_view(catalog, [a], value, 1200)
    assert "two or more" in one["layout"]["annotations"][0]["text"]


# ---------------------------------------------------------------------------------------------------- bad input


def test_unknown_or_vanished_runs_give_messages_not_errors(tmp_path):
    run = live_run(tmp_path)
    cat = Catalog(tmp_path, background=False, rescan_seconds=0)
    assert "unknown run" in text_of(cb.header_view(cat, "nope", 5))
    fig, _ = cb.overview_view(cat, "run-id", "nope", None, 1200, None)
    assert "unknown run" in fig["layout"]["annotations"][0]["text"]
    heat, *_ = cb.layer_view(cat, "layer", "nope", "l0", [], None, None, 1200, None)
    assert "unknown run" in heat["layout"]["annotations"][0]["text"]
    run_id = cat.entries()[0].run_id
    heat, *_ = cb.layer_view(cat, "layer", run_id, "no.such.layer", [], None, None, 1200, None)
    assert "no layer" in heat["layout"]["annotations"][0]["text"]
    import shutil

    shutil.rmtree(run)
    assert "unknown run" in text_of(cb.alerts_view(cat, run_id, None, None)[0])


def test_corrupt_part_is_shown_on_the_run_page(tmp_path):
    run = live_run(tmp_path)
    (run / "layers" / "r0000-s0001-00000009.parquet").write_bytes(b"junk")
    cat = Catalog(tmp_path, background=False)
    with pytest.warns(RuntimeWarning):
        header = text_of(cb.header_view(cat, cat.entries()[0].run_id, 5))
    assert "skipped corrupt part file layers/r0000-s0001-00000009.parquet" in header
    assert "live · refreshing every 5 s" in header


def test_create_app_checks_its_root_and_keeps_debug_off(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        create_app(tmp_path / "missing")
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError):
        create_app(tmp_path / "f")
    app = create_app(tmp_path, refresh_seconds=2)
    assert app.server.debug is False
    client = app.server.test_client()
    assert client.get("/").status_code == 200
    layout = client.get("/_dash-layout").get_json()
    assert "tick" in json.dumps(layout) and '"interval": 2000' in json.dumps(layout)


def test_wsgi_server_reads_its_root_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("MOEWATCH_ROOT", raising=False)
    monkeypatch.delitem(sys.modules, "moewatch.app.wsgi", raising=False)
    with pytest.raises(RuntimeError, match="MOEWATCH_ROOT is not set"):
        importlib.import_module("moewatch.app.wsgi")
    monkeypatch.setenv("MOEWATCH_ROOT", str(tmp_path))
    monkeypatch.setenv("MOEWATCH_REFRESH", "3")
    try:
        wsgi = importlib.import_module("moewatch.app.wsgi")
        assert wsgi.server is wsgi.app.server and wsgi.server.test_client().get("/").status_code == 200
        assert wsgi.app.moewatch_catalog.root == tmp_path.resolve()
    finally:
        sys.modules.pop("moewatch.app.wsgi", None)


def test_a_cache_built_from_one_more_part_equals_a_fresh_one(tmp_path):
    run = live_run(tmp_path)
    a = RunData(run)
    a.refresh()
    append(run, 30, 40, 1)
    a.refresh()
    b = RunData(run)
    b.refresh()
    np.testing.assert_array_equal(a.tokens("l1"), b.tokens("l1"))
    np.testing.assert_array_equal(a.series("l1")["cv"], b.series("l1")["cv"])


def test_a_run_too_short_for_a_detector_window_is_not_called_healthy_on_every_layer(tmp_path):
    """Three steps: no detector window yet. The alerts panel and the header say nothing was judged yet instead of
    "the detector finds routing healthy on every layer"."""
    run = tmp_path / "short"
    write_manifest(run, ["l0"], 4)
    write_part(run, {"l0": random_counts(np.random.default_rng(0), 3, 4)}, np.arange(3), n=0)
    cat = Catalog(tmp_path, background=False, min_refresh_seconds=0)
    run_id = cat.entries()[0].run_id
    panel = text_of(cb.alerts_view(cat, run_id, None, None)[0])
    assert "healthy on every layer" not in panel and "too few steps to judge yet" in panel
    assert "too few steps to judge yet" in text_of(cb.header_view(cat, run_id, 5))
