"""Score the collapse detector on its evaluation set: precision, recall and lead time before collapse completes.

    python benchmarks/detector_eval.py                       # synthetic set, seeds 0-5
    python benchmarks/detector_eval.py --runs sample_runs    # plus labeled real runs (label in run.json meta)
    python benchmarks/detector_eval.py --set cv_warning=0.4  # score other thresholds

A real run joins the set when its run.json user meta has "label" (healthy | collapse | degraded) and, for
collapse runs, "collapse_step"; see moewatch/detect/evaluate.py. Figures go to docs/detector.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moewatch.detect import DetectorConfig, parse_pairs  # noqa: E402
from moewatch.detect.evaluate import evaluate  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=6, help="synthetic seeds per family and layer shape")
    ap.add_argument("--runs", type=Path, default=None, help="folder of labeled run directories to add")
    ap.add_argument("--config", type=Path, default=None, help="TOML file of detector thresholds")
    ap.add_argument("--set", dest="pairs", action="append", default=[], help="override a threshold: key=value")
    ap.add_argument("--quiet", action="store_true", help="print the summary only")
    args = ap.parse_args()
    config = DetectorConfig.from_toml(args.config) if args.config else DetectorConfig()
    if args.pairs:
        config = config.with_overrides(parse_pairs(args.pairs))
    t0 = time.perf_counter()
    scores = evaluate(config, seeds=range(args.seeds), runs_dir=args.runs)
    table = scores.table().splitlines()
    print("\n".join(table[-2:] if args.quiet else table))
    for title, cases in (("false alarms", scores.false_alarms), ("missed", scores.missed),
                         ("degraded runs called critical", scores.overcalled)):
        if cases:
            print(f"{title}: {', '.join(c.name for c in cases)}")
    print(f"({time.perf_counter() - t0:.1f} s)")
    return 0 if not (scores.false_alarms or scores.missed or scores.overcalled) else 1


if __name__ == "__main__":
    sys.exit(main())
