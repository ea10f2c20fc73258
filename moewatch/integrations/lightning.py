"""`MoEWatchCallback` for Lightning (`lightning.pytorch.Trainer`).

    from moewatch.integrations.lightning import MoEWatchCallback
    trainer = lightning.Trainer(callbacks=[MoEWatchCallback()], accumulate_grad_batches=2)

Attaches at `on_fit_start` to the LightningModule (or the submodule named by `module`), ends one moewatch step at
`on_train_batch_end` whenever `trainer.global_step` advanced (an optimizer step happened: with
`accumulate_grad_batches=n` that is every n-th batch, and the n batches sum into one step numbered with the new
`global_step`, 1, 2, ...), and closes at `on_fit_end` ("finished") or `on_exception` ("crashed"). The run goes to
`<default_root_dir>/moewatch` unless `run_dir` is given. Validation and sanity-check forwards run in eval mode
without grad, so they are not counted (`record_eval=True` records them into the eval tables).

`wandb=True` / `mlflow=True` also log into the run of the Trainer's `WandbLogger` / `MLFlowLogger` (or the active one);
`stop_on="collapsed"` (or `"critical"`) sets `trainer.should_stop` at the first step after such a live alert.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from moewatch.integrations import require
from moewatch.integrations.session import CallbackConfig, SessionCallback, WatchSession, jsonable

pl = require("lightning.pytorch", "lightning", "moewatch.integrations.lightning")
log = logging.getLogger("moewatch")


class MoEWatchCallback(SessionCallback, pl.Callback):
    """Record router health during `Trainer.fit()` into `<default_root_dir>/moewatch` (or `run_dir`).

    Arguments are those of `moewatch.attach` plus `module` (the dotted name of the submodule to attach to, e.g.
    `"model"` when the LightningModule holds a transformers model as `self.model`; default: the LightningModule)
    and `tensorboard_dir` (a directory for the TensorBoard bridge, or `True` for `trainer.log_dir`, where Lightning's
    TensorBoardLogger writes, so moewatch's charts sit next to your own), `wandb` / `mlflow` (True: log into the run
    of the Trainer's `WandbLogger` / `MLFlowLogger`, else the active one, else a new one; or a mapping of
    `WandbBridge` / `MLflowBridge` arguments) and `stop_on` ("collapsed" or "critical": set `trainer.should_stop`
    when such a live alert is raised).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike | None = None,
        *,
        module: str | None = None,
        flush_steps: int = 100,
        flush_seconds: float = 30.0,
        record_eval: bool = False,
        meta: Mapping[str, Any] | None = None,
        routers: Mapping[str, Any] | None = None,
        tensorboard_dir: str | os.PathLike | bool | None = None,
        alerts: bool = False,
        on_alert: Callable[[Any], None] | None = None,
        group: Any = None,
        per_rank: bool = False,
        reduce_timeout: float = 60.0,
        wandb: bool | Mapping[str, Any] | None = None,
        mlflow: bool | Mapping[str, Any] | None = None,
        stop_on: str | None = None,
    ):
        super().__init__()
        if module is not None and (not isinstance(module, str) or not module):
            raise ValueError(f"module must be a submodule's dotted name, got {module!r}")
        self.module = module
        self.config = CallbackConfig(run_dir=run_dir, flush_steps=flush_steps, flush_seconds=flush_seconds,
                                     record_eval=record_eval, meta=meta, routers=routers,
                                     tensorboard_dir=tensorboard_dir, alerts=alerts, on_alert=on_alert,
                                     group=group, per_rank=per_rank, reduce_timeout=reduce_timeout, wandb=wandb,
                                     mlflow=mlflow, stop_on=stop_on)
        self._session = WatchSession(self.config)
        self._last_global_step = 0

    def _target(self, pl_module: nn.Module) -> nn.Module:
        if self.module is None:
            return pl_module
        try:
            return pl_module.get_submodule(self.module)
        except AttributeError:
            names = [n for n, _ in pl_module.named_children()]
            raise ValueError(f"MoEWatchCallback(module={self.module!r}): {type(pl_module).__name__} has no such "
                             f"submodule (its children: {names})") from None

    def on_fit_start(self, trainer, pl_module):
        target = self._target(pl_module)
        root = Path(trainer.default_root_dir)
        self._last_global_step = int(trainer.global_step)
        self._session.start(
            target,
            default_run_dir=root / "moewatch",
            default_tensorboard_dir=lambda: trainer.log_dir or root,
            meta=fit_meta(trainer, pl_module, self.module),
            tracker_defaults=lambda kind: tracker_defaults(trainer, kind),
        )

    def on_train_start(self, trainer, pl_module):
        # A resumed fit restores global_step after on_fit_start: count optimizer steps from the restored value.
        self._last_global_step = int(trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = int(trainer.global_step)
        if step != self._last_global_step:
            self._last_global_step = step
            self._session.step(step)
            agree = None
            if trainer.world_size > 1:
                def agree(flag: bool) -> bool:
                    return bool(trainer.strategy.reduce_boolean_decision(flag, all=False))
            if self._session.stop_due(step, agree=agree):
                trainer.should_stop = True
                log.warning("moewatch: trainer.should_stop is set at step %d", step)

    def on_fit_end(self, trainer, pl_module):
        self._session.close("finished")

    def on_exception(self, trainer, pl_module, exception):
        self._session.close("crashed")


def tracker_defaults(trainer: Any, kind: str) -> dict[str, Any]:
    """The run of the Trainer's own W&B / MLflow logger, for the bridge to log into (none: the bridge's defaults)."""
    for logger in getattr(trainer, "loggers", None) or []:
        name = type(logger).__name__
        if kind == "wandb" and name == "WandbLogger":
            max_steps = int(trainer.max_steps) if trainer.max_steps and trainer.max_steps > 0 else None
            return {"run": logger.experiment, "max_steps": max_steps}
        if kind == "mlflow" and name == "MLFlowLogger":
            return {"run_id": logger.run_id, "tracking_uri": getattr(logger, "_tracking_uri", None)}
    if kind == "wandb" and trainer.max_steps and trainer.max_steps > 0:
        return {"max_steps": int(trainer.max_steps)}
    return {}


def fit_meta(trainer: Any, pl_module: nn.Module, module: str | None) -> dict[str, Any]:
    """The Trainer settings a reader needs to interpret the steps, for run.json."""
    strategy = getattr(trainer, "strategy", None)
    settings = {
        "max_steps": trainer.max_steps,
        "max_epochs": trainer.max_epochs,
        "accumulate_grad_batches": trainer.accumulate_grad_batches,
        "precision": getattr(trainer, "precision", None),
        "world_size": trainer.world_size,
        "num_devices": trainer.num_devices,
        "num_nodes": trainer.num_nodes,
        "strategy": type(strategy).__name__ if strategy is not None else None,
        "gradient_clip_val": trainer.gradient_clip_val,
        "default_root_dir": trainer.default_root_dir,
    }
    return {
        "integration": "lightning.Trainer",
        "lightning_version": pl.__version__,
        "step_unit": "optimizer step (trainer.global_step)",
        "lightning_module": f"{type(pl_module).__module__}.{type(pl_module).__qualname__}",
        "attached_module": module,
        "trainer": jsonable(settings),
    }
