"""Step-time overhead of moewatch on a transformers Mixtral: with and without attach, in the same process.

    python benchmarks/overhead.py                 # CPU, tiny config
    python benchmarks/overhead.py --device cuda   # GPU, a larger config (also checks there is no host sync)

Rounds alternate between the plain and the watched model so drift (thermal, other load) hits both alike; the
reported ratio is median(watched) / median(plain) - 1.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

import moewatch

CONFIGS = {
    # hidden, layers, experts, top_k, intermediate, batch, seq
    "cpu": dict(hidden_size=256, num_hidden_layers=4, num_local_experts=8, num_experts_per_tok=2,
                intermediate_size=512, batch=8, seq=128),
    "cuda": dict(hidden_size=1024, num_hidden_layers=8, num_local_experts=16, num_experts_per_tok=2,
                 intermediate_size=2048, batch=8, seq=1024),
}


def build(device: str, cfg: dict):
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=1024, hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=8, num_key_value_heads=8,
        num_local_experts=cfg["num_local_experts"], num_experts_per_tok=cfg["num_experts_per_tok"],
        max_position_embeddings=cfg["seq"], router_aux_loss_coef=0.0,
    )
    torch.manual_seed(0)
    model = MixtralForCausalLM(config).to(device)
    model.train()
    return model


def time_steps(model, opt, batch, n: int, watch=None, sync=None) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if watch is not None:
            watch.step()
        if sync:
            sync()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=5, help="steps per round")
    ap.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0 = torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = CONFIGS[args.device]
    sync = torch.cuda.synchronize if args.device == "cuda" else None
    import copy

    plain_model = build(args.device, cfg)
    watched_model = copy.deepcopy(plain_model)  # same weights, same cost: only moewatch differs
    opts = [torch.optim.SGD(m.parameters(), lr=1e-4) for m in (plain_model, watched_model)]
    g = torch.Generator(device="cpu").manual_seed(0)
    batch = torch.randint(0, 1024, (cfg["batch"], cfg["seq"]), generator=g).to(args.device)
    with tempfile.TemporaryDirectory() as run_dir:
        watch = moewatch.attach(watched_model, run_dir, flush_steps=50)
        time_steps(plain_model, opts[0], batch, 3, sync=sync)  # warm-up both
        time_steps(watched_model, opts[1], batch, 3, watch=watch, sync=sync)
        plain, watched = [], []
        for _ in range(args.rounds):
            plain += time_steps(plain_model, opts[0], batch, args.steps, sync=sync)
            watched += time_steps(watched_model, opts[1], batch, args.steps, watch=watch, sync=sync)
        watch.close()
        steps = moewatch.load(run_dir).layers.step.nunique()
    p, w = statistics.median(plain), statistics.median(watched)
    print(f"device={args.device} config={cfg} threads={torch.get_num_threads()}")
    print(f"routers={len(watch.routers)} recorded_steps={steps}")
    print(f"plain   median step {p * 1e3:8.2f} ms")
    print(f"watched median step {w * 1e3:8.2f} ms")
    print(f"overhead {100 * (w / p - 1):+.2f}%")


if __name__ == "__main__":
    main()
