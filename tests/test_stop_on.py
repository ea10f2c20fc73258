"""`stop_on`: a live collapse alert stops a plain loop (the reference model's `collapse` scenario), a real HF Trainer
(with a checkpoint) and a real Lightning fit. Nothing stops by default.

The runs collapse for certain on any CPU: the reference scenario has no balancing at all, and the transformers
Mixtrals get experts 2 and 3 of every router masked out from the first step (as a routing bug would). The detector
then raises its collapse once its warm-up is over (about step 120); the assertions leave the trajectories free and
check where training stopped against the alert: at most `flush_steps` plus a margin for the writer thread's lag.
"""

from __future__ import annotations

import logging
import runpy
from pathlib import Path

import pytest
import torch

import moewatch
from moewatch.capture.watch import STOP_ON, WatchConfig
from moewatch.detect.alerts import Alert
from moewatch.integrations.session import CallbackConfig
from tests.test_statuses import starved_routing

ROOT = Path(__file__).resolve().parents[1]
FLUSH = 5
# Steps the training thread may run ahead of the writer thread that raises the alert: a tiny model's step takes
# milliseconds, and on a loaded 2-core CI machine the writer has lagged by 66 steps.
LAG = 120
MAX_STEPS = 400
STARVED = (2, 3)


def _alert(kind: str, severity: str = "critical") -> Alert:
    return Alert(kind=kind, severity=severity, layer="l0", experts=(), first_step=0, last_step=9, value=1.0,
                 threshold=0.5, message=kind, lever="", detected_step=9, ongoing=True)


def test_stop_on_is_validated_and_names_its_choices(tmp_path):
    assert STOP_ON == {"critical": ("critical", "collapsed"), "collapsed": ("collapsed",)}
    for bad in ("warning", "Collapsed", True):
        with pytest.raises(ValueError, match="stop_on must be 'critical'.*'collapsed'"):
            WatchConfig(stop_on=bad)
        with pytest.raises(ValueError, match="stop_on"):
            CallbackConfig(stop_on=bad)
    with pytest.raises(ValueError, match="stop_on"):
        moewatch.attach(None, tmp_path / "bad", routers={}, stop_on="recovered")


@pytest.mark.parametrize("stop_on, stops_on", [("collapsed", {"dead_expert"}), ("critical", {"drops", "dead_expert"}),
                                               (None, set())])
def test_which_alerts_set_should_stop(tmp_path, stop_on, stops_on):
    for kind in ("drops", "dead_expert"):
        with moewatch.attach(None, tmp_path / f"{stop_on}-{kind}", routers={}, stop_on=stop_on) as watch:
            watch._on_live_alert(_alert(kind, severity="warning"))
            assert not watch.should_stop, "a warning never stops training"
            watch._on_live_alert(_alert(kind))
            assert watch.should_stop == (kind in stops_on), (stop_on, kind)
            assert (watch.stop_alert is not None) == watch.should_stop


def test_a_plain_loop_stops_on_the_reference_models_collapse(tmp_path, monkeypatch, caplog):
    """The README's example: the demo's `collapse` scenario, checked by `watch.should_stop` after each step."""
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.ERROR, logger="moewatch"):
        ns = runpy.run_path(str(ROOT / "examples" / "stop_on_collapse.py"), run_name="__main__")
    watch, step = ns["watch"], ns["step"]
    alert = watch.stop_alert
    assert watch.should_stop and alert.status == "collapsed"
    assert step < ns["max_steps"] - 1, "training must stop before max_steps"
    assert alert.detected_step <= step <= alert.detected_step + FLUSH + LAG, (alert.detected_step, step)
    assert torch.load(tmp_path / "runs" / "stop-example" / "checkpoint.pt")["step"] == step
    assert any("stop_on='collapsed'" in r.getMessage() and "watch.should_stop is set" in r.getMessage()
               for r in caplog.records), "why it stops is logged"
    run = moewatch.load(tmp_path / "runs" / "stop-example")
    assert run.meta["status"] == "finished" and run.layers.step.max() == step


