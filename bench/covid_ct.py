"""Issue 20 on real CT slices (`../shared/data/covid_ct`): full supervision, one row per fix.

    python bench/covid_ct.py                         # every row not finished yet, in order
    python bench/covid_ct.py --rows isic-64,auto     # some rows; --list shows them all
    python bench/covid_ct.py --table                 # only rewrite bench/results/covid_ct.md

Each row writes its constants file and runs `dsal run --full-supervision --iterations 0` (all
`--epochs` epochs on the whole 800-slice pool; the presets keep their own initial epochs), then
`dsal evaluate` on the 200 test slices. A finished row (also a collapsed one) is saved to
`bench/results/covid_ct/<row>.json` and skipped next time. Runs and the decoded cache live under
`--exp-dir`, outside the repository; the data is read in place.

Rows: the fixed `isic2017-cpu` preset at 64x64 and 128x128; the choice the old plan made (8
filters, grey, per-image soft Dice, Adam 1e-3) at 256x256 and at 128x128; each fix added in turn
at 128x128 (batch Dice first, so it is also the batch-Dice-alone row), then each
other fix alone; and `--preset auto`. Every row has collapse detection on.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import cv2

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(os.environ.get("RESULTS_DIR") or ROOT / "bench" / "results")
DATA = (ROOT.parent / "shared" / "data" / "covid_ct").resolve()
COLLAPSE = dict(collapse_patience=5, collapse_floor=0.01)  # the recommended defaults, set explicitly here

OLD_PLAN = dict(color="gray", base_filters=8, batch_size=16, loss="dice", learning_rate=1e-3,
                normalization="zscore")  # what `dsal plan` chose before issue 20 (it ran at 256x256)
S128 = dict(img_rows=128, img_cols=128)
BATCH_DICE = dict(batch_dice=True)
BCE_DICE = dict(loss="bce_dice")
NORM = dict(norm="instance")
FG = dict(foreground_oversample=0.33)
WARMUP = dict(lr_warmup_epochs=1)

# name -> (what it shows, preset, settings); "epochs" True: NB_INITIAL_EPOCHS = --epochs
ROWS: dict[str, tuple[str, str, dict, bool]] = {
    "isic-64": ("fixed isic2017-cpu preset, 64x64", "isic2017-cpu", {}, False),
    "isic-128": ("fixed isic2017-cpu preset, 128x128", "isic2017-cpu", S128, False),
    "old-plan-256": ("the old plan's choice, 256x256 (the collapse of the issue)", "demo",
                     dict(OLD_PLAN, img_rows=256, img_cols=256), True),
    "old-plan-128": ("the old plan's choice at 128x128 (base of the rows below)", "demo", dict(OLD_PLAN, **S128), True),
    "+batch-dice": ("+ batch Dice", "demo", dict(OLD_PLAN, **S128, **BATCH_DICE), True),
    "+bce-dice": ("+ Dice + cross-entropy (from logits)", "demo", dict(OLD_PLAN, **S128, **BATCH_DICE, **BCE_DICE),
                  True),
    "+norm": ("+ instance norm", "demo", dict(OLD_PLAN, **S128, **BATCH_DICE, **BCE_DICE, **NORM), True),
    "+fg-oversample": ("+ foreground oversampling 0.33", "demo",
                       dict(OLD_PLAN, **S128, **BATCH_DICE, **BCE_DICE, **NORM, **FG), True),
    "+warmup": ("+ 1 warm-up epoch", "demo", dict(OLD_PLAN, **S128, **BATCH_DICE, **BCE_DICE, **NORM, **FG, **WARMUP),
                True),
    "only-bce-dice": ("Dice + cross-entropy alone (per-image Dice)", "demo", dict(OLD_PLAN, **S128, **BCE_DICE), True),
    "only-norm": ("instance norm alone", "demo", dict(OLD_PLAN, **S128, **NORM), True),
    "only-warmup": ("1 warm-up epoch alone", "demo", dict(OLD_PLAN, **S128, **WARMUP), True),
    "only-lr-1e-4": ("Adam 1e-4 alone", "demo", dict(OLD_PLAN, **S128, learning_rate=1e-4), True),
    "auto": ("--preset auto (planned, with the learning probe)", "auto", {}, False),
    # the same fixes on the old plan at its own 256x256, where the collapse happened
    "256+batch-dice": ("old plan at 256x256 + batch Dice", "demo",
                       dict(OLD_PLAN, img_rows=256, img_cols=256, **BATCH_DICE), True),
    "256-only-bce-dice": ("old plan at 256x256, Dice + cross-entropy alone", "demo",
                          dict(OLD_PLAN, img_rows=256, img_cols=256, **BCE_DICE), True),
}


def constants(name: str, args) -> Path:
    """The row's constants file (its whole configuration), written under the exp dir."""
    what, preset, settings, use_epochs = ROWS[name]
    values = dict(preset=preset, data_path=str(args.data), exp_dir=str(args.exp_dir),
                  cache_dir=str(args.exp_dir / ".cache"), progress=False, seed=0, nb_overlays=2, **COLLAPSE, **settings)
    if use_epochs:
        values["nb_initial_epochs"] = args.epochs
    if preset == "auto":
        values["plan_budget_minutes"] = args.budget
    from dsal_tf.config import parse_set_options

    values.update({k.lower(): v for k, v in parse_set_options(tuple(args.sets)).items()})  # --set: every row
    path = args.exp_dir / "constants" / f"{name}.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'"""bench/covid_ct.py row {name}: {what}."""\n'
                    + "".join(f"{k.upper()} = {v!r}\n" for k, v in values.items()))
    return path


def empty_masks(args, size: int) -> int:
    """Training masks left without foreground at `size` x `size` (nearest-neighbour resizing, as the loader)."""
    files = sorted((args.data / "trainGT").glob("*.png"))
    return sum(int(not cv2.resize(cv2.imread(str(f), 0), (size, size), interpolation=cv2.INTER_NEAREST).any())
               for f in files)


def _history(run: Path) -> list[dict]:
    rd = run / "round_00"
    path = rd / "history.csv" if (rd / "history.csv").is_file() else rd / "history.csv.part"
    if not path.is_file():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


def _number(text) -> bool:
    try:
        return float(text) == float(text)  # not NA, not nan
    except (TypeError, ValueError):
        return False


def run_row(name: str, args) -> dict | None:
    what, preset, settings, _ = ROWS[name]
    const = constants(name, args)
    cli = [sys.executable, "-m", "dsal_tf.cli"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    if settings.get("foreground_oversample") and not empty_masks(args, settings.get("img_rows", 64)):
        prev = list(ROWS)[list(ROWS).index(name) - 1]
        done = args.results / "covid_ct" / f"{prev}.json"
        if done.is_file():  # the sampler is the plain shuffle: the run would repeat the row above bit for bit
            row = {**json.loads(done.read_text()), "row": name, "what": what, "settings": settings,
                   "note": f"every training mask has foreground at this size: the sampler is the plain shuffle, "
                           f"so this is row {prev} (not rerun)"}
            return row
    t = time.perf_counter()
    proc = subprocess.run([*cli, "run", "--constants", str(const), "--exp", name, "--full-supervision",
                           "--iterations", "0"], cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    run = args.exp_dir / name
    hist = _history(run)
    row = dict(row=name, what=what, preset=preset, settings=settings, wall_s=round(wall, 1), epochs=len(hist),
               best_val_dice=max((float(h["val_main_dice"]) for h in hist if _number(h.get("val_main_dice"))),
                                 default=None))  # epochs without validation (VALIDATION_FREQ) say NA
    if proc.returncode != 0:
        message = (proc.stderr.strip().splitlines() or ["?"])[-1]
        if "collapsed" not in message:
            print(f"{name}: failed (exit {proc.returncode}): {message}", file=sys.stderr)
            return None
        return {**row, "status": "collapsed", "message": message}
    ev = subprocess.run([*cli, "evaluate", "--constants", str(const), "--exp", name], cwd=ROOT, env=env,
                        capture_output=True, text=True)
    if ev.returncode != 0:
        print(f"{name}: evaluation failed: {ev.stderr.strip()[-300:]}", file=sys.stderr)
        return None
    with (run / "evaluation.csv").open() as f:
        final = list(csv.DictReader(f))[-1]
    saved = json.loads((run / "config.json").read_text())
    row.update(status="finished", test_dice=float(final["dice_mean"]), test_dice_std=float(final["dice_std"]),
               hd95_penalized=float(final["hd95_penalized_mean"]),
               size=f"{saved['img_rows']}x{saved['img_cols']}", filters=saved["base_filters"], loss=saved["loss"],
               batch_dice=saved.get("batch_dice"), norm=saved.get("norm"), config_epochs=saved["nb_initial_epochs"])
    plan = run / "plan.json"
    if plan.is_file():
        p = json.loads(plan.read_text())
        row.update(predicted_s=p["choice"]["predicted"]["total_s"], plan_s=p["plan_s"],
                   run_s=round(wall - p["plan_s"], 1),
                   refused=[c["refused"] for c in p["candidates"] if "refused" in c])
    return row


def _f(v, fmt=".4f") -> str:
    return "-" if v is None else format(v, fmt)


def write_table(args) -> Path:
    rows = [json.loads((args.results / "covid_ct" / f"{n}.json").read_text()) for n in ROWS
            if (args.results / "covid_ct" / f"{n}.json").is_file()]
    out = ["# covid_ct: small structures on real CT (issue 20)", "",
           f"Data: `{args.data}` (800 pool / 130 val / 200 test slices, 256x256 grey, infection about 1.4% of a "
           "slice). Full supervision, seed 0, one run per row. Command: `python bench/covid_ct.py` "
           f"(`--epochs {args.epochs}`: rows marked * train that many epochs; the presets keep theirs). "
           f"Collapse detection on everywhere (COLLAPSE_PATIENCE={COLLAPSE['collapse_patience']}, "
           f"COLLAPSE_FLOOR={COLLAPSE['collapse_floor']}). Times on 2 shared CPU cores.", "",
           "| row | what | status | epochs | best val Dice | test Dice | HD95 (pen.) | wall min | predicted min |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        status = r.get("status", "?") + (" (copied)" if "note" in r else "")
        pred = r.get("predicted_s")
        actual = r.get("run_s", r["wall_s"])
        err = f" ({(actual - pred) / pred:+.0%})" if pred else ""
        star = "*" if ROWS[r["row"]][3] else ""
        out.append(f"| {r['row']}{star} | {r['what']} | {status} | {r['epochs']} | {_f(r.get('best_val_dice'))} | "
                   f"{_f(r.get('test_dice'))} | {_f(r.get('hd95_penalized'), '.2f')} | {actual / 60:.1f} | "
                   f"{_f(pred and pred / 60, '.1f')}{err} |")
    notes = [f"- {r['row']}: {r['message']}" for r in rows if r.get("status") == "collapsed"]
    notes += [f"- {r['row']}: {r['note']}" for r in rows if "note" in r]
    notes += [f"- {r['row']}: the plan refused {'; '.join(r['refused'])}" for r in rows if r.get("refused")]
    if notes:
        out += ["", *notes]
    out += ["", "Wall time is the whole `dsal run`; for `auto` it is the run after planning (the plan's own time "
            "is in its plan.json), against the plan's prediction."]
    path = args.results / "covid_ct.md"
    path.write_text("\n".join(out) + "\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows (default: all)")
    ap.add_argument("--epochs", type=int, default=12, help="epochs of the rows marked * (isic2017-cpu: 12)")
    ap.add_argument("--budget", type=float, default=15.0, help="PLAN_BUDGET_MINUTES of the auto row")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--exp-dir", type=Path, default=Path("/tmp/dsal-covid-ct"))
    ap.add_argument("--results", type=Path, default=RESULTS, help="where covid_ct.md and covid_ct/ go")
    ap.add_argument("--redo", action="store_true", help="run finished rows again")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="a constant for every row, e.g. MIXED_PRECISION=off (the results queue pins the precision)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--table", action="store_true", help="only rewrite the table")
    args = ap.parse_args()
    args.exp_dir = args.exp_dir.resolve()
    if args.list:
        for n, (what, preset, settings, _) in ROWS.items():
            print(f"{n:16s} {what}  [{preset}] {settings}")
        return
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        sys.exit(f"unknown row(s) {unknown}; see --list")
    (args.results / "covid_ct").mkdir(parents=True, exist_ok=True)
    for name in names if not args.table else []:
        done = args.results / "covid_ct" / f"{name}.json"
        if done.is_file() and not args.redo:
            print(f"{name}: finished, skipped")
            continue
        print(f"{name}: running ({ROWS[name][0]})", flush=True)
        row = run_row(name, args)
        if row is not None:
            done.write_text(json.dumps(row, indent=2, default=float))
            print(f"{name}: {row.get('status')} test Dice {_f(row.get('test_dice'))}, {row['wall_s'] / 60:.1f} min",
                  flush=True)
        write_table(args)
    print(f"wrote {write_table(args)}")


if __name__ == "__main__":
    main()
