"""Plain `moewatch.attach` in your own training loop, with router health also written to TensorBoard.

    python examples/tensorboard_attach.py        # then: tensorboard --logdir runs/tensorboard

A tiny random Mixtral (built from a config, nothing downloaded) so the example runs anywhere in seconds.
"""

import torch
from transformers import MixtralConfig, MixtralForCausalLM

import moewatch
from moewatch.integrations.tensorboard import TensorBoardBridge

config = MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_local_experts=4,
                       num_experts_per_tok=2, use_cache=False)
model = MixtralForCausalLM(config)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

# The bridge runs in moewatch's writer thread: scalars moewatch/<layer>/{cv,entropy_norm,max_share,dead,
# drop_rate,z_loss,aux_loss} and a histogram moewatch/<layer>/expert_load (x = expert index, height = tokens).
with (
    TensorBoardBridge("runs/tensorboard") as tb,
    moewatch.attach(model, "runs/attach-example", on_tables=tb) as watch,
):
    for _ in range(4):
        ids = torch.randint(0, 64, (4, 16))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        watch.step()

print(moewatch.load("runs/attach-example").layers[["step", "layer", "tokens", "cv", "max_share"]])
