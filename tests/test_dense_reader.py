"""The streaming per-layer reader (moewatch.store.dense) equals moewatch.load(...).global_view(): across ranks,
resumed steps, corrupt parts, and any memory budget; and the report built on it judges as the frames path does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import moewatch
from moewatch.detect import DetectorConfig, analyze, analyze_frames
from moewatch.detect import synthetic as syn
from moewatch.detect.windows import layer_data_from_dense, layer_data_from_frames
from moewatch.report import build_report
from moewatch.store import schema
from moewatch.store.dense import iter_dense_layers
from tests.run_builders import fallback_run, ranked_run, rewrite_parts, split_ranks

REPO = Path(__file__).resolve().parents[1]


def assert_same_as_global_view(path: Path, budget: int = 1 << 30) -> None:
    view = moewatch.load(path).global_view()
    ref = {d.layer: d for d in layer_data_from_frames(view.layers, view.experts)}
    got = [layer_data_from_dense(d) for d in iter_dense_layers(path, budget_bytes=budget)]
    assert [g.layer for g in got] == list(ref)
    for g in got:
        r = ref[g.layer]
        assert (g.num_experts, g.top_k) == (r.num_experts, r.top_k)
        np.testing.assert_array_equal(g.steps, r.steps)
        np.testing.assert_array_equal(g.tokens, r.tokens)
        for name in ("dropped", "bias"):
            a, b = getattr(g, name), getattr(r, name)
            assert (a is None) == (b is None), name
            if a is not None:
                np.testing.assert_allclose(a, b, rtol=1e-12, equal_nan=True)
        for k in r.stats:
            np.testing.assert_allclose(g.stats[k], r.stats[k], rtol=1e-9, equal_nan=True, err_msg=k)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, syn.SyntheticRun]:
    sc = syn.Scenario("c", "sudden", "collapse", onset=300, ramp=60, steps=600, layers=3, num_experts=8, top_k=2,
                      capacity_factor=1.0)
    run = syn.simulate(sc)
    return tmp_path_factory.mktemp("dense"), run


def test_sample_runs_and_every_budget():
    root = REPO / "sample_runs"
    if not root.is_dir():
        pytest.skip("sample_runs/ is not in this checkout")
    for path in sorted(p for p in root.iterdir() if p.is_dir()):
        assert_same_as_global_view(path)
    assert_same_as_global_view(root / "aux-free-bias", budget=1)  # one layer per pass; the bias column moves


def test_ranks_resumed_steps_and_a_corrupt_part(base):
    root, run = base
    path = ranked_run(root / "ranks")
    ex0, ex1, ly0, ly1 = split_ranks(run)
    with pytest.warns(RuntimeWarning, match="corrupt part"):
        assert_same_as_global_view(path)
    with pytest.warns(RuntimeWarning, match="corrupt part"):
        assert_same_as_global_view(path, budget=1)
    # Both ranks' rows in one part (valid, though moewatch writes a part per rank): sums stay exact.
    import pandas as pd

    mixed = run.write(root / "mixed")
    rewrite_parts(mixed, schema.EXPERTS, [pd.concat([ex0, ex1], ignore_index=True)])
    rewrite_parts(mixed, schema.LAYERS, [pd.concat([ly0, ly1], ignore_index=True)])
    assert_same_as_global_view(mixed)
    skipped: list[str] = []
    with pytest.warns(RuntimeWarning) as caught:
        list(iter_dense_layers(path, budget_bytes=1, skipped=skipped))
    assert len(skipped) == 1 and len([w for w in caught if "corrupt" in str(w.message)]) == 1  # once, not per pass


def test_report_on_the_stream_judges_as_the_frames_path(base):
    root, run = base
    path = run.write(root / "plain")
    rep = build_report(path, DetectorConfig())
    view = moewatch.load(path).global_view()
    frames = analyze_frames(view.layers, view.experts)
    key = lambda a: (a.kind, a.severity, a.layer, a.first_step, a.last_step, a.value, a.latest)  # noqa: E731
    assert sorted(map(key, rep.analysis.alerts)) == sorted(map(key, frames.shown_alerts()))
    assert rep.status == frames.status and rep.status in ("collapsed", "critical") and rep.steps == 600
    # Layers stream through the detector one at a time: it consumes a generator.
    streamed = analyze(layer_data_from_dense(d) for d in iter_dense_layers(path, budget_bytes=1))
    assert streamed.status == frames.status and len(streamed.layers) == 3


def test_a_multi_process_run_whose_group_sum_failed(tmp_path):
    assert_same_as_global_view(fallback_run(tmp_path / "fallback"))


def test_only_the_layers_asked_for(base):
    root, run = base
    path = run.write(root / "subset")
    names = [layer.name for layer in run.layers]
    got = [d.layer for d in iter_dense_layers(path, layers=[names[2], names[0]])]
    assert got == [names[0], names[2]]  # in the run's order


def test_a_router_without_a_distribution_is_never_an_entropy_collapse(base):
    """Routers that hand over no distribution (or no logits) record NaN entropy and z-loss. Every reader keeps them
    NaN, on one rank and summed over ranks; read as 0 they would raise a critical entropy collapse."""
    from moewatch.app.catalog import Catalog

    root, run = base
    ex0, ex1, ly0, ly1 = split_ranks(run)
    for ly in (ly0, ly1):
        ly["entropy"] = np.nan
        ly["entropy_norm"] = np.nan
        ly["z_loss"] = np.nan
    for name, parts in (("one", ([ex0], [ly0])), ("two", ([ex0, ex1], [ly0, ly1]))):
        path = run.write(root / f"nodist-{name}")
        rewrite_parts(path, schema.EXPERTS, parts[0])
        rewrite_parts(path, schema.LAYERS, parts[1])
        assert_same_as_global_view(path)
        assert moewatch.load(path).global_view().layers["entropy_norm"].isna().all()
        rep = build_report(path, DetectorConfig())
        assert not [a for a in rep.analysis.alerts if a.kind == "entropy_collapse"], name
        catalog = Catalog(root, background=False)
        run_id = next(e.run_id for e in catalog.entries() if e.name == f"nodist-{name}")
        det = catalog.detector.get(catalog.run(run_id))
        assert not [a for a in det.alerts if a.kind == "entropy_collapse"], name
        assert det.status == rep.status


def test_a_flushed_experts_part_has_a_row_group_per_layer_and_a_step_range_reads_only_its_row_groups(tmp_path):
    """What the dashboard asks for (one layer, some steps) is read without decoding the other layers' rows."""
    import pyarrow.parquet as pq
    import torch

    from moewatch.capture.watch import Watch, WatchConfig
    from moewatch.store.dense import _row_groups, plan_run, read_layers
    from tests.toy import ToyMoE, toy_specs

    torch.manual_seed(0)
    model = ToyMoE(d=8, num_experts=4, top_k=2, layers=3, capacity=6)
    run_dir = tmp_path / "run"
    watch = Watch(model, run_dir, toy_specs(model), WatchConfig(flush_steps=4))
    for _ in range(12):
        model(torch.randn(16, 8)).sum().backward()
        watch.step()
    watch.close()
    parts = sorted((run_dir / "experts").glob("*.parquet"))
    assert len(parts) == 3
    names = moewatch.load(run_dir).layers.layer.unique().tolist()
    for i, f in enumerate(parts):  # steps 0-3, 4-7, 8-11
        meta = pq.read_metadata(f)
        assert meta.num_row_groups == 3  # one per layer, steps in order within it
        assert len(_row_groups(meta, {names[1]})) == 1
        assert len(_row_groups(meta, {names[1]}, (4, 7))) == (1 if i == 1 else 0)
    view = moewatch.load(run_dir).global_view().experts
    (d,) = read_layers(run_dir, [names[1]], plan_run(run_dir), steps=(5, 9))
    assert d.steps.tolist() == [5, 6, 7, 8, 9]
    sub = view[(view.layer == names[1]) & view.step.between(5, 9)]
    np.testing.assert_array_equal(d.tokens, sub.pivot(index="step", columns="expert", values="tokens").to_numpy())


