"""The trackio bridge: per-layer router-health scalars, expert-load histograms and alerts in a trackio run, through
trackio's wandb-like API (extra `moewatch[trackio]`).

`TrackioBridge` is an `on_tables` sink and an `on_alert` target for `moewatch.attach`; both run in moewatch's writer
thread, never in the training step. It logs into the run you give it, else trackio's current run (`trackio.init`,
the HF Trainer's `report_to="trackio"`; trackio keeps it per thread, so it is looked up when the bridge is built),
else a run it starts with `trackio.init(project=, name=, embed=False)` and finishes at close. trackio stores runs
locally in SQLite (`$TRACKIO_DIR/<project>.db`; `trackio show` opens its dashboard).

- `moewatch/<layer>/<metric>`: the same per-layer scalars, named the same way, as the TensorBoard bridge
  (`moewatch.integrations.bridge`), logged at moewatch's step numbers (`run.log(..., step=)`);
- `moewatch/<layer>/expert_load`: a `trackio.Histogram` with one bucket per expert (at most 512, larger layers
  binned as for W&B), every `histogram_every` steps (default 10);
- alerts as trackio alerts (`run.alert`, at the alert's step; level ERROR for critical/collapsed, WARN for warnings),
  at most `alert_burst` at once and then one per `alert_interval` seconds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

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
)

trackio = require("trackio", "trackio", "moewatch.integrations.trackio")

MAX_BUCKETS = HISTOGRAM_BUCKETS


@dataclass(frozen=True, kw_only=True)
class TrackioConfig(RunBridgeConfig):
    """The bridge's settings (plus the shared `RunBridgeConfig` / `BridgeConfig` ones). Validated on construction."""

    tracker: ClassVar[str] = "trackio"
    init: ClassVar[str] = "trackio.init"


class TrackioBridge(TrackerBridge):
    """Logs moewatch's rows and alerts into a trackio run; pass it as `attach(..., on_tables=tr, on_alert=tr.alert)`.

    `run`: the trackio run (default: trackio's current run, else `trackio.init(project=, name=, **init_kwargs)`,
    which needs `project` and which the bridge finishes at close). Close the bridge after the Watch.
    """

    tracker = "trackio"

    def __init__(
        self,
        run: Any = None,
        *,
        project: str | None = None,
        name: str | None = None,
        init_kwargs: Mapping[str, Any] | None = None,
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
        super().__init__(TrackioConfig(project=project, name=name, init_kwargs=init_kwargs, scalars=tuple(scalars),
                                       histograms=histograms, prefix=prefix, every=every,
                                       histogram_every=histogram_every, max_buckets=max_buckets,
                                       all_ranks=all_ranks, alert_level=alert_level, alert_interval=alert_interval,
                                       alert_burst=alert_burst))
        self.owns_run = False
        if run is None:
            run = trackio.context_vars.current_run.get()
        if run is None:
            if project is None:
                raise ValueError("TrackioBridge: no trackio run is active; pass project= (or run=, or call "
                                 "trackio.init first)")
            run = trackio.init(project=project, name=name, **{"embed": False, **dict(init_kwargs or {})})
            self.owns_run = True
        self.run = run

    def _log_steps(self, rows: list[StepRows]) -> None:
        p = self.config.prefix
        for r in rows:
            payload: dict[str, Any] = dict(r.scalars)
            for layer, counts_E in r.loads.items():
                counts, edges, _ = expert_buckets(counts_E, self.config.max_buckets)
                payload[metric_key(p, layer, EXPERT_LOAD)] = trackio.Histogram(np_histogram=(counts, edges))
            if payload:
                self.run.log(payload, step=r.step)

    def _send_alert(self, alert: Any, held: int) -> None:
        level = getattr(trackio.AlertLevel, alert_level(alert))
        self.run.alert(title=alert_title(alert), text=alert_text(alert, held), level=level,
                       step=int(alert.detected_step))

    def _finish(self) -> None:
        if self.owns_run:
            self.run.finish()
            if trackio.context_vars.current_run.get() is self.run:  # as trackio.finish() leaves it
                trackio.context_vars.current_run.set(None)

    def __repr__(self) -> str:
        return f"TrackioBridge(project={getattr(self.run, 'project', None)!r}, run={getattr(self.run, 'name', None)!r})"
