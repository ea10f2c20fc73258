"""The TensorBoard bridge, read back with TensorBoard's own EventAccumulator and compared with the run's tables."""

from __future__ import annotations

import runpy
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

import moewatch

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from moewatch.integrations.tensorboard import SCALARS, TensorBoardBridge  # noqa: E402
from tests.toy import ToyMoE, toy_specs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def read_events(log_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0})  # 0: keep every event
    acc.Reload()
    return acc


def train_toy(run_dir: Path, sink, steps: int = 5, flush_steps: int = 2) -> None:
    torch.manual_seed(0)
    model = ToyMoE(capacity=2)  # 5 tokens * top-2 over 4 experts of capacity 2: some assignments are dropped
    with moewatch.attach(model, run_dir, routers={s.name: s for s in toy_specs(model)}, flush_steps=flush_steps,
                         on_tables=sink) as watch:
        for _ in range(steps):
            for _ in range(2):  # two micro-batches per step
                model(torch.randn(1, 5, 8)).sum().backward()
            watch.step()


def test_scalars_and_histograms_equal_the_run_tables(tmp_path):
    threads: list[str] = []
    bridge = TensorBoardBridge(tmp_path / "tb")

    def sink(experts: pa.Table, layers: pa.Table) -> None:
        threads.append(threading.current_thread().name)
        bridge(experts, layers)

    train_toy(tmp_path / "run", sink)
    bridge.close()
    assert threads and set(threads) == {"moewatch-flush"}, "the bridge must run in the writer thread"
    assert len(threads) == 3  # 5 steps flushed every 2 steps: blocks of 2, 2 and 1

    run = moewatch.load(tmp_path / "run")
    acc = read_events(tmp_path / "tb")
    layers = sorted(run.layers.layer.unique())
    assert layers == ["blocks.0.router", "blocks.1.router"]
    assert set(acc.Tags()["scalars"]) == {f"moewatch/{layer}/{m}" for layer in layers for m in SCALARS}
    assert (run.layers.drop_rate > 0).any(), "the toy must drop assignments for drop_rate to be tested"
    for layer in layers:
        rows = run.layers[run.layers.layer == layer].sort_values("step")
        for metric in SCALARS:
            events = acc.Scalars(f"moewatch/{layer}/{metric}")
            assert [e.step for e in events] == rows.step.tolist()
            np.testing.assert_allclose([e.value for e in events], rows[metric].to_numpy(np.float64), rtol=1e-6,
                                       err_msg=f"{layer}/{metric}")
            np.testing.assert_allclose([e.wall_time for e in events], rows.time.to_numpy(), rtol=0, atol=1e-3)

        hists = acc.Histograms(f"moewatch/{layer}/expert_load")
        assert [h.step for h in hists] == rows.step.tolist()
        for h in hists:
            tokens = run.experts[(run.experts.layer == layer) & (run.experts.step == h.step)].sort_values("expert")
            counts = tokens.tokens.to_numpy(np.float64)
            hv = h.histogram_value
            np.testing.assert_array_equal(hv.bucket, counts)  # one bucket per expert, its token assignments
            np.testing.assert_allclose(hv.bucket_limit, np.arange(4) + 0.5)
            assert hv.num == counts.sum()
            assert hv.sum == pytest.approx((np.arange(4) * counts).sum())
            hot = np.nonzero(counts)[0]
            assert (hv.min, hv.max) == (hot[0] - 0.5, hot[-1] + 0.5)


def test_tensorboard_renders_one_unit_wide_bucket_per_expert(tmp_path):
    # What TensorBoard's histogram dashboard plots: the data_compat migration of the raw histogram.
    from tensorboard import data_compat
    from tensorboard.compat.proto import summary_pb2
    from tensorboard.util import tensor_util

    from moewatch.integrations.tensorboard import add_expert_load

    class Capture:
        def add_histogram_raw(self, tag, **kw):
            self.kw = kw

    cap = Capture()
    add_expert_load(cap, "t", np.array([0.0, 7.0, 0.0, 3.0]), step=1)
    kw = cap.kw
    histo = summary_pb2.HistogramProto(min=kw["min"], max=kw["max"], num=kw["num"], sum=kw["sum"],
                                       sum_squares=kw["sum_squares"], bucket_limit=kw["bucket_limits"],
                                       bucket=kw["bucket_counts"])
    value = summary_pb2.Summary.Value(tag="t", histo=histo)
    buckets = tensor_util.make_ndarray(data_compat.migrate_value(value).tensor)
    # [left, right, count] per rendered bucket: experts 1..3, each bucket centred on its expert index
    np.testing.assert_allclose(buckets, [[0.5, 1.5, 7], [1.5, 2.5, 0], [2.5, 3.5, 3]])


