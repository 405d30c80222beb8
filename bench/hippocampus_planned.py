"""Issue 25's hippocampus table, planned: the settings `dsal plan` chooses within a time budget, Dice + BCE.

    python bench/results_queue.py run --only hippocampus-planned/ ...   # the rows, one job per (row, seed)
    python bench/hippocampus_planned.py row ROW SEED [--exp-dir EXP]     # one row; plans first if no plan yet
    python bench/hippocampus_planned.py table [--exp-dir EXP]            # rewrite the table

The protocol of bench/hippocampus.py (10 random expert volumes, then 10 a round for 5 rounds; each strategy
from the seed's initial model; full supervision on all 140 volumes for the same number of steps), with what
that table chose by hand chosen by the planner instead: `dsal plan --budget-minutes ROW_BUDGET` with the
protocol's settings fixed picks the patch, filters, batch, steps per epoch and epochs of one run, so the 18
jobs (6 rows x 3 seeds) fit in about 2 hours of the 2-core machine, and the loss is the planner's (Dice +
BCE on volumes; the first table's soft Dice collapsed on 2 of 4 seeds). The plan is made once, by the first
row that finds none (`EXP/hippocampus-planned/plan.json` and `plan_constants.py`), and every row reads it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from compare_table import queue_records, row_table_main, runs_grid  # noqa: E402
from hippocampus import ITERATIONS, ROWS, result_sections  # noqa: E402

RESULTS = Path(os.environ.get("RESULTS_DIR") or ROOT / "bench" / "results")
NAME = "compare-hippocampus-planned"
PREFIX = "hippocampus-planned/"
SEEDS = (0, 1, 2)
ROW_BUDGET = 6.0  # minutes a run may take: 18 runs in about 2 hours
# jobs whose minutes include a pause of the queue (SIGSTOP) while something ran alone
PAUSES = ["`dsal` seed 0 (the first job, which also made the plan and the seed's initial model) was paused for 6.3 min "
          "while the test suite ran alone in a clean clone; its minutes overstate by that much."]
PROTOCOL = {"NB_LABELED": 10, "NB_NEXT_SAMPLE": 10, "NB_ITERATIONS": ITERATIONS, "NB_PSEUDO_INITIAL": 5,
            "PSEUDO_RATE": 5}


def plan_dir(exp_dir: Path) -> Path:
    return exp_dir / "hippocampus-planned"


def ensure_plan(data: str, exp_dir: Path) -> Path:
    """The plan's constants file, planned now (alone on the machine, as a queue job) if there is none yet."""
    const = plan_dir(exp_dir) / "plan_constants.py"
    if not const.is_file():
        sets = [a for k, v in PROTOCOL.items() for a in ("--set", f"{k}={v}")]
        subprocess.run([sys.executable, "-m", "dsal_tf.cli", "plan", "--data", data, "--budget-minutes",
                        str(ROW_BUDGET), "--out", str(plan_dir(exp_dir) / "plan.json"), *sets], cwd=ROOT, check=True)
    return const


def compare_argv(data: str, row: str, seed: int, constants: Path) -> tuple[str, ...]:
    """The `dsal compare` arguments of one row and seed (row "full": full supervision only)."""
    return ("compare", "--constants", str(constants), "--data", data, "--no-progress", "--name", NAME,
            "--iterations", str(ITERATIONS), "--strategies", "" if row == "full" else row, "--seeds", str(seed),
            "--baseline", "random", "--full-supervision" if row == "full" else "--no-full-supervision")


def run_row(data: str, row: str, seed: int, exp_dir: Path) -> None:
    argv = compare_argv(data, row, seed, ensure_plan(data, exp_dir))
    subprocess.run([sys.executable, "-m", "dsal_tf.cli", *argv, "--exp-dir", str(exp_dir)], cwd=ROOT, check=True)


def table(exp_dir: Path) -> str:
    plan_file = plan_dir(exp_dir) / "plan.json"
    plan = json.loads(plan_file.read_text()) if plan_file.is_file() else None
    lines = ["# Active learning on 3D volumes, planned settings: hippocampus MRI (MSD Task04)", "",
             f"`python bench/results_queue.py run --only {PREFIX}` (`bench/hippocampus_planned.py`). The protocol of "
             "[hippocampus.md](hippocampus.md) (10 random expert volumes, then 10 a round for 5 rounds; test Dice, "
             "HD95p in mm, AULC, differences against random paired per test volume with bootstrap 95% intervals), "
             f"with the settings `dsal plan --budget-minutes {ROW_BUDGET:g}` chose for one run (protocol settings "
             f"fixed: {', '.join(f'{k}={v}' for k, v in PROTOCOL.items())}), seeds {', '.join(map(str, SEEDS))}.", ""]
    if plan is None:
        lines += ["The plan is made by the first row (none has run yet)."]
    else:
        s, pred = plan["choice"]["settings"], plan["choice"]["predicted"]
        keys = ("patch_size", "base_filters", "batch_size", "steps_per_epoch", "nb_initial_epochs", "nb_active_epochs",
                "loss", "batch_dice", "learning_rate")
        lines += [f"Planned ({plan['plan_s']:.0f} s of planning): " + ", ".join(f"{k.upper()}={s[k]}" for k in keys)
                  + f"; predicted {pred['total_s'] / 60:.1f} min a run (training {pred['train_s'] / 60:.1f}, scoring "
                  f"{pred['score_s'] / 60:.1f}); the jobs' minutes below are the actual ones."]
    lines += ["", "## Runs (row x seed: minutes, peak memory of the job's process, commit)", ""]
    lines += runs_grid(queue_records(exp_dir, PREFIX), lambda row, seed: f"{PREFIX}{row}/s{seed}", (*ROWS, "full"),
                       seeds=SEEDS)
    lines += ["", *PAUSES]
    steps = None
    if plan is not None:
        c = plan["choice"]["settings"]
        steps = (c["nb_initial_epochs"] + ITERATIONS * c["nb_active_epochs"]) * c["steps_per_epoch"]
    return "\n".join(lines + result_sections(exp_dir / NAME, steps)) + "\n"


def main(argv: list[str] | None = None) -> int:
    return row_table_main(argv, __doc__, ROWS, run_row, table, RESULTS / "hippocampus_planned.md")


if __name__ == "__main__":
    sys.exit(main())
