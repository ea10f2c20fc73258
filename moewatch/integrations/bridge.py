"""What the tracker bridges share (TensorBoard, W&B, MLflow, trackio): one way to name and compute what they log.

- `step_rows(experts, layers, config)` turns a flushed block of rows into one `StepRows` per (rank, step): the
  per-layer scalars keyed `<prefix>/<layer>/<metric>` (the values of the run's `layers` table; null values are left
  out) and each layer's per-expert token counts for the expert-load histogram `<prefix>/<layer>/expert_load`.
- `expert_buckets` bins a layer's experts into at most `max_buckets` histogram buckets (W&B and trackio take 512).
- `AlertGate` rate-limits alert delivery (a token bucket); `alert_title` / `alert_text` / `alert_level` word an alert.
- `TrackerBridge` is the base of the W&B, MLflow and trackio bridges: an `on_tables` sink and an `on_alert` target
  that runs in moewatch's writer thread and, if its tracker raises, warns once and disables itself (training goes on;
  the run directory still has everything).
- `write_report` renders a run's HTML report for a bridge to attach at close.

Nothing here imports a tracker library.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from moewatch.store.schema import LAYERS, SCHEMAS

SCALARS = ("cv", "entropy_norm", "max_share", "dead", "drop_rate", "z_loss", "aux_loss")
EXPERT_LOAD = "expert_load"
SEVERITY_RANK = {"info": 0, "warning": 1, "critical": 2}
HISTOGRAM_BUCKETS = 512  # buckets of one W&B or trackio histogram


@dataclass(frozen=True, kw_only=True)
class BridgeConfig:
    """What a bridge logs, shared by every tracker. Validated on construction.

    `scalars`: columns of the `layers` table logged per layer; `histograms`: the expert-load histogram per layer;
    `prefix`: the first part of every key; `all_ranks`: log the rows of every rank this process hands over (default:
    rank 0's only, as trackers usually do); `every` / `histogram_every`: log only steps whose number divides by it;
    `max_buckets`: bin layers with more experts into this many histogram buckets (None: one bucket per expert).
    Alerts of at least `alert_level` severity are delivered, at most `alert_burst` at once and then one per
    `alert_interval` seconds.
    """

    scalars: tuple[str, ...] = SCALARS
    histograms: bool = True
    prefix: str = "moewatch"
    all_ranks: bool = False
    every: int = 1
    histogram_every: int = 1
    max_buckets: int | None = None
    alert_level: str = "warning"
    alert_interval: float = 60.0
    alert_burst: int = 5

    def __post_init__(self) -> None:
        object.__setattr__(self, "scalars", tuple(self.scalars))
        known = set(SCHEMAS[LAYERS].names)
        unknown = [s for s in self.scalars if s not in known]
        if unknown:
            raise ValueError(f"unknown layer metrics {unknown}; pick from the `layers` table: {sorted(known)}")
        if not isinstance(self.prefix, str) or not self.prefix or self.prefix.startswith("/") \
                or self.prefix.endswith("/"):
            raise ValueError(f"prefix must be a non-empty key prefix without leading/trailing '/', got {self.prefix!r}")
        for name in ("every", "histogram_every", "alert_burst"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.max_buckets is not None and (not isinstance(self.max_buckets, int) or self.max_buckets < 1):
            raise ValueError(f"max_buckets must be an integer >= 1 or None, got {self.max_buckets!r}")
        if self.alert_level not in SEVERITY_RANK:
            raise ValueError(f"alert_level must be one of {', '.join(SEVERITY_RANK)}, got {self.alert_level!r}")
        if not (isinstance(self.alert_interval, (int, float)) and self.alert_interval >= 0):
            raise ValueError(f"alert_interval must be a number of seconds >= 0, got {self.alert_interval!r}")


@dataclass(frozen=True, kw_only=True)
class RunBridgeConfig(BridgeConfig):
    """The settings of a bridge that logs into a run of its tracker and may start that run (W&B, trackio): histograms
    every 10 steps within the tracker's 512 buckets, and the run's `project`, `name` and other `init_kwargs`."""

    tracker: ClassVar[str] = "the tracker"  # its name in messages
    init: ClassVar[str] = "init"  # the function `init_kwargs` go to

    histogram_every: int = 10
    max_buckets: int | None = HISTOGRAM_BUCKETS
    project: str | None = None
    name: str | None = None
    init_kwargs: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_buckets is None or self.max_buckets > HISTOGRAM_BUCKETS:
            raise ValueError(f"max_buckets must be at most {HISTOGRAM_BUCKETS} ({self.tracker}'s histogram limit), "
                             f"got {self.max_buckets!r}")
        if self.init_kwargs is not None and not isinstance(self.init_kwargs, Mapping):
            raise TypeError(f"init_kwargs must be a mapping of {self.init} arguments, got {self.init_kwargs!r}")


def metric_key(prefix: str, layer: str, metric: str) -> str:
    """`<prefix>/<layer>/<metric>`: the one name every bridge gives a layer's metric."""
    return f"{prefix}/{layer}/{metric}"


@dataclass
class StepRows:
    """What one step of one rank holds for a tracker: its scalars by key, and each layer's per-expert token counts."""

    rank: int
    step: int
    time: float | None
    scalars: dict[str, float] = field(default_factory=dict)
    loads: dict[str, np.ndarray] = field(default_factory=dict)  # layer -> tokens per expert (histograms on)


def step_rows(experts: pa.Table, layers: pa.Table, config: BridgeConfig) -> list[StepRows]:
    """One `StepRows` per (rank, step) of a flushed block, in (rank, step) order; ranks other than 0 are left out
    unless `config.all_ranks`, steps whose number `config.every` does not divide too. Histogram counts are filled
    on steps that `config.histogram_every` divides."""
    if layers.num_rows == 0:
        return []
    ly = layers.to_pandas()
    if not config.all_ranks:
        ly = ly[ly["rank"] == 0]
    if config.every > 1:
        ly = ly[ly["step"] % config.every == 0]
    if ly.empty:
        return []
    ly = ly.sort_values(["rank", "step", "layer"], kind="stable")
    out: dict[tuple[int, int], StepRows] = {}
    p = config.prefix
    for row in ly.itertuples(index=False):
        key = (int(row.rank), int(row.step))
        rows = out.get(key)
        if rows is None:
            rows = out[key] = StepRows(rank=key[0], step=key[1], time=finite_or_none(row.time))
        for name in config.scalars:
            value = finite_or_none(getattr(row, name))
            if value is not None:
                rows.scalars[metric_key(p, row.layer, name)] = value
    if config.histograms and experts.num_rows:
        ex = experts.select(["rank", "step", "layer", "expert", "tokens"]).to_pandas()
        ex = ex[ex["step"] % config.histogram_every == 0]
        ex = ex.sort_values(["rank", "step", "layer", "expert"], kind="stable")
        for (rank, step, layer), g in ex.groupby(["rank", "step", "layer"], sort=False):
            rows = out.get((int(rank), int(step)))
            if rows is not None:
                rows.loads[str(layer)] = g["tokens"].to_numpy(np.float64)
    return list(out.values())


def expert_buckets(counts_E: np.ndarray, max_buckets: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    """(counts per bucket, bucket edges, experts per bucket): one bucket per expert (edges `i - 0.5 .. i + 0.5`, so
    the x axis is the expert index) while the layer has at most `max_buckets` experts; past that, runs of `width`
    neighbouring experts share a bucket (the last one may hold fewer), edges still on the expert axis. The counts are
    int64 when all are whole numbers (token counts summed over ranks), so a tracker shows them as counts."""
    counts = np.asarray(counts_E, dtype=np.float64)
    n = len(counts)
    width = 1 if max_buckets is None or n <= max_buckets else math.ceil(n / max_buckets)
    starts = np.arange(0, n, width)
    binned = np.add.reduceat(counts, starts) if n else counts
    edges = np.append(starts, n).astype(np.float64) - 0.5
    if np.all(binned == np.round(binned)):
        binned = binned.astype(np.int64)
    return binned, edges, width


def finite_or_none(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


class AlertGate:
    """A token bucket: up to `burst` alerts at once, then one more every `interval` seconds. `admit()` says whether
    an alert may go out now and how many were held back since the last one that did."""

    def __init__(self, interval: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.interval, self.burst, self.clock = float(interval), int(burst), clock
        self._tokens = float(burst)
        self._last = clock()
        self._held = 0

    def admit(self) -> tuple[bool, int]:
        now = self.clock()
        if self.interval <= 0:
            self._tokens = float(self.burst)
        else:
            self._tokens = min(float(self.burst), self._tokens + (now - self._last) / self.interval)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            held, self._held = self._held, 0
            return True, held
        self._held += 1
        return False, self._held


def alert_level(alert: Any) -> str:
    """INFO, WARN or ERROR (the levels W&B and trackio share) for the status an alert puts its layer in."""
    return {"collapsed": "ERROR", "critical": "ERROR", "warning": "WARN"}.get(alert.status, "INFO")


def alert_title(alert: Any, limit: int = 63) -> str:
    """A short title: the status, the kind and the layer (W&B wants fewer than 64 characters; its rate limit is per
    title, so one title per layer and kind)."""
    title = f"moewatch {alert.status}: {alert.kind} on {alert.layer}"
    return title if len(title) <= limit else title[: limit - 3] + "..."


def alert_text(alert: Any, held: int = 0) -> str:
    from moewatch.detect.live import format_alert

    text = format_alert(alert)
    if held:
        text += (f" ({held} more alert{'s' if held != 1 else ''} held back by moewatch's rate limit since the "
                 "previous one; every alert is in the run directory and `moewatch report`)")
    return text


class TrackerBridge:
    """The base of the tracker bridges: pass one as `attach(..., on_tables=bridge, on_alert=bridge.alert)`.

    Both entry points run in moewatch's writer thread. Subclasses implement `_log_steps` (a block's `StepRows`),
    `_record_alert` (every alert: summaries, tags), `_send_alert` (rate-limited notifications) and `_finish`.
    A tracker error warns once and disables the bridge; training and the run directory are not affected.
    """

    tracker = "tracker"

    def __init__(self, config: BridgeConfig, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self._lock = threading.RLock()
        self._closed = False
        self._failed = False
        self._gate = AlertGate(config.alert_interval, config.alert_burst, clock)
        self.alerts_seen = 0  # alerts handed to alert()
        self.alerts_sent = 0  # delivered as notifications
        self.alerts_held = 0  # held back by the rate limit
        self.worst_status = "healthy"

    @property
    def active(self) -> bool:
        """Whether blocks and alerts are still logged (not closed, no tracker error)."""
        return not self._closed and not self._failed

    def __call__(self, experts: pa.Table, layers: pa.Table) -> None:
        """Log one flushed block (called by the Watch's writer thread)."""
        if layers.num_rows == 0:
            return
        with self._lock:
            if not self.active:
                return
            self._guard(lambda: self._log_steps(step_rows(experts, layers, self.config)))

    def alert(self, alert: Any) -> None:
        """Take one live alert (an `on_alert` target): one of at least `alert_level` severity is recorded (summary,
        tags) and delivered as a notification within the rate limit."""
        from moewatch.detect.alerts import worst_status

        with self._lock:
            if not self.active:
                return
            if SEVERITY_RANK.get(alert.severity, 0) < SEVERITY_RANK[self.config.alert_level]:
                return
            self.alerts_seen += 1
            self.worst_status = worst_status([self.worst_status, alert.status])
            if not self._guard(lambda: self._record_alert(alert)):
                return
            admitted, held = self._gate.admit()
            if not admitted:
                self.alerts_held += 1
                return
            if self._guard(lambda: self._send_alert(alert, held)):
                self.alerts_sent += 1

    def close(self) -> None:
        """Attach what belongs at the end (e.g. the report) and finish what the bridge opened (also after a tracker
        error); later calls do nothing."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._finish()
            except Exception as e:  # closing must not raise into the training script's teardown
                warnings.warn(f"moewatch: the {self.tracker} bridge could not finish ({type(e).__name__}: {e})",
                              RuntimeWarning, stacklevel=2)

    def _guard(self, fn: Callable[[], Any]) -> bool:
        try:
            fn()
            return True
        except Exception as e:
            self._failed = True
            warnings.warn(f"moewatch: the {self.tracker} bridge failed ({type(e).__name__}: {e}); it logs nothing more "
                          "in this run (training goes on, and the run directory still records everything)",
                          RuntimeWarning, stacklevel=3)
            return False

    # Subclasses override these.
    def _log_steps(self, rows: list[StepRows]) -> None:
        raise NotImplementedError

    def _record_alert(self, alert: Any) -> None:
        pass

    def _send_alert(self, alert: Any, held: int) -> None:
        pass

    def _finish(self) -> None:
        pass

    def __enter__(self) -> TrackerBridge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_report(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                 name: str = "moewatch_report.html") -> Path | None:
    """Render the HTML report of the run in `run_dir` into `out_dir/name` (a new temporary folder by default) and
    return its path; None (with a warning) when the run cannot be judged, e.g. it recorded nothing."""
    from moewatch.detect.config import DetectorConfig
    from moewatch.report import build_report, render

    try:
        config = DetectorConfig()
        report = build_report(Path(run_dir), config)
        html = render([report], "html", config)
    except Exception as e:
        warnings.warn(f"moewatch: no HTML report of {run_dir} to attach ({type(e).__name__}: {e})", RuntimeWarning,
                      stacklevel=2)
        return None
    folder = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="moewatch-report-"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(html, encoding="utf-8")
    return path


_UNSAFE = re.compile(r"[^\w\-. :/]")


def safe_key(key: str) -> str:
    """A key with only the characters MLflow accepts in metric and tag names (others become '_')."""
    return _UNSAFE.sub("_", key)
