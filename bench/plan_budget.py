"""Does `--preset auto` keep its time budget? Planned against actual minutes, planning included (issue 25).

    python bench/results_queue.py run --only plan/ ...          # the cases, one job each
    python bench/plan_budget.py run CASE [--exp-dir EXP]        # one case: `dsal run --preset auto`, timed
    python bench/plan_budget.py table [--exp-dir EXP]           # rewrite bench/results/plan_budget.md

Each case is one `dsal run --preset auto` in a fresh run folder, timed from the command's start (planning
included) to its end; the table reads the run's `plan.json`: the budget, the planning minutes, the probe,
the predicted minutes per phase and the `actual` minutes the run wrote there when it finished.

Cases (`CASES`), the two that ran over their budgets before the planner counted its own time:
- `small-grey`: 80 small grey CT slices with lesions of a few pixels (every 10th `covid_ct` training slice,
  every 6th validation and every 5th test slice, linked, not copied), `--iterations 1`, 30 labels, 2 initial
  epochs and 1 a round, the default 15-minute budget. Before: still planning after 10 minutes (every candidate
  fit; the plan preferred 256x256 with 32 filters at 7 s a step, then probed it for 100 steps).
- `covid-12`: all of `covid_ct` with a 12-minute budget. Before: the plan predicted 12 minutes and the whole
  command took 17 (the probe timed 590 ms a step, training ran at 800-850).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(os.environ.get("RESULTS_DIR") or ROOT / "bench" / "results")
COVID = os.environ.get("COVID_DATA", str((ROOT.parent / "shared" / "data" / "covid_ct").resolve()))
SPLITS = ("train", "val", "test")
# case -> (every k-th file per split or None for the whole set, budget minutes, extra `dsal run` options)
CASES: dict[str, tuple[dict[str, int] | None, float, tuple[str, ...]]] = {
    "small-grey": ({"train": 10, "val": 6, "test": 5}, 15.0,
                   ("--iterations", "1", "--set", "NB_LABELED=30", "--set", "NB_INITIAL_EPOCHS=2",
                    "--set", "NB_ACTIVE_EPOCHS=1")),
    "covid-12": (None, 12.0, ()),
}


def subset(source: Path, every: dict[str, int], dest: Path) -> Path:
    """An orgData folder of symlinks to every k-th image (and its mask) of each split of `source`."""
    for split in SPLITS:
        for kind in ("Img", "GT"):
            (dest / f"{split}{kind}").mkdir(parents=True, exist_ok=True)
        images = sorted((source / f"{split}Img").glob("*.png"))[::every[split]]
        for img in images:
            mask = source / f"{split}GT" / f"{img.stem}_segmentation.png"
            for src, folder in ((img, f"{split}Img"), (mask, f"{split}GT")):
                link = dest / folder / src.name
                if not link.exists():
                    link.symlink_to(src)
    return dest


def run_case(case: str, exp_dir: Path) -> dict:
    every, budget, extra = CASES[case]
    data = subset(Path(COVID), every, exp_dir / "plan-budget-data" / case) if every else Path(COVID)
    name = f"plan-budget-{case}"
    argv = [sys.executable, "-m", "dsal_tf.cli", "run", "--data", str(data), "--exp-dir", str(exp_dir), "--exp", name,
            "--preset", "auto", "--no-progress", "--set", f"PLAN_BUDGET_MINUTES={budget}", *extra]
    t = time.perf_counter()
    subprocess.run(argv, cwd=ROOT, check=True)
    record = {"case": case, "argv": argv[2:], "wall_s": round(time.perf_counter() - t, 1), "budget_minutes": budget,
              "plan": json.loads((exp_dir / name / "plan.json").read_text())}
    out = exp_dir / "plan-budget" / f"{case}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    return record


def row(rec: dict) -> str:
    plan = rec["plan"]
    s = plan["choice"]["settings"]
    size = "x".join(map(str, s["patch_size"])) if "patch_size" in s else f"{s['img_rows']}x{s['img_cols']}"
    probe = (plan.get("probe") or {}).get("chosen") or {}
    pred, actual = plan["choice"]["predicted"], plan.get("actual", {})
    wall_min = rec["wall_s"] / 60
    within = "yes" if wall_min <= rec["budget_minutes"] else f"**no** (+{wall_min - rec['budget_minutes']:.1f} min)"
    return (f"| {rec['case']} | {rec['budget_minutes']:g} | {size} f{s['base_filters']} b{s['batch_size']} | "
            f"{plan['plan_s'] / 60:.1f} | {probe.get('steps', '-')} steps, {probe.get('probe_s', '-')} s | "
            f"{pred['train_s'] / 60:.1f} / {actual.get('train_s', float('nan')) / 60:.1f} | "
            f"{pred['score_s'] / 60:.1f} / {actual.get('score_s', float('nan')) / 60:.1f} | "
            f"{plan['plan_s'] / 60 + pred['total_s'] / 60:.1f} | {wall_min:.1f} | {within} |")


def table(exp_dir: Path) -> str:
    recs = [json.loads(p.read_text()) for p in sorted((exp_dir / "plan-budget").glob("*.json"))]
    lines = ["# Does `--preset auto` keep its budget?", "",
             "`python bench/results_queue.py run --only plan/` (each case: `python bench/plan_budget.py run CASE`, one "
             "`dsal run --preset auto` timed from the command's start to its end, alone on the 2-core machine). "
             "Planned minutes: the plan's own minutes plus its prediction for the run; actual: the command's wall "
             "time. Train and score: the plan's prediction / the run's sum of `train_s` and `score_s` "
             "(`learning_curve.csv`, also in `plan.json`'s `actual`). Cases: see `bench/plan_budget.py`.", "",
             "| case | budget (min) | chosen | planning (min) | probe | train (min) predicted / actual | "
             "score (min) predicted / actual | planned (min) | actual (min) | within budget |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [row(r) for r in recs] or ["| (no case has finished) |"]
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "plan_budget.md").write_text(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("run", "table"))
    ap.add_argument("case", nargs="?", choices=tuple(CASES))
    ap.add_argument("--exp-dir", type=Path, default=Path(os.environ.get("EXP_DIR", ROOT / "exp")))
    args = ap.parse_args()
    if args.what == "run":
        if not args.case:
            ap.error("run needs a CASE")
        run_case(args.case, args.exp_dir.resolve())
    print(table(args.exp_dir.resolve()))


if __name__ == "__main__":
    main()
