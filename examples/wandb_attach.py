"""Plain `moewatch.attach` in your own training loop, with router health, alerts and the report in Weights & Biases.

    python examples/wandb_attach.py                      # needs `wandb login`, or:
    WANDB_MODE=offline python examples/wandb_attach.py   # records into ./wandb/offline-run-*, `wandb sync` later

A tiny random Mixtral (built from a config, nothing downloaded) so the example runs anywhere in seconds.
"""

import torch
from transformers import MixtralConfig, MixtralForCausalLM

import moewatch
from moewatch.integrations.wandb import WandbBridge

config = MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_local_experts=4,
                       num_experts_per_tok=2, use_cache=False)
model = MixtralForCausalLM(config)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

# Logs into the active wandb.run if there is one, else starts its own run (and finishes it at close).
# Per step: moewatch/<layer>/{cv,entropy_norm,max_share,dead,drop_rate,z_loss,aux_loss}, a histogram
# moewatch/<layer>/expert_load (x = expert index, height = tokens; every 10th step), x axis moewatch/step;
# alerts as W&B alerts (rate-limited) and in the summary; the HTML report in the run's files at close.
with (
    WandbBridge(project="moewatch-example", report_dir="runs/wandb-example") as wb,
    moewatch.attach(model, "runs/wandb-example", on_tables=wb, on_alert=wb.alert) as watch,
):
    for _ in range(4):
        ids = torch.randint(0, 64, (4, 16))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        watch.step()

print(moewatch.load("runs/wandb-example").layers[["step", "layer", "tokens", "cv", "max_share"]])
