"""The lifecycle the training-framework callbacks share: attach at the start of training, step, close at the end.

`CallbackConfig` holds what a user sets on a callback (validated when the callback is built, not when training
starts); `WatchSession` owns one Watch (and its TensorBoard bridge, if any) across `start` / `step` / `close`.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from moewatch.capture.watch import Watch, WatchConfig, attach


@dataclass(frozen=True)
class CallbackConfig:
    """Settings shared by the framework callbacks; see `moewatch.attach` for the recording options.

    `tensorboard_dir`: a directory for the TensorBoard bridge, `True` for the framework's own TensorBoard directory,
    or None (no TensorBoard output). `group` / `per_rank` / `reduce_timeout`: rank aggregation, as in `attach`
    (default: summed over the world group, written once by rank 0).
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

    def __post_init__(self) -> None:
        WatchConfig(flush_steps=self.flush_steps, flush_seconds=self.flush_seconds, record_eval=self.record_eval,
                    per_rank=self.per_rank, reduce_timeout=self.reduce_timeout)
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


class WatchSession:
    """One Watch at a time, attached by `start` and closed by `close`; a leftover from a failed run is closed first."""

    def __init__(self, config: CallbackConfig):
        self.config = config
        self.watch: Watch | None = None
        self.bridge: Any = None

    @property
    def active(self) -> bool:
        return self.watch is not None

    def start(
        self,
        model: nn.Module,
        default_run_dir: str | os.PathLike,
        default_tensorboard_dir: Callable[[], str | os.PathLike] | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> Watch:
        if self.watch is not None:
            # The previous training call ended without its end hook (an exception the framework let through).
            self.close("crashed")
        c = self.config
        run_dir = Path(c.run_dir) if c.run_dir is not None else Path(default_run_dir)
        tb_dir = c.tensorboard_dir
        if tb_dir is True:
            tb_dir = default_tensorboard_dir() if default_tensorboard_dir is not None else run_dir / "tensorboard"
        if tb_dir is not None:
            from moewatch.integrations.tensorboard import TensorBoardBridge

            self.bridge = TensorBoardBridge(tb_dir)
        try:
            self.watch = attach(
                model, run_dir, routers=c.routers, flush_steps=c.flush_steps, flush_seconds=c.flush_seconds,
                record_eval=c.record_eval, meta={**jsonable(meta or {}), **dict(c.meta or {})},
                alerts=c.alerts, on_alert=c.on_alert, on_tables=self.bridge,
                group=c.group, per_rank=c.per_rank, reduce_timeout=c.reduce_timeout,
            )
        except BaseException:
            self._close_bridge()
            raise
        return self.watch

    def step(self, number: int) -> None:
        if self.watch is not None:
            self.watch.step(number)

    def close(self, status: str = "finished") -> None:
        watch, self.watch = self.watch, None
        try:
            if watch is not None:
                watch.close(status=status)
        finally:
            self._close_bridge()

    def _close_bridge(self) -> None:
        bridge, self.bridge = self.bridge, None
        if bridge is not None:
            try:
                bridge.close()
            except Exception as e:  # the run directory is what matters; a TensorBoard hiccup only warns
                warnings.warn(f"moewatch: could not close the TensorBoard writer ({e})", RuntimeWarning, stacklevel=2)


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
