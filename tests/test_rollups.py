"""Rollups (moewatch.store.rollup): exact block sums of the global view, used by the report where the detector's
windows are whole blocks, ignored once stale; the detector's alerts are the same either way."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from moewatch.detect import DetectorConfig
from moewatch.detect import synthetic as syn
from moewatch.report import build_report
from moewatch.store.compact import compact
from moewatch.store.dense import iter_dense_layers
from moewatch.store.rollup import BLOCK, open_rollups, path_for, write_rollups
from tests.run_builders import fallback_run, ranked_run

REPO = Path(__file__).resolve().parents[1]


def key(rep) -> list:
    return sorted((a.kind, a.severity, a.layer, a.first_step, a.last_step, a.detected_step, a.value, a.latest,
                   a.ongoing, a.message) for a in rep.analysis.alerts)


def assert_blocks_exact(path: Path) -> None:
    per_step = {d.layer: d for d in iter_dense_layers(path)}
    rolled = list(iter_dense_layers(path, rollups=True))
    assert rolled and all(d.block == BLOCK for d in rolled)
    for d in rolled:
        ref = per_step[d.layer]
        starts = np.arange(0, len(ref.steps), BLOCK)
        np.testing.assert_array_equal(d.tokens, np.add.reduceat(ref.tokens, starts, axis=0))
        np.testing.assert_array_equal(d.head, ref.tokens[: len(d.head)])
        if ref.dropped is not None:
            np.testing.assert_array_equal(d.dropped, np.add.reduceat(ref.dropped, starts, axis=0))
        if ref.bias is not None:
            ends = np.minimum(starts + BLOCK, len(ref.steps)) - 1
            np.testing.assert_allclose(d.bias, ref.bias[ends], equal_nan=True)


def blocks_read(monkeypatch) -> list[int]:
    """The ``block`` of every layer the dense reader yields from now on (10: from the rollups, 1: per step)."""
    import moewatch.store.dense as dense

    reads: list[int] = []
    real = dense.iter_dense_layers

    def counted(*args, **kwargs):
        for d in real(*args, **kwargs):
            reads.append(d.block)
            yield d

    monkeypatch.setattr(dense, "iter_dense_layers", counted)
    return reads


def test_rollups_equal_the_sums_of_the_per_step_rows(tmp_path):
    for path in (ranked_run(tmp_path / "ranks"), fallback_run(tmp_path / "fallback")):
        with pytest.warns(RuntimeWarning) if (path / "experts" / "part-999.parquet").exists() else _nothing():
            write_rollups(path)
            assert_blocks_exact(path)


def test_the_report_judges_the_same_from_rollups_on_every_sample_run(tmp_path, monkeypatch):
    reads = blocks_read(monkeypatch)
    src = REPO / "sample_runs"
    if not src.is_dir():
        pytest.skip("sample_runs/ is not in this checkout")
    for run in sorted(p for p in src.iterdir() if p.is_dir()):
        path = shutil.copytree(run, tmp_path / run.name)
        per_step = build_report(path, DetectorConfig())
        compact(path)  # merges parts and writes the rollups
        assert open_rollups(path) is not None
        assert_blocks_exact(path)
        reads.clear()
        rolled = build_report(path, DetectorConfig())
        assert reads == [BLOCK, BLOCK], run.name  # both layers judged from their rollups, no per-step read
        assert key(rolled) == key(per_step) and rolled.status == per_step.status, run.name
        assert rolled.verdict == per_step.verdict and rolled.steps == per_step.steps


def test_stale_or_unaligned_rollups_fall_back_to_the_steps(tmp_path):
    sc = syn.Scenario("c", "sudden", "collapse", onset=400, ramp=80, steps=700, layers=2, num_experts=8)
    path = syn.simulate(sc).write(tmp_path / "run")
    per_step = build_report(path, DetectorConfig())
    write_rollups(path)
    assert open_rollups(path) is not None
    # Windows that are not whole blocks (27 steps): the report reads those layers per step.
    odd = DetectorConfig(window_steps=27, max_window_steps=27)
    assert key(build_report(path, odd)) == key(build_report(_without_rollups(path, tmp_path), odd))
    # A part written after the rollups makes them stale: ignored, not half-used.
    part = next((path / "experts").glob("*.parquet"))
    shutil.copy(part, part.with_name("zz-later.parquet"))
    assert open_rollups(path) is None
    part.with_name("zz-later.parquet").unlink()
    assert open_rollups(path) is not None and key(build_report(path, DetectorConfig())) == key(per_step)
    path_for(path).write_bytes(b"not parquet")
    assert open_rollups(path) is None and key(build_report(path, DetectorConfig())) == key(per_step)


def test_gradient_norms_roll_up_and_expert_stalled_is_judged_from_the_blocks(tmp_path, monkeypatch):
    """A run recording per-expert gradient norms keeps the rollup speed-up: blocks carry the sum of the recorded norms
    and their count, so each window's mean norm (and the expert_stalled alert) is what the per-step rows give."""

    from moewatch.detect import analyze_run
    from moewatch.detect.windows import layer_data_from_dense, make_windows, window_size
    from tests.test_app_data import random_counts, set_columns, write_manifest, write_part
    from tests.test_expert_learning import healthy_grads

    rng = np.random.default_rng(11)
    run = tmp_path / "r"
    write_manifest(run, ["gate"], 8)
    write_part(run, {"gate": random_counts(rng, 800, 8)}, np.arange(800))
    grad = healthy_grads(800, 8, seed=11)
    grad[400:, 6] *= 0.003  # expert 6 stops learning at step 400
    grad[rng.random(800) < 0.1] = np.nan  # steps the optimizer skipped (AMP overflow): no norm recorded
    # rows are step-major, as write_part writes them
    set_columns(next((run / "experts").glob("*.parquet")), grad_norm=grad.reshape(-1))

    per_step = analyze_run(run)
    write_rollups(run)
    ((step_layer,), (rolled,)) = list(iter_dense_layers(run)), list(iter_dense_layers(run, rollups=True))
    assert rolled.block == BLOCK and rolled.grad_norm is not None
    config = DetectorConfig()
    size = window_size(rolled.head, config)
    assert size % BLOCK == 0
    a, _ = make_windows(layer_data_from_dense(step_layer), size, True)
    b, _ = make_windows(layer_data_from_dense(rolled), size, True)
    np.testing.assert_allclose(b.grad_norm, a.grad_norm, rtol=1e-12)

    reads = blocks_read(monkeypatch)
    from_blocks = analyze_run(run)
    assert reads == [BLOCK]  # judged from the rollup, no per-step read
    stalled = [(x.kind, x.experts, x.first_step, x.severity) for x in from_blocks.alerts if x.kind == "expert_stalled"]
    assert stalled and stalled[0][1] == (6,)
    assert stalled == [(x.kind, x.experts, x.first_step, x.severity) for x in per_step.alerts
                       if x.kind == "expert_stalled"]


def test_a_rollup_of_an_older_format_is_stale(tmp_path):
    sc = syn.Scenario("c", "sudden", "collapse", onset=400, ramp=80, steps=300, layers=1, num_experts=8)
    path = syn.simulate(sc).write(tmp_path / "run")
    write_rollups(path)
    import json

    import pyarrow.parquet as pq

    from moewatch.store.rollup import KEY

    t = pq.read_table(path_for(path))
    info = json.loads(t.schema.metadata[KEY])
    info.pop("version")  # what a version-1 writer wrote: no grad columns, no version
    pq.write_table(t.drop_columns(["grad_sum", "grad_steps"]).replace_schema_metadata({KEY: json.dumps(info)}),
                   path_for(path))
    assert open_rollups(path) is None


def _without_rollups(path: Path, tmp_path: Path) -> Path:
    copy = shutil.copytree(path, tmp_path / "plain")
    shutil.rmtree(copy / "rollups")
    return copy


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
