"""The MLflow bridge against the real `mlflow` with a local file store, read back through `MlflowClient`."""

from __future__ import annotations

import runpy
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import moewatch
from moewatch.detect.alerts import Alert

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402

from moewatch.integrations.bridge import SCALARS  # noqa: E402
from moewatch.integrations.mlflow import MAX_METRICS, MLflowBridge  # noqa: E402
from tests.toy import ToyMoE, toy_specs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path, monkeypatch) -> str:
    """A local file store under tmp_path (MLflow 3 keeps the file store in maintenance mode: allowed explicitly)."""
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("Default")  # the active experiment is process-wide: not one another test's store had
    yield uri
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


def alert(i: int, kind: str = "dead_expert", layer: str = "blocks.0.router", severity: str = "critical") -> Alert:
    return Alert(kind=kind, severity=severity, layer=layer, experts=(1,), first_step=i, last_step=i + 5, value=0.5,
                 threshold=0.25, message=f"alert {i}", lever="add router noise", detected_step=i + 5, ongoing=True)


def train_toy(run_dir: Path, bridge: MLflowBridge, steps: int = 5, flush_steps: int = 2) -> None:
    torch.manual_seed(0)
    model = ToyMoE(capacity=2)
    with moewatch.attach(model, run_dir, routers={s.name: s for s in toy_specs(model)}, flush_steps=flush_steps,
                         on_tables=bridge, on_alert=bridge.alert) as watch:
        for _ in range(steps):
            model(torch.randn(1, 5, 8)).sum().backward()
            watch.step()


def test_metrics_and_report_read_back_through_the_client(store, tmp_path):
    bridge = MLflowBridge(experiment="moewatch-test", run_name="toy", report_dir=tmp_path / "run")
    with bridge:
        train_toy(tmp_path / "run", bridge)
    client = MlflowClient()
    got = client.get_run(bridge.run_id)
    assert got.info.status == "FINISHED" and got.info.run_name == "toy", "a run the bridge created is ended"
    assert client.get_experiment(got.info.experiment_id).name == "moewatch-test"

    run = moewatch.load(tmp_path / "run")
    for layer in sorted(run.layers.layer.unique()):
        rows = run.layers[run.layers.layer == layer].sort_values("step")
        for metric in SCALARS:
            history = sorted(client.get_metric_history(bridge.run_id, f"moewatch/{layer}/{metric}"),
                             key=lambda m: m.step)
            assert [m.step for m in history] == rows.step.tolist()
            np.testing.assert_allclose([m.value for m in history], rows[metric].to_numpy(np.float64), rtol=1e-6)
            assert [m.timestamp for m in history] == [int(t * 1000) for t in rows.time]
    artifacts = [a.path for a in client.list_artifacts(bridge.run_id, "moewatch")]
    assert artifacts == ["moewatch/moewatch_report.html"]
    page = Path(client.download_artifacts(bridge.run_id, "moewatch/moewatch_report.html", str(tmp_path / "dl")))
    assert page.read_text().lstrip().lower().startswith("<!doctype html")


def test_log_batch_sends_at_most_1000_metrics_a_call(store, tmp_path):
    bridge = MLflowBridge(experiment="moewatch-test")
    sizes = []
    log_batch = bridge.client.log_batch

    def spy(run_id, metrics=(), **kwargs):
        sizes.append(len(metrics))
        return log_batch(run_id, metrics=metrics, **kwargs)

    bridge.client.log_batch = spy
    with bridge:
        train_toy(tmp_path / "run", bridge, steps=100, flush_steps=100)  # 100 steps x 2 layers x 7 scalars
    assert sizes == [MAX_METRICS, 400]
    history = MlflowClient().get_metric_history(bridge.run_id, "moewatch/blocks.1.router/max_share")
    assert sorted(m.step for m in history) == list(range(100))


def test_an_active_run_gets_the_metrics_and_alerts_as_tags_and_stays_open(store, tmp_path):
    with mlflow.start_run() as active:
        bridge = MLflowBridge()
        assert bridge.run_id == active.info.run_id and not bridge.owns_run
        train_toy(tmp_path / "run", bridge, steps=2)
        bridge.alert(alert(1))
        bridge.alert(alert(2, kind="drops", layer="blocks.1.router"))
        bridge.alert(alert(3))  # the same layer and kind: the tag holds the latest
        bridge.alert(alert(4, severity="info"))  # below alert_level: not written
        bridge.close()
        assert MlflowClient().get_run(active.info.run_id).info.status == "RUNNING"
    tags = MlflowClient().get_run(active.info.run_id).data.tags
    assert tags["moewatch/alerts"] == "3" and tags["moewatch/worst_alert_status"] == "collapsed"
    assert "alert 3" in tags["moewatch/alert/blocks.0.router/dead_expert"]
    assert tags["moewatch/alert/blocks.0.router/dead_expert"].startswith("moewatch collapsed (dead_expert critical")
    assert "alert 2" in tags["moewatch/alert/blocks.1.router/drops"]
    assert not any("info" in v for k, v in tags.items() if k.startswith("moewatch/alert/"))
    metrics = MlflowClient().get_run(active.info.run_id).data.metrics
    assert "moewatch/blocks.0.router/cv" in metrics


def test_unsafe_characters_in_a_layer_name_become_underscores(store, tmp_path):
    bridge = MLflowBridge(experiment="moewatch-test")
    with bridge, moewatch.attach(None, tmp_path / "run", routers={}, on_tables=bridge) as watch:
        watch.record("experts[0]#gate", indices=torch.tensor([[0], [1]]), num_experts=2, top_k=1)
        watch.step()
    history = MlflowClient().get_metric_history(bridge.run_id, "moewatch/experts_0__gate/max_share")
    assert [m.value for m in history] == [0.5]


def test_an_mlflow_error_warns_once_and_disables_the_bridge(store, tmp_path):
    bridge = MLflowBridge(experiment="moewatch-test")

    def broken(*args, **kwargs):
        raise ConnectionError("tracking server unreachable")

    bridge.client.log_batch = broken
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_toy(tmp_path / "run", bridge, steps=4, flush_steps=1)
        bridge.close()
    failures = [w for w in caught if "MLflow bridge failed" in str(w.message)]
    assert len(failures) == 1 and "unreachable" in str(failures[0].message)
    assert moewatch.load(tmp_path / "run").meta["status"] == "finished"
    assert MlflowClient().get_run(bridge.run_id).info.status == "FINISHED"  # its own run is still ended


def test_config_is_validated(store):
    with pytest.raises(ValueError, match="unknown layer metrics"):
        MLflowBridge(scalars=("nope",))
    with pytest.raises(ValueError, match="prefix"):
        MLflowBridge(prefix="")


def test_readme_example(store, tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(ROOT / "examples" / "mlflow_attach.py"), run_name="__main__")
    run = moewatch.load(tmp_path / "runs" / "mlflow-example")
    assert run.meta["status"] == "finished"
    (found,) = MlflowClient().search_runs(["0"], filter_string="attributes.run_name = 'moewatch-example'")
    assert found.info.status == "FINISHED"
    for layer in run.layers.layer.unique():
        history = MlflowClient().get_metric_history(found.info.run_id, f"moewatch/{layer}/max_share")
        expected = run.layers[run.layers.layer == layer].sort_values("step").max_share.to_numpy()
        np.testing.assert_allclose([m.value for m in sorted(history, key=lambda m: m.step)], expected, rtol=1e-6)
    assert [a.path for a in MlflowClient().list_artifacts(found.info.run_id, "moewatch")] == [
        "moewatch/moewatch_report.html"]
