"""The lifecycle the training-framework callbacks share: attach at the start of training, step, close at the end.

`CallbackConfig` holds what a user sets on a callback (validated when the callback is built, not when training
starts); `WatchSession` owns one Watch and its tracker bridges (TensorBoard, W&B, MLflow) across `start` / `step` /
`close`, and tells the callback when `stop_on` asks training to stop (`stop_due`).
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from moewatch.capture.watch import Watch, WatchConfig, attach

log = logging.getLogger("moewatch")

# Tracker switches of the callbacks: the option, the bridge's module and class.
TRACKERS = {"wandb": ("moewatch.integrations.wandb", "WandbBridge"),
            "mlflow": ("moewatch.integrations.mlflow", "MLflowBridge")}


def _bridge_class(kind: str) -> Any:
    module, name = TRACKERS[kind]
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class CallbackConfig:
    """Settings shared by the framework callbacks; see `moewatch.attach` for the recording options.

    `tensorboard_dir`: a directory for the TensorBoard bridge, `True` for the framework's own TensorBoard directory,
    or None (no TensorBoard output). `wandb` / `mlflow`: True to log into the framework's (or the active) W&B run /
    MLflow run through `WandbBridge` / `MLflowBridge` (with the run's HTML report attached at close), or a mapping of
    that bridge's keyword arguments; either turns live alerts on, since the bridges deliver them. `stop_on`: as in
    `attach` ("collapsed" or "critical"; the callback then stops training). `group` / `per_rank` /
    `reduce_timeout`: rank aggregation, as in `attach` (default: summed over the world group, written once by rank 0).
    """

    run_dir: str | os.PathLike | None = None
    flush_steps: int = 100
    flush_seconds: float = 30.0
    record_eval: bool = False
    meta: Mapping[str, Any] | None = None
    routers: Mapping[str, Any] | None = None
    tensorboard_dir: str | os.PathLike | bool | None = None
    alerts: bool = False
    on_alert: Callable[[Any], None] | None = None
    group: Any = None
    per_rank: bool = False
    reduce_timeout: float = 60.0
    wandb: bool | Mapping[str, Any] | None = None
    mlflow: bool | Mapping[str, Any] | None = None
    stop_on: str | None = None

    def __post_init__(self) -> None:
        WatchConfig(flush_steps=self.flush_steps, flush_seconds=self.flush_seconds, record_eval=self.record_eval,
                    per_rank=self.per_rank, reduce_timeout=self.reduce_timeout, stop_on=self.stop_on)
        if self.meta is not None and not isinstance(self.meta, Mapping):
            raise TypeError(f"meta must be a mapping, got {type(self.meta).__name__}")
        if self.meta is not None:
            try:
                json.dumps(dict(self.meta))
            except (TypeError, ValueError) as e:
                raise ValueError(f"meta must be JSON-serializable (it goes into run.json): {e}") from None
        if self.tensorboard_dir is False:
            object.__setattr__(self, "tensorboard_dir", None)
        if self.tensorboard_dir is not None:
            # Fail when the callback is built, not hours later when training starts.
            import moewatch.integrations.tensorboard  # noqa: F401
        for kind in TRACKERS:
            value = getattr(self, kind)
            if value is False:
                object.__setattr__(self, kind, None)
            elif value is True:
                _bridge_class(kind)
            elif isinstance(value, Mapping):
                accepted = set(inspect.signature(_bridge_class(kind)).parameters) - {"report_dir"}
                unknown = sorted(set(value) - accepted)
                if unknown:
                    raise ValueError(f"{kind}=: unknown {TRACKERS[kind][1]} arguments {unknown}; it takes "
                                     f"{sorted(accepted)}")
            elif value is not None:
                raise TypeError(f"{kind} must be True, False, None or a mapping of {TRACKERS[kind][1]} arguments, "
                                f"got {value!r}")

    @property
    def trackers(self) -> list[str]:
        """The tracker bridges switched on (`wandb`, `mlflow`)."""
        return [kind for kind in TRACKERS if getattr(self, kind) is not None]


class SessionCallback:
    """What the framework callbacks expose of their `WatchSession` (kept in ``self._session``)."""

    _session: WatchSession

    @property
    def watch(self) -> Watch | None:
        """The Watch of the training run in progress (None outside it)."""
        return self._session.watch

    @property
    def stopped_at(self) -> int | None:
        """The step at which `stop_on` stopped the last training run (None: it did not)."""
        return self._session.stop_step

    @property
    def stop_alert(self) -> Any:
        """The alert that stopped it (None when it did not, or on a rank that followed another rank's alert)."""
        return self._session.stop_alert


class WatchSession:
    """One Watch at a time, attached by `start` and closed by `close`; a leftover from a failed run is closed first."""

    def __init__(self, config: CallbackConfig):
        self.config = config
        self.watch: Watch | None = None
        self.bridges: list[Any] = []  # TensorBoard first, then the trackers, in the order they were built
        self._stopped = False
        self.stop_step: int | None = None  # the step at which stop_on stopped training (None: it did not)
        self.stop_alert: Any = None  # the alert that stopped it (None on a rank that learnt it from another)

    @property
    def active(self) -> bool:
        return self.watch is not None

    def start(
        self,
        model: nn.Module,
        default_run_dir: str | os.PathLike,
        default_tensorboard_dir: Callable[[], str | os.PathLike] | None = None,
        meta: Mapping[str, Any] | None = None,
        tracker_defaults: Callable[[str], Mapping[str, Any]] | None = None,
    ) -> Watch:
        """Attach to `model`. `tracker_defaults(kind)` gives a tracker bridge the framework's own run (and what else
        it knows, e.g. max_steps); the user's `wandb=` / `mlflow=` mapping goes over it."""
        if self.watch is not None:
            # The previous training call ended without its end hook (an exception the framework let through).
            self.close("crashed")
        c = self.config
        self._stopped = False
        self.stop_step, self.stop_alert = None, None
        run_dir = Path(c.run_dir) if c.run_dir is not None else Path(default_run_dir)
        try:
            tb_dir = c.tensorboard_dir
            if tb_dir is True:
                tb_dir = default_tensorboard_dir() if default_tensorboard_dir is not None else run_dir / "tensorboard"
            if tb_dir is not None:
                from moewatch.integrations.tensorboard import TensorBoardBridge

                self.bridges.append(TensorBoardBridge(tb_dir))
            for kind in c.trackers:
                chosen = getattr(c, kind)
                if _global_rank() != 0 and not (isinstance(chosen, Mapping) and chosen.get("all_ranks")):
                    continue  # trackers log rank 0's rows (the group's sums); no run per rank
                kwargs = {**(tracker_defaults(kind) if tracker_defaults is not None else {}), "report_dir": run_dir,
                          **(chosen if isinstance(chosen, Mapping) else {})}
                self.bridges.append(_bridge_class(kind)(**kwargs))
            trackers = [b for b in self.bridges if hasattr(b, "alert") and not _is_tensorboard(b)]
            on_alert = _alert_fan_out(c.on_alert, trackers) if trackers else c.on_alert
            self.watch = attach(
                model, run_dir, routers=c.routers, flush_steps=c.flush_steps, flush_seconds=c.flush_seconds,
                record_eval=c.record_eval, meta={**jsonable(meta or {}), **dict(c.meta or {})},
                alerts=c.alerts, on_alert=on_alert, on_tables=_table_fan_out(self.bridges) if self.bridges else None,
                group=c.group, per_rank=c.per_rank, reduce_timeout=c.reduce_timeout, stop_on=c.stop_on,
            )
        except BaseException:
            self._close_bridges()
            raise
        return self.watch

    @property
    def bridge(self) -> Any:
        """The TensorBoard bridge, if any."""
        return next((b for b in self.bridges if _is_tensorboard(b)), None)

    def step(self, number: int) -> None:
        if self.watch is not None:
            self.watch.step(number)

    def stop_due(self, step: int, agree: Callable[[bool], bool] | None = None) -> bool:
        """True once, at the first step at which training should stop for `stop_on` (logged with the reason).

        `agree(flag) -> bool` makes the ranks of a distributed job decide together (any rank's alert stops all); it
        is a collective, so it is called on every rank at the same steps: every `flush_steps`-th step.
        """
        watch = self.watch
        if watch is None or self.config.stop_on is None or self._stopped:
            return False
        flag = watch.should_stop
        if agree is not None:
            if step % self.config.flush_steps:
                return False
            flag = agree(flag)
        if not flag:
            return False
        self._stopped = True
        self.stop_step, self.stop_alert = step, watch.stop_alert
        a = watch.stop_alert
        why = (f"a {a.status} alert ({a.kind} on {a.layer}, raised at step {a.detected_step}: {a.message})"
               if a is not None else "another rank raised such an alert")
        log.warning("moewatch: stopping training at step %d (stop_on=%r): %s", step, self.config.stop_on, why)
        return True

    def close(self, status: str = "finished") -> None:
        watch, self.watch = self.watch, None
        try:
            if watch is not None:
                watch.close(status=status)
        finally:
            self._close_bridges()

    def _close_bridges(self) -> None:
        bridges, self.bridges = self.bridges, []
        for bridge in bridges:
            try:
                bridge.close()
            except Exception as e:  # the run directory is what matters; a tracker hiccup only warns
                warnings.warn(f"moewatch: could not close {bridge!r} ({e})", RuntimeWarning, stacklevel=2)


def _global_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _is_tensorboard(bridge: Any) -> bool:
    return type(bridge).__name__ == "TensorBoardBridge"


def _table_fan_out(bridges: list[Any]) -> Callable[[Any, Any], None]:
    def to_bridges(experts: Any, layers: Any) -> None:
        for bridge in bridges:  # each bridge catches its own tracker's errors (warns once, then stays off)
            bridge(experts, layers)

    to_bridges.__name__ = "tracker bridges"
    return to_bridges


def _alert_fan_out(user: Callable[[Any], None] | None, bridges: list[Any]) -> Callable[[Any], None]:
    def to_all(alert: Any) -> None:
        for bridge in bridges:
            bridge.alert(alert)
        if user is not None:
            user(alert)

    return to_all


def jsonable(value: Any, depth: int = 0) -> Any:
    """A JSON-safe copy for run.json's meta: enums and paths become strings, anything else unknown its repr."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else str(value)
    if depth > 4:
        return repr(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v, depth + 1) for v in value]
    enum_value = getattr(value, "value", None)
    if isinstance(enum_value, (str, int)):
        return enum_value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return repr(value)
