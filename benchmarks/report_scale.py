"""`moewatch report` end to end on big synthetic runs in the on-disk format: wall time and peak RSS (issue "Real
pretraining scale": 100k steps x 32 layers x 64 experts top-2 in <= 20 s and <= 2 GiB; 50k steps x 58 layers x
256 experts top-8 in <= 60 s and <= 4 GiB).

    python benchmarks/report_scale.py                  # both shapes (writes them under /tmp once, ~1.6 GB)
    python benchmarks/report_scale.py --shape mixtral  # only 100k x 32 x 64
    python benchmarks/report_scale.py --shape mixtral --grads --compact  # with per-expert gradient norms, then
                                                       # compacted (rollups): the report reads blocks, not steps

The runs are written by benchmarks/dashboard.py's writer (one layer drifts to collapse); the report runs in a child
process under /usr/bin/time, so its peak RSS is the report's alone.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dashboard import make_run  # noqa: E402

SHAPES = {
    "mixtral": dict(steps=100_000, layers=32, experts=64, top_k=2, tokens=4096, part_steps=1000),
    "deepseek-v3": dict(steps=50_000, layers=58, experts=256, top_k=8, tokens=4096, part_steps=1000),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=[*SHAPES, "all"], default="all")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/moewatch-bench-report"))
    ap.add_argument("--grads", action="store_true", help="record a grad_norm per expert and step (schema 2)")
    ap.add_argument("--compact", action="store_true",
                    help="time the report before and after `moewatch compact` (which writes the rollups)")
    args = ap.parse_args()
    for name in SHAPES if args.shape == "all" else [args.shape]:
        sh = SHAPES[name]
        path = args.dir / (name + ("-grads" if args.grads else ""))
        make_run(path, sh["steps"], sh["layers"], sh["experts"], sh["part_steps"], status="finished",
                 top_k=sh["top_k"], tokens=sh["tokens"], grads=args.grads)
        report(name, sh, path)
        if args.compact and not (path / "rollups").is_dir():
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "moewatch.cli", "compact", str(path)], check=True)
            print(f"  moewatch compact: {time.perf_counter() - t0:.1f} s")
        if args.compact:
            report(name + " (compacted, rollups)", sh, path)


def report(name: str, sh: dict, path: Path) -> None:
    """`moewatch report` on ``path`` in a child process: wall time and peak RSS."""
    size = sum(f.stat().st_size for f in path.rglob("*.parquet"))
    t0 = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "moewatch.cli", "report", str(path)],
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    verdict = next((line for line in done.stdout.splitlines() if line.startswith("Verdict:")), "?")
    rows = sh["steps"] * sh["layers"] * sh["experts"]
    print(f"{name}: {sh['steps']:,} steps x {sh['layers']} layers x {sh['experts']} experts top-{sh['top_k']} "
          f"({rows / 1e6:.0f} M expert rows, {size / 2**20:.0f} MiB of Parquet): report {wall:.1f} s, peak RSS "
          f"{int(rss.group(1)) / 2**20 if rss else float('nan'):.2f} GiB, exit {done.returncode}\n  {verdict}")

if __name__ == "__main__":
    main()
