"""The results queue: every benchmark job behind the README's tables, one at a time, in order.

Run it from a worktree pinned to a commit, so edits made while it runs cannot change a row, and
under the one-heavy-job lock (the machine has 2 cores; two heavy jobs at once each run > 2x slower):

    git worktree add ../bench-$(git rev-parse --short HEAD) HEAD && cd ../bench-<sha>
    nohup ../shared/tools/heavy python bench/results_queue.py run --exp-dir /work/bench-exp \\
        --results /work/main/bench/results > /work/bench-exp/queue.log 2>&1 &
    python bench/results_queue.py status --exp-dir /work/bench-exp     # done / running / pending, minutes

Every job is a resumable command (finished runs inside it are skipped). A job that exits 0 is
recorded in `<exp-dir>/queue/<job>.json` (minutes, commit, command) and is not run again; after each
job the queue regenerates that job's table and `queue.md` (and with `--commit` commits the results
folder). A table shows pending rows as pending.
`run --only PREFIX[,PREFIX...]` runs the jobs whose id starts with a PREFIX; `--list` prints the plan;
`touch <exp-dir>/queue/STOP` ends a running queue after its current job (to restart it from a newer
worktree: finished jobs are never run again).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ISIC = os.environ.get("ISIC_DATA", str((ROOT.parent / "shared" / "data" / "isic2017").resolve()))
HIPPOCAMPUS = os.environ.get("HIPPOCAMPUS_DATA", str((ROOT.parent / "shared" / "data" / "hippocampus").resolve()))
SEEDS = (0, 1, 2)
COMPARE = "compare-isic2017-cpu-v2"  # the issue-8 strategy table (bench/results/isic2017.md), complete, frozen
# Tables that already hold fp32 rows, validated every epoch at the training batch's summation order, keep
# that protocol for the rows still to come (issue 24 made bf16 and sparser validation the defaults):
# the noisy teacher, covid and robust. New tables take the defaults.
AS_BEFORE = ("--set", "MIXED_PRECISION=off", "--set", "VALIDATION_FREQ=1")


@dataclass(frozen=True)
class Job:
    id: str
    table: str  # the collector that regenerates its table afterwards
    argv: tuple[str, ...]


def dsal(*args: str) -> tuple[str, ...]:
    return (sys.executable, "-m", "dsal_tf.cli", *args)


# The strategy table of issue 27 (bench/results/isic2017_v3.md): every row at one commit, by default
# precision (bf16). The v2 table's run folders are gone from this machine, so its new rows (ClaSP PE, the
# reference settings, size strata, BoostMIS) could not be paired with its random rows; v3 runs its
# baselines again beside them. Order: DSAL, random and full supervision first, then issue 27's rows, then
# the v2 rows that beat random there.
COMPARE_V3 = "compare-isic2017-cpu-v3"
STRATEGY_ROWS = ("dsal", "random", "", "claspe", "dsal@reference", "dsal+size_strata", "boostmis",
                 "dsal@boostmis-trainer", "boostmis@boostmis-trainer", "entropy", "dsal+diverse")


def compare_job(spec: str, seed: int) -> Job:
    """One row of the v3 strategy table for one seed (`spec` "" = full supervision only)."""
    return Job(f"isic3/{spec or 'full'}/s{seed}", "isic2017-v3", dsal(
        "compare", "--preset", "isic2017-cpu", "--data", ISIC, "--no-progress", "--name", COMPARE_V3,
        "--strategies", spec, "--seeds", str(seed), "--baseline", "random",
        "--full-supervision" if spec == "" else "--no-full-supervision"))


# issue 27.5: DSAL against random at 128x128 (the first side head 32x32 instead of 16x16), its own table
COMPARE_128 = "compare-isic2017-cpu-128"


def compare_128_job(seed: int) -> Job:
    """DSAL and random at 128x128 for one seed, by default precision like the v3 table, without full
    supervision."""
    return Job(f"isic128/s{seed}", "isic2017-v3", dsal(
        "compare", "--preset", "isic2017-cpu", "--data", ISIC, "--no-progress", "--name", COMPARE_128,
        "--strategies", "dsal,random", "--seeds", str(seed), "--baseline", "random", "--no-full-supervision",
        "--set", "IMG_ROWS=128", "--set", "IMG_COLS=128"))


NOISY_EXPERTS = (200, 400)
# bench/covid_ct.py rows: the fixed preset to beat, the old plan's collapse, each fix alone, the new plan
COVID_ROWS = ("isic-128", "old-plan-128", "+batch-dice", "only-bce-dice", "only-norm", "auto",
              "old-plan-256", "256+batch-dice", "256-only-bce-dice", "only-warmup", "isic-64", "+bce-dice", "+norm")


def precision_jobs() -> list[Job]:
    """bf16 against fp32 (bench/bench_precision.py): speed, scoring picks, final Dice on ISIC and the demo."""
    bench = (sys.executable, "bench/bench_precision.py")
    jobs = [Job("precision/speed", "precision", (*bench, "speed")),
            Job("precision/picks", "precision", (*bench, "picks", "--data", ISIC, "--model",
                                                 f"{COMPARE}/init-s0/round_00"))]
    jobs += [Job(f"precision/isic-bf16/s{seed}", "precision", dsal(
        "compare", "--preset", "isic2017-cpu", "--data", ISIC, "--no-progress", "--name", "compare-isic2017-cpu-bf16",
        "--strategies", "dsal", "--seeds", str(seed), "--no-full-supervision", "--set", "MIXED_PRECISION=bfloat16"))
        for seed in SEEDS]
    for tag, choice in (("fp32", "off"), ("bf16", "bfloat16")):
        jobs.append(Job(f"precision/demo-{tag}", "precision", dsal(
            "compare", "--preset", "demo", "--no-progress", "--name", f"compare-demo-{tag}", "--strategies", "dsal",
            "--seeds", ",".join(map(str, SEEDS)), "--no-full-supervision", "--set", f"MIXED_PRECISION={choice}")))
    return jobs


def hippocampus_planned_jobs() -> list[Job]:
    """Issue 25's volume table on planned settings (bench/hippocampus_planned.py), every row of a seed first."""
    sys.path.insert(0, str(ROOT / "bench"))
    from hippocampus_planned import PREFIX, ROWS
    from hippocampus_planned import SEEDS as PLANNED_SEEDS

    return [Job(f"{PREFIX}{row}/s{seed}", "hippocampus-planned",
                (sys.executable, "bench/hippocampus_planned.py", "row", row, str(seed), "--data", HIPPOCAMPUS))
            for seed in PLANNED_SEEDS for row in (*ROWS, "full")]


