"""The W&B bridge against the real `wandb` in offline mode, read back from the run's own transaction log."""

from __future__ import annotations

import runpy
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import moewatch
from moewatch.detect.alerts import Alert

wandb = pytest.importorskip("wandb")
from moewatch.integrations.bridge import SCALARS, AlertGate, expert_buckets  # noqa: E402
from moewatch.integrations.wandb import MAX_METRICS, WandbBridge, WandbConfig, wandb_keys  # noqa: E402
from tests.toy import ToyMoE, toy_specs  # noqa: E402
from tests.wandb_offline import read_offline_run, rows_with  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def offline(tmp_path, monkeypatch) -> Path:
    """W&B in offline mode with every folder it writes under tmp_path; any run left open is finished. W&B keeps its
    settings (the folders) in a process-wide singleton: teardown() makes the next test's wandb read them afresh."""
    wandb.teardown()
    folder = tmp_path / "wb"
    folder.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(folder))
    yield folder
    if wandb.run is not None:
        wandb.finish()
    wandb.teardown()


def alert(i: int = 0, severity: str = "critical", kind: str = "dead_expert", layer: str = "blocks.0.router") -> Alert:
    return Alert(kind=kind, severity=severity, layer=layer, experts=(i % 4,), first_step=i, last_step=i + 5,
                 value=0.5, threshold=0.25, message=f"alert {i}", lever="add router noise", detected_step=i + 5,
                 ongoing=True, latest=0.5)


def train_toy(run_dir: Path, bridge: WandbBridge, steps: int = 5, flush_steps: int = 2, **attach) -> None:
    torch.manual_seed(0)
    model = ToyMoE(capacity=2)
    with moewatch.attach(model, run_dir, routers={s.name: s for s in toy_specs(model)}, flush_steps=flush_steps,
                         on_tables=bridge, on_alert=bridge.alert, **attach) as watch:
        for _ in range(steps):
            model(torch.randn(1, 5, 8)).sum().backward()
            watch.step()


