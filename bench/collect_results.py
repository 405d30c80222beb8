"""Collect the ISIC benchmark folders under exp/ into bench/results/isic2017_v3.md (partial results too):
the issue-27 strategy table (`compare-isic2017-cpu-v3`) and DSAL against random at 128x128; and the noisy
teacher's folders into bench/results/noisy_teacher.md. A table whose run folders are not on this machine
(a new machine: the folders stay behind, the tables are committed) is left as it is, not rewritten empty.

bench/results/isic2017.md, the issue-8 table (`compare-isic2017-cpu-v2`, fp32), is complete and no longer
rewritten: its run folders are not on this machine any more, and its command is in bench/results/README.md."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from compare_table import md  # noqa: E402  (the one markdown table writer of the bench scripts)

EXP = Path(os.environ.get("EXP_DIR") or ROOT / "exp").resolve()
RESULTS = Path(os.environ.get("RESULTS_DIR") or ROOT / "bench" / "results").resolve()
OUT = RESULTS / "isic2017_v3.md"
NOISY_OUT = RESULTS / "noisy_teacher.md"
RESOLUTION_HEADING = "## DSAL against random at 128x128"


def differences_against(cmp_dir: Path, baseline: str) -> pd.DataFrame:
    """`dsal compare`'s paired differences for a second baseline, from the finished runs."""
    from dsal_tf.compare import finished_runs, paired_differences, per_image_dice

    if not cmp_dir.is_dir():
        return pd.DataFrame()
    runs, _ = finished_runs(cmp_dir)
    curves = {(s, seed): per_image_dice(c.run_dir) for s, seed, c in runs
              if all((c.run_dir / f"round_{r:02d}" / "test_metrics.csv").is_file() for r in range(c.nb_iterations + 1))}
    if not any(k[0] == baseline for k in curves):
        return pd.DataFrame()
    return pd.DataFrame(paired_differences(curves, baseline))


