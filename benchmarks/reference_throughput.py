"""Throughput of the reference MoE: grouped_mm dispatch against a plain loop over experts, same process.

Two measurements, each timed for both dispatch paths with the same weights and inputs, interleaved so that
drift in the machine's speed hits both alike (the median of the rounds is reported):

- the MoE layer alone: forward + backward of ``MoE.experts`` on T tokens,
- the whole model: one training step (forward, backward, AdamW step) of MoEGPT.

The loop path is the classic reference implementation (Mixtral's): for each expert, find its tokens with
torch.where, run the expert, scatter back. On a GPU that costs a host sync per expert; grouped_mm runs every
expert in one call with no sync. On a GPU the model runs under bf16 autocast (grouped_mm's CUDA kernels are
bf16).

    python benchmarks/reference_throughput.py                       # CPU defaults
    python benchmarks/reference_throughput.py --device cuda --tokens 16384 --d-model 1024 --d-expert 2048 ...
    python benchmarks/reference_throughput.py --json out.json        # also write the figures as JSON
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from moewatch.reference.model import MoE, MoEConfig, MoEGPT, grouped_mm_supported  # noqa: E402

PATHS = ("grouped_mm", "loop")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_rounds(
    fns: dict[str, Callable[[], None]], rounds: int, iters: int, device: torch.device
) -> dict[str, float]:
    """Median seconds per call of each function, measured in interleaved rounds."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            sync(device)
            samples[name].append((time.perf_counter() - start) / iters)
    return {name: statistics.median(s) for name, s in samples.items()}


def layer_benchmark(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    config = MoEConfig(
        d_model=args.d_model, n_head=1, n_experts=args.experts, top_k=args.top_k, d_expert=args.d_expert
    )
    moe = MoE(config).to(device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    x_TD = torch.randn(args.tokens, args.d_model, generator=gen).to(device).requires_grad_(True)
    logits_TE = torch.randn(args.tokens, args.experts, generator=gen).to(device)
    probs_TE = logits_TE.softmax(-1)
    weights_TK, indices_TK = probs_TE.topk(args.top_k, dim=-1)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step(path: str) -> Callable[[], None]:
        def run() -> None:
            moe.dispatch = path
            with autocast:
                y_TD = moe.experts(x_TD, indices_TK, weights_TK)
            y_TD.float().square().mean().backward()
            moe.zero_grad(set_to_none=True)
            x_TD.grad = None

        return run

    fns = {path: step(path) for path in PATHS}
    for fn in fns.values():  # warm up: allocator, kernels, lazy init
        for _ in range(args.warmup):
            fn()
    seconds = time_rounds(fns, args.rounds, args.iters, device)
    return {path: args.tokens / s for path, s in seconds.items()}


def model_benchmark(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    base = MoEConfig(
        vocab_size=256,
        block_size=args.seq,
        n_layer=args.layers,
        n_head=args.heads,
        d_model=args.d_model,
        n_experts=args.experts,
        top_k=args.top_k,
        d_expert=args.d_expert,
    )
    gen = torch.Generator().manual_seed(0)
    x_BS = torch.randint(0, 256, (args.batch, args.seq), generator=gen).to(device)
    y_BS = torch.randint(0, 256, (args.batch, args.seq), generator=gen).to(device)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    fns = {}
    for path in PATHS:
        model = MoEGPT(dataclasses.replace(base, dispatch=path)).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def run(model: MoEGPT = model, opt: torch.optim.Optimizer = opt) -> None:
            with autocast:
                loss = model(x_BS, y_BS).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        fns[path] = run
    for fn in fns.values():
        for _ in range(args.warmup):
            fn()
    seconds = time_rounds(fns, args.rounds, args.iters, device)
    return {path: args.batch * args.seq / s for path, s in seconds.items()}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per MoE-layer call (layer benchmark)")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-expert", type=int, default=512)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--layers", type=int, default=2, help="model benchmark: transformer blocks")
    p.add_argument("--heads", type=int, default=4, help="model benchmark: attention heads")
    p.add_argument("--batch", type=int, default=8, help="model benchmark: sequences per step")
    p.add_argument("--seq", type=int, default=256, help="model benchmark: sequence length")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=5, help="calls per timed round")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median is reported")
    p.add_argument("--skip-model", action="store_true", help="only the MoE layer")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if not grouped_mm_supported(device, dtype):
        print(f"grouped_mm is not available for {dtype} on {device}: nothing to compare", file=sys.stderr)
        return {}

    results: dict = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dtype": str(dtype),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    layer = layer_benchmark(args, device)
    results["layer_tokens_per_s"] = layer
    results["layer_speedup"] = layer["grouped_mm"] / layer["loop"]
    shape = f"T={args.tokens} D={args.d_model} H={args.d_expert} E={args.experts} k={args.top_k}"
    where = f"{device.type}, {dtype}, {results['threads']} threads"
    print(f"device: {results['device']} ({where}), torch {torch.__version__}")
    print(f"MoE layer fwd+bwd  [{shape}]")
    for path in PATHS:
        print(f"  {path:<11} {layer[path]:>12,.0f} tokens/s")
    print(f"  grouped_mm / loop: {results['layer_speedup']:.2f}x")
    if not args.skip_model:
        model = model_benchmark(args, device)
        results["model_tokens_per_s"] = model
        results["model_speedup"] = model["grouped_mm"] / model["loop"]
        model_shape = f"B={args.batch} S={args.seq} layers={args.layers} {shape.split(' ', 1)[1]}"
        print(f"whole model train step  [{model_shape}]")
        for path in PATHS:
            print(f"  {path:<11} {model[path]:>12,.0f} tokens/s")
        print(f"  grouped_mm / loop: {results['model_speedup']:.2f}x")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
