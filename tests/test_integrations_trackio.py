"""The trackio bridge against the real `trackio`, read back from its local SQLite store (`SQLiteStorage`)."""

from __future__ import annotations

import runpy
import sys
import uuid
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import moewatch
from moewatch.detect.alerts import Alert

trackio = pytest.importorskip("trackio")
from trackio.sqlite_storage import SQLiteStorage  # noqa: E402

from moewatch.integrations.bridge import SCALARS  # noqa: E402
from moewatch.integrations.trackio import TrackioBridge  # noqa: E402
from tests.toy import ToyMoE, toy_specs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path, monkeypatch) -> Path:
    """trackio's store in tmp_path. trackio reads $TRACKIO_DIR once, at import, into module globals: point those
    at tmp_path (the test may run after trackio was imported elsewhere)."""
    folder = tmp_path / "trackio"
    folder.mkdir()
    monkeypatch.setenv("TRACKIO_DIR", str(folder))
    for name, module in list(sys.modules.items()):
        if (name == "trackio" or name.startswith("trackio.")) and isinstance(getattr(module, "TRACKIO_DIR", None),
                                                                             Path):
            monkeypatch.setattr(module, "TRACKIO_DIR", folder)
    yield folder
    if trackio.context_vars.current_run.get() is not None:
        trackio.finish()


def project() -> str:
    return f"moewatch-{uuid.uuid4().hex[:8]}"


def alert(i: int) -> Alert:
    return Alert(kind="dead_expert", severity="critical", layer="blocks.0.router", experts=(1,), first_step=i,
                 last_step=i + 5, value=0.5, threshold=0.25, message=f"alert {i}", lever="add router noise",
                 detected_step=i + 5, ongoing=True)


def train_toy(run_dir: Path, bridge: TrackioBridge, steps: int = 5, flush_steps: int = 2) -> None:
    torch.manual_seed(0)
    model = ToyMoE(capacity=2)
    with moewatch.attach(model, run_dir, routers={s.name: s for s in toy_specs(model)}, flush_steps=flush_steps,
                         on_tables=bridge, on_alert=bridge.alert) as watch:
        for _ in range(steps):
            model(torch.randn(1, 5, 8)).sum().backward()
            watch.step()


def test_scalars_histograms_and_alerts_read_back_from_the_sqlite_store(store, tmp_path):
    name = project()
    bridge = TrackioBridge(project=name, name="toy", histogram_every=2, alert_burst=2, alert_interval=3600)
    with bridge:
        train_toy(tmp_path / "run", bridge)
        for i in range(10):
            bridge.alert(alert(i))
    assert SQLiteStorage.get_project_db_path(name).parent == store
    logs = SQLiteStorage.get_logs(name, "toy")
    run = moewatch.load(tmp_path / "run")
    for layer in sorted(run.layers.layer.unique()):
        rows = run.layers[run.layers.layer == layer].sort_values("step")
        for metric in SCALARS:
            key = f"moewatch/{layer}/{metric}"
            logged = [entry for entry in logs if key in entry]
            assert [entry["step"] for entry in logged] == rows.step.tolist()
            np.testing.assert_allclose([entry[key] for entry in logged], rows[metric].to_numpy(np.float64),
                                       rtol=1e-6)
        hists = [entry for entry in logs if f"moewatch/{layer}/expert_load" in entry]
        assert [entry["step"] for entry in hists] == [0, 2, 4]
        for entry in hists:
            h = entry[f"moewatch/{layer}/expert_load"]
            tokens = run.experts[(run.experts.layer == layer) & (run.experts.step == entry["step"])]
            assert h["_type"] == "trackio.histogram"
            assert h["values"] == tokens.sort_values("expert").tokens.tolist()
            np.testing.assert_allclose(h["bins"], np.arange(5) - 0.5)
    alerts = SQLiteStorage.get_alerts(name, run_name="toy")
    assert len(alerts) == 2, "ten alerts in a burst of two: the rest are held back"
    assert {a["level"] for a in alerts} == {"error"} and {a["step"] for a in alerts} == {5, 6}
    assert all(a["title"] == "moewatch collapsed: dead_expert on blocks.0.router" for a in alerts)
    assert bridge.alerts_held == 8
    assert trackio.context_vars.current_run.get() is None, "a run the bridge started is finished at close"


def test_the_current_run_is_used_and_left_open(store, tmp_path):
    name = project()
    run = trackio.init(project=name, name="mine", embed=False)
    bridge = TrackioBridge()
    assert bridge.run is run and not bridge.owns_run
    train_toy(tmp_path / "run", bridge, steps=2)
    bridge.close()
    run.log({"train/loss": 1.0}, step=2)
    trackio.finish()
    logs = SQLiteStorage.get_logs(name, "mine")
    assert [entry["step"] for entry in logs if "moewatch/blocks.0.router/cv" in entry] == [0, 1]
    assert [entry["train/loss"] for entry in logs if "train/loss" in entry] == [1.0]


def test_without_a_run_or_a_project_it_says_what_to_pass(store):
    with pytest.raises(ValueError, match="pass project="):
        TrackioBridge()
    with pytest.raises(ValueError, match="max_buckets"):
        TrackioBridge(project="x", max_buckets=600)


def test_a_trackio_error_warns_once_and_disables_the_bridge(store, tmp_path):
    class Broken:
        def log(self, *args, **kwargs):
            raise OSError("disk full")

    bridge = TrackioBridge(run=Broken())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_toy(tmp_path / "run", bridge, steps=4, flush_steps=1)
        bridge.close()
    assert len([w for w in caught if "trackio bridge failed" in str(w.message)]) == 1
    assert moewatch.load(tmp_path / "run").meta["status"] == "finished"


def test_readme_example(store, tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(ROOT / "examples" / "trackio_attach.py"), run_name="__main__")
    run = moewatch.load(tmp_path / "runs" / "trackio-example")
    assert run.meta["status"] == "finished"
    logs = SQLiteStorage.get_logs("moewatch-example", "attach")
    for layer in run.layers.layer.unique():
        logged = [entry[f"moewatch/{layer}/max_share"] for entry in logs if f"moewatch/{layer}/max_share" in entry]
        expected = run.layers[run.layers.layer == layer].sort_values("step").max_share.to_numpy()
        np.testing.assert_allclose(logged, expected, rtol=1e-6)
