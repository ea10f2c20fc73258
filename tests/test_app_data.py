"""The dashboard's data layer: the per-run cache against the loader, the live cursor, downsampling, the detector's
windows for the charts, the catalog (run paths as ids, the run list's rows) and the detector's analysis per run.

Also holds the small run-writing helpers the other dashboard tests import (`write_part`, `write_manifest`,
`synthetic_collapse`).
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from moewatch.app.catalog import Catalog, UnknownRun, run_href, run_id_for, shape_text
from moewatch.app.data import RunData
from moewatch.app.detection import Detector, run_detector, trend_of
from moewatch.app.downsample import bin_edges, bin_sum, columns_for, downsample, minmax_last
from moewatch.app.windows import binned_load, detector_window, plan, window_bounds, window_series

import moewatch
from moewatch.capture.watch import Watch, WatchConfig
from moewatch.detect import DetectorConfig
from moewatch.store.schema import EXPERTS_SCHEMA, LAYERS_SCHEMA, MANIFEST, SCHEMA_VERSION, conform
from tests.toy import ToyMoE, toy_specs

SAMPLES = Path(__file__).resolve().parents[1] / "sample_runs"

# ---------------------------------------------------------------------------------------------------- helpers


def write_manifest(run: Path, layers: list[str], E: int, k: int = 2, status: str = "finished",
                   world_size: int = 1) -> None:
    run.mkdir(parents=True, exist_ok=True)
    manifest = {"schema_version": SCHEMA_VERSION, "status": status, "model_class": "tests.HandWritten",
                "world_size": world_size, "heartbeat": time.time(), "flush_seconds": 30.0,
                "routers": [{"name": name, "num_experts": E, "top_k": k} for name in layers]}
    (run / MANIFEST).write_text(json.dumps(manifest))


def set_columns(part: Path, **columns) -> None:
    """Rewrite a part file with ``columns`` replaced (name -> values in the part's row order: numpy, NaN as null, or
    an Arrow array), each cast to the part's type for it."""
    t = pq.read_table(part)
    for name, values in columns.items():
        arr = values if isinstance(values, pa.Array) else pa.array(values, from_pandas=True)
        i = t.schema.get_field_index(name)
        t = t.append_column(name, arr) if i < 0 else t.set_column(i, t.schema.field(i), arr.cast(t.schema.field(i).type))
    pq.write_table(t, part)


def write_part(run: Path, counts: dict[str, np.ndarray], steps: np.ndarray, *, rank: int = 0, session: int = 1,
               n: int = 0, k: int = 2, bias: float | None = None, seed: int = 0) -> None:
    """One flush: experts + layers parts for `steps` ([S]) with per-layer counts ``[S, E]``, schema-conforming."""
    rng = np.random.default_rng(seed)
    ex, ly = [], []
    for layer, c in counts.items():
        S, E = c.shape
        tot = c.sum(axis=1)
        tokens = np.maximum(tot // k, 1)
        mean = c.mean(axis=1)
        f = c / np.maximum(tot, 1)[:, None]
        ent = rng.uniform(0.5, 0.9, S) * np.log(E)
        ex.append(conform(pa.table({
            "step": np.repeat(steps, E).astype(np.int64), "layer": [layer] * (S * E),
            "expert": np.tile(np.arange(E, dtype=np.int32), S), "tokens": c.reshape(-1).astype(np.int64),
            "dropped": np.zeros(S * E, np.int64), "prob_mean": f.reshape(-1),
            "bias": np.full(S * E, np.nan if bias is None else bias),
            "rank": np.full(S * E, rank, np.int32), "session": np.full(S * E, session, np.int32),
            "seq": np.repeat(steps, E).astype(np.int64)}), EXPERTS_SCHEMA))
        ly.append(conform(pa.table({
            "step": steps.astype(np.int64), "layer": [layer] * S, "tokens": tokens.astype(np.int64),
            "top_k": np.full(S, k, np.int32), "num_experts": np.full(S, E, np.int32), "entropy": ent,
            "entropy_norm": ent / np.log(E), "cv": c.std(axis=1) / np.where(mean > 0, mean, 1),
            "max_share": f.max(axis=1), "dead": (c == 0).sum(axis=1).astype(np.int32),
            "dropped": np.zeros(S, np.int64), "drop_rate": np.zeros(S),
            "logit_abs_max": rng.uniform(1, 5, S), "logit_mean": np.zeros(S), "logit_std": np.ones(S),
            "z_loss": rng.uniform(1, 3, S), "aux_loss": E * (f * f).sum(axis=1), "nonfinite": np.zeros(S, np.int64),
            "calls": np.ones(S, np.int32), "time": np.zeros(S), "rank": np.full(S, rank, np.int32),
            "session": np.full(S, session, np.int32), "seq": steps.astype(np.int64)}), LAYERS_SCHEMA))
    for table, parts in (("experts", ex), ("layers", ly)):
        (run / table).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.concat_tables(parts), run / table / f"r{rank:04d}-s{session:04d}-{n:08d}.parquet")


