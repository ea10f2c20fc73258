"""A training loop that stops itself when its router collapses: `attach(..., stop_on="collapsed")`.

    python examples/stop_on_collapse.py

Trains the bundled reference MoE (one layer, 32 experts) with no load balancing at all, the demo's `collapse`
scenario: its router collapses from the start, the live detector says so once its warm-up is over, and the loop
saves a checkpoint and stops there instead of training on to max_steps.
"""

import dataclasses

import torch

import moewatch
from moewatch.reference.data import BatchSampler, build_corpus
from moewatch.reference.demo import BASE_CONFIG, default_scenarios
from moewatch.reference.model import MoEGPT

torch.manual_seed(0)
torch.set_num_threads(1)  # matrices this small gain nothing from more threads
config = dataclasses.replace(BASE_CONFIG, n_layer=1, d_model=32, n_head=2, n_experts=32, d_expert=16, block_size=32)
scenario = default_scenarios(config)["collapse"]  # no aux loss, no z-loss, no bias balancing
model = MoEGPT(scenario.config).train()
opt = torch.optim.AdamW(model.parameters(), lr=scenario.lr, betas=(0.9, 0.95))
batches = BatchSampler(build_corpus(200_000, seed=0), scenario.batch_size, config.block_size, seed=0)
max_steps = 400

watch = moewatch.attach(model, "runs/stop-example", stop_on="collapsed", flush_steps=5)
for step in range(max_steps):
    x, y = batches.next()
    model(x, y).loss.backward()
    opt.step()
    opt.zero_grad()
    watch.step()
    if watch.should_stop:  # set by the live detector, in moewatch's writer thread
        print(f"stopping at step {step}: {watch.stop_alert.message}")
        torch.save({"model": model.state_dict(), "step": step}, "runs/stop-example/checkpoint.pt")
        break
watch.close()
