"""The transformers.Trainer callback, run with a real Trainer on a tiny Mixtral (CPU, built from a config)."""

from __future__ import annotations

import json
import re
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import moewatch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it
from transformers import MixtralConfig, MixtralForCausalLM, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from moewatch.integrations.hf import MoEWatchCallback  # noqa: E402
from tests.router_truth import RouterCounts, assert_run_matches  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SEQ = 8
LAYERS = ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]


def tiny_mixtral() -> MixtralForCausalLM:
    config = MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_local_experts=4,
                           num_experts_per_tok=2, max_position_embeddings=64, use_cache=False)
    torch.manual_seed(0)
    return MixtralForCausalLM(config)


def dataset(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(2, 64, (n, SEQ), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


class Truth(RouterCounts, TrainerCallback):
    """Independent counts (tests/router_truth.py), cut into steps at every on_step_end."""

    def on_step_end(self, args, state, control, **kwargs):
        self.cut(state.global_step)


def make_trainer(tmp_path: Path, callback: MoEWatchCallback, max_steps: int = 3, **extra) -> tuple[Trainer, Truth]:
    model = tiny_mixtral()
    truth = Truth(model)
    settings = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, gradient_accumulation_steps=2,
        max_steps=max_steps, report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0, seed=1)
    args = TrainingArguments(**{**settings, **extra})
    # 10 samples in micro-batches of 2 with accumulation 2: optimizer steps of 2, 2 and 1 micro-batches.
    trainer = Trainer(model=model, args=args, train_dataset=dataset(10, 0), eval_dataset=dataset(4, 1),
                      callbacks=[callback, truth])
    return trainer, truth


def test_trainer_run_records_each_optimizer_step(tmp_path):
    callback = MoEWatchCallback(tensorboard_dir=True)
    trainer, truth = make_trainer(tmp_path, callback, eval_strategy="steps", eval_steps=1,
                                  per_device_eval_batch_size=2)
    trainer.train()
    assert callback.watch is None, "closed at train end"
    assert truth.eval_calls > 0, "evaluation must have run for the test to mean anything"

    run = moewatch.load(tmp_path / "out" / "moewatch")  # the default: <output_dir>/moewatch
    assert run.meta["status"] == "finished"
    assert sorted(truth.steps) == [1, 2, 3]
    assert sorted(run.layers.step.unique()) == [1, 2, 3]  # numbered as HF numbers them
    assert sorted(run.layers.layer.unique()) == LAYERS
    # micro-batches of 2 x 8 tokens, summed per optimizer step; eval forwards in between are not counted
    assert_run_matches(run, truth, LAYERS, steps=[1, 2, 3], tokens=[32, 32, 16], calls=[2, 2, 1])

    meta = run.meta["meta"]
    assert meta["integration"] == "transformers.Trainer"
    assert meta["max_steps"] == 3
    ta = meta["training_args"]
    assert (ta["gradient_accumulation_steps"], ta["per_device_train_batch_size"], ta["seed"]) == (2, 2, 1)
    assert ta["global_batch_size"] == 4 and ta["world_size"] == 1
    assert ta["output_dir"] == str(tmp_path / "out")
    json.dumps(run.meta)  # the manifest stays plain JSON

    # tensorboard_dir=True: next to the Trainer's own TensorBoard runs, written from the same flushed rows
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "out" / "runs" / "moewatch"), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    for layer in LAYERS:
        events = acc.Scalars(f"moewatch/{layer}/cv")
        rows = run.layers[run.layers.layer == layer].sort_values("step")
        assert [e.step for e in events] == [1, 2, 3]
        np.testing.assert_allclose([e.value for e in events], rows.cv.to_numpy(), rtol=1e-6)
        assert [h.step for h in acc.Histograms(f"moewatch/{layer}/expert_load")] == [1, 2, 3]


