"""Capture overhead with the rank sum (`attach(..., group=)`) on 2 gloo processes, and the reducer's own cost.

    python benchmarks/group_overhead.py                 # step time: plain DDP vs DDP + moewatch, per arm
    python benchmarks/group_overhead.py --payload       # one round for a DeepSeek-V3-shaped model (58 x 256, top-8)

Step time: each of the 2 processes (gloo, CPU, 1 torch thread each) trains three DistributedDataParallel copies of
the same transformers Mixtral (benchmarks/overhead.py's CPU config) in rotating rounds: plain, with moewatch
summing over the world group (the default under torch.distributed), and with moewatch writing each rank's own rows
(no group, the pre-aggregation behaviour). Figures are medians over the rounds; the overhead is
median(watched) / median(plain) - 1, per rank.

Payload: the reducer's protocol alone, with synthetic accumulators of a 58-layer, 256-expert model: how long one
round of `--steps` steps takes in the background thread (two all-reduces of steps x 58 x 1,290 float64).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _steps(model, opt, batch, n, watch=None) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if watch is not None:
            watch.step()
        out.append(time.perf_counter() - t0)
    return out


def _train(rank: int, world: int, init: str, run_root: str, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    from overhead import CONFIGS, build
    from torch.nn.parallel import DistributedDataParallel

    import moewatch
    from moewatch.capture.watch import Watch, WatchConfig

    cfg = CONFIGS["cpu"]
    base = build("cpu", cfg)
    models = {arm: copy.deepcopy(base) for arm in ("plain", "group", "rank")}
    watches = {
        "group": moewatch.attach(models["group"], os.path.join(run_root, "group"), flush_steps=args.flush_steps),
        "rank": None,
    }
    from moewatch.capture.discovery import discover

    watches["rank"] = Watch(models["rank"], os.path.join(run_root, "rank"), discover(models["rank"]),
                            WatchConfig(flush_steps=args.flush_steps))  # no group: each rank its own rows
    ddp = {arm: DistributedDataParallel(m) for arm, m in models.items()}
    opts = {arm: torch.optim.SGD(m.parameters(), lr=1e-4) for arm, m in ddp.items()}
    g = torch.Generator().manual_seed(rank)
    batch = torch.randint(0, 1024, (cfg["batch"], cfg["seq"]), generator=g)
    for arm in ddp:  # warm-up
        _steps(ddp[arm], opts[arm], batch, 2, watches.get(arm))
    times: dict[str, list[float]] = {arm: [] for arm in ddp}
    arms = list(ddp)
    for r in range(args.rounds):
        for arm in arms[r % 3:] + arms[: r % 3]:  # rotate the order: no arm always runs first
            times[arm] += _steps(ddp[arm], opts[arm], batch, args.steps, watches.get(arm))
    reducer = watches["group"]._reducer
    for w in watches.values():
        w.close()
    stats = {"header_rounds": reducer.rounds, "sum_rounds": reducer.data_rounds, "summed_steps": reducer.reduced_steps,
             "allreduce_s": round(reducer.reduce_seconds, 3), "assemble_s": round(reducer.assemble_seconds, 3),
             "write_s": round(reducer.write_seconds, 3), "thread_cpu_s": round(reducer.cpu_seconds, 3),
             "mode": reducer.mode}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"median": {a: statistics.median(t) for a, t in times.items()}, "n": len(times["plain"]),
                   "reducer": stats}, f)
    dist.barrier()
    dist.destroy_process_group()


def _payload(rank: int, world: int, init: str, run_root: str, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    from moewatch import metrics
    from moewatch.capture.reduce import GroupReducer, StepBatch
    from moewatch.store.writer import Chunk, FlushWorker, LayerSlot, PartWriter

    L, E, K, S = 58, 256, 8, args.steps
    registry = tuple((f"layers.{i}.mlp.gate", E, K, True) for i in range(L))
    width = metrics.state_size(E)
    layout = tuple(LayerSlot(name, E, K, True, i * width, (i + 1) * width) for i, (name, *_) in enumerate(registry))
    worker = FlushWorker(PartWriter(Path(run_root), rank, 1), heartbeat=None, heartbeat_seconds=30)
    worker.start()
    reducer = GroupReducer(members=tuple(range(world)), rank=rank, worker=worker, phases=("train",), timeout=120,
                           session=1, per_rank=False, on_session=lambda s, a: None, on_fallback=lambda f: None)
    reducer.start()
    timings = []
    for r in range(args.rounds):
        states = torch.rand(S, L * width, dtype=torch.float64) * 100
        steps = [(r * S + i, r * S + i, time.time(), L) for i in range(S)]
        chunk = Chunk(states, None, layout, steps=[s[1] for s in steps], seqs=[s[0] for s in steps],
                      times=[s[2] for s in steps], calls=[{n: 1 for n, *_ in registry}] * S, phase="train")
        t0 = time.perf_counter()
        reducer.submit(StepBatch(steps, [chunk], registry))
        reducer.wait_handled(steps[-1][0], 600)
        timings.append(time.perf_counter() - t0)
    reducer.submit(StepBatch([], [], registry, closing=True))
    reducer.join(600)
    worker.drain()
    worker.stop()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        n = max(reducer.data_rounds, 1)
        json.dump({"round_seconds": timings, "assemble": reducer.assemble_seconds / n,
                   "allreduce": reducer.reduce_seconds / n, "write": reducer.write_seconds / n,
                   "mb_per_round": S * L * width * 8 / 1e6, "rows_per_round": S * L * E}, f)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--payload", action="store_true", help="measure the reducer alone on synthetic 58x256 steps")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=5, help="steps per round (--payload: steps per reduction)")
    ap.add_argument("--flush-steps", type=int, default=10)
    args = ap.parse_args()
    if args.payload and args.steps == 5:
        args.steps = 100
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out")
        os.makedirs(out)
        fn = _payload if args.payload else _train
        mp.start_processes(fn, args=(2, os.path.join(tmp, "init"), os.path.join(tmp, "runs"), args, out), nprocs=2,
                           start_method="spawn")
        results = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(2)]
    print(f"load average before/after: {os.getloadavg()[0]:.2f}; torch {torch.__version__}; 2 processes x 1 thread")
    if args.payload:
        for r, res in enumerate(results):
            t = res["round_seconds"]
            print(f"rank {r}: {args.steps} steps x 58 layers x 256 experts = {res['mb_per_round']:.0f} MB per round, "
                  f"{res['rows_per_round'] / 1e6:.2f} M expert rows; round (reduce + rank 0 writes) median "
                  f"{statistics.median(t):.2f} s, min {min(t):.2f} s; per round: assemble {res['assemble']:.2f} s, "
                  f"all-reduces {res['allreduce']:.2f} s, convert + write (rank 0) {res['write']:.2f} s")
        return
    for r, res in enumerate(results):
        m = res["median"]
        print(f"rank {r}: {res['n']} steps per arm; plain {m['plain'] * 1e3:.1f} ms, group {m['group'] * 1e3:.1f} ms "
              f"({100 * (m['group'] / m['plain'] - 1):+.1f} %), per-rank rows {m['rank'] * 1e3:.1f} ms "
              f"({100 * (m['rank'] / m['plain'] - 1):+.1f} %); reducer {res['reducer']}")


if __name__ == "__main__":
    main()
