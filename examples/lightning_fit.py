"""Lightning + moewatch: one callback records router health for every optimizer step of `Trainer.fit`.

    python examples/lightning_fit.py     # then: moewatch serve runs/

A tiny random Mixtral (built from a config, nothing downloaded) inside a LightningModule, so it runs anywhere.
"""

import lightning as L
import torch
from transformers import MixtralConfig, MixtralForCausalLM

import moewatch
from moewatch.integrations.lightning import MoEWatchCallback


class LitMoE(L.LightningModule):
    def __init__(self):
        super().__init__()
        config = MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_local_experts=4,
                               num_experts_per_tok=2, use_cache=False)
        self.model = MixtralForCausalLM(config)

    def training_step(self, ids, batch_idx):
        return self.model(input_ids=ids, labels=ids).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


loader = torch.utils.data.DataLoader(torch.randint(0, 64, (32, 16)), batch_size=4)
trainer = L.Trainer(max_steps=4, accumulate_grad_batches=2, accelerator="cpu",
                    default_root_dir="runs/lightning-example",
                    callbacks=[MoEWatchCallback(module="model")],  # -> runs/lightning-example/moewatch
                    enable_checkpointing=False, logger=False, enable_progress_bar=False)
trainer.fit(LitMoE(), loader)

print(moewatch.load("runs/lightning-example/moewatch").layers[["step", "layer", "tokens", "cv", "max_share"]])