def slices_fg_jobs() -> list[Job]:
    """Issue 27.3: foreground-aware random against random on hippocampus slices (bench/slices_fg.py), every row
    of a seed first; the seed's first job also trains its initial model (and the first writes the slices)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from slices_fg import PREFIX, ROWS
    from slices_fg import SEEDS as SLICE_SEEDS

    return [Job(f"{PREFIX}{row}/s{seed}", "none", (sys.executable, "bench/slices_fg.py", "row", row, str(seed),
                                                   "--data", HIPPOCAMPUS))
            for seed in SLICE_SEEDS for row in (*ROWS, "full")]


def plan_budget_jobs() -> list[Job]:
    """Issue 25: does `--preset auto` keep its budget, planning included (bench/plan_budget.py)?"""
    sys.path.insert(0, str(ROOT / "bench"))
    from plan_budget import CASES

    return [Job(f"plan/{case}", "none", (sys.executable, "bench/plan_budget.py", "run", case)) for case in CASES]


def robust_jobs() -> list[Job]:
    """The full robust-trainer tables (3 noise settings, seeds 0-2), one job a seed: each rebuilds its
    table over the seeds so far (finished rows are skipped). At the default precision (bf16 here):
    the weighting signals of RGS, MW-Net and MCPM agree with float32's as closely as the plain gradient
    does (bench/meta_precision_probe.py, results/meta_precision.md). Then the loss control `noisy-bce` and
    `clean-bce`, added after the first jobs ran (a job that finished without them leaves them to these)."""
    settings = (("dilate", "0.4"), ("dilate", "0.8"), ("elastic", "0.4"))
    return [Job(f"robust/{kind}-r{rate}/s{seed}", "none", (
        sys.executable, "bench/robust_isic.py", "--data", ISIC, "--kind", kind, "--rate", rate,
        "--seeds", ",".join(map(str, SEEDS[:i + 1])))) for kind, rate in settings for i, seed in enumerate(SEEDS)] + [
        Job(f"robust/{kind}-r{rate}/bce", "none", (
            sys.executable, "bench/robust_isic.py", "--data", ISIC, "--kind", kind, "--rate", rate,
            "--seeds", ",".join(map(str, SEEDS)), "--rows", "noisy-bce,clean-bce")) for kind, rate in settings]


def hippocampus_jobs() -> list[Job]:
    """Issue 25's volume table (bench/hippocampus.py): every row of seed 0 first, so one seed gives a table."""
    sys.path.insert(0, str(ROOT / "bench"))
    from hippocampus import COLLAPSED_ROWS, ROWS, compare_argv  # seeds 1 and 3 collapse: see there
    from hippocampus import SEEDS as HIPPOCAMPUS_SEEDS

    return [Job(f"hippocampus/{row}/s{seed}", "hippocampus", dsal(*compare_argv(HIPPOCAMPUS, row, seed)))
            for seed in HIPPOCAMPUS_SEEDS for row in (*ROWS, "full") if (row, seed) not in COLLAPSED_ROWS]