def random_counts(rng, S: int, E: int, hot: float = 0.0) -> np.ndarray:
    p = np.full(E, 1.0 / E)
    if hot:
        p = (1 - hot) * p
        p[0] += hot
    return rng.multinomial(256, p, size=S)


def synthetic_collapse(root: Path, steps: int = 2000, name: str = "collapse", shape: str = "sudden",
                       label: str = "collapse", layers: int = 3) -> Path:
    """A finished run whose layer 0 collapses onto one expert (the detector helper's generator)."""
    from moewatch.detect.synthetic import Scenario, simulate

    sc = Scenario(name, shape, label, steps=steps, num_experts=8, layers=layers, seed=3, onset=steps // 3,
                  ramp=steps // 3)
    return simulate(sc).write(root / name)


def assert_matches_loader(cache: RunData, path: Path) -> None:
    """The cache holds exactly the loader's all-ranks global view."""
    view = moewatch.load(path).global_view()
    assert list(cache.steps) == sorted(view.layers["step"].unique().tolist())
    for name in cache.layer_names:
        ly = view.layers[view.layers["layer"] == name].sort_values("step")
        s = cache.series(name)
        for col in ("cv", "entropy_norm", "max_share", "dead", "drop_rate", "z_loss", "logit_abs_max", "tokens"):
            # cv, max share and max |logit| are held as float32 (display precision); sums stay float64
            np.testing.assert_allclose(s[col], ly[col].to_numpy(float), rtol=1e-6, equal_nan=True, err_msg=col)
        ex = view.experts[view.experts["layer"] == name]
        pivot = ex.pivot(index="step", columns="expert", values="tokens").to_numpy()
        np.testing.assert_array_equal(cache.tokens(name), pivot)


# ---------------------------------------------------------------------------------------------------- cache


def test_cache_equals_loader_on_a_real_capture(tmp_path):
    torch.manual_seed(0)
    model = ToyMoE(d=8, num_experts=4, top_k=2, layers=2, capacity=6)
    watch = Watch(model, tmp_path / "run", toy_specs(model), WatchConfig(flush_steps=4))
    for _ in range(13):
        model(torch.randn(16, 8)).sum().backward()
        watch.step()
    watch.close()
    cache = RunData(tmp_path / "run")
    assert cache.refresh() is True
    assert cache.n == 13 and cache.status == "finished"
    assert_matches_loader(cache, tmp_path / "run")
    # capacity 6 for 32 assignments over 4 experts drops some: per-expert drops and the layer drop rate are kept
    view = moewatch.load(tmp_path / "run").global_view()
    name = cache.layer_names[0]
    dropped = view.experts[view.experts.layer == name].pivot(index="step", columns="expert", values="dropped")
    assert dropped.to_numpy().sum() > 0
    np.testing.assert_array_equal(cache.layer(name).dropped.a, dropped.to_numpy())
    bias = cache.bias(name)
    assert bias is not None and bias.shape == (13, 4)  # the toy router has a correction bias buffer


def test_two_ranks_are_summed_and_a_resume_rewrites_steps(tmp_path):
    run = tmp_path / "run"
    rng = np.random.default_rng(1)
    write_manifest(run, ["a", "b"], 4, world_size=2)
    for rank in (0, 1):
        write_part(run, {"a": random_counts(rng, 10, 4), "b": random_counts(rng, 10, 4, hot=0.5)},
                   np.arange(10), rank=rank, session=1, seed=rank)
    cache = RunData(run)
    cache.refresh()
    assert cache.ranks == [0, 1]
    assert_matches_loader(cache, run)
    gen = cache.generation
    # A restart from a checkpoint at step 6: both ranks write steps 6..13 again in session 2.
    for rank in (0, 1):
        write_part(run, {"a": random_counts(rng, 8, 4, hot=0.3), "b": random_counts(rng, 8, 4)},
                   np.arange(6, 14), rank=rank, session=2, seed=10 + rank)
    assert cache.refresh() is True
    assert cache.dirty_since(gen) == 6  # index of step 6: the figures must be rebuilt from there
    assert_matches_loader(cache, run)


def test_refresh_reads_only_new_part_files(tmp_path):
    run = tmp_path / "run"
    rng = np.random.default_rng(2)
    write_manifest(run, ["a"], 4, status="running")
    write_part(run, {"a": random_counts(rng, 5, 4)}, np.arange(5), n=0)
    cache = RunData(run)
    cache.refresh()
    before = cache.tokens("a").copy()
    # Overwrite the part already read with garbage: a cursor that re-read it would now report it corrupt.
    (run / "experts" / "r0000-s0001-00000000.parquet").write_bytes(b"not parquet")
    assert cache.refresh() is False
    assert cache.skipped == []
    gen, n = cache.generation, cache.n
    write_part(run, {"a": random_counts(rng, 3, 4)}, np.arange(5, 8), n=1)
    assert cache.refresh() is True
    assert cache.n == 8 and cache.dirty_since(gen) == n  # only appended steps changed
    np.testing.assert_array_equal(cache.tokens("a")[:5], before)


def test_corrupt_part_is_skipped_with_its_name(tmp_path):
    run = tmp_path / "run"
    rng = np.random.default_rng(3)
    write_manifest(run, ["a"], 4)
    write_part(run, {"a": random_counts(rng, 5, 4)}, np.arange(5), n=0)
    (run / "experts" / "r0000-s0001-00000001.parquet").write_bytes(b"\x00garbage")
    cache = RunData(run)
    with pytest.warns(RuntimeWarning, match="r0000-s0001-00000001"):
        cache.refresh()
    assert len(cache.skipped) == 1 and "experts/r0000-s0001-00000001.parquet" in cache.skipped[0]
    assert cache.n == 5 and cache.tokens("a").sum() > 0


def test_steps_arriving_out_of_order_are_inserted(tmp_path):
    run = tmp_path / "run"
    rng = np.random.default_rng(4)
    write_manifest(run, ["a"], 4, world_size=2)
    write_part(run, {"a": random_counts(rng, 3, 4)}, np.array([0, 2, 4]), rank=0)
    cache = RunData(run)
    cache.refresh()
    gen = cache.generation
    write_part(run, {"a": random_counts(rng, 3, 4)}, np.array([1, 3, 5]), rank=1)
    cache.refresh()
    assert list(cache.steps) == [0, 1, 2, 3, 4, 5]
    assert cache.dirty_since(gen) == 1
    assert_matches_loader(cache, run)


def test_a_run_without_parts_is_empty_not_an_error(tmp_path):
    write_manifest(tmp_path / "run", ["a", "b"], 8, status="running")
    cache = RunData(tmp_path / "run")
    cache.refresh()
    assert cache.n == 0 and cache.layer_names == ["a", "b"]
    assert cache.series("a")["cv"].shape == (0,)


# ---------------------------------------------------------------------------------------------------- downsampling


def test_minmax_last_keeps_every_spike_and_bucket_extremes():
    rng = np.random.default_rng(0)
    n = 100_003
    y = rng.normal(size=n).astype(np.float32)
    y[12_345] = 50.0
    y[77_777] = -40.0
    y[500:520] = np.nan
    idx = minmax_last(y, 2000)
    assert len(idx) <= 2000
    assert np.all(np.diff(idx) >= 0)  # time order
    kept = y[idx]
    assert 50.0 in kept and -40.0 in kept
    assert idx[-1] == n - 1  # the last point is always there (the live edge)
    # every bucket's min and max survive
    w = -(-n // (2000 // 3))
    for b in (0, 5, 100, 600):
        seg = y[b * w: (b + 1) * w]
        mine = kept[(idx >= b * w) & (idx < (b + 1) * w)]
        assert np.nanmin(mine) == np.nanmin(seg) and np.nanmax(mine) == np.nanmax(seg)
    np.testing.assert_array_equal(idx, minmax_last(y, 2000))  # deterministic, never random


def test_minmax_last_per_trace_and_short_input_untouched():
    y = np.zeros((10_000, 3), np.float32)
    y[4_013, 1] = 9
    idx = minmax_last(y, 600)
    assert idx.shape[1] == 3 and idx.shape[0] <= 600
    assert 4_013 in idx[:, 1] and 4_013 not in idx[:, 0]
    x = np.arange(50)
    xs, ys, down = downsample(x, x.astype(float))
    assert not down and len(xs) == 50


def test_bins_cover_every_step_once():
    for n, b in ((10, 3), (1000, 1000), (7, 50), (100_000, 1400)):
        e = bin_edges(n, b)
        assert e[0] == 0 and e[-1] == n and np.all(np.diff(e) > 0) and len(e) - 1 == min(n, b)
    v = np.arange(20).reshape(10, 2)
    assert bin_sum(v, bin_edges(10, 3), np.int64).sum() == v.sum()
    big = np.full((4, 1), 2**30, np.int32)  # two of these overflow int32: the sum must widen
    assert bin_sum(big, np.array([0, 2, 4]), np.int64).tolist() == [[2**31], [2**31]]
    np.testing.assert_allclose(bin_sum(np.array([1.0, np.nan, 3.0]), np.array([0, 2, 3])), [1.0, 3.0])
    assert columns_for(None) == 1200 and columns_for(10) == 50 and columns_for(10_000) == 2000


# ---------------------------------------------------------------------------------------------------- windows


def sample_run(name: str) -> Path:
    path = SAMPLES / name
    if not (path / MANIFEST).is_file():
        pytest.skip(f"sample_runs/{name} is not in this checkout")
    return path


def test_window_bounds_follow_the_detector_and_fold_a_short_tail_into_the_last_window():
    assert window_bounds(60, 20).tolist() == [0, 20, 40, 60]
    assert window_bounds(75, 20).tolist() == [0, 20, 40, 60, 75]  # 15 >= half a window: judged on its own
    assert window_bounds(65, 20).tolist() == [0, 20, 40, 65]  # 5 steps: added to the last window
    assert window_bounds(7, 20).tolist() == [0, 7]  # fewer steps than a window: one partial window
    assert window_bounds(0, 20).tolist() == [0, 0]


def test_plan_aligns_bins_to_whole_windows_and_merges_past_the_width(tmp_path):
    write_manifest(tmp_path / "r", ["l0"], 4)
    write_part(tmp_path / "r", {"l0": random_counts(np.random.default_rng(0), 1000, 4)}, np.arange(1000))
    run = RunData(tmp_path / "r")
    run.refresh()
    full = plan(run, "l0", 0, 1000, 20, 1200)
    assert (full.group, full.rows, full.count) == (1, slice(0, 1000), 50)
    assert full.edges.tolist() == list(range(0, 1001, 20))
    narrow = plan(run, "l0", 0, 1000, 20, 12)  # 50 windows into at most 12 columns: 5 whole windows each
    assert narrow.group == 5 and narrow.count == 10 and narrow.edges.tolist() == list(range(0, 1001, 100))
    zoom = plan(run, "l0", 105, 171, 20, 1200)  # a zoom snaps out to the windows it touches
    assert zoom.rows == slice(100, 180) and zoom.edges.tolist() == [0, 20, 40, 60, 80]
    assert plan(run, "l0", 1000, 1000, 20, 1200) is None
    load, first, last = binned_load(run, "l0", full)
    np.testing.assert_array_equal(load, run.tokens("l0").reshape(50, 20, 4).sum(axis=1))
    assert first.tolist() == list(range(0, 1000, 20)) and last.tolist() == list(range(19, 1000, 20))


def test_a_layer_recorded_on_fewer_steps_is_windowed_on_its_own_rows(tmp_path):
    run_dir = tmp_path / "r"
    rng = np.random.default_rng(1)
    write_manifest(run_dir, ["a", "b"], 4)
    write_part(run_dir, {"a": random_counts(rng, 60, 4)}, np.arange(60), n=0)
    write_part(run_dir, {"b": random_counts(rng, 30, 4)}, np.arange(0, 60, 2), n=1)  # b: every other step
    run = RunData(run_dir)
    run.refresh()
    assert run.layer_rows("a") is None and run.layer_rows("b").tolist() == list(range(0, 60, 2))
    bins = plan(run, "b", 0, 60, 10, 100)
    load, first, last = binned_load(run, "b", bins)
    assert first.tolist() == [0, 20, 40] and last.tolist() == [18, 38, 58]
    np.testing.assert_array_equal(load, run.tokens("b")[0::2].reshape(3, 10, 4).sum(axis=1))


def test_windowed_charts_read_exactly_what_the_detector_reads_on_the_sample_runs():
    for name in ("aux-loss", "collapse", "capacity-1.0"):
        run = RunData(sample_run(name), name)
        run.refresh()
        analysis = run_detector(run)
        for result in analysis.layers:
            assert detector_window(run, result.layer) == result.window  # computed without the detector's result
            bins = plan(run, result.layer, 0, run.n, result.window, 10_000)
            s = window_series(run, result.layer, bins)
            np.testing.assert_array_equal(s["first"], result.series["first"])
            np.testing.assert_array_equal(s["last"], result.series["last"])
            for key in ("cv", "max_share", "dead", "entropy_norm", "drop_rate", "z_loss", "logit_abs_max"):
                np.testing.assert_allclose(s[key], result.series[key], rtol=1e-6, atol=1e-9, err_msg=(name, key))
            load, _, _ = binned_load(run, result.layer, bins)
            np.testing.assert_allclose(load / load.sum(axis=1, keepdims=True), result.series["share"], rtol=1e-5)


def test_sample_aux_loss_windows_are_calm_where_raw_steps_are_noise():
    run = RunData(sample_run("aux-loss"), "aux-loss")
    run.refresh()
    warm = DetectorConfig().warmup_steps
    for layer in run.layer_names:
        E = run.layer(layer).num_experts
        bins = plan(run, layer, 0, run.n, detector_window(run, layer), 1200)
        load, first, _ = binned_load(run, layer, bins)
        after = load[first >= warm].astype(float)
        ratio = after * E / after.sum(axis=1, keepdims=True)
        raw = run.tokens(layer)[warm:].astype(float)
        raw_ratio = raw * E / raw.sum(axis=1, keepdims=True)
        calm = ((ratio >= 0.5) & (ratio <= 2)).mean()
        assert calm >= 0.95, (layer, calm)  # 512 tokens a step over 16 experts: windows of 20 steps are calm
        assert ((raw_ratio >= 0.5) & (raw_ratio <= 2)).mean() < 0.7  # one step alone is mostly sampling noise
        assert (ratio < 0.25).mean() < 0.01 < (raw_ratio < 0.25).mean()  # no field of "dead" cells


# ---------------------------------------------------------------------------------------------------- catalog + detection


def test_catalog_ids_are_run_paths_under_the_root_and_nothing_else(tmp_path):
    rng = np.random.default_rng(5)
    for name in ("exp/a", "exp/b c"):
        write_manifest(tmp_path / name, ["l0"], 4)
        write_part(tmp_path / name, {"l0": random_counts(rng, 4, 4)}, np.arange(4))
    (tmp_path / "not-a-run").mkdir()
    cat = Catalog(tmp_path, background=False)
    entries = cat.entries()
    assert [(e.run_id, e.name) for e in entries] == [("exp/a", "exp/a"), ("exp/b c", "exp/b c")]
    assert entries[0].run_id == run_id_for(tmp_path.resolve(), tmp_path / "exp/a")
    assert run_href("exp/b c") == "/run/exp/b%20c" and run_href("a,b#1?") == "/run/a%2Cb%231%3F"
    for bad in ("../etc", "exp/../exp/a", "/exp/a", str(tmp_path / "exp/a"), "exp", "not-a-run", "", None, 3):
        with pytest.raises(UnknownRun):
            cat.entry(bad)
    assert cat.run("exp/b c").n == 4
    assert shape_text([{"num_experts": 8}, {"num_experts": 64}]) == "8–64 × 2"
    one = Catalog(tmp_path / "exp" / "a", background=False)  # the root is itself a run: its id is its name
    assert [e.run_id for e in one.entries()] == ["a"] and one.run("a").n == 4


def test_summaries_give_status_verdict_sentence_and_load_over_time():
    cat = Catalog(SAMPLES if SAMPLES.is_dir() else sample_run("collapse"), background=False)
    rows = {r.name: r for r in cat.summaries()}
    expected = {"aux-loss": "healthy", "z-loss+aux": "healthy", "collapse": "collapsed", "capacity-1.0": "critical"}
    for name, verdict in expected.items():
        r = rows[name]
        assert r.verdict == verdict and r.sentence.startswith(verdict.upper() + ":"), (name, r.sentence)
        assert r.steps == 400 and r.status == "finished" and r.shape == "16 × 2" and r.model == "MoEGPT"
        assert len(r.trend) == 20 and r.trend.last[-1] == 399  # one bar per detector window of 20 steps
    warm = DetectorConfig().warmup_steps
    for name in ("aux-loss", "z-loss+aux"):
        t = rows[name].trend
        assert all(level == 0 for level, last in zip(t.level, t.last, strict=True) if last >= warm), name
        assert max(t.ratio) < 2.5  # the largest expert stays within ~2x its fair share
    assert rows["collapse"].trend.level[-1] == 3 and max(rows["collapse"].trend.ratio) > 8
    assert rows["capacity-1.0"].trend.level[-1] == 2  # drops: critical, not a collapse
    assert "dropped at capacity" in rows["capacity-1.0"].sentence


def test_trend_merges_windows_by_their_maximum():
    h = pd.DataFrame({"layer": ["a"] * 4 + ["b"] * 4, "start_step": [0, 10, 20, 30] * 2,
                      "end_step": [9, 19, 29, 39] * 2, "level": [0, 0, 1, 0, 0, 2, 0, 0],
                      "status": ["healthy", "healthy", "warning", "healthy", "healthy", "critical", "healthy",
                                 "healthy"], "warmup": [True, False, False, False] * 2,
                      "max_share": [0.25, 0.3, 0.5, 0.25, 0.25, 0.25, 0.25, 0.9], "num_experts": 4})
    t = trend_of(h, points=2)
    assert t.first == (0, 20) and t.last == (19, 39) and t.level == (2, 1) and t.warmup == (False, False)
    assert t.ratio == (1.2, 3.6)  # E x max share, the worst layer's
    assert len(trend_of(h.iloc[:0])) == 0


def test_dashboard_keeps_the_detectors_whole_analysis(tmp_path):
    path = synthetic_collapse(tmp_path, 2000)
    cache = RunData(path, "x")
    cache.refresh()
    det = Detector(background=False).get(cache)
    from moewatch.detect import analyze_frames
    from moewatch.detect.verdict import verdict

    view = moewatch.load(path).global_view()
    theirs = analyze_frames(view.layers, view.experts)
    key = lambda a: (a.kind, a.severity, a.layer, tuple(a.experts), a.first_step, a.last_step)  # noqa: E731
    assert sorted(map(key, det.analysis.alerts)) == sorted(map(key, theirs.alerts))
    assert [key(a) for a in det.alerts] == [key(a) for a in theirs.shown_alerts()]
    assert det.status == theirs.status == "collapsed" and det.sentence == verdict(theirs)
    pd.testing.assert_frame_equal(det.health, theirs.health())
    assert det.layer("model.layers.0.mlp.gate").window == theirs.layers[0].window and det.layer("nope") is None


def test_detection_unavailable_is_reported_not_raised(tmp_path, monkeypatch):
    path = synthetic_collapse(tmp_path, 600)
    cache = RunData(path, "x")
    cache.refresh()
    monkeypatch.setitem(__import__("sys").modules, "moewatch.detect", None)  # as if not installed
    det = Detector(background=False).get(cache)
    assert det.state == "unavailable" and "unavailable" in det.message and det.status is None
    assert detector_window(cache, cache.layer_names[0], det) is None  # the charts fall back to raw counts


def test_background_detection_fills_in(tmp_path):
    path = synthetic_collapse(tmp_path, 800)
    cache = RunData(path, "x")
    cache.refresh()
    d = Detector(background=True)
    det = d.get(cache, wait=30)
    assert det.state == "ok" and det.status == "collapsed"


def test_eviction_keeps_memory_under_the_budget(tmp_path):
    rng = np.random.default_rng(6)
    for name in ("a", "b", "c"):
        write_manifest(tmp_path / name, ["l0"], 4)
        write_part(tmp_path / name, {"l0": random_counts(rng, 50, 4)}, np.arange(50))
    cat = Catalog(tmp_path, background=False, max_bytes=1)
    ids = [e.run_id for e in cat.entries()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for rid in ids:
            cat.run(rid)
    assert [rid for rid in ids if cat.loaded(rid) is not None] == [ids[-1]]  # only the one in use stays


def test_run_list_rereads_a_run_only_when_its_parts_change(tmp_path):
    rng = np.random.default_rng(7)
    for name in ("a", "b"):
        write_manifest(tmp_path / name, ["l0"], 4)
        write_part(tmp_path / name, {"l0": random_counts(rng, 20, 4)}, np.arange(20))
    cat = Catalog(tmp_path, background=False, max_bytes=1)  # room for one run in memory at a time
    first = {r.name: r for r in cat.summaries()}
    assert first["a"].steps == 20 and first["b"].steps == 20 and first["a"].verdict == "healthy"
    evicted = [r for r in first.values() if cat.loaded(r.run_id) is None]
    assert len(evicted) == 1 and evicted[0].sentence.startswith("HEALTHY") and len(evicted[0].trend) == 1
    held = [e.run_id for e in cat.entries() if cat.loaded(e.run_id) is not None]
    instance = cat.loaded(held[0]).instance
    again = {r.name: r for r in cat.summaries()}
    assert again == first  # the evicted run is summarized from memory of it, not read again
    assert [e.run_id for e in cat.entries() if cat.loaded(e.run_id) is not None] == held
    assert cat.loaded(held[0]).instance == instance
    write_part(tmp_path / "a", {"l0": random_counts(rng, 5, 4)}, np.arange(20, 25), n=1)
    assert {r.name: r.steps for r in cat.summaries()} == {"a": 25, "b": 20}


def test_the_cache_counts_a_fallen_back_rank_s_rows_once(tmp_path):
    """After a failed group sum the dashboard applies the loader's rule too: every token once, like global_view()."""
    from moewatch.store.dense import iter_dense_layers
    from tests.run_builders import FALLBACK_TOKENS, fallback_run

    run_dir = fallback_run(tmp_path / "run")
    expected = FALLBACK_TOKENS
    data = RunData(run_dir)
    data.refresh()
    np.testing.assert_array_equal(data.tokens("gate"), expected)
    view = moewatch.load(run_dir).global_view()
    np.testing.assert_array_equal(
        view.experts.pivot(index="step", columns="expert", values="tokens").sort_index().to_numpy(), expected)
    (dense,) = iter_dense_layers(run_dir)
    np.testing.assert_array_equal(dense.tokens, expected)


# ---------------------------------------------------------------------------------------------------- reading per layer


def test_only_the_layers_shown_are_read_and_held_within_the_budget(tmp_path):
    """The page reads a layer's counts when it shows it, not the run's; past the budget the oldest layer goes."""
    run = tmp_path / "run"
    rng = np.random.default_rng(11)
    names = ["l0", "l1", "l2", "l3"]
    write_manifest(run, names, 8)
    write_part(run, {name: random_counts(rng, 50, 8) for name in names}, np.arange(50))
    cache = RunData(run, layer_budget=2 * 50 * 8 * 4)  # room for two layers' int32 counts
    cache.refresh()
    assert all(layer.tokens is None for layer in cache.layers)  # the step axis and layer columns only
    assert cache.series("l2")["cv"].shape == (50,)  # a layer's metrics need no counts
    assert all(layer.tokens is None for layer in cache.layers)
    view = moewatch.load(run).global_view().experts
    for name in ("l0", "l1", "l2"):
        grid = view[view.layer == name].pivot(index="step", columns="expert", values="tokens").to_numpy()
        np.testing.assert_array_equal(cache.tokens(name), grid)
    held = [layer.name for layer in cache.layers if layer.tokens is not None]
    assert held == ["l1", "l2"]  # l0 was used longest ago
    assert sum(layer.nbytes for layer in cache.layers) == 2 * 50 * 8 * 4  # two layers' int32 counts, no more


def test_a_held_layer_gets_a_late_experts_part_and_follows_a_mixed_compaction(tmp_path):
    """Live: a flush writes its layers part before its experts part; a compaction may merge parts read and not read.
    The held counts equal the loader's after every refresh."""
    from moewatch.store.compact import compact

    run = tmp_path / "run"
    rng = np.random.default_rng(12)
    write_manifest(run, ["a"], 4, status="running")
    write_part(run, {"a": random_counts(rng, 5, 4)}, np.arange(5), n=0)
    cache = RunData(run)
    cache.refresh()
    cache.tokens("a")  # held from here on

    def grid() -> np.ndarray:
        view = moewatch.load(run).global_view().experts
        return view.pivot(index="step", columns="expert", values="tokens").reindex(cache.steps).fillna(0).to_numpy()

    # Steps 5..7: the layers part lands first, its experts part a refresh later.
    write_part(run, {"a": random_counts(rng, 3, 4)}, np.arange(5, 8), n=1)
    late = run / "experts" / "r0000-s0001-00000001.parquet"
    hidden = tmp_path / "late.parquet"
    late.rename(hidden)
    gen = cache.generation
    assert cache.refresh() is True and cache.n == 8 and cache.dirty_since(gen) == 5
    np.testing.assert_array_equal(cache.tokens("a")[5:], 0)
    gen = cache.generation
    hidden.rename(late)
    assert cache.refresh() is True and cache.dirty_since(gen) == 5
    np.testing.assert_array_equal(cache.tokens("a"), grid())
    # A part not read yet, then a compaction that merges it with parts already read.
    write_part(run, {"a": random_counts(rng, 2, 4)}, np.arange(8, 10), n=2)
    write_part(run, {"a": random_counts(rng, 2, 4)}, np.arange(10, 12), n=3)
    assert compact(run, rows=1_000, min_parts=2).merged
    assert cache.refresh() is True and cache.n == 12
    np.testing.assert_array_equal(cache.tokens("a"), grid())
    assert grid().sum() == 12 * 256  # every step's 256 assignments, once


def test_full_zoom_out_takes_gradient_norms_and_gate_mass_from_the_rollups(tmp_path):
    """A run recording gradient norms and gate mass (the aux-free-lost sample run) keeps full zoom-out free of
    per-step reads: the gradient panel and the gate-mass-vs-load points come from rollup blocks, equal to what the
    per-step rows give."""
    import shutil

    from moewatch.app import figures

    from moewatch.store.compact import compact

    src = SAMPLES / "aux-free-lost"
    if not src.is_dir():
        pytest.skip("sample_runs/ is not in this checkout")
    path = shutil.copytree(src, tmp_path / "run")
    assert compact(path).rollups

    def charts(run: RunData, name: str) -> tuple[np.ndarray, list]:
        window = detector_window(run, name)
        heat, _ = figures.heatmap_figure(run, name, width_px=600, window=window)
        shares, _ = figures.shares_figure(run, name, window=window)
        (grad,) = [t for t in heat["data"] if t.get("yaxis") == "y2" and t["type"] == "heatmap"]
        (gate,) = [t for t in shares["data"] if t.get("xaxis") == "x2"]
        return np.asarray(grad["z"], np.float64), [np.asarray(gate["x"]), np.asarray(gate["y"])]

    fresh = RunData(path, "x")
    fresh.refresh()
    assert fresh.has_grads and fresh.has_gate
    per_step = RunData(path, "y")
    per_step.refresh()
    per_step._rollups = None  # as if the run had no rollups
    for name in fresh.layer_names:
        grad, gate = charts(fresh, name)
        assert fresh.layer_info(name).tokens is None, "full zoom-out must not read the per-step rows"
        grad2, gate2 = charts(per_step, name)
        assert per_step.layer_info(name).tokens is not None
        np.testing.assert_allclose(grad, grad2, rtol=1e-9, equal_nan=True)
        assert np.isfinite(grad).any()
        for a, b in zip(gate, gate2, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-9)


def test_full_zoom_out_reads_the_rollups_exactly_and_no_per_step_counts(tmp_path):
    """Coarser than a block (detector windows at full zoom-out), the page sums the run's rollups: the same numbers
    as the per-step counts, without reading them."""
    from moewatch.app import figures

    from moewatch.store.compact import compact

    path = synthetic_collapse(tmp_path, 2000)
    assert compact(path).rollups
    fresh = RunData(path, "x")
    fresh.refresh()
    name = fresh.layer_names[0]
    window = detector_window(fresh, name)
    assert window % 10 == 0 and fresh.layer_info(name).tokens is None  # sized from the rollup's head steps
    figures.heatmap_figure(fresh, name, width_px=600, window=window)
    figures.metrics_figure(fresh, name, window=window)
    assert fresh.layer_info(name).tokens is None, "full zoom-out must not read the per-step counts"
    bins = plan(fresh, name, 0, fresh.n, window, 300)
    from_blocks, first, last = binned_load(fresh, name, bins)
    series = window_series(fresh, name, bins)

    per_step = RunData(path, "y")
    per_step.refresh()
    per_step._rollups = None  # as if the run had no rollups
    expected, first2, last2 = binned_load(per_step, name, bins)
    np.testing.assert_array_equal(from_blocks, expected)
    np.testing.assert_array_equal(first, first2)
    np.testing.assert_array_equal(last, last2)
    assert per_step.layer_info(name).tokens is not None
    for key, values in window_series(per_step, name, bins).items():
        if values is None:
            assert series[key] is None
        else:
            np.testing.assert_array_equal(series[key], values, err_msg=key)
