"""Compaction (moewatch.store.compact): few large parts instead of many small ones, every row read exactly once at
any moment, a kill -9 mid-compaction loses nothing, and every reader (load, the report's stream, the dashboard's
cache) sees the same run before and after."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import moewatch
from moewatch.capture.watch import Watch, WatchConfig
from moewatch.store.compact import REPLACES, compact, live_parts
from moewatch.store.dense import iter_dense_layers
from tests.toy import ToyMoE, toy_specs

ROOT = Path(__file__).resolve().parents[1]


def record(run_dir: Path, steps: int, flush: int = 3, session_start: int = 0) -> None:
    torch.manual_seed(session_start)
    model = ToyMoE()
    with Watch(model, run_dir, toy_specs(model), WatchConfig(flush_steps=flush, flush_seconds=3600)) as watch:
        for i in range(steps):
            model(torch.randn(2, 5, 8)).sum().backward()
            watch.step(session_start + i)


def frames(run_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    run = moewatch.load(run_dir)
    key_e, key_l = ["rank", "step", "layer", "expert"], ["rank", "step", "layer"]
    return (run.experts.sort_values(key_e).reset_index(drop=True),
            run.layers.sort_values(key_l).reset_index(drop=True))


def parquet_files(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.rglob("*.parquet"))


@pytest.fixture()
def run(tmp_path) -> Path:
    run_dir = tmp_path / "run"
    record(run_dir, 60)  # 20 flushes: 20 parts per table
    record(run_dir, 30, session_start=45)  # a resumed session re-writes steps 45-59 and goes on to 74
    return run_dir


def test_compaction_merges_parts_and_changes_nothing_a_reader_sees(run):
    before = frames(run)
    dense_before = [(d.layer, d.tokens.copy()) for d in iter_dense_layers(run)]
    n_before = len(parquet_files(run))
    done = compact(run, rows=10_000)
    after = frames(run)
    pd.testing.assert_frame_equal(before[0], after[0])
    pd.testing.assert_frame_equal(before[1], after[1])
    for (name, tokens), d in zip(dense_before, iter_dense_layers(run), strict=True):
        assert name == d.layer and np.array_equal(tokens, d.tokens)
    assert done.written >= 2 and done.merged > done.written and len(parquet_files(run)) < n_before / 3
    assert compact(run, rows=10_000).written == 0  # already compact


def test_an_interrupted_compaction_is_read_once_and_finished_by_the_next(run):
    before = frames(run)
    folder = run / "experts"
    sources = sorted(folder.glob("r0000-s0001-0*.parquet"))[:5]
    # The state a kill -9 leaves between the compacted part's rename and the sources' deletion.
    import pyarrow.parquet as pq

    from moewatch.store.compact import _merge

    _merge(folder, "experts", 0, 1, [(int(f.stem.split("-")[-1]), f) for f in sources])
    assert all(f.exists() for f in sources)
    assert not any(f in live_parts(folder) for f in sources)
    pd.testing.assert_frame_equal(before[0], frames(run)[0])  # each row once: the sources are not read
    compacted = next(folder.glob("*-c*.parquet"))
    assert pq.read_schema(compacted).metadata[REPLACES]
    done = compact(run, rows=10_000)
    assert not any(f.exists() for f in sources) and done.deleted >= len(sources)
    pd.testing.assert_frame_equal(before[0], frames(run)[0])


KILLER = """
import sys
sys.path.insert(0, {root!r})
from moewatch.store.compact import compact
print("start", flush=True)
compact({run!r}, rows=40)
print("done", flush=True)
"""


@pytest.mark.parametrize("merges", [0, 1, 6])
def test_kill_9_during_compaction_loses_nothing(tmp_path, merges):
    """Killed before its first merge, right after one, or part-way through: readers see every row once."""
    run_dir = tmp_path / "run"
    record(run_dir, 150, flush=1)  # 150 one-step parts per table: dozens of merges
    before = frames(run_dir)
    proc = subprocess.Popen([sys.executable, "-c", KILLER.format(root=str(ROOT), run=str(run_dir))],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "start"
    deadline = time.monotonic() + 60
    while len(list((run_dir / "experts").glob("*-c*.parquet"))) < merges and time.monotonic() < deadline:
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    if merges:
        assert list((run_dir / "experts").glob("*-c*.parquet")), "the kill came before any merge"
    mid = frames(run_dir)  # whatever the moment: every row exactly once
    pd.testing.assert_frame_equal(before[0], mid[0])
    pd.testing.assert_frame_equal(before[1], mid[1])
    # A write killed mid-way leaves a dot-named temporary file no reader lists; once it is old, compact removes it.
    for tmp in run_dir.rglob(".tmp-*"):
        os.utime(tmp, (time.time() - 7200, time.time() - 7200))
    compact(run_dir, rows=40)  # finishes the job
    pd.testing.assert_frame_equal(before[0], frames(run_dir)[0])
    assert not list(run_dir.rglob(".tmp-*"))


def test_the_dashboard_cache_follows_a_compaction(run):
    from moewatch.app.data import RunData

    data = RunData(run)
    data.refresh()
    tokens = {name: data.tokens(name).copy() for name in data.layer_names}
    compact(run, rows=10_000)
    assert data.refresh() is not None
    for name, t in tokens.items():
        np.testing.assert_array_equal(data.tokens(name), t)
    view = moewatch.load(run).global_view().experts
    name = data.layer_names[0]
    grid = view[view.layer == name].pivot(index="step", columns="expert", values="tokens").sort_index().to_numpy()
    np.testing.assert_array_equal(data.tokens(name), grid)


def test_compact_cli(run, tmp_path):
    from typer.testing import CliRunner

    from moewatch.cli import app

    runner = CliRunner()
    out = runner.invoke(app, ["compact", str(run), "--rows", "10000"])
    assert out.exit_code == 0 and "merged" in out.stdout
    again = runner.invoke(app, ["compact", str(run)])
    assert again.exit_code == 0 and "nothing to merge" in again.stdout
    assert runner.invoke(app, ["compact", str(tmp_path / "nope")]).exit_code == 2


def test_compacted_parts_keep_a_row_group_per_layer_so_readers_skip_the_rest(run):
    import pyarrow.parquet as pq

    from moewatch.store.dense import _row_groups

    compact(run, rows=10_000)
    part = next((run / "experts").glob("*-c*.parquet"))
    meta = pq.read_metadata(part)
    layers = pq.read_table(part, columns=["layer"])["layer"].unique().to_pylist()
    assert len(layers) >= 2 and meta.num_row_groups == len(layers)
    assert len(_row_groups(meta, {layers[0]})) == 1  # the other layers' row groups are not even decoded


def test_a_session_resumed_after_compaction_gets_a_new_number_and_keeps_its_rows(tmp_path):
    """attach numbers a new session after the sessions its part names show: a compaction that merged every plain
    part of the last session let the next attach reuse its number, and the new parts (named like the replaced ones)
    were hidden by the compacted part, then deleted by the next compaction."""
    run_dir = tmp_path / "run"
    record(run_dir, 12)
    compact(run_dir, rows=10**6)
    record(run_dir, 6, session_start=12)
    assert {int(f.name[7:11]) for f in live_parts(run_dir / "layers")} == {1, 2}
    assert moewatch.load(run_dir).steps == 18
    compact(run_dir, rows=10**6)
    assert moewatch.load(run_dir).steps == 18
    assert frames(run_dir)[1].groupby("session").step.nunique().to_dict() == {1: 12, 2: 6}


def test_a_crash_between_a_flush_s_two_writes_is_never_counted_twice(tmp_path):
    """A kill after a flush's layers part and before its experts part, then a resume: the resume numbers steps after
    everything on disk, and every reader sees each step once (the torn flush's steps without counts)."""
    run_dir = tmp_path / "run"
    record(run_dir, 12)  # flushes of 3 steps
    # The torn flush: the last part the writer wrote (the highest part number) never made it to disk.
    parts = [*(run_dir / "experts").glob("*.parquet"), *(run_dir / "layers").glob("*.parquet")]
    max(parts, key=lambda f: int(f.stem.split("-")[-1])).unlink()
    model = ToyMoE()
    with Watch(model, run_dir, toy_specs(model), WatchConfig(flush_steps=3, flush_seconds=3600)) as watch:
        for _ in range(6):
            model(torch.randn(2, 5, 8)).sum().backward()
            watch.step()  # numbered after the last step on disk
    run = moewatch.load(run_dir)
    view = run.global_view()
    assert sorted(view.layers.step.unique()) == list(range(18))
    assert not view.experts.duplicated(["step", "layer", "expert"]).any()
    dense = {d.layer: d for d in iter_dense_layers(run_dir)}
    for layer, d in dense.items():
        grid = view.experts[view.experts.layer == layer].pivot(index="step", columns="expert", values="tokens")
        full = grid.reindex(d.steps).fillna(0).to_numpy()
        np.testing.assert_array_equal(d.tokens, full)
        assert d.tokens[9:12].sum() == 0 and d.tokens[12:].sum() > 0
