"""Plain `moewatch.attach` in your own training loop, with router health and alerts in trackio (local SQLite).

    python examples/trackio_attach.py        # then: trackio show --project moewatch-example

A tiny random Mixtral (built from a config, nothing downloaded) so the example runs anywhere in seconds.
"""

import torch
from transformers import MixtralConfig, MixtralForCausalLM

import moewatch
from moewatch.integrations.trackio import TrackioBridge

config = MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_local_experts=4,
                       num_experts_per_tok=2, use_cache=False)
model = MixtralForCausalLM(config)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

# Logs into trackio's current run, else starts one in `project` (finished at close): moewatch/<layer>/{cv,
# entropy_norm,max_share,dead,drop_rate,z_loss,aux_loss} at moewatch's steps, a histogram
# moewatch/<layer>/expert_load every 10th step, and alerts as trackio alerts (rate-limited).
with (
    TrackioBridge(project="moewatch-example", name="attach") as tr,
    moewatch.attach(model, "runs/trackio-example", on_tables=tr, on_alert=tr.alert) as watch,
):
    for _ in range(4):
        ids = torch.randint(0, 64, (4, 16))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        watch.step()

print(moewatch.load("runs/trackio-example").layers[["step", "layer", "tokens", "cv", "max_share"]])
