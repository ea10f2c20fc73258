"""Hugging Face Trainer + moewatch: one callback records router health for every optimizer step.

    python examples/hf_trainer.py     # then: moewatch serve runs/   (or: tensorboard --logdir runs/hf-example/runs)
    torchrun --nproc_per_node 2 examples/hf_trainer.py    # the same, data-parallel: one part file set per rank

A tiny random Mixtral (built from a config, nothing downloaded) so the example runs anywhere in seconds.
"""

import torch
from transformers import MixtralConfig, MixtralForCausalLM, Trainer, TrainingArguments

import moewatch
from moewatch.integrations.hf import MoEWatchCallback

config = MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_local_experts=4,
                       num_experts_per_tok=2, use_cache=False)
model = MixtralForCausalLM(config)
train_data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (16, 16))]

args = TrainingArguments(output_dir="runs/hf-example", max_steps=4, per_device_train_batch_size=2,
                         gradient_accumulation_steps=2, report_to=[], use_cpu=True, save_strategy="no")
trainer = Trainer(model=model, args=args, train_dataset=train_data,
                  callbacks=[MoEWatchCallback(tensorboard_dir=True)])  # -> runs/hf-example/moewatch
trainer.train()

trainer.accelerator.wait_for_everyone()  # under torchrun: every rank has closed its part of the run
if trainer.is_world_process_zero():
    run = moewatch.load("runs/hf-example/moewatch").global_view()  # all ranks summed
    print(run.layers[["step", "layer", "tokens", "cv", "max_share"]])