def plan() -> list[Job]:
    """Every job, in the order they run: what the open issues need first, ablations and extras last."""
    noisy = {}
    for experts in NOISY_EXPERTS:
        # seeds so far, not one: the summary and differences are rebuilt over every finished seed
        for i, seed in enumerate(SEEDS):
            noisy[(experts, seed)] = Job(f"noisy/e{experts}/s{seed}", "isic2017-v3", dsal(
                "noisy-teacher", "--preset", "isic2017-cpu", "--data", ISIC, "--no-progress",
                "--experts", str(experts), "--seeds", ",".join(map(str, SEEDS[:i + 1])), *AS_BEFORE))
    methods = [Job("boostmis/generated", "none", (sys.executable, "bench/bench_boostmis.py", "--seeds", "0,1,2",
                                                  "--iterations", "5", "--steps", "300", "--threshold", "global",
                                                  "--optimizer", "adam", "--one-head", "--out",
                                                  "boostmis_issue16.md")),
               Job("robust/reduced-dilate-r0.4", "none", (sys.executable, "bench/robust_isic.py", "--data", ISIC,
                                                          "--seeds", "0", "--pool", "400", "--epochs", "5",
                                                          *AS_BEFORE))]
    # issue 27.2: which BoostMIS change causes the collapse; ~4 min a seed on 2 cores, the table over seeds so far
    # (before the v3 table: its BoostMIS rows run on the defaults this ablation picks)
    boostmis_ablation = [Job(f"boostmis/ablation/s{seed}", "none", (
        sys.executable, "bench/bench_boostmis.py", "--ablation", "--seeds", ",".join(map(str, SEEDS[:i + 1])),
        "--iterations", "5", "--steps", "300")) for i, seed in enumerate(SEEDS)]
    # issue 27.2 after the ablation: the generated-feature table on dsal classify's defaults (first per_class + sgd,
    # then a fresh head each round, the global cutoff and sgd: the table is the latter's)
    boostmis_after = [Job("boostmis/generated-issue27", "none", (
        sys.executable, "bench/bench_boostmis.py", "--seeds", "0,1,2", "--iterations", "5", "--steps", "300"))]
    # the combinations and the fresh-head rows added after the first table (finished runs are skipped; 1-7 min)
    boostmis_ablation += [Job("boostmis/ablation-combos", "none", (
        sys.executable, "bench/bench_boostmis.py", "--ablation", "--seeds", "0,1,2", "--iterations", "5",
        "--steps", "300"))]
    precision = precision_jobs()
    covid = [Job(f"covid/{row}", "none", (sys.executable, "bench/covid_ct.py", "--rows", row, "--budget", "6",
                                          *AS_BEFORE)) for row in COVID_ROWS]
    walltime = [Job("speed/walltime-isic2017-cpu", "none", (sys.executable, "bench/bench_walltime.py", "--data", ISIC))]
    # issue 24: the same run after the overhead changes, in fp32 (what the overhead alone saves) and by default (bf16)
    walltime_after = [Job(f"speed/walltime-isic2017-cpu-after-{tag}", "none", (
        sys.executable, "bench/bench_walltime.py", "--data", ISIC, "--tag", f"after-{tag}", *sets)) for tag, sets in
        (("fp32", ("--set", "MIXED_PRECISION=off")), ("default", ()))]
    semisup = [Job("semisup/step-time", "none", (sys.executable, "bench/semisup_isic.py", "step-time"))]
    semisup += [Job(f"semisup/isic-s{seed}", "none", (sys.executable, "bench/semisup_isic.py", "--data", ISIC,
                                                      "--seeds", str(seed), "--full")) for seed in SEEDS]
    sys.path.insert(0, str(ROOT / "bench"))
    from semisup_isic import AL_ROWS, al_argv

    semisup += [Job(f"semisup/al/{spec}/s{seed}", "semisup-al", dsal(*al_argv(ISIC, spec, seed)))
                for seed in SEEDS for spec in AL_ROWS]
    # issue 26 table 3: hippocampus, 10 labelled volumes, standard vs bcp + full supervision, 1000 steps a row;
    # about 10 + 20 + 10 min a seed (bcp ~2.3x a standard step), the table over what finished
    semisup += [Job(f"semisup/hippocampus-s{seed}", "none", (sys.executable, "bench/semisup_isic.py", "--dataset",
                                                             "hippocampus", "--data", HIPPOCAMPUS, "--seeds",
                                                             str(seed), "--full")) for seed in SEEDS]
    isic = [compare_job(spec, seed) for seed in SEEDS for spec in STRATEGY_ROWS]  # every row of a seed first
    return ([noisy[(200, seed)] for seed in SEEDS] + methods + covid[:9] + precision[:2] + walltime
            + walltime_after + precision[2:5] + covid[9:] + precision[5:] + hippocampus_jobs()
            + semisup + boostmis_ablation + boostmis_after + isic + [compare_128_job(seed) for seed in SEEDS]
            + robust_jobs() + [noisy[(400, seed)] for seed in SEEDS] + slices_fg_jobs()
            + plan_budget_jobs() + hippocampus_planned_jobs()
            + [Job("speed/scale", "none", (sys.executable, "bench/bench_scale.py", "--sizes", "500,4000,10000,30000",
                                          "--fresh-cache"))])