def test_a_live_plan_extended_with_appended_parts_equals_a_fresh_plan(tmp_path):
    """plan_run with a PlanCache extends the last plan for parts of later steps, and recomputes otherwise (a resume
    that re-writes steps, a rank's older steps arriving late): always the plan of the whole table."""
    from moewatch.store.dense import PlanCache, plan_run
    from tests.test_app_data import random_counts, write_manifest, write_part

    run = tmp_path / "run"
    rng = np.random.default_rng(5)
    write_manifest(run, ["a", "b"], 4, world_size=2)
    cache = PlanCache()

    def same() -> None:
        got, want = plan_run(run, extra=True, cache=cache), plan_run(run, extra=True)
        assert got.names == want.names and (got.ranks, got.wide, got.drops) == (want.ranks, want.wide, want.drops)
        assert (got.winners is None) == (want.winners is None)
        for n in want.names:
            np.testing.assert_array_equal(got.steps[n], want.steps[n])
            assert (got.num_experts[n], got.top_k[n]) == (want.num_experts[n], want.top_k[n])
            for c, v in want.stats[n].items():
                np.testing.assert_array_equal(got.stats[n][c], v, err_msg=f"{n} {c}")

    write_part(run, {"a": random_counts(rng, 5, 4)}, np.arange(5), n=0)
    same()
    write_part(run, {"a": random_counts(rng, 5, 4), "b": random_counts(rng, 5, 4)}, np.arange(5, 10), n=1)
    same()  # appended: a layer first seen in the new part
    assert cache.last_step == 9
    write_part(run, {"a": random_counts(rng, 3, 4)}, np.arange(3, 6), rank=1, n=0)
    same()  # a second rank's older steps: recomputed
    write_part(run, {"a": random_counts(rng, 4, 4)}, np.arange(8, 12), session=2, n=0)
    same()  # a resume re-writing steps 8, 9
    assert plan_run(run, cache=cache).winners is not None
