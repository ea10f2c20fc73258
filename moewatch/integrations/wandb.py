"""The Weights & Biases bridge: per-layer router-health scalars, expert-load histograms, alerts and the HTML report
in a W&B run (extra `moewatch[wandb]`).

`WandbBridge` is an `on_tables` sink and an `on_alert` target for `moewatch.attach`; both run in moewatch's writer
thread, never in the training step. It logs into the run you give it, else the active `wandb.run` (the one the HF
Trainer's `report_to="wandb"` or Lightning's `WandbLogger` opened), else a run it starts itself (and finishes at
close). Per flushed step it makes one `run.log` call holding

- `moewatch/<layer>/<metric>`: the same per-layer scalars, named the same way, as the TensorBoard bridge
  (`moewatch.integrations.bridge`);
- `moewatch/<layer>/expert_load`: a `wandb.Histogram` with one bucket per expert (bucket `i` spans `i - 0.5 ..
  i + 0.5`); a layer with more than 512 experts (W&B's bucket limit) is binned into runs of neighbouring experts,
  said once in a warning and in the run summary under `moewatch/experts_per_bucket`;
- `moewatch/step`: moewatch's step number, the x axis of every moewatch key (`define_metric`), so moewatch's rows
  never depend on the run's own step counter (which the Trainer's or Lightning's logging advances).

Alerts go into the run summary (`moewatch/alerts`, `moewatch/worst_alert_status`, `moewatch/last_alert`,
`moewatch/alert_log`) and out as W&B alerts (`run.alert`, level ERROR for critical/collapsed, WARN for warnings),
at most `alert_burst` at once and then one per `alert_interval` seconds (also W&B's own `wait_duration` per title).
At close the run's HTML report (`report_dir`: the moewatch run directory) is saved into the W&B run's files.

W&B's limits (docs: "Experiments limits and performance"): under 10,000 distinct metrics per project, under 100,000
logged points per scalar metric and 10,000 per histogram metric, 512 histogram buckets. moewatch logs
`layers x (scalars + 1) + 1` keys: 465 for a 58-layer model whatever its expert count (the experts live inside one
histogram per layer, never one key per expert). Scalars are logged every step and histograms every
`histogram_every` (default 10) steps, so a run of up to 100,000 steps stays within the point limits; with
`max_steps` known (the callbacks pass it) the strides are raised to fit longer runs, and a kind that reaches its
limit anyway stops with a warning (the run directory keeps every step).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from moewatch.integrations import require
from moewatch.integrations.bridge import (
    EXPERT_LOAD,
    HISTOGRAM_BUCKETS,
    SCALARS,
    RunBridgeConfig,
    StepRows,
    TrackerBridge,
    alert_level,
    alert_text,
    alert_title,
    expert_buckets,
    metric_key,
    write_report,
)

wandb = require("wandb", "wandb", "moewatch.integrations.wandb")

MAX_METRICS = 10_000  # distinct metrics per project
SCALAR_POINTS = 100_000  # logged points per scalar metric
HISTOGRAM_POINTS = 10_000  # logged points per histogram metric
MAX_BUCKETS = HISTOGRAM_BUCKETS  # buckets of one wandb.Histogram
ALERT_LOG = 100  # alerts kept in the run summary's alert log (the newest)


def wandb_keys(layers: int, scalars: int = len(SCALARS), histograms: bool = True) -> int:
    """The distinct metric keys moewatch logs for a model with `layers` routers (the step key included)."""
    return layers * (scalars + int(histograms)) + 1


@dataclass(frozen=True, kw_only=True)
class WandbConfig(RunBridgeConfig):
    """The bridge's settings (plus the shared `RunBridgeConfig` / `BridgeConfig` ones). Validated on construction."""

    tracker: ClassVar[str] = "W&B"
    init: ClassVar[str] = "wandb.init"

    report_dir: str | os.PathLike | None = None
    max_steps: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 0):
            raise ValueError(f"max_steps must be an integer >= 0 or None, got {self.max_steps!r}")

    def fitted(self) -> WandbConfig:
        """The strides raised so that `max_steps` steps stay within W&B's points per metric."""
        if not self.max_steps:
            return self
        return replace(self, every=max(self.every, math.ceil(self.max_steps / SCALAR_POINTS)),
                       histogram_every=max(self.histogram_every, math.ceil(self.max_steps / HISTOGRAM_POINTS)))


