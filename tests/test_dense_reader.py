"""The streaming per-layer reader (moewatch.store.dense) equals moewatch.load(...).global_view(): across ranks,
resumed steps, corrupt parts, and any memory budget; and the report built on it judges as the frames path does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import moewatch
from moewatch.detect import DetectorConfig, analyze, analyze_frames
from moewatch.detect import synthetic as syn
from moewatch.detect.windows import layer_data_from_dense, layer_data_from_frames
from moewatch.report import build_report
from moewatch.store import schema
from moewatch.store.dense import iter_dense_layers

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


def _rewrite(path: Path, table: str, frames: list) -> None:
    folder = path / table
    for f in folder.glob("*.parquet"):
        f.unlink()
    sch = schema.SCHEMAS[table]
    for i, df in enumerate(frames):
        pq.write_table(pa.Table.from_pandas(df[sch.names], schema=sch, preserve_index=False),
                       folder / f"part-{i:03d}.parquet")


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
    layers, experts = run.frames()
    path = run.write(root / "ranks")
    # Two ranks: each expert's tokens split unevenly between them, the layer rows' counts too.
    ex0, ex1 = experts.copy(), experts.copy()
    ex0["tokens"] = experts["tokens"] // 3
    ex1["tokens"] = experts["tokens"] - ex0["tokens"]
    ex1["rank"] = np.int32(1)
    # A moving balancing bias that the two ranks hold slightly differently: the global view averages it.
    ex0["bias"] = ex0["step"] * 1e-3 + ex0["expert"]
    ex1["bias"] = ex0["bias"] + 0.5
    ly0, ly1 = layers.copy(), layers.copy()
    ly0["tokens"] = layers["tokens"] // 3
    ly1["tokens"] = layers["tokens"] - ly0["tokens"]
    ly1["rank"] = np.int32(1)
    ly1["entropy"] = layers["entropy"] * 0.5
    # A resumed session re-wrote rank 0's steps 200-299 with other counts: those must win.
    again = ex0[(ex0["step"] >= 200) & (ex0["step"] < 300)].copy()
    again["tokens"] = again["tokens"][::-1].to_numpy()
    again["session"] = np.int32(1)
    again_l = ly0[(ly0["step"] >= 200) & (ly0["step"] < 300)].copy()
    again_l["session"] = np.int32(1)
    _rewrite(path, schema.EXPERTS, [ex0, ex1, again])
    _rewrite(path, schema.LAYERS, [ly0, ly1, again_l])
    (path / schema.EXPERTS / "part-999.parquet").write_bytes(b"not parquet")
    with pytest.warns(RuntimeWarning, match="corrupt part"):
        assert_same_as_global_view(path)
    with pytest.warns(RuntimeWarning, match="corrupt part"):
        assert_same_as_global_view(path, budget=1)
    # Both ranks' rows in one part (valid, though moewatch writes a part per rank): sums stay exact.
    import pandas as pd

    mixed = run.write(root / "mixed")
    _rewrite(mixed, schema.EXPERTS, [pd.concat([ex0, ex1], ignore_index=True)])
    _rewrite(mixed, schema.LAYERS, [pd.concat([ly0, ly1], ignore_index=True)])
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


def test_only_the_layers_asked_for(base):
    root, run = base
    path = run.write(root / "subset")
    names = [layer.name for layer in run.layers]
    got = [d.layer for d in iter_dense_layers(path, layers=[names[2], names[0]])]
    assert got == [names[0], names[2]]  # in the run's order
