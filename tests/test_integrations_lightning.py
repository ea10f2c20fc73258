"""The Lightning callback, run with a real lightning.Trainer on CPU around a tiny Mixtral built from a config."""

from __future__ import annotations

import runpy
from pathlib import Path

import numpy as np
import pytest
import torch

import moewatch

L = pytest.importorskip("lightning")
pytest.importorskip("transformers")
from transformers import MixtralConfig, MixtralForCausalLM  # noqa: E402

from moewatch.integrations.lightning import MoEWatchCallback  # noqa: E402
from tests.router_truth import RouterCounts, assert_run_matches  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SEQ = 8


class LitMoE(L.LightningModule):
    def __init__(self, fail_at_batch: int | None = None):
        super().__init__()
        config = MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_local_experts=4,
                               num_experts_per_tok=2, max_position_embeddings=64, use_cache=False)
        torch.manual_seed(0)
        self.model = MixtralForCausalLM(config)
        self.fail_at_batch = fail_at_batch

    def training_step(self, ids, batch_idx):
        if batch_idx == self.fail_at_batch:
            raise RuntimeError("boom")
        return self.model(input_ids=ids, labels=ids).loss

    def validation_step(self, ids, batch_idx):
        return self.model(input_ids=ids, labels=ids).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Truth(RouterCounts, L.Callback):
    """Independent counts (tests/router_truth.py), cut into steps right before each optimizer step."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.cut(trainer.global_step + 1)  # global_step counts optimizer steps done


def loader(n: int = 10, seed: int = 0) -> torch.utils.data.DataLoader:
    ids = torch.randint(2, 64, (n, SEQ), generator=torch.Generator().manual_seed(seed))
    return torch.utils.data.DataLoader(ids, batch_size=2)


def trainer_for(tmp_path: Path, callbacks: list, **extra) -> L.Trainer:
    settings = dict(accelerator="cpu", devices=1, max_steps=3, accumulate_grad_batches=2, enable_checkpointing=False,
                    logger=False, enable_progress_bar=False, enable_model_summary=False,
                    default_root_dir=str(tmp_path / "root"))
    settings.update(extra)
    return L.Trainer(callbacks=callbacks, **settings)


def test_fit_records_one_step_per_optimizer_step(tmp_path):
    lit = LitMoE()
    truth = Truth(lit)
    callback = MoEWatchCallback()
    # 10 samples in batches of 2, accumulating 2: optimizer steps of 2, 2 and 1 batches (the epoch's remainder);
    # validation every 2 batches plus the sanity check run forwards that must not count.
    trainer = trainer_for(tmp_path, [callback, truth], val_check_interval=2, num_sanity_val_steps=1)
    trainer.fit(lit, loader(), loader(4, 1))
    assert callback.watch is None
    assert truth.eval_calls > 0, "validation must have run for the test to mean anything"
    assert sorted(truth.steps) == [1, 2, 3]

    run = moewatch.load(tmp_path / "root" / "moewatch")  # the default: <default_root_dir>/moewatch
    assert run.meta["status"] == "finished"
    layers = ["model.model.layers.0.mlp.gate", "model.model.layers.1.mlp.gate"]  # attached to the LightningModule
    assert sorted(run.layers.layer.unique()) == layers
    assert sorted(run.layers.step.unique()) == [1, 2, 3]  # trainer.global_step after each optimizer step
    assert_run_matches(run, truth, layers, steps=[1, 2, 3], tokens=[32, 32, 16], calls=[2, 2, 1])
    meta = run.meta["meta"]
    assert meta["integration"] == "lightning.Trainer"
    assert meta["trainer"]["accumulate_grad_batches"] == 2 and meta["trainer"]["max_steps"] == 3
    assert meta["lightning_module"].endswith("LitMoE")


def test_submodule_run_dir_and_tensorboard_next_to_the_logger(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    lit = LitMoE()
    callback = MoEWatchCallback(tmp_path / "mine", module="model", tensorboard_dir=True, meta={"experiment": "e1"})
    logger = TensorBoardLogger(str(tmp_path / "tb"), name="exp")
    trainer_for(tmp_path, [callback], logger=logger, max_steps=2, limit_val_batches=0).fit(lit, loader())
    run = moewatch.load(tmp_path / "mine")
    assert sorted(run.layers.layer.unique()) == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    assert sorted(run.layers.step.unique()) == [1, 2]
    assert run.meta["meta"]["experiment"] == "e1" and run.meta["meta"]["attached_module"] == "model"
    assert not (tmp_path / "root" / "moewatch").exists()

    acc = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "histograms": 0})  # trainer.log_dir
    acc.Reload()
    rows = run.layers[run.layers.layer == "model.layers.0.mlp.gate"].sort_values("step")
    events = acc.Scalars("moewatch/model.layers.0.mlp.gate/max_share")
    assert [e.step for e in events] == [1, 2]
    np.testing.assert_allclose([e.value for e in events], rows.max_share.to_numpy(), rtol=1e-6)


def test_wandb_and_mlflow_switches_log_into_the_loggers_runs(tmp_path, monkeypatch):
    """WandbLogger and MLFlowLogger open the runs; wandb=True / mlflow=True log moewatch into them."""
    wandb = pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    from lightning.pytorch.loggers import MLFlowLogger, WandbLogger
    from mlflow import MlflowClient

    from tests.wandb_offline import read_offline_run, rows_with

    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    wandb.teardown()  # W&B keeps its folders in a process-wide singleton: read the ones above
    uri = (tmp_path / "mlruns").as_uri()
    loggers = [WandbLogger(project="moewatch-pl", save_dir=str(tmp_path), offline=True),
               MLFlowLogger(experiment_name="moewatch-pl", tracking_uri=uri)]
    callback = MoEWatchCallback(module="model", flush_steps=1, wandb=True, mlflow=True)
    try:
        trainer_for(tmp_path, [callback], logger=loggers, max_steps=2, limit_val_batches=0).fit(LitMoE(), loader())
        wandb_run_id = loggers[0].experiment.id
    finally:
        wandb.finish()
        wandb.teardown()
    run = moewatch.load(tmp_path / "root" / "moewatch")
    layer = "model.layers.0.mlp.gate"
    expected = run.layers[run.layers.layer == layer].sort_values("step").max_share.to_numpy()

    rec = read_offline_run(tmp_path, wandb_run_id)
    assert rec.metrics["*"].step_metric == "trainer/global_step"  # the WandbLogger's run
    logged = rows_with(rec, f"moewatch/{layer}/max_share")
    assert [r["moewatch/step"] for r in logged] == [1, 2]
    np.testing.assert_allclose([r[f"moewatch/{layer}/max_share"] for r in logged], expected, rtol=1e-6)
    assert "moewatch_report.html" in rec.files

    client = MlflowClient(uri)
    history = client.get_metric_history(loggers[1].run_id, f"moewatch/{layer}/max_share")  # the MLFlowLogger's run
    np.testing.assert_allclose([m.value for m in sorted(history, key=lambda m: m.step)], expected, rtol=1e-6)
    assert [a.path for a in client.list_artifacts(loggers[1].run_id, "moewatch")] == ["moewatch/moewatch_report.html"]


def test_an_exception_closes_the_run_as_crashed(tmp_path):
    callback = MoEWatchCallback(flush_steps=1)
    with pytest.raises(RuntimeError, match="boom"):
        trainer_for(tmp_path, [callback], max_steps=10).fit(LitMoE(fail_at_batch=5), loader(20))
    assert callback.watch is None
    run = moewatch.load(tmp_path / "root" / "moewatch")
    assert run.meta["status"] == "crashed"
    # batches 0-3 made optimizer steps 1 and 2; batch 4 ran forward but its step never happened: it is
    # written as the final step (close() keeps routing recorded since the last step)
    assert sorted(run.layers.step.unique()) == [1, 2, 3]
    assert run.layers.groupby("step").calls.first().tolist() == [2, 2, 1]


def test_resuming_from_a_checkpoint_continues_the_step_numbers(tmp_path):
    callback = MoEWatchCallback()
    first = trainer_for(tmp_path, [callback], max_steps=2)
    first.fit(LitMoE(), loader(12))  # 6 batches per epoch; stops after batch 3 (2 optimizer steps)
    first.save_checkpoint(tmp_path / "ckpt")
    # global_step is restored (to 2) after on_fit_start; the resumed fit goes on with batches 4 and 5 (step 3),
    # its first batch making no optimizer step, then batches 0 and 1 of the next epoch (step 4)
    trainer_for(tmp_path, [callback], max_steps=4).fit(LitMoE(), loader(12), ckpt_path=tmp_path / "ckpt")
    run = moewatch.load(tmp_path / "root" / "moewatch")
    assert run.meta["sessions"] == 2 and run.meta["status"] == "finished"
    steps = run.layers.groupby("step").agg(calls=("calls", "first"), session=("session", "first"))
    assert steps.index.tolist() == [1, 2, 3, 4]
    assert steps.calls.tolist() == [2, 2, 2, 2]
    assert steps.session.tolist() == [1, 1, 2, 2]


def test_unknown_submodule_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no such submodule"):
        trainer_for(tmp_path, [MoEWatchCallback(module="backbone")], max_steps=1).fit(LitMoE(), loader())
    with pytest.raises(ValueError, match="flush_seconds"):
        MoEWatchCallback(flush_seconds=0)
    with pytest.raises(ValueError, match="stop_on must be"):
        MoEWatchCallback(stop_on="sometimes")


def test_readme_example(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(ROOT / "examples" / "lightning_fit.py"), run_name="__main__")
    run = moewatch.load(tmp_path / "runs" / "lightning-example" / "moewatch")
    assert run.meta["status"] == "finished"
    assert sorted(run.layers.step.unique()) == [1, 2, 3, 4]
    assert (run.layers.tokens == 2 * 4 * 16).all()  # 2 batches of 4 sequences of 16 tokens per step
    assert (run.layers.layer.str.startswith("model.layers.")).all()

