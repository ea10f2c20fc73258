"""Writer throughput: expert rows per second that moewatch's writer thread turns from accumulator snapshots into
Parquet part files (metrics, Arrow tables, zstd Parquet, atomic write), per flush of a pretraining-sized model.

    python benchmarks/writer.py                      # 100 steps x 32 layers x 64 experts per flush, 10 flushes
    python benchmarks/writer.py --layers 58 --experts 256

The training thread never does this work (it hands the writer a device-to-host copy); the figure says how many
steps per second the writer sustains before flushes queue up.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moewatch import metrics  # noqa: E402
from moewatch.store.writer import Chunk, LayerSlot, PartWriter, chunk_to_tables  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100, help="steps per flush")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--flushes", type=int, default=10)
    args = ap.parse_args()
    width = metrics.state_size(args.experts)
    layout, col = [], 0
    for i in range(args.layers):
        layout.append(LayerSlot(f"model.layers.{i}.mlp.gate", args.experts, args.top_k, False, col, col + width))
        col += width
    # Plausible accumulator contents: counts per expert, token totals; the writer's cost does not depend on values.
    states = torch.rand(args.steps, col, dtype=torch.float64) * 100
    rows = args.steps * args.layers * args.experts
    with tempfile.TemporaryDirectory() as tmp:
        writer = PartWriter(Path(tmp), 0, 1)
        t0 = time.perf_counter()
        for f in range(args.flushes):
            steps = list(range(f * args.steps, (f + 1) * args.steps))
            chunk = Chunk(states, None, tuple(layout), steps, steps, [0.0] * args.steps,
                          [{s.name: 1 for s in layout}] * args.steps, "train")
            ex, ly = chunk_to_tables(chunk, 0, 1)
            writer.write("experts", ex)
            writer.write("layers", ly)
        secs = (time.perf_counter() - t0) / args.flushes
    print(f"{args.steps} steps x {args.layers} layers x {args.experts} experts per flush ({rows:,} expert rows): "
          f"{secs:.3f} s per flush, {rows / secs / 1e6:.1f} M expert rows/s, {args.steps / secs:,.0f} steps/s")


if __name__ == "__main__":
    main()