class WandbBridge(TrackerBridge):
    """Logs moewatch's rows and alerts into a W&B run; pass it as `attach(..., on_tables=wb, on_alert=wb.alert)`.

    `run`: the W&B run to log into (default: the active `wandb.run`, else a new `wandb.init(project=, name=,
    **init_kwargs)` that the bridge finishes at close). `report_dir`: the moewatch run directory whose HTML report
    is saved into the run at close. Close the bridge after the Watch (the `with` order in the README does that).
    """

    tracker = "W&B"

    def __init__(
        self,
        run: Any = None,
        *,
        project: str | None = None,
        name: str | None = None,
        init_kwargs: Mapping[str, Any] | None = None,
        report_dir: str | os.PathLike | None = None,
        max_steps: int | None = None,
        scalars: tuple[str, ...] = SCALARS,
        histograms: bool = True,
        prefix: str = "moewatch",
        every: int = 1,
        histogram_every: int = 10,
        max_buckets: int = MAX_BUCKETS,
        all_ranks: bool = False,
        alert_level: str = "warning",
        alert_interval: float = 60.0,
        alert_burst: int = 5,
    ):
        config = WandbConfig(project=project, name=name, init_kwargs=init_kwargs, report_dir=report_dir,
                             max_steps=max_steps, scalars=tuple(scalars), histograms=histograms, prefix=prefix,
                             every=every, histogram_every=histogram_every, max_buckets=max_buckets,
                             all_ranks=all_ranks, alert_level=alert_level, alert_interval=alert_interval,
                             alert_burst=alert_burst)
        super().__init__(config.fitted())
        self.owns_run = False
        if run is None:
            run = wandb.run
        if run is None:
            run = wandb.init(project=project, name=name, **dict(init_kwargs or {}))
            self.owns_run = True
        self.run = run
        self.step_key = f"{prefix}/step"
        self.run.define_metric(self.step_key)
        self._defined: set[str] = set()
        self._binned: dict[str, int] = {}
        self._points = {"scalars": 0, "histograms": 0}
        self._alert_log: list[dict[str, Any]] = []
        self._warned: set[str] = set()

    def _define(self, key: str) -> None:
        # An exact definition, so a framework's glob (e.g. "*" against train/global_step) does not claim the key.
        if key not in self._defined:
            self._defined.add(key)
            self.run.define_metric(key, step_metric=self.step_key)
            if len(self._defined) == MAX_METRICS:
                self._warn_once("metrics", f"moewatch: {MAX_METRICS} distinct W&B metrics logged, W&B's suggested "
                                           "limit per project; log fewer `scalars=` or turn `histograms=` off")

    def _under_limit(self, kind: str, limit: int) -> bool:
        if self._points[kind] < limit:
            self._points[kind] += 1
            return True
        self._warn_once(kind, f"moewatch: W&B's limit of {limit:,} points per {kind[:-1]} metric is reached; moewatch "
                              f"logs no more {kind} into this run (the run directory keeps every step). Pass "
                              f"max_steps= or a larger every=/histogram_every= to spread them over the run")
        return False

    def _warn_once(self, what: str, message: str) -> None:
        if what not in self._warned:
            self._warned.add(what)
            warnings.warn(message, RuntimeWarning, stacklevel=4)

    def _log_steps(self, rows: list[StepRows]) -> None:
        p = self.config.prefix
        for r in rows:
            payload: dict[str, Any] = {}
            if r.scalars and self._under_limit("scalars", SCALAR_POINTS):
                payload.update(r.scalars)
            if r.loads and self._under_limit("histograms", HISTOGRAM_POINTS):
                for layer, counts in r.loads.items():
                    payload[metric_key(p, layer, EXPERT_LOAD)] = self._histogram(layer, counts)
            if not payload:
                continue
            for key in payload:
                self._define(key)
            payload[self.step_key] = r.step
            self.run.log(payload)

    def _histogram(self, layer: str, counts_E: np.ndarray) -> Any:
        counts, edges, width = expert_buckets(counts_E, self.config.max_buckets)
        if width > 1 and layer not in self._binned:
            self._binned[layer] = width
            self.run.summary[f"{self.config.prefix}/experts_per_bucket"] = dict(self._binned)
            self._warn_once(f"binned:{layer}", (
                f"moewatch: {layer} has {len(counts_E)} experts, more than W&B's {self.config.max_buckets} histogram "
                f"buckets: its expert_load histogram puts {width} neighbouring experts in each bucket (recorded in "
                f"the run summary under {self.config.prefix}/experts_per_bucket)"))
        return wandb.Histogram(np_histogram=(counts, edges))

    def _record_alert(self, alert: Any) -> None:
        p = self.config.prefix
        self._alert_log = ([*self._alert_log, alert.to_dict()])[-ALERT_LOG:]
        summary = self.run.summary
        summary[f"{p}/alerts"] = self.alerts_seen
        summary[f"{p}/worst_alert_status"] = self.worst_status
        summary[f"{p}/last_alert"] = alert_text(alert)
        summary[f"{p}/alert_log"] = self._alert_log

    def _send_alert(self, alert: Any, held: int) -> None:
        self.run.alert(title=alert_title(alert), text=alert_text(alert, held), level=alert_level(alert),
                       wait_duration=max(1.0, self.config.alert_interval))

    def _finish(self) -> None:
        try:
            if not self._failed:
                p = self.config.prefix
                self.run.summary[f"{p}/alerts_delivered"] = self.alerts_sent
                self.run.summary[f"{p}/alerts_held_back"] = self.alerts_held
                if self.config.report_dir is not None:
                    path = write_report(self.config.report_dir, Path(self.run.dir))
                    if path is not None:
                        self.run.save(str(path), base_path=str(path.parent), policy="now")
        finally:
            if self.owns_run:
                self.run.finish()

    def __repr__(self) -> str:
        return f"WandbBridge(run={getattr(self.run, 'id', None)!r})"
