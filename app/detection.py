"""Alerts and the verdict badge of each run, from the collapse detector, computed off the request threads.

The detector (moewatch.detect) is imported lazily: when it is missing or broken the dashboard still serves charts
and the alerts panel says detection is unavailable. It is fed the cache's per-layer arrays directly
(`moewatch.detect.analyze` on `RunData.detector_layers()`), so a large run is not read a second time; without that
entry point it falls back to `moewatch.detect.detect(moewatch.load(path))`.

Results are cached per run generation (a live run is re-judged after new parts, at most every `min_interval` s).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .data import RunData

log = logging.getLogger("moewatch.app")

SEVERITY_ORDER = {"critical": 0, "warning": 1, "info": 2}
UNAVAILABLE = "unavailable"
PENDING = "pending"
OK = "ok"
ERROR = "error"


@dataclass(frozen=True)
class Detection:
    """One run's detector output. `state`: ok | pending (first result not ready) | unavailable | error."""

    state: str
    alerts: tuple[Any, ...] = ()
    message: str = ""
    generation: int = -1
    seconds: float = 0.0

    @property
    def verdict(self) -> str | None:
        """collapsed (any critical) / warning (any warning) / healthy; None when there is no result."""
        if self.state != OK:
            return None
        severities = {getattr(a, "severity", "") for a in self.alerts}
        if "critical" in severities:
            return "collapsed"
        if "warning" in severities:
            return "warning"
        return "healthy"


def verdict_of(alerts) -> str:
    return Detection(OK, tuple(alerts)).verdict or "healthy"


def sort_alerts(alerts) -> list[Any]:
    """Most severe first, then by onset step and layer."""
    return sorted(alerts, key=lambda a: (SEVERITY_ORDER.get(getattr(a, "severity", ""), 3),
                                         getattr(a, "first_step", 0) or 0, str(getattr(a, "layer", ""))))


def run_detector(run: RunData) -> tuple[Any, ...]:
    """All alerts of `run`; raises ImportError when the detector is not installed."""
    import moewatch.detect as detect_mod

    analyze = getattr(detect_mod, "analyze", None)
    if analyze is not None:
        try:
            layers = run.detector_layers()
        except ImportError:
            layers = None
        if layers is not None:
            return tuple(sort_alerts(analyze(layers).alerts))
    from moewatch.store.reader import load

    return tuple(sort_alerts(detect_mod.detect(load(run.path, eval=False))))


@dataclass
class Detector:
    """Runs the detector on one background thread (so two cores are not both busy with it) and caches results."""

    background: bool = True
    min_interval: float = 2.0
    _results: dict[str, Detection] = field(default_factory=dict)
    _pending: dict[str, Future] = field(default_factory=dict)
    _last: dict[str, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _pool: ThreadPoolExecutor | None = None

    def get(self, run: RunData, wait: float = 0.0) -> Detection:
        """The latest result for `run` (maybe of an older generation while a newer one is computed)."""
        key = run.run_id or str(run.path)
        with self._lock:
            have = self._results.get(key)
            fresh = have is not None and have.generation == run.generation
            # A slow detector (a huge live run) is re-run at most every 5x its own duration: ~20% of one core.
            wait_between = max(self.min_interval, 5 * (have.seconds if have is not None else 0.0))
            due = time.monotonic() - self._last.get(key, -1e9) >= wait_between
            if not fresh and key not in self._pending and (have is None or due or have.state != OK):
                self._last[key] = time.monotonic()
                if self.background:
                    if self._pool is None:
                        self._pool = ThreadPoolExecutor(1, thread_name_prefix="moewatch-detect")
                    self._pending[key] = self._pool.submit(self._work, key, run)
                else:
                    self._pending[key] = Future()
            future = self._pending.get(key)
        if future is not None and not self.background and not future.done():
            self._work(key, run)
        elif future is not None and wait > 0:
            try:
                future.result(timeout=wait)
            except Exception:  # recorded by _work; a timeout just means "pending"
                pass
        with self._lock:
            return self._results.get(key) or Detection(PENDING, message="checking the run for collapse…")

    def _work(self, key: str, run: RunData) -> None:
        t0 = time.perf_counter()
        with run.lock:
            generation = run.generation
        try:
            alerts = run_detector(run)
            result = Detection(OK, alerts, generation=generation, seconds=time.perf_counter() - t0)
        except ImportError as e:
            result = Detection(UNAVAILABLE, message=f"collapse detection is unavailable ({e}); charts still work",
                               generation=generation)
        except Exception as e:  # a detector bug must not take the dashboard down
            log.exception("moewatch: detection failed for %s", run.path)
            result = Detection(ERROR, message=f"collapse detection failed on this run: {type(e).__name__}: {e}",
                               generation=generation)
        with self._lock:
            self._results[key] = result
            future = self._pending.pop(key, None)
        if future is not None and not self.background:
            future.set_result(None)

    def forget(self, key: str) -> None:
        with self._lock:
            self._results.pop(key, None)
            self._last.pop(key, None)