PRECISION_NAMES = {"off": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def precision_of(configs) -> str:
    """The precision of the runs whose `config.json` files are `configs`, for a table heading: one name,
    or every name found with its count when the rows mix them. Runs made before `config.json` recorded
    the resolved choice (or a noisy-teacher folder, which recorded none before issue 24) ran in fp32,
    the default until issue 24."""
    import json
    from collections import Counter

    found = Counter()
    for path in configs:
        choice = json.loads(Path(path).read_text()).get("mixed_precision", "off") if Path(path).is_file() else "off"
        found[PRECISION_NAMES.get(choice, choice)] += 1
    if not found:
        return "precision: none finished"
    if len(found) == 1:
        return f"precision: {next(iter(found))}"
    return "precision MIXED: " + ", ".join(f"{k} x{n}" for k, n in sorted(found.items()))


SIZE_NOTE = ("`spearman`: Spearman(uncertainty, 1 - true Dice) on the scored pool; "
             "`spearman_fg`: Spearman(uncertainty, predicted foreground fraction); "
             "`partial_spearman_fg`: the partial Spearman of uncertainty and 1 - true Dice given the foreground "
             "(does the score find errors beyond lesion size); "
             "`picks_fg` / `pool_fg`: the mean predicted foreground of the oracle's picks / of the pool "
             "(docs/methods.md#dsal-and-lesion-size).\n")


def score_sections(rho: pd.DataFrame, heading: str = "## ") -> list[str]:
    """spearman.csv as the table's sections: the mean over seeds per strategy and round, then every seed.
    A spearman.csv written before the per-seed columns (mean and std of `spearman` only) shows as it is."""
    if "seed" not in rho:
        return [f"{heading}Spearman(uncertainty, 1 - true Dice) on the pool\n", md(rho), ""]
    measures = [c for c in rho.columns if c not in ("strategy", "round", "seed")]
    mean = rho.groupby(["strategy", "round"])[measures].mean().reset_index()
    mean.insert(2, "seeds", rho.groupby(["strategy", "round"]).size().to_numpy())
    return [f"{heading}The score against the real error and against lesion size, mean over seeds\n", SIZE_NOTE,
            md(mean), "", f"{heading}The same, per round and seed\n", md(rho), ""]


def resolution_sections(exp: Path) -> list[str]:
    """DSAL against random at 128x128 (issue 27.5), a table of its own: at 64x64 the first side head is a
    16x16 map and DSAL's score mostly ranks lesion size; at 128x128 it is 32x32."""
    sys.path.insert(0, str(ROOT / "bench"))
    from compare_table import differences, queue_records, runs_grid, summary
    from results_queue import COMPARE_128, SEEDS

    folder = exp / COMPARE_128
    if not folder.is_dir():  # its folders stayed on another machine: keep the committed section
        text = OUT.read_text() if OUT.is_file() else ""
        start = text.find(RESOLUTION_HEADING)
        return text[start:].removesuffix("\n").split("\n") if start >= 0 else []
    records = queue_records(exp, "isic128/")
    parts = [f"{RESOLUTION_HEADING} (`{folder.name}`, issue 27.5; "
             f"{precision_of(folder.glob('*-s*/config.json'))})\n",
             "`isic2017-cpu` with `IMG_ROWS = IMG_COLS = 128` (its own initial models, no full supervision); "
             "one queue job per seed runs both rows.\n",
             *runs_grid(records, lambda row, seed: f"isic128/s{seed}", ["dsal,random"], SEEDS), ""]
    table = summary(folder)
    if table is not None:
        parts += ["Summary (final round, AULC, seconds per round):\n", md(table), ""]
    diffs = differences(folder)
    if diffs is not None:
        parts += ["Paired differences against random (bootstrap 95% interval over test images and seeds):\n",
                  md(diffs), ""]
    if (folder / "spearman.csv").is_file():
        parts += score_sections(pd.read_csv(folder / "spearman.csv"), heading="### 128x128: ")
    return parts


def main() -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    from compare_table import queue_records, runs_grid, summary
    from results_queue import COMPARE_V3, SEEDS, STRATEGY_ROWS

    cmp_dir = EXP / COMPARE_V3
    parts = [f"# ISIC 2017 strategy table v3 (`{cmp_dir.name}`, issue 27; isic2017-cpu preset: 64x64 RGB, 16 base "
             "filters)\n",
             "`python bench/results_queue.py run --only isic3/` (one `dsal compare` per row and seed, every row of a "
             "seed first; `--list` prints each command): 600 random initial labels of the 1600-image pool, 5 rounds "
             "of 70, test split (400 images), tuned on nothing but valImg, precision and validation at their "
             "defaults. Each row runs with its own weak labeler (`pseudo` column); rows whose data settings differ "
             "(`@reference`) train their own initial model, the others share the seed's. Rows not yet run are pending "
             "below and absent from the tables; `hd95p` is HD95 with a missed lesion scored as the image diagonal. "
             "The issue-8 table of the same preset, fp32, is [isic2017.md](isic2017.md).\n",
             "## Runs (row x seed: minutes, peak memory, commit)\n",
             *runs_grid(queue_records(EXP, "isic3/"), lambda row, seed: f"isic3/{row}/s{seed}",
                        [spec or "full" for spec in STRATEGY_ROWS], SEEDS), ""]
    table = summary(cmp_dir)
    if table is not None:
        parts += [f"## Strategy summary (final round, AULC, seconds per round; "
                  f"{precision_of(cmp_dir.glob('*-s*/config.json'))})\n", md(table), ""]
    for name, title in (("differences.csv", "Paired differences (strategy - random): final test Dice and AULC, "
                         "bootstrap 95% interval over test images and seeds; `outside_noise` = the interval "
                         "excludes 0"),
                        ("comparison.csv", "Per round, mean and std over seeds")):
        if (cmp_dir / name).is_file():
            parts += [f"## {title}\n", md(pd.read_csv(cmp_dir / name)), ""]
    if (cmp_dir / "spearman.csv").is_file():
        parts += score_sections(pd.read_csv(cmp_dir / "spearman.csv"))
    vs_dsal = differences_against(cmp_dir, "dsal")
    if len(vs_dsal):
        parts += ["## Paired differences against DSAL (same bootstrap)\n", md(vs_dsal), ""]
    if (cmp_dir / "learning_curves.png").is_file():
        shutil.copyfile(cmp_dir / "learning_curves.png", OUT.parent / "learning_curves_v3.png")
        parts += ["![learning curves](learning_curves_v3.png)\n"]
    parts += resolution_sections(EXP)
    if cmp_dir.is_dir():
        write(OUT, parts)
    else:
        print(f"{OUT}: left as it is (no {cmp_dir} on this machine)", file=sys.stderr)
    noisy = noisy_teacher_sections()
    if noisy:
        write(NOISY_OUT, ["# Noisy teacher (issue 9; `dsal noisy-teacher`, isic2017-cpu)\n",
                          "`python bench/results_queue.py run --only noisy/` (one job a seed, the summary over the "
                          "seeds so far). The 200-expert table, made before these records, is in "
                          "[README.md](README.md#noisy-teacher-with-the-same-sampler-control-isic-2017-200-experts-"
                          "seeds-0-2).\n", *noisy])


def noisy_teacher_sections() -> list[str]:
    parts = []
    for nt in sorted(EXP.glob("noisy-teacher-isic2017-cpu-e*/summary.csv")):
        parts += [f"## Noisy teacher, {nt.parent.name} ({precision_of([nt.parent / 'config.json'])})\n",
                  "Students train on BCE + Dice (`loss` column); the teacher on the preset's LOSS.\n",
                  md(pd.read_csv(nt)), ""]
        if (nt.parent / "differences.csv").is_file():
            parts += ["Paired differences against `uniform` (the same sampler with equal weights), test Dice, "
                      "bootstrap 95% interval over test images and seeds:\n",
                      md(pd.read_csv(nt.parent / "differences.csv")), ""]
    return parts


def write(path: Path, parts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts) + "\n")
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
