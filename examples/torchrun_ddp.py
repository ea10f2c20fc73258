"""Data-parallel training under torchrun with plain `moewatch.attach`: every rank records the routing of its own
data shard, the ranks sum their steps in a background thread (over the world group, the default) and rank 0 writes
them once, with run.json; `--per-rank` also keeps each rank's own rows under `<run-dir>/ranks/`.

    torchrun --nproc_per_node 2 examples/torchrun_ddp.py --run-dir runs/ddp-example
    python -c "import moewatch; print(moewatch.load('runs/ddp-example').global_view().layers)"

Runs on CPU with the gloo backend (pass `--backend nccl` on GPUs); without torchrun it trains as a single process.
The model is a tiny random Mixtral built from a config, so nothing is downloaded.

What matters for moewatch:
- attach to the *unwrapped* model, before `DistributedDataParallel` wraps it (router names stay free of `module.`);
- call `watch.step()` once per optimizer step on every rank: the micro-batches of gradient accumulation (here under
  `no_sync()`) sum into that step;
- `watch.close()` on every rank, at the same point; read the run once all ranks have closed (the barrier below).
"""

from __future__ import annotations

import argparse
import contextlib
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from transformers import MixtralConfig, MixtralForCausalLM

import moewatch

VOCAB = 64


def build_model() -> MixtralForCausalLM:
    config = MixtralConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_local_experts=4,
                           num_experts_per_tok=2, use_cache=False)
    torch.manual_seed(0)  # the same initial weights on every rank (DDP would broadcast rank 0's anyway)
    return MixtralForCausalLM(config)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="runs/ddp-example")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps")
    parser.add_argument("--accumulate", type=int, default=2, help="micro-batches per optimizer step")
    parser.add_argument("--batch-size", type=int, default=2, help="sequences per micro-batch per rank")
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--backend", default="gloo")
    parser.add_argument("--per-rank", action="store_true", help="also keep each rank's own rows (ranks/)")
    args = parser.parse_args(argv)

    distributed = "WORLD_SIZE" in os.environ  # set by torchrun, with RANK, MASTER_ADDR and MASTER_PORT
    if distributed:
        dist.init_process_group(args.backend)
    rank = dist.get_rank() if distributed else 0

    model = build_model()
    watch = moewatch.attach(model, args.run_dir, per_rank=args.per_rank,
                            meta={"example": "torchrun_ddp", "accumulate": args.accumulate})
    ddp = DistributedDataParallel(model) if distributed else model
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
    data = torch.Generator().manual_seed(1000 + rank)  # each rank trains on its own shard

    for _ in range(args.steps):
        for micro in range(args.accumulate):
            ids = torch.randint(0, VOCAB, (args.batch_size, args.seq_len), generator=data)
            last = micro == args.accumulate - 1
            # skip the gradient all-reduce until the last micro-batch, as accumulation under DDP should
            with contextlib.nullcontext() if last or not distributed else ddp.no_sync():
                ddp(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        watch.step()

    watch.close()
    if distributed:
        dist.barrier()  # every rank's parts are written before rank 0 reads the run
    if rank == 0:
        run = moewatch.load(args.run_dir).global_view()
        print(run.layers[["step", "layer", "tokens", "cv", "max_share", "dead"]].to_string(index=False))
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