def test_rows_without_a_value_are_left_out(tmp_path):
    # A router that gives indices only has no logits: z_loss (and the logit columns) are null and get no event.
    bridge = TensorBoardBridge(tmp_path / "tb")
    with bridge, moewatch.attach(None, tmp_path / "run", routers={}, on_tables=bridge) as watch:
        for step in range(3):
            watch.record("manual", indices=torch.tensor([[0, 1], [0, 2], [0, 1]]), num_experts=4, top_k=2)
            watch.step(step + 10)
    acc = read_events(tmp_path / "tb")
    tags = set(acc.Tags()["scalars"])
    assert "moewatch/manual/z_loss" not in tags
    assert {"moewatch/manual/cv", "moewatch/manual/dead", "moewatch/manual/max_share"} <= tags
    assert [e.step for e in acc.Scalars("moewatch/manual/dead")] == [10, 11, 12]
    assert [e.value for e in acc.Scalars("moewatch/manual/dead")] == [1.0, 1.0, 1.0]  # expert 3 never chosen
    assert [e.value for e in acc.Scalars("moewatch/manual/max_share")] == pytest.approx([0.5] * 3)


def _tables(tmp_path: Path) -> tuple[pa.Table, pa.Table]:
    got: list[tuple[pa.Table, pa.Table]] = []
    train_toy(tmp_path / "src", lambda e, ly: got.append((e, ly)), steps=2, flush_steps=10)
    assert len(got) == 1
    return got[0]


def _with_rank(table: pa.Table, rank: int) -> pa.Table:
    i = table.schema.get_field_index("rank")
    return table.set_column(i, table.schema.field(i), pa.array(np.full(table.num_rows, rank, np.int32)))


def test_only_rank_zero_by_default_all_ranks_in_subfolders(tmp_path):
    experts, layers = _tables(tmp_path)
    quiet = TensorBoardBridge(tmp_path / "tb1")
    quiet(_with_rank(experts, 1), _with_rank(layers, 1))
    quiet.close()
    assert not (tmp_path / "tb1").exists(), "a rank other than 0 must not create event files by default"

    every = TensorBoardBridge(tmp_path / "tb2", all_ranks=True)
    every(experts, layers)
    every(_with_rank(experts, 1), _with_rank(layers, 1))
    every.close()
    for rank in (0, 1):
        acc = read_events(tmp_path / "tb2" / f"rank{rank}")
        assert [e.step for e in acc.Scalars("moewatch/blocks.0.router/cv")] == [0, 1]

    closed = TensorBoardBridge(tmp_path / "tb3")
    closed.close()
    closed(experts, layers)  # blocks after close() are ignored, not an error
    assert not (tmp_path / "tb3").exists()


def test_config_is_validated():
    with pytest.raises(ValueError, match="unknown layer metrics"):
        TensorBoardBridge("tb", scalars=("cv", "nope"))
    with pytest.raises(ValueError, match="prefix"):
        TensorBoardBridge("tb", prefix="/x")


def test_readme_example_plain_attach(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(ROOT / "examples" / "tensorboard_attach.py"), run_name="__main__")
    run = moewatch.load(tmp_path / "runs" / "attach-example")
    assert run.meta["status"] == "finished"
    acc = read_events(tmp_path / "runs" / "tensorboard")
    steps = sorted(run.layers.step.unique())
    assert steps == list(range(len(steps))) and len(steps) >= 3
    for layer in run.layers.layer.unique():
        events = acc.Scalars(f"moewatch/{layer}/max_share")
        expected = run.layers[run.layers.layer == layer].sort_values("step").max_share.to_numpy()
        np.testing.assert_allclose([e.value for e in events], expected, rtol=1e-6)