def test_run_dir_meta_flush_and_a_train_that_raised(tmp_path):
    class Boom(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise RuntimeError("boom")

    callback = MoEWatchCallback(tmp_path / "mine", flush_steps=1, meta={"experiment": "e1", "max_steps": -1},
                                group=False, per_rank=True, reduce_timeout=7.0)
    trainer, _ = make_trainer(tmp_path, callback)
    trainer.add_callback(Boom())
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    # The Trainer has no exception hook: the Watch stays open (interpreter exit would close it as crashed).
    assert callback.watch is not None
    callback.watch.wait()
    # the rank-aggregation settings reach the Watch (one process: nothing to sum, so run.json says nothing of it)
    assert (callback.watch.config.per_rank, callback.watch.config.reduce_timeout) == (True, 7.0)
    assert sorted(moewatch.load(tmp_path / "mine").layers.step.unique()) == [1, 2]

    trainer.remove_callback(Boom)
    trainer.train()  # the leftover Watch is closed first, then the run is resumed as a new session
    run = moewatch.load(tmp_path / "mine")
    assert not (tmp_path / "out" / "moewatch").exists()
    assert run.meta["status"] == "finished" and run.meta["sessions"] == 2
    assert run.meta["meta"]["experiment"] == "e1"
    assert run.meta["meta"]["max_steps"] == -1  # the user's meta wins over the recorded settings
    assert sorted(run.layers.step.unique()) == [1, 2, 3]
    assert (run.layers.session == 2).all()  # the rerun's steps replace the first attempt's
    assert len(list((tmp_path / "mine" / "layers").glob("*.parquet"))) == 2 + 3  # one part per step


def test_wandb_and_mlflow_switches_log_into_the_trainers_own_runs(tmp_path, monkeypatch):
    """report_to=["wandb", "mlflow"] opens the Trainer's runs; wandb=True / mlflow=True log moewatch into them."""
    wandb = pytest.importorskip("wandb")
    mlflow = pytest.importorskip("mlflow")
    from tests.wandb_offline import read_offline_run, rows_with

    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                        "WANDB_DIR": str(tmp_path), "WANDB_CONFIG_DIR": str(tmp_path), "WANDB_CACHE_DIR": str(tmp_path),
                        "WANDB_DATA_DIR": str(tmp_path), "WANDB_PROJECT": "moewatch-hf",
                        "MLFLOW_TRACKING_URI": (tmp_path / "mlruns").as_uri(), "MLFLOW_ALLOW_FILE_STORE": "true",
                        "MLFLOW_EXPERIMENT_NAME": "moewatch-hf"}.items():
        monkeypatch.setenv(name, value)
    wandb.teardown()  # W&B keeps its folders in a process-wide singleton: read the ones above
    mlflow.set_tracking_uri((tmp_path / "mlruns").as_uri())
    callback = MoEWatchCallback(flush_steps=1, wandb=True, mlflow=True)
    trainer, _ = make_trainer(tmp_path, callback, report_to=["wandb", "mlflow"])
    try:
        trainer.train()
        wandb_run_id = wandb.run.id
    finally:
        wandb.finish()
        wandb.teardown()
        mlflow.set_tracking_uri(None)
    run = moewatch.load(tmp_path / "out" / "moewatch")

    rec = read_offline_run(tmp_path, wandb_run_id)
    assert rec.metrics["*"].step_metric == "train/global_step"  # the Trainer's W&B callback made this run
    for layer in LAYERS:
        rows = run.layers[run.layers.layer == layer].sort_values("step")
        logged = rows_with(rec, f"moewatch/{layer}/cv")
        assert [r["moewatch/step"] for r in logged] == [1, 2, 3]
        np.testing.assert_allclose([r[f"moewatch/{layer}/cv"] for r in logged], rows.cv.to_numpy(), rtol=1e-6)
        assert rec.metrics[f"moewatch/{layer}/cv"].step_metric == "moewatch/step"
    assert "moewatch_report.html" in rec.files

    client = mlflow.MlflowClient((tmp_path / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("moewatch-hf")
    (ml_run,) = client.search_runs([experiment.experiment_id])  # the one run, the Trainer's
    assert "learning_rate" in ml_run.data.params  # the Trainer's MLflow callback logged its arguments there
    history = client.get_metric_history(ml_run.info.run_id, f"moewatch/{LAYERS[0]}/max_share")
    assert sorted(m.step for m in history) == [1, 2, 3]
    assert [a.path for a in client.list_artifacts(ml_run.info.run_id, "moewatch")] == ["moewatch/moewatch_report.html"]


def test_settings_are_validated_when_the_callback_is_built():
    with pytest.raises(ValueError, match="flush_steps"):
        MoEWatchCallback(flush_steps=0)
    with pytest.raises(ValueError, match="stop_on must be"):
        MoEWatchCallback(stop_on="warning")
    pytest.importorskip("wandb")
    with pytest.raises(ValueError, match=r"unknown WandbBridge arguments \['nope'\]"):
        MoEWatchCallback(wandb={"nope": 1})
    with pytest.raises(TypeError, match="wandb must be True"):
        MoEWatchCallback(wandb="yes")
    with pytest.raises(ValueError, match="JSON"):
        MoEWatchCallback(meta={"model": object()})
    with pytest.raises(ValueError, match="reduce_timeout"):
        MoEWatchCallback(reduce_timeout=0)
    with pytest.raises(TypeError, match="per_rank"):
        MoEWatchCallback(per_rank="yes")


def test_readme_example(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(ROOT / "examples" / "hf_trainer.py"), run_name="__main__")
    run = moewatch.load(tmp_path / "runs" / "hf-example" / "moewatch")
    assert run.meta["status"] == "finished"
    assert sorted(run.layers.step.unique()) == [1, 2, 3, 4]
    assert (run.layers.tokens == 2 * 2 * 16).all()  # 2 micro-batches of 2 sequences of 16 tokens per step
    assert list((tmp_path / "runs" / "hf-example" / "runs" / "moewatch").glob("events.out.tfevents.*"))


def test_import_moewatch_pulls_in_no_optional_dependency():
    code = ("import sys, moewatch, moewatch.integrations, moewatch.integrations.session, "
            "moewatch.integrations.bridge; "
            "print(sorted(m for m in ('transformers', 'lightning', 'pytorch_lightning', 'tensorboard', "
            "'accelerate', 'wandb', 'mlflow', 'trackio') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def _snippet_problems(markdown: Path, only_integrations: bool) -> tuple[int, list[str]]:
    """Code blocks of `markdown` that are not excerpts of an example: their lines, in order, in one examples/ file."""
    examples = {p.name: p.read_text().splitlines() for p in sorted((ROOT / "examples").glob("*.py"))}
    keys = ("moewatch.integrations", "MoEWatchCallback", "TensorBoardBridge", "DistributedDataParallel", "torchrun",
            "should_stop")
    checked, problems = 0, []
    for marker, lang, body in re.findall(r"(<!-- recipe[^>]*-->\n)?```(\w*)\n(.*?)```", markdown.read_text(),
                                         flags=re.S):
        if lang not in ("python", "bash") or (only_integrations and not any(k in body for k in keys)):
            continue
        if marker:  # a pattern for a stack that cannot run here (Megatron, DeepSpeed, a GPU mesh), labelled as such
            continue
        # compared without indentation: the example's code may sit in a function, its commands in the docstring
        lines = [line.strip() for line in body.splitlines() if line.strip() and line.strip() != "..."]
        checked += 1
        if not any(_in_order(lines, [x.strip() for x in text]) for text in examples.values()):
            problems.append(body)
    return checked, problems


def _in_order(lines: list[str], text: list[str]) -> bool:
    it = iter(text)
    return all(any(line == t for t in it) for line in lines)


def test_doc_snippets_are_excerpts_of_the_tested_examples():
    checked, problems = _snippet_problems(ROOT / "docs" / "integrations.md", only_integrations=False)
    assert checked >= 5 and problems == []


def test_readme_snippets_are_excerpts_of_the_tested_examples():
    checked, problems = _snippet_problems(ROOT / "README.md", only_integrations=True)
    if checked == 0:
        pytest.skip("README.md has no integration snippets yet")
    assert problems == [], "README integration snippets must be excerpts of examples/ (which the tests run)"