def test_scalars_histograms_and_report_read_back_from_the_offline_run(offline, tmp_path):
    threads: list[str] = []
    bridge = WandbBridge(project="moewatch-test", report_dir=tmp_path / "run", histogram_every=2)
    log = bridge.run.log

    def spy(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return log(*args, **kwargs)

    bridge.run.log = spy
    with bridge:
        train_toy(tmp_path / "run", bridge)
    assert set(threads) == {"moewatch-flush"}, "the bridge must log from the writer thread"

    run = moewatch.load(tmp_path / "run")
    rec = read_offline_run(offline)
    layers = sorted(run.layers.layer.unique())
    for layer in layers:
        rows = run.layers[run.layers.layer == layer].sort_values("step")
        for metric in SCALARS:
            key = f"moewatch/{layer}/{metric}"
            logged = rows_with(rec, key)
            assert [r["moewatch/step"] for r in logged] == rows.step.tolist(), key
            np.testing.assert_allclose([r[key] for r in logged], rows[metric].to_numpy(np.float64), rtol=1e-6)
            assert rec.metrics[key].step_metric == "moewatch/step"  # x axis: moewatch's step, not the run's
        hists = rows_with(rec, f"moewatch/{layer}/expert_load")
        assert [r["moewatch/step"] for r in hists] == [0, 2, 4]  # histogram_every=2
        for r in hists:
            h = r[f"moewatch/{layer}/expert_load"]
            tokens = run.experts[(run.experts.layer == layer) & (run.experts.step == r["moewatch/step"])]
            assert h["_type"] == "histogram"
            assert h["values"] == tokens.sort_values("expert").tokens.tolist()  # one bucket per expert
            np.testing.assert_allclose(h["bins"], np.arange(5) - 0.5)
    # The report is saved into the run's files, a self-contained HTML page.
    assert "moewatch_report.html" in rec.files
    assert (rec.files_dir / "moewatch_report.html").read_text().lstrip().lower().startswith("<!doctype html")
    assert rec.summary["moewatch/alerts_delivered"] == 0
    assert wandb.run is None, "a run the bridge started is finished at close"


def test_alerts_are_rate_limited_and_all_land_in_the_summary(offline, tmp_path):
    bridge = WandbBridge(project="moewatch-test", alert_burst=2, alert_interval=3600)
    for i in range(20):
        bridge.alert(alert(i))
    bridge.alert(alert(99, severity="info"))  # below alert_level="warning": neither sent nor counted
    bridge.close()
    rec = read_offline_run(offline)
    assert len(rec.alerts) == 2, "20 alerts in a burst of 2: two go out, the rest wait for the interval"
    for a in rec.alerts:
        assert a.level == "ERROR" and a.wait_duration == 3600 * 1000  # W&B's own per-title limit, in ms
        assert a.title == "moewatch collapsed: dead_expert on blocks.0.router" and len(a.title) < 64
    assert "alert 0" in rec.alerts[0].text and "Lever: add router noise" in rec.alerts[0].text
    assert rec.summary["moewatch/alerts"] == 20
    assert rec.summary["moewatch/worst_alert_status"] == "collapsed"
    assert rec.summary["moewatch/alerts_delivered"] == 2 and rec.summary["moewatch/alerts_held_back"] == 18
    assert "alert 19" in rec.summary["moewatch/last_alert"]
    assert [a["message"] for a in rec.summary["moewatch/alert_log"]] == [f"alert {i}" for i in range(20)]


def test_the_gate_refills_one_alert_per_interval_and_counts_what_it_held():
    now = [0.0]
    gate = AlertGate(interval=10.0, burst=2, clock=lambda: now[0])
    assert [gate.admit() for _ in range(4)] == [(True, 0), (True, 0), (False, 1), (False, 2)]
    now[0] = 9.0
    assert gate.admit() == (False, 3)
    now[0] = 10.5
    assert gate.admit() == (True, 3)  # the next one out says how many were held back
    assert gate.admit() == (False, 1)
    now[0] = 1000.0
    assert [gate.admit()[0] for _ in range(3)] == [True, True, False]  # refilled to the burst, no further


def test_live_alerts_reach_wandb_from_the_writer_thread(offline, tmp_path):
    # A layer whose experts 1-3 never get a token: the live detector raises a collapse and the bridge delivers it.
    bridge = WandbBridge(project="moewatch-test", alert_burst=1)
    config = moewatch.detect.DetectorConfig(warmup_steps=0, window_steps=5)
    with bridge, moewatch.attach(None, tmp_path / "run", routers={}, flush_steps=10, on_tables=bridge,
                                 on_alert=bridge.alert, detector_config=config) as watch:
        for _ in range(60):
            watch.record("manual", indices=torch.zeros(64, 1, dtype=torch.long), num_experts=4, top_k=1)
            watch.step()
    rec = read_offline_run(offline)
    assert len(rec.alerts) == 1 and rec.alerts[0].level == "ERROR"
    assert rec.summary["moewatch/alerts"] >= 1 and rec.summary["moewatch/worst_alert_status"] == "collapsed"
    assert rec.summary["moewatch/alerts_delivered"] == 1


def test_an_existing_run_is_used_and_not_finished_and_a_framework_glob_does_not_take_the_keys(offline, tmp_path):
    run = wandb.init(project="moewatch-test")
    # What the HF Trainer's and Lightning's W&B loggers do: every key against their own step, synced.
    run.define_metric("train/global_step")
    run.define_metric("*", step_metric="train/global_step", step_sync=True)
    bridge = WandbBridge()
    assert bridge.run is run and not bridge.owns_run
    run.log({"train/global_step": 7, "train/loss": 1.0})
    train_toy(tmp_path / "run", bridge, steps=3)
    bridge.close()
    assert wandb.run is run, "the user's run stays open"
    run.log({"train/global_step": 8, "train/loss": 0.5})
    run.finish()
    rec = read_offline_run(offline)
    assert [r["train/loss"] for r in rows_with(rec, "train/loss")] == [1.0, 0.5]
    assert [r["moewatch/step"] for r in rows_with(rec, "moewatch/blocks.0.router/cv")] == [0, 1, 2]
    assert rec.metrics["moewatch/blocks.0.router/cv"].step_metric == "moewatch/step"
    assert rec.metrics["*"].step_metric == "train/global_step"


def test_a_layer_over_512_experts_is_binned_and_says_so(offline, tmp_path):
    bridge = WandbBridge(project="moewatch-test", histogram_every=1)
    experts = 1000
    with pytest.warns(RuntimeWarning, match=r"1000 experts, more than W&B's 512 histogram buckets.*2 neighbouring"):
        with bridge, moewatch.attach(None, tmp_path / "run", routers={}, on_tables=bridge) as watch:
            watch.record("wide", indices=torch.arange(experts).reshape(-1, 1), num_experts=experts, top_k=1)
            watch.step()
    rec = read_offline_run(offline)
    (row,) = rows_with(rec, "moewatch/wide/expert_load")
    h = row["moewatch/wide/expert_load"]
    assert len(h["values"]) == 500 and sum(h["values"]) == experts and set(h["values"]) == {2}
    assert h["bins"][0] == -0.5 and h["bins"][-1] == experts - 0.5 and h["bins"][1] == 1.5
    assert rec.summary["moewatch/experts_per_bucket"] == {"wide": 2}

    counts, edges, width = expert_buckets(np.arange(7.0), max_buckets=3)  # 7 experts in buckets of 3, 3 and 1
    assert width == 3 and counts.tolist() == [3.0, 12.0, 6.0] and edges.tolist() == [-0.5, 2.5, 5.5, 6.5]
    counts, edges, width = expert_buckets(np.array([4.0, 0.0]), max_buckets=512)
    assert width == 1 and counts.tolist() == [4.0, 0.0] and edges.tolist() == [-0.5, 0.5, 1.5]


def test_a_58_layer_256_expert_model_stays_within_wandb_limits(offline, tmp_path):
    """The key count of the issue's model, measured on a real offline run: 58 routers of 256 experts, 2 steps."""
    bridge = WandbBridge(project="moewatch-test", histogram_every=1)
    gen = torch.Generator().manual_seed(0)
    with bridge, moewatch.attach(None, tmp_path / "run", routers={}, on_tables=bridge) as watch:
        for _ in range(2):
            for layer in range(58):
                logits = torch.randn(512, 256, generator=gen)  # logits too: every scalar has a value
                watch.record(f"model.layers.{layer}.mlp.gate", logits=logits, indices=logits.topk(8).indices)
            watch.step()
    rec = read_offline_run(offline)
    keys = {k for row in rec.history for k in row if not k.startswith("_")}
    assert len(keys) == wandb_keys(58) == 58 * 8 + 1 == 465 < MAX_METRICS
    assert len(rec.history) == 2, "one row per moewatch step, all layers in it"
    assert all(len(row["moewatch/model.layers.0.mlp.gate/expert_load"]["values"]) == 256 for row in rec.history)
    # Points per metric: a million-step run is spread to W&B's 100,000 per scalar and 10,000 per histogram.
    fitted = WandbConfig(max_steps=1_000_000).fitted()
    assert (fitted.every, fitted.histogram_every) == (10, 100)
    assert WandbConfig().fitted().histogram_every == 10  # unknown length: fits runs up to 100,000 steps


def test_a_wandb_error_warns_once_and_disables_the_bridge(offline, tmp_path):
    bridge = WandbBridge(project="moewatch-test")
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("W&B is down")

    bridge.run.log = broken
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_toy(tmp_path / "run", bridge, steps=6, flush_steps=1)
        bridge.alert(alert())
        bridge.close()
    failures = [w for w in caught if "W&B bridge failed" in str(w.message)]
    assert len(failures) == 1 and "W&B is down" in str(failures[0].message)
    assert len(calls) == 1 and not bridge.active
    run = moewatch.load(tmp_path / "run")
    assert run.meta["status"] == "finished" and sorted(run.layers.step.unique()) == list(range(6))


def test_config_is_validated(offline):
    with pytest.raises(ValueError, match="max_buckets"):
        WandbBridge(project="x", max_buckets=1000)
    with pytest.raises(ValueError, match="unknown layer metrics"):
        WandbBridge(project="x", scalars=("cv", "nope"))
    with pytest.raises(ValueError, match="alert_level"):
        WandbBridge(project="x", alert_level="loud")
    with pytest.raises(ValueError, match="every"):
        WandbBridge(project="x", every=0)
    assert wandb.run is None, "an invalid bridge starts no run"


def test_readme_example(offline, tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(ROOT / "examples" / "wandb_attach.py"), run_name="__main__")
    run = moewatch.load(tmp_path / "runs" / "wandb-example")
    assert run.meta["status"] == "finished"
    rec = read_offline_run(offline)
    for layer in run.layers.layer.unique():
        logged = rows_with(rec, f"moewatch/{layer}/max_share")
        expected = run.layers[run.layers.layer == layer].sort_values("step").max_share.to_numpy()
        np.testing.assert_allclose([r[f"moewatch/{layer}/max_share"] for r in logged], expected, rtol=1e-6)
    assert "moewatch_report.html" in rec.files
