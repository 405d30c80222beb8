"""The pieces of a results table made from a `dsal compare` folder and the results queue's records:
markdown, the runs grid (minutes and peak memory per row and seed), the summary with seconds per round,
and the paired differences, and the `row` / `table` command line of a table made one `dsal compare` row at a
time. Used by bench/hippocampus.py, bench/hippocampus_planned.py, bench/slices_fg.py and bench/semisup_isic.py."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path

import pandas as pd


def md(df: pd.DataFrame) -> str:
    """A markdown table; floats with 4 decimals."""
    cols = list(df.columns)
    fmt = {c: (lambda v: f"{v:.4f}") if pd.api.types.is_float_dtype(df[c]) else str for c in cols}
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt[c](df[c].iloc[i]) for c in cols) + " |" for i in range(len(df))]
    return "\n".join(lines)


def queue_records(exp_dir: Path, prefix: str) -> dict[str, dict]:
    """The results queue's record of each finished job whose id starts with `prefix` (minutes, peak memory,
    commit), by job id."""
    records = {}
    for path in sorted((exp_dir / "queue").glob(prefix.replace("/", "__") + "*.json")):
        rec = json.loads(path.read_text())
        records[rec["job"]] = rec
    return records


def runs_grid(records: dict[str, dict], job_id, rows, seeds=(0, 1, 2)) -> list[str]:
    """Markdown lines: per row and seed, the job's minutes, peak memory and commit, or pending.
    `job_id(row, seed)` names the job."""
    lines = ["| row | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for row in rows:
        cells = []
        for seed in seeds:
            rec = records.get(job_id(row, seed))
            if rec is None:
                cells.append("pending")
                continue
            peak = f", {rec['peak_rss_mb'] / 1024:.1f} GiB" if "peak_rss_mb" in rec else ""
            cells.append(f"{rec['minutes']:.1f} min{peak} ({rec['commit']})")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return lines


def per_round_seconds(folder: Path) -> pd.DataFrame:
    """Mean training and scoring seconds per round after round 0, per row (from the learning curves)."""
    rows = []
    for curve in sorted(folder.glob("*-s*/learning_curve.csv")):
        row, _, _ = curve.parent.name.rpartition("-s")
        if row.partition("@")[0] == "init":
            continue
        c = pd.read_csv(curve)
        later = c[c["round"] > 0] if (c["round"] > 0).any() else c
        rows.append({"strategy": row, "train_s_per_round": later["train_s"].mean(),
                     "score_s_per_round": later["score_s"].mean()})
    if not rows:
        return pd.DataFrame()
    return pd.DataFrame(rows).groupby("strategy", as_index=False).mean()


SUMMARY_COLUMNS = ("strategy", "pseudo", "selection", "final_dice_mean", "final_dice_std", "final_hd95p_mean",
                   "n_oracle", "aulc_mean", "aulc_std", "seeds")


def summary(folder: Path) -> pd.DataFrame | None:
    """`dsal compare`'s summary with the seconds per round, or None before anything finished."""
    path = folder / "summary.csv"
    if not path.is_file():
        return None
    s = pd.read_csv(path)
    s = s[[c for c in SUMMARY_COLUMNS if c in s]]
    timing = per_round_seconds(folder)
    return s.merge(timing, on="strategy", how="left") if not timing.empty else s


def differences(folder: Path) -> pd.DataFrame | None:
    path = folder / "differences.csv"
    return pd.read_csv(path) if path.is_file() else None


def row_table_main(argv: list[str] | None, doc: str, rows, run_row: Callable, table: Callable[[Path], str],
                   out: Path) -> int:
    """`SCRIPT row ROW SEED [--data D] [--exp-dir E]` runs one row (`run_row(data, row, seed, exp_dir)`) and
    rewrites the table `out` (`table(exp_dir)`); `SCRIPT table [--exp-dir E]` only rewrites it. `--data`
    defaults to $HIPPOCAMPUS_DATA or ../shared/data/hippocampus beside the project."""
    root = Path(__file__).resolve().parent.parent
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("what", choices=("row", "table"))
    ap.add_argument("row", nargs="?", choices=(*rows, "full"))
    ap.add_argument("seed", nargs="?", type=int)
    ap.add_argument("--data", default=os.environ.get("HIPPOCAMPUS_DATA",
                                                     str((root.parent / "shared" / "data" / "hippocampus").resolve())))
    ap.add_argument("--exp-dir", type=Path, default=Path(os.environ.get("EXP_DIR") or root / "exp"))
    args = ap.parse_args(argv)
    exp_dir = args.exp_dir.resolve()
    if args.what == "row":
        if args.row is None or args.seed is None:
            ap.error("row needs ROW and SEED")
        run_row(args.data, args.row, args.seed, exp_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table(exp_dir))
    print(f"wrote {out}")
    return 0