# Jobs whose tables were made before this machine's queue records began (their run folders are gone): the
# status names the table instead of calling them pending, and `run` passes them by unless `--only` names
# them (then they run again from scratch: a re-run, not a resume).
EARLIER = {"noisy/e200/": "README.md (noisy teacher, 200 experts)", "boostmis/generated": "boostmis_issue16.md",
           "robust/reduced-": "robust_isic2017_dilate-r0.4-ep5-pool400.md", "covid/": "covid_ct.md",
           "precision/": "precision.md", "speed/scale": "scale.md"}


def made_earlier(job: Job) -> str | None:
    return next((table for prefix, table in EARLIER.items() if job.id.startswith(prefix)), None)


def pinned_path() -> str:
    """PYTHONPATH for a job: this checkout's package first, so a script run as `python bench/x.py` imports the
    pinned worktree's `dsal_tf`, not whatever an editable install points at (or nothing)."""
    return os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])


def collect(table: str, exp_dir: Path, results: Path) -> None:
    """Regenerate one table from the run folders (a table is never guessed: it reads what finished)."""
    env = {**os.environ, "EXP_DIR": str(exp_dir), "RESULTS_DIR": str(results), "PYTHONPATH": pinned_path()}
    argv = {"isic2017-v3": ["bench/collect_results.py"],
            "precision": ["bench/bench_precision.py", "dice", "--exp-dir", str(exp_dir)],
            "hippocampus": ["bench/hippocampus.py", "--exp-dir", str(exp_dir)],
            "hippocampus-planned": ["bench/hippocampus_planned.py", "table", "--exp-dir", str(exp_dir)],
            "semisup-al": ["bench/semisup_isic.py", "al-table", "--exp-dir", str(exp_dir)]}.get(table)
    if argv:  # "none": the job's own script writes its table
        subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, check=False)


def commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    return out.stdout.strip() + ("+dirty" if dirty else "")


def state_dir(exp_dir: Path) -> Path:
    return exp_dir / "queue"


def record_path(results: Path, job: Job) -> Path:
    """A finished job's record, kept beside the tables (committed with them: a new machine starts with no run
    folders, and the queue's records of what finished must not go with them)."""
    return results / "queue" / (job.id.replace("/", "__") + ".json")


def status_rows(exp_dir: Path, results: Path, jobs: list[Job]) -> list[dict]:
    running = state_dir(exp_dir) / "RUNNING"
    now_running = json.loads(running.read_text()) if running.is_file() else {}
    rows = []
    for job in jobs:
        rec = record_path(results, job)
        if rec.is_file():
            r = json.loads(rec.read_text())
            rows.append({"job": job.id, "state": "done", "minutes": f"{r['minutes']:.1f}", "commit": r["commit"]})
        elif now_running.get("job") == job.id:
            minutes = (time.time() - now_running["start"]) / 60
            rows.append({"job": job.id, "state": "running", "minutes": f"{minutes:.1f} so far",
                         "commit": now_running["commit"]})
        elif made_earlier(job):
            rows.append({"job": job.id, "state": f"made earlier: {made_earlier(job)}", "minutes": "", "commit": ""})
        else:
            rows.append({"job": job.id, "state": "pending", "minutes": "", "commit": ""})
    return rows