# ------------------------------------------------------------------------------ transformers and Lightning

def tiny_mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_local_experts=4,
                           num_experts_per_tok=2, max_position_embeddings=64, use_cache=False)
    torch.manual_seed(0)
    model = MixtralForCausalLM(config)
    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(starve)  # before attach: moewatch reads the choice really used
    return model


def starve(module, args, output):
    """Experts 2 and 3 get no token: their router logits are masked before the top-k (a routing bug)."""
    return starved_routing(module, output, STARVED)


def test_a_real_hf_trainer_stops_with_a_checkpoint(tmp_path, caplog):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    from moewatch.integrations.hf import MoEWatchCallback

    ids = torch.randint(2, 64, (64, 8), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row.clone()} for row in ids]
    callback = MoEWatchCallback(flush_steps=FLUSH, stop_on="collapsed")
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=MAX_STEPS,
                             learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no",
                             logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=0)
    trainer = Trainer(model=tiny_mixtral(), args=args, train_dataset=data, callbacks=[callback])
    with caplog.at_level(logging.WARNING, logger="moewatch"):
        trainer.train()

    stopped, alert = callback.stopped_at, callback.stop_alert
    assert stopped is not None and alert is not None and alert.status == "collapsed", alert
    assert trainer.state.global_step == stopped < MAX_STEPS
    assert alert.detected_step <= stopped <= alert.detected_step + FLUSH + LAG, (alert.detected_step, stopped)
    # control.should_save: a checkpoint of the step it stopped at, although save_strategy="no"
    assert [p.name for p in (tmp_path / "out").glob("checkpoint-*")] == [f"checkpoint-{stopped}"]
    assert (tmp_path / "out" / f"checkpoint-{stopped}" / "trainer_state.json").exists()
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"stopping training at step {stopped} (stop_on='collapsed')" in m and alert.kind in m
               for m in messages), messages
    run = moewatch.load(tmp_path / "out" / "moewatch")
    assert run.meta["status"] == "finished" and run.layers.step.max() == stopped


def test_a_real_lightning_fit_stops(tmp_path, caplog):
    L = pytest.importorskip("lightning")
    pytest.importorskip("transformers")
    from moewatch.integrations.lightning import MoEWatchCallback

    class LitMoE(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = tiny_mixtral()

        def training_step(self, ids, batch_idx):
            return self.model(input_ids=ids, labels=ids).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    ids = torch.randint(2, 64, (64, 8), generator=torch.Generator().manual_seed(0))
    callback = MoEWatchCallback(module="model", flush_steps=FLUSH, stop_on="collapsed")
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=MAX_STEPS, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path), callbacks=[callback])
    with caplog.at_level(logging.WARNING, logger="moewatch"):
        trainer.fit(LitMoE(), torch.utils.data.DataLoader(ids, batch_size=4))

    stopped, alert = callback.stopped_at, callback.stop_alert
    assert stopped is not None and alert.status == "collapsed", alert
    assert trainer.global_step == stopped < MAX_STEPS
    assert alert.detected_step <= stopped <= alert.detected_step + FLUSH + LAG, (alert.detected_step, stopped)
    assert any(f"trainer.should_stop is set at step {stopped}" in r.getMessage() for r in caplog.records)
    # Lightning's own ModelCheckpoint saves when the stopped epoch ends
    assert [p.name for p in (tmp_path / "checkpoints").glob("*.ckpt")] == [f"epoch={stopped // 16}-step={stopped}.ckpt"]
    run = moewatch.load(tmp_path / "moewatch")
    assert run.meta["status"] == "finished" and run.layers.step.max() == stopped


def test_nothing_stops_by_default(tmp_path):
    pytest.importorskip("transformers")
    with moewatch.attach(tiny_mixtral(), tmp_path / "run", alerts=True) as watch:
        assert watch.config.stop_on is None
        watch._on_live_alert(_alert("dead_expert"))
        assert not watch.should_stop
