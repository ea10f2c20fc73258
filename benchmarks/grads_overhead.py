"""Cost of the per-expert gradient hook (`moewatch.capture.grads.GradTracker`) per optimizer step.

    python benchmarks/grads_overhead.py                  # CPU: a Mixtral-shaped model (transformers 5, fused experts)
    python benchmarks/grads_overhead.py --device cuda    # GPU, a larger config

Reports, for the fused experts of a transformers Mixtral and for the same weights as experts-as-modules (E
separate ``nn.Linear`` triples per layer, as transformers 4.x / LitGPT / DeepSpeed keep them):

Plus the same as modules with tiny weights and 48 layers x 64 experts, which shows the Python cost per tensor.

- ``hook``: the pre-hook alone (what ``optimizer.step()`` gains), median over calls on the real grads;
- ``take``: handing the step's squares over (once per ``watch.step()``);
- ``param_norms``: the parameter norms (once per flush);
- ``step``: a whole training step (forward, backward, AdamW step, zero_grad) with and without the tracker,
  rounds alternating so that drift hits both alike; the overhead is median(tracked) / median(plain) - 1.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from moewatch.capture.discovery import discover
from moewatch.capture.grads import GradTracker

sys.path.insert(0, str(Path(__file__).resolve().parent))

# The same model and shapes as benchmarks/overhead.py.
from overhead import CONFIGS, build  # noqa: E402


class ModuleExperts(nn.Module):
    """The same expert weights as separate modules: layers[i].mlp.{gate, experts[e].{w1, w2, w3}}."""

    def __init__(self, cfg: dict, device: str) -> None:
        super().__init__()
        D, H, E = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_local_experts"]

        def expert() -> nn.Module:
            m = nn.Module()
            m.w1, m.w2, m.w3 = nn.Linear(D, H, bias=False), nn.Linear(H, D, bias=False), nn.Linear(D, H, bias=False)
            return m

        def block() -> nn.Module:
            b = nn.Module()
            b.gate = nn.Linear(D, E, bias=False)
            b.experts = nn.ModuleList(expert() for _ in range(E))
            return b

        self.layers = nn.ModuleList(nn.Module() for _ in range(cfg["num_hidden_layers"]))
        for layer in self.layers:
            layer.mlp = block()
        self.to(device)


def timed(fn, n: int, sync) -> float:
    out = []
    for _ in range(n):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def hook_costs(model: nn.Module, routers, sync, n: int) -> dict[str, float]:
    """Median seconds of the hook, take and param_norms on the model's current (filled) grads."""
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    tracker = GradTracker.attach(model, routers)
    try:
        assert not tracker.problems, tracker.problems
        tracker._hook(opt, (), {})  # the optimizer's plan is built on its first step
        tracker.take()
        hook = timed(lambda: tracker._hook(opt, (), {}), n, sync)
        take = timed(tracker.take, n, sync)
        norms = timed(tracker.param_norms, max(n // 4, 3), sync)
        tensors = sum(len(ep.tensors) for ep in tracker.found.values())
    finally:
        tracker.remove()
    return dict(hook=hook, take=take, param_norms=norms, tensors=tensors)


def step_overhead(model: nn.Module, batch: torch.Tensor, sync, rounds: int, steps: int) -> tuple[float, float]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    routers = discover(model)

    def run(n: int) -> list[float]:
        out = []
        for _ in range(n):
            sync()
            t0 = time.perf_counter()
            model(input_ids=batch, labels=batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            out.append(time.perf_counter() - t0)
        return out

    run(2)  # warm-up (optimizer state, allocator)
    plain: list[float] = []
    tracked: list[float] = []
    for _ in range(rounds):
        plain += run(steps)
        tracker = GradTracker.attach(model, routers)
        tracked += run(steps)
        tracker.take()
        tracker.remove()
    return statistics.median(plain), statistics.median(tracked)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--calls", type=int, default=50)
    args = ap.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)
    cfg = CONFIGS[args.device]
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    model = build(args.device, cfg)
    batch = torch.randint(0, 1024, (cfg["batch"], cfg["seq"]), device=args.device)
    shape = (f"hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers x {cfg['num_local_experts']} experts, "
             f"intermediate {cfg['intermediate_size']}, batch {cfg['batch']}x{cfg['seq']}, {args.device}, "
             f"{torch.get_num_threads()} threads")
    print(f"Mixtral-shaped: {shape}")

    model(input_ids=batch, labels=batch).loss.backward()
    fused = hook_costs(model, discover(model), sync, args.calls)
    model.zero_grad(set_to_none=True)

    mods = ModuleExperts(cfg, args.device)
    for p in mods.parameters():
        p.grad = torch.randn_like(p)
    routers = {f"layers.{i}.mlp.gate": cfg["num_local_experts"] for i in range(cfg["num_hidden_layers"])}
    modules = hook_costs(mods, routers, sync, args.calls)

    # Python's share: many tiny tensors (a DeepSeek-V3-sized expert count: 48 layers x 64 experts x 3 weights).
    many_cfg = dict(cfg, hidden_size=8, intermediate_size=8, num_hidden_layers=48, num_local_experts=64)
    many = ModuleExperts(many_cfg, args.device)
    for p in many.parameters():
        p.grad = torch.randn_like(p)
    many = hook_costs(many, {f"layers.{i}.mlp.gate": 64 for i in range(48)}, sync, max(args.calls // 5, 5))

    for name, c in (("fused [E, ...] (transformers 5)", fused), ("experts as modules", modules),
                    ("modules, 48x64 tiny experts", many)):
        print(f"  {name:34s} {c['tensors']:4d} tensors: hook {c['hook'] * 1e3:7.3f} ms/optimizer step, "
              f"take {c['take'] * 1e3:6.3f} ms, param_norms {c['param_norms'] * 1e3:7.3f} ms")

    plain, tracked = step_overhead(model, batch, sync, args.rounds, args.steps)
    print(f"  training step: plain {plain * 1e3:.1f} ms, tracked {tracked * 1e3:.1f} ms "
          f"({(tracked / plain - 1) * 100:+.2f}%; hook alone {fused['hook'] / plain * 100:.2f}% of the step)")


if __name__ == "__main__":
    main()
