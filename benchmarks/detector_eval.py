"""Score the collapse detector on its evaluation set: precision, recall and lead time before collapse completes.

    python benchmarks/detector_eval.py                       # synthetic set, seeds 0-5
    python benchmarks/detector_eval.py --runs sample_runs    # plus labeled real runs (label in run.json meta)
    python benchmarks/detector_eval.py --demo-seeds 0-4      # plus the reference model's demo, trained per seed
    python benchmarks/detector_eval.py --set cv_warning=0.4  # score other thresholds

A real run joins the set when its run.json user meta has "label" (healthy | collapse | collapse_at_start |
degraded) and, for the collapse labels, "collapse_step"; see moewatch/detect/evaluate.py. Figures go to docs/detector.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moewatch.detect import DetectorConfig, parse_pairs  # noqa: E402
from moewatch.detect.evaluate import Scores, evaluate, labeled_runs  # noqa: E402


def seed_range(text: str) -> list[int]:
    """"0-4" or "0,3,7" to a list of seeds."""
    if "-" in text:
        lo, hi = text.split("-", 1)
        return list(range(int(lo), int(hi) + 1))
    return [int(s) for s in text.split(",") if s.strip()]


def demo_runs(seeds: list[int], out: Path) -> Path:
    """Train the demo's labelled scenarios (moewatch.reference.demo) once per seed into ``out/seed<N>``."""
    from moewatch.reference.demo import SCENARIOS, run_demo

    labelled = [s for s in SCENARIOS.values() if s.label]
    for seed in seeds:
        print(f"demo seed {seed}: training {', '.join(s.name for s in labelled)}", file=sys.stderr)
        run_demo(out / f"seed{seed}", seed=seed, scenarios=labelled)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=6, help="synthetic seeds per family and layer shape")
    ap.add_argument("--runs", type=Path, default=None, help="folder of labeled run directories to add")
    ap.add_argument("--demo-seeds", type=seed_range, default=[],
                    help="train the reference model's labelled demo scenarios on these seeds (e.g. 0-4) and add them")
    ap.add_argument("--demo-dir", type=Path, default=None, help="keep the demo runs here (default: a temp folder)")
    ap.add_argument("--config", type=Path, default=None, help="TOML file of detector thresholds")
    ap.add_argument("--set", dest="pairs", action="append", default=[], help="override a threshold: key=value")
    ap.add_argument("--quiet", action="store_true", help="print the summary only")
    args = ap.parse_args()
    config = DetectorConfig.from_toml(args.config) if args.config else DetectorConfig()
    if args.pairs:
        config = config.with_overrides(parse_pairs(args.pairs))
    t0 = time.perf_counter()
    scores = evaluate(config, seeds=range(args.seeds), runs_dir=args.runs)
    if args.demo_seeds:
        with tempfile.TemporaryDirectory(prefix="moewatch-demo-eval-") as tmp:
            root = demo_runs(args.demo_seeds, args.demo_dir or Path(tmp))
            demo = Scores(tuple(labeled_runs(root, config)))
        print("reference-model demo runs:")
        print(demo.table())
        print()
        scores = Scores(scores.cases + demo.cases)
        print("all runs:")
    table = scores.table().splitlines()
    summary = next(i for i, line in enumerate(table) if line.startswith("precision"))
    print("\n".join(table[summary:] if args.quiet else table))
    for title, cases in (("false alarms", scores.false_alarms), ("missed", scores.missed),
                         ("degraded runs called critical", scores.overcalled)):
        if cases:
            print(f"{title}: {', '.join(c.name for c in cases)}")
    print(f"({time.perf_counter() - t0:.1f} s)")
    return 0 if not (scores.false_alarms or scores.missed or scores.overcalled) else 1


if __name__ == "__main__":
    sys.exit(main())
