"""Plain `moewatch.attach` in your own training loop, with router health, alerts and the report in MLflow.

    MLFLOW_TRACKING_URI=sqlite:///mlflow.db python examples/mlflow_attach.py    # or your tracking server's URI

A tiny random Mixtral (built from a config, nothing downloaded) so the example runs anywhere in seconds.
"""

import mlflow
import torch
from transformers import MixtralConfig, MixtralForCausalLM

import moewatch
from moewatch.integrations.mlflow import MLflowBridge

config = MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_local_experts=4,
                       num_experts_per_tok=2, use_cache=False)
model = MixtralForCausalLM(config)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

# Logs into the active MLflow run: metrics moewatch/<layer>/{cv,entropy_norm,max_share,dead,drop_rate,z_loss,
# aux_loss} per step (log_batch, at most 1,000 a call), alerts as tags moewatch/alert/<layer>/<kind>, and the HTML
# report as the artifact moewatch/moewatch_report.html at close.
with (
    mlflow.start_run(run_name="moewatch-example") as active,
    MLflowBridge(report_dir="runs/mlflow-example") as ml,
    moewatch.attach(model, "runs/mlflow-example", on_tables=ml, on_alert=ml.alert) as watch,
):
    for _ in range(4):
        ids = torch.randint(0, 64, (4, 16))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        watch.step()

print(mlflow.MlflowClient().get_metric_history(active.info.run_id, "moewatch/model.layers.0.mlp.gate/cv"))
