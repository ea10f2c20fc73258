"""`MoEWatchCallback` for the Hugging Face `transformers.Trainer`.

    from moewatch.integrations.hf import MoEWatchCallback
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[MoEWatchCallback()])

Attaches at `on_train_begin` to the Trainer's model, ends one moewatch step at every `on_step_end` (once per optimizer
step, so the micro-batches of gradient accumulation sum into one step) numbered with `state.global_step` (1, 2, ...
as the Trainer counts), and closes at `on_train_end`. The run goes to `<output_dir>/moewatch` unless `run_dir` is
given. Under torchrun the ranks' counts are summed over the world group and written once (the Watch does that).

`wandb=True` / `mlflow=True` also log into the run the Trainer's `report_to=` opened (or the active one); `stop_on=
"collapsed"` (or `"critical"`) ends training at the first step after such a live alert, with a checkpoint:
`control.should_save` and `control.should_training_stop`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from moewatch.integrations import require
from moewatch.integrations.session import CallbackConfig, SessionCallback, WatchSession, jsonable

log = logging.getLogger("moewatch")

transformers = require("transformers", "hf", "moewatch.integrations.hf")
TrainerCallback = transformers.TrainerCallback

# TrainingArguments recorded in run.json's meta: what a reader needs to interpret the steps.
ARGS_IN_META = (
    "output_dir", "run_name", "seed", "per_device_train_batch_size", "gradient_accumulation_steps", "max_steps",
    "num_train_epochs", "learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "max_grad_norm",
    "optim", "bf16", "fp16", "gradient_checkpointing", "torch_compile",
)


class MoEWatchCallback(SessionCallback, TrainerCallback):
    """Record router health during `Trainer.train()` into `<output_dir>/moewatch` (or `run_dir`).

    Arguments are those of `moewatch.attach` plus `tensorboard_dir` (a directory for the TensorBoard bridge, or
    `True` for `<output_dir>/runs/moewatch`, next to the Trainer's own TensorBoard runs), `wandb` / `mlflow` (True:
    log into the W&B / MLflow run that `report_to=` opened, else the active one, else a new one; or a mapping of
    `WandbBridge` / `MLflowBridge` arguments) and `stop_on` ("collapsed" or "critical": stop training, saving a
    checkpoint, when such a live alert is raised). `meta` is merged over the recorded TrainingArguments in run.json.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike | None = None,
        *,
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
        self.config = CallbackConfig(run_dir=run_dir, flush_steps=flush_steps, flush_seconds=flush_seconds,
                                     record_eval=record_eval, meta=meta, routers=routers,
                                     tensorboard_dir=tensorboard_dir, alerts=alerts, on_alert=on_alert,
                                     group=group, per_rank=per_rank, reduce_timeout=reduce_timeout, wandb=wandb,
                                     mlflow=mlflow, stop_on=stop_on)
        self._session = WatchSession(self.config)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("MoEWatchCallback: the Trainer passed no model to on_train_begin")
        output_dir = Path(args.output_dir or "trainer_output")
        self._session.start(
            model,
            default_run_dir=output_dir / "moewatch",
            default_tensorboard_dir=lambda: output_dir / "runs" / "moewatch",
            meta=training_meta(args, state),
            # The Trainer's own W&B / MLflow callbacks come first and have opened their run by now: the bridges
            # log into it (wandb.run, mlflow.active_run()).
            tracker_defaults=lambda kind: {"max_steps": int(state.max_steps or 0) or None} if kind == "wandb" else {},
        )

    def on_step_end(self, args, state, control, **kwargs):
        self._session.step(state.global_step)
        if self._session.stop_due(state.global_step, agree=_ranks_agree(args)):
            control.should_save = True
            control.should_training_stop = True
            log.warning("moewatch: the Trainer saves a checkpoint at step %d and stops", state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self._session.close("finished")


def _ranks_agree(args: Any) -> Any:
    """Under torch.distributed, a collective that stops every rank when any rank's alert asks to (the alerts are
    raised where the rows are written, usually rank 0 only); None in a single process."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None

    def agree(flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0], device=args.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    return agree


def training_meta(args: Any, state: Any) -> dict[str, Any]:
    """The essentials of a TrainingArguments (and the run's planned length) for run.json."""
    recorded = {name: getattr(args, name) for name in ARGS_IN_META if hasattr(args, name)}
    world = int(getattr(args, "world_size", 1) or 1)
    recorded["world_size"] = world
    recorded["global_batch_size"] = (int(getattr(args, "per_device_train_batch_size", 0) or 0)
                                     * int(getattr(args, "gradient_accumulation_steps", 1) or 1) * world)
    return {
        "integration": "transformers.Trainer",
        "transformers_version": transformers.__version__,
        "step_unit": "optimizer step (TrainerState.global_step)",
        "max_steps": int(getattr(state, "max_steps", 0) or 0),
        "training_args": jsonable(recorded),
    }