def write_status(exp_dir: Path, results: Path, jobs: list[Job]) -> str:
    rows = status_rows(exp_dir, results, jobs)
    done = [float(r["minutes"]) for r in rows if r["state"] == "done"]
    lines = ["# Results queue", "",
             "`python bench/results_queue.py status` (this file is rewritten after every job). Minutes are wall time, "
             "one heavy job at a time on the 2-core machine.", "",
             f"{len(done)} of {len(rows)} jobs done, {sum(done):.0f} min of machine time so far; "
             f"{sum(r['state'].startswith('made earlier') for r in rows)} made before these records "
             f"(`EARLIER`), {sum(r['state'] == 'pending' for r in rows)} pending.", "",
             "| job | state | minutes | commit |", "|---|---|---|---|"]
    lines += [f"| {r['job']} | {r['state']} | {r['minutes']} | {r['commit']} |" for r in rows]
    text = "\n".join(lines) + "\n"
    results.mkdir(parents=True, exist_ok=True)
    (results / "queue.md").write_text(text)
    return text


def commit_results(results: Path, job: Job) -> None:
    """Commit the regenerated tables (only the results folder: whatever else is staged stays staged)."""
    repo = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=results, capture_output=True,
                          text=True).stdout.strip()
    if not repo:
        return
    subprocess.run(["git", "add", "--", str(results)], cwd=repo, check=False)
    subprocess.run(["git", "commit", "-q", "-m", f"results: {job.id} ({commit()})", "--", str(results)],
                   cwd=repo, check=False)


def run(exp_dir: Path, results: Path, jobs: list[Job], only: str | None, commit_each: bool = False) -> int:
    state_dir(exp_dir).mkdir(parents=True, exist_ok=True)
    (results / "queue").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "RESULTS_DIR": str(results), "PYTHONPATH": pinned_path()}
    failed = 0
    for job in jobs:
        named = only and job.id.startswith(tuple(only.split(",")))
        if (only and not named) or record_path(results, job).is_file() or (made_earlier(job) and not named):
            continue
        if (state_dir(exp_dir) / "STOP").is_file():  # `touch <exp-dir>/queue/STOP`: end between jobs
            (state_dir(exp_dir) / "STOP").unlink()
            print("== STOP file found: stopping between jobs", flush=True)
            break
        sha = commit()
        running = state_dir(exp_dir) / "RUNNING"
        running.write_text(json.dumps({"job": job.id, "start": time.time(), "commit": sha}))
        write_status(exp_dir, results, jobs)
        print(f"== {job.id}: {' '.join(job.argv[2:])}", flush=True)
        start = time.time()
        child = subprocess.Popen([*job.argv, "--exp-dir", str(exp_dir)], cwd=ROOT, env=env)
        _, status, usage = os.wait4(child.pid, 0)  # this job's own peak memory (ru_maxrss is in KiB on Linux)
        rc = os.waitstatus_to_exitcode(status)
        minutes = (time.time() - start) / 60
        running.unlink(missing_ok=True)
        if rc == 0:
            record_path(results, job).write_text(json.dumps(
                {"job": job.id, "minutes": minutes, "peak_rss_mb": usage.ru_maxrss / 1024, "commit": sha,
                 "argv": list(job.argv[2:]),
                 "finished": time.strftime("%Y-%m-%d %H:%M:%S")}))
        else:
            failed += 1
            print(f"== {job.id} failed with exit code {rc} after {minutes:.1f} min; going on", flush=True)
        collect(job.table, exp_dir, results)
        write_status(exp_dir, results, jobs)
        if commit_each:
            commit_results(results, job)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("command", choices=("run", "status"))
    ap.add_argument("--exp-dir", type=Path, default=ROOT / "exp")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--only", default=None, help="Run only the jobs whose id starts with this "
                    "(or with one of a comma-separated list).")
    ap.add_argument("--list", action="store_true", help="Print the jobs and their commands, run nothing.")
    ap.add_argument("--commit", action="store_true", help="git-commit the results folder after every job.")
    args = ap.parse_args(argv)
    jobs = plan()
    if args.list:
        for job in jobs:
            print(f"{job.id}: {' '.join(job.argv[2:])}")
        return 0
    if args.command == "status":
        print(write_status(args.exp_dir.resolve(), args.results, jobs), end="")
        return 0
    return run(args.exp_dir.resolve(), args.results.resolve(), jobs, args.only, args.commit)


if __name__ == "__main__":
    sys.exit(main())
