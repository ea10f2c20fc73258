"""The MLflow bridge: per-layer router-health scalars, alerts as tags and the HTML report as an artifact in an MLflow
run (extra `moewatch[mlflow]`).

`MLflowBridge` is an `on_tables` sink and an `on_alert` target for `moewatch.attach`; both run in moewatch's writer
thread, never in the training step. It logs into the run you name (`run_id`), else the active run of the thread that
builds it (`mlflow.start_run()`, the HF Trainer's `report_to="mlflow"`, Lightning's `MLFlowLogger` via the callback),
else a run it creates (and ends at close). MLflow's active run is per thread, so the run and the tracking URI are
resolved when the bridge is built and the writer thread logs through an `MlflowClient`.

- Metrics `moewatch/<layer>/<metric>`: the same per-layer scalars, named the same way, as the TensorBoard bridge
  (`moewatch.integrations.bridge`), with moewatch's step numbers and the steps' wall times, sent with `log_batch` in
  calls of at most 1,000 metrics (MLflow's limit). MLflow has no histogram type: no expert-load histogram.
- Alerts as tags: `moewatch/alert/<layer>/<kind>` (the alert's line, the latest per layer and kind),
  `moewatch/alerts` (how many) and `moewatch/worst_alert_status`. Tags are state, overwritten in place, so every
  alert is written (at most 100 tags a call).
- At close, the run's HTML report (`report_dir`: the moewatch run directory) as the artifact
  `moewatch/moewatch_report.html`.

Characters MLflow does not accept in a key (it takes letters, digits, `_ - . : /` and spaces) become `_`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from moewatch.integrations import require
from moewatch.integrations.bridge import (
    SCALARS,
    BridgeConfig,
    StepRows,
    TrackerBridge,
    alert_text,
    safe_key,
    write_report,
)

mlflow = require("mlflow", "mlflow", "moewatch.integrations.mlflow")

MAX_METRICS = 1000  # metrics per log_batch call
MAX_TAGS = 100  # tags per log_batch call
MAX_TAG_VALUE = 5000  # characters kept of a tag value (MLflow takes up to 8,000)


@dataclass(frozen=True, kw_only=True)
class MLflowConfig(BridgeConfig):
    """The bridge's settings (plus the shared `BridgeConfig` ones). Validated on construction."""

    histograms: bool = False
    run_id: str | None = None
    experiment: str | None = None
    run_name: str | None = None
    tracking_uri: str | None = None
    report_dir: str | os.PathLike | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.histograms:
            raise ValueError("MLflow has no histogram type: the MLflow bridge logs scalars only (histograms=False)")


class MLflowBridge(TrackerBridge):
    """Logs moewatch's rows and alerts into an MLflow run; pass it as `attach(..., on_tables=ml, on_alert=ml.alert)`.

    `run_id`: the run to log into (default: the active run, else a new run in `experiment` (default: MLflow's
    default experiment) named `run_name`, which the bridge ends at close). `tracking_uri`: default
    `mlflow.get_tracking_uri()`. `report_dir`: the moewatch run directory whose HTML report is logged as an artifact
    at close. Close the bridge after the Watch.
    """

    tracker = "MLflow"

    def __init__(
        self,
        run_id: str | None = None,
        *,
        experiment: str | None = None,
        run_name: str | None = None,
        tracking_uri: str | None = None,
        report_dir: str | os.PathLike | None = None,
        scalars: tuple[str, ...] = SCALARS,
        prefix: str = "moewatch",
        every: int = 1,
        all_ranks: bool = False,
        alert_level: str = "warning",
    ):
        super().__init__(MLflowConfig(run_id=run_id, experiment=experiment, run_name=run_name,
                                      tracking_uri=tracking_uri, report_dir=report_dir, scalars=tuple(scalars),
                                      prefix=prefix, every=every, all_ranks=all_ranks, alert_level=alert_level))
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri or mlflow.get_tracking_uri()
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        self.owns_run = False
        if run_id is None:
            active = mlflow.active_run()
            run_id = active.info.run_id if active is not None else None
        if run_id is None:
            run_id = self.client.create_run(self._experiment_id(experiment), run_name=run_name).info.run_id
            self.owns_run = True
        self.run_id = run_id
        self.metrics_logged = 0
        self.batches = 0

    def _experiment_id(self, name: str | None) -> str:
        if name is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME")
        if name is None:
            experiment_id = os.environ.get("MLFLOW_EXPERIMENT_ID")
            if experiment_id:
                return experiment_id
            name = "Default"
        found = self.client.get_experiment_by_name(name)
        return found.experiment_id if found is not None else self.client.create_experiment(name)

    def _log_steps(self, rows: list[StepRows]) -> None:
        from mlflow.entities import Metric

        batch: list[Any] = []
        for r in rows:
            millis = int((r.time if r.time is not None else 0.0) * 1000)
            for key, value in r.scalars.items():
                batch.append(Metric(key=safe_key(key), value=value, timestamp=millis, step=r.step))
                if len(batch) == MAX_METRICS:
                    self._send(metrics=batch)
                    batch = []
        if batch:
            self._send(metrics=batch)

    def _send(self, metrics: Sequence[Any] = (), tags: Sequence[Any] = ()) -> None:
        self.client.log_batch(self.run_id, metrics=list(metrics), tags=list(tags))
        self.metrics_logged += len(metrics)
        self.batches += 1

    def _record_alert(self, alert: Any) -> None:
        from mlflow.entities import RunTag

        p = self.config.prefix
        tags = {
            f"{p}/alert/{alert.layer}/{alert.kind}": alert_text(alert)[:MAX_TAG_VALUE],
            f"{p}/alerts": str(self.alerts_seen),
            f"{p}/worst_alert_status": self.worst_status,
        }
        self._send(tags=[RunTag(safe_key(k), v) for k, v in tags.items()])

    def _finish(self) -> None:
        try:
            if not self._failed and self.config.report_dir is not None:
                path = write_report(self.config.report_dir)
                if path is not None:
                    self.client.log_artifact(self.run_id, str(path), artifact_path=self.config.prefix)
        finally:
            if self.owns_run:
                self.client.set_terminated(self.run_id)

    def __repr__(self) -> str:
        return f"MLflowBridge(run_id={self.run_id!r})"
