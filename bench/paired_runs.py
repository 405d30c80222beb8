"""Paired test Dice of two finished runs on the same test items: `python bench/paired_runs.py RUN_A RUN_B`.

Reads each run's last round's `test_metrics.csv` (per test image or volume), pairs them by name and prints
the mean of A - B with its bootstrap 95% interval over the items (`compare.bootstrap_ci`, one seed). Used for
the single-seed diagnosis rows (bench/results/semisup_hippocampus_diagnosis.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def test_dice(run: Path):
    import pandas as pd

    rounds = sorted(Path(run).glob("round_*/test_metrics.csv"))
    if not rounds:
        raise SystemExit(f"{run}: no round_*/test_metrics.csv; give a finished run folder")
    return pd.read_csv(rounds[-1]).set_index("name")["dice"].sort_index()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_a", type=Path)
    ap.add_argument("run_b", type=Path)
    args = ap.parse_args(argv)

    from dsal_tf.compare import bootstrap_ci

    a, b = test_dice(args.run_a), test_dice(args.run_b)
    if list(a.index) != list(b.index):
        raise SystemExit(f"{args.run_a} and {args.run_b} were tested on different items; pair runs of one split")
    d, lo, hi = bootstrap_ci((a - b).to_numpy()[None])
    print(f"A {a.mean():.4f}, B {b.mean():.4f}, A - B {d:+.4f} [{lo:+.4f}, {hi:+.4f}] over {len(a)} items")


if __name__ == "__main__":
    main()
