"""Robust training under noisy masks on ISIC 2017 (issue 10): every row through the same paired sampler.

Run: `python bench/robust_isic.py --seeds 0 [--kind dilate --rate 0.4] [--rows noisy,mwnet,...]`
(resumable: finished rows are skipped; runs in `exp/robust-<preset>-<kind>-r<rate>/`). Each finished row's
`result.json` and per-image `test_metrics.csv` are also kept in the repository, under
`bench/results/raw/robust-<preset>-<kind>-r<rate>/s<seed>/<row>/`: a row found there is done, and the
table is built from there, so the tables survive the loss of the run folders (a new machine) and a
later session adds seeds to them instead of starting over.

Per seed s: `dsal corrupt` writes `exp/data/isic2017-<kind>-r<rate>-s<s>` (a fraction `rate` of the
training masks corrupted, seed s). A meta set of `--meta` pool images (seeded by s) keeps its clean
masks; it is the clean stream of the paired sampler in every row (so every row trains on it) and
the rest of the pool (1500 images) is the noisy stream:

- `noisy`: U-Net, `uniform` trainer on the corrupted masks (the baseline);
- `mwnet`, `mcpm`, `pnt`, `int`, `pint`, `rgs`: the robust trainers (and the noisy-teacher RGS) on
  the same data, every one with the same real step as `noisy` (Adam; `META_STEP = "adam"`);
- `mwnet-sgd`: MW-Net with the authors' real step (SGD 0.1, momentum 0.9: `META_STEP = "sgd"`, its default);
- `clean`: U-Net, `uniform` trainer with the clean masks in the noisy stream too (the upper bound);
- `noisy-bce`, `clean-bce`: `noisy` and `clean` with `LOSS = "bce"`, the loss control and the noise's
  cost under it: the rows are not all on one loss.

The preset's `LOSS` (soft Dice) for `noisy`, `clean`, `mwnet`, `rgs` (`REWEIGHT_LOSS = "run"`, so
`uniform` and `rgs` do not switch to BCE + Dice); MCPM's weighted term is the per-pixel BCE by
definition, and PNT, INT and PINT learn the noisy stream by per-pixel cross-entropy where the gate
trusts the label and squared error to the teacher elsewhere (their expert batch on `LOSS`). So those
four differ from `noisy` in the loss as well as the weighting; `noisy-bce` (plain per-pixel BCE on the
same masks) is the row they differ from in the weighting alone. Each `result.json` records the
trainer's loss as `loss`.

All rows: a fresh U-Net (seed s), `NB_INITIAL_EPOCHS` epochs of one pass over the 1500-image
stream, the best epoch by validation Dice, then test Dice, IoU and HD95. The gap recovered is
`(row - noisy) / (clean - noisy)` in mean test Dice (and IoU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

# row -> (trainer, its settings). Every row takes the same real step, Adam at LEARNING_RATE, so each differs
# from `noisy` in its weighting alone: MW-Net and MCPM with `META_STEP = "adam"`. `mwnet-sgd` is MW-Net with
# the authors' real step (`META_STEP = "sgd"`, the trainer's default), paired with `mwnet` for the
# optimizer's own effect (in plain fits SGD at 0.1 lags Adam: bench/results/meta_step_rate.md).
ROWS = {"noisy": ("uniform", {}), "mwnet": ("mwnet", {"meta_step": "adam"}), "mcpm": ("mcpm", {"meta_step": "adam"}),
        "pnt": ("pnt", {}), "int": ("int", {}), "pint": ("pint", {}), "rgs": ("rgs", {}),
        "mwnet-sgd": ("mwnet", {"meta_step": "sgd"}), "clean": ("uniform", {}),
        "noisy-bce": ("uniform", {"loss": "bce"}), "clean-bce": ("uniform", {"loss": "bce"})}
# noisy-bce and clean-bce: the loss control and its upper bound (added after seed 0 of dilate r = 0.4)
CLEAN_ROWS = ("clean", "clean-bce")  # rows with the clean masks in the noisy stream too


# what inflates a row's `train s` (wall time): the queue paused (SIGSTOP) while the test suite ran alone, or
# another process on the 2 cores
PAUSED = {"dilate-r0.8": "Seed 0's `train s` of `mwnet-sgd` includes about 7 min of the queue paused while the "
                         "test suite ran alone, and `noisy`'s (222 s) a package install beside it.",
          "dilate-r0.4": "Seed 1's `train s` of `noisy` includes about 7.5 min of the queue paused while the test "
                         "suite ran alone."}


def trainer_label(row: str) -> str:
    trainer, settings = ROWS[row]
    return f"`{trainer}`" + "".join(f", {k.upper()} = {v}" for k, v in settings.items())


RESULTS = Path(os.environ.get("RESULTS_DIR") or Path(__file__).resolve().parent / "results")


def run_row(cfg, row: str, seed: int, pool, noisy_masks, val, test, normalizer, meta: np.ndarray, out: Path,
            kept: Path, log=print) -> dict:
    """Train and test one row in `out` (a run folder); its result and per-image metrics are copied to `kept`
    (the repository's record), and a row already kept is not run again."""
    from dsal_tf import train
    from dsal_tf.evaluate import evaluate_model, summarize
    from dsal_tf.trainers import get_trainer

    if (kept / "result.json").is_file():
        return json.loads((kept / "result.json").read_text())
    trainer, settings = ROWS[row]
    rcfg = cfg.replace(trainer=trainer, meta_size=0, reweight_loss="run", **settings)
    is_noisy = np.ones(len(pool), bool)
    is_noisy[meta] = False
    y = pool.masks.copy() if row in CLEAN_ROWS else noisy_masks.copy()
    y[meta] = pool.masks[meta]
    model = train.new_model(rcfg, seed)
    log(f"seed {seed} {row}: trainer {rcfg.trainer}, {int(is_noisy.sum())} + {len(meta)} meta images, "
        f"{rcfg.nb_initial_epochs} epochs")
    start = time.time()
    train.fit(train.FitJob(model, rcfg, pool.images, y, is_noisy, val, normalizer, out, rcfg.nb_initial_epochs, seed))
    per_image, _ = evaluate_model(model, test, normalizer, rcfg.batch_size)
    result = {"row": row, "trainer": rcfg.trainer, "loss": get_trainer(rcfg.trainer).loss_for(rcfg), "seed": seed,
              "train_s": round(time.time() - start, 1), **summarize(per_image)}
    for folder in (out, kept):  # the run folder, then the repository's record (the row is done once it is there)
        folder.mkdir(parents=True, exist_ok=True)
        per_image.to_csv(folder / "test_metrics.csv", index=False, float_format="%.5f")  # for the paired intervals
        (folder / "result.json").write_text(json.dumps(result, indent=1))
    log(f"seed {seed} {row}: test Dice {result['dice_mean']:.4f} in {result['train_s']:.0f} s")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/isic2017")
    parser.add_argument("--preset", default="isic2017-cpu")
    parser.add_argument("--kind", default="dilate")
    parser.add_argument("--rate", type=float, default=0.4)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--meta", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=None, help="default: the preset's NB_INITIAL_EPOCHS")
    parser.add_argument("--pool", type=int, default=None, help="use the first N pool images (default: the preset's)")
    parser.add_argument("--summary-only", action="store_true", help="only collect finished rows")
    parser.add_argument("--exp-dir", default="exp", help="where the runs and the corrupted copies go")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="a constant for every row, e.g. MIXED_PRECISION=off (the results queue pins it)")
    args = parser.parse_args(argv)

    from dsal_tf import determinism, train
    from dsal_tf.config import load_config, parse_set_options
    from dsal_tf.corrupt import corrupt_folder
    from dsal_tf.data import Normalizer, load_split

    rows = [r for r in args.rows.split(",") if r]
    for r in rows:
        if r not in ROWS:
            raise SystemExit(f"--rows: unknown row {r!r}; choose from {list(ROWS)}")
    tag = f"{args.kind}-r{args.rate:g}"
    overrides = {"preset": args.preset, "data_path": args.data, "progress": False, "exp_dir": args.exp_dir,
                 **{k.lower(): v for k, v in parse_set_options(tuple(args.sets)).items()}}
    scale = ""
    if args.epochs is not None:
        overrides["nb_initial_epochs"] = args.epochs
        scale += f"-ep{args.epochs}"
    if args.pool is not None:
        overrides["pool_size"] = args.pool
        scale += f"-pool{args.pool}"
    name = f"robust-{args.preset}{scale}-{tag}"
    base = load_config(None, overrides)
    out = Path(base.exp_dir) / name
    kept = RESULTS / "raw" / name  # the finished rows, in the repository
    results = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        cfg = base.replace(seed=seed)
        noisy_dir = Path(cfg.exp_dir) / "data" / f"{Path(args.data).name}-{tag}-s{seed}"
        if not args.summary_only:
            corrupt_folder(args.data, noisy_dir, args.rate, args.kind, seed)
            determinism.apply(cfg)
            train.set_precision(cfg)
            pool, val, test = (load_split(cfg, s) for s in ("train", "val", "test"))
            noisy = load_split(cfg.replace(data_path=str(noisy_dir)), "train")
            assert noisy.names == pool.names
            label_dice = _dice(noisy.masks, pool.masks)
            normalizer = Normalizer.fit(pool.images, cfg.normalization)
            meta = np.sort(np.random.default_rng([seed, args.meta]).choice(len(pool), args.meta, replace=False))
            setup = json.dumps({"noisy_data": str(noisy_dir), "meta": meta.tolist(), "noisy_label_dice": label_dice,
                                "config": json.loads(cfg.to_json())}, indent=1)
            for folder in (out, kept):
                (folder / f"s{seed}").mkdir(parents=True, exist_ok=True)
                (folder / f"s{seed}" / "setup.json").write_text(setup)
            for row in rows:
                run_row(cfg, row, seed, pool, noisy.masks, val, test, normalizer, meta, out / f"s{seed}" / row,
                        kept / f"s{seed}" / row)
        for row in ROWS:
            done = kept / f"s{seed}" / row / "result.json"
            if done.is_file():
                results.append(json.loads(done.read_text()))
    if results:
        write_table(pd.DataFrame(results), kept, args, tag + scale)


def seed_dice(seed_dir: Path, name: str) -> pd.Series | None:
    """Per-test-image Dice of one row of one seed, by image name, or None before it finished."""
    path = seed_dir / name / "test_metrics.csv"
    return pd.read_csv(path).set_index("name")["dice"].sort_index() if path.is_file() else None


def paired_gap(out: Path, row: str) -> tuple[tuple, tuple, tuple, list[int]] | None:
    """`(Δ Dice vs noisy, the gap clean - noisy, share of the gap recovered, seeds)`, each `(value, lo,
    hi)` with a paired bootstrap interval over seeds and test images (`compare.bootstrap_ci`,
    `bootstrap_ratio_ci`), on the seeds where `row`, `noisy` and `clean` all saved per-image test
    metrics; None if there are none."""
    from dsal_tf.compare import bootstrap_ci, bootstrap_ratio_ci

    num, den, seeds = [], [], []
    for seed_dir in sorted(out.glob("s*/"), key=lambda p: int(p.name[1:])):
        r, lo, hi = seed_dice(seed_dir, row), seed_dice(seed_dir, "noisy"), seed_dice(seed_dir, "clean")
        if r is None or lo is None or hi is None:
            continue
        num.append((r - lo).to_numpy())
        den.append((hi - lo).to_numpy())
        seeds.append(int(seed_dir.name[1:]))
    if not seeds:
        return None
    num, den = np.stack(num), np.stack(den)
    return bootstrap_ci(num), bootstrap_ci(den), bootstrap_ratio_ci(num, den), seeds


def paired_delta(out: Path, row: str, base: str) -> str:
    """`row - base` in test Dice, paired per test image over the seeds both finished, with its bootstrap
    interval; '' when they share no seed."""
    return paired_contrast(out, (row,), (base,))


def paired_contrast(out: Path, plus: tuple[str, ...], minus: tuple[str, ...]) -> str:
    """`sum(plus) - sum(minus)` of rows' test Dice, paired per test image over the seeds where every row
    finished, with its bootstrap interval; '' when there is no such seed."""
    from dsal_tf.compare import bootstrap_ci

    diffs = []
    for seed_dir in sorted(out.glob("s*/"), key=lambda p: int(p.name[1:])):
        found = {row: seed_dice(seed_dir, row) for row in plus + minus}
        if all(d is not None for d in found.values()):
            diffs.append((sum(found[r] for r in plus) - sum(found[r] for r in minus)).to_numpy())
    if not diffs:
        return ""
    m, lo, hi = bootstrap_ci(np.stack(diffs))
    return f"{m:+.4f} [{lo:+.4f}, {hi:+.4f}]"


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1) > 0, b.reshape(len(b), -1) > 0
    inter = (a & b).sum(1)
    return float(np.mean((2 * inter + 1) / (a.sum(1) + b.sum(1) + 1)))


def write_table(results: pd.DataFrame, out: Path, args, tag: str) -> None:
    results.to_csv(out / "results.csv", index=False, float_format="%.4f")
    order = [r for r in ROWS if r in set(results["row"])]
    summary = (results.groupby("row").agg(dice=("dice_mean", "mean"), dice_std=("dice_mean", "std"),
                                          iou=("iou_mean", "mean"), iou_std=("iou_mean", "std"),
                                          hd95=("hd95_mean", "mean"), hd95_std=("hd95_mean", "std"),
                                          seeds=("seed", "count"), train_s=("train_s", "mean"))
               .reindex(order))
    lo, hi = summary["dice"].get("noisy"), summary["dice"].get("clean")
    ilo, ihi = summary["iou"].get("noisy"), summary["iou"].get("clean")
    label_dice = [json.loads(p.read_text())["noisy_label_dice"] for p in sorted(out.glob("s*/setup.json"))]
    lines = [
        f"# Robust training under noisy masks: ISIC 2017, {args.preset}, {tag}"
        + (f" (reduced: {args.pool or 'all'} pool images, {args.epochs or 'preset'} epochs)"
           if args.pool or args.epochs else ""),
        "",
        f"Training masks corrupted by `{args.kind}` at r = {args.rate:g} (`dsal corrupt`, seed = run seed; "
        f"Dice of the noisy pool masks to the truth: {', '.join(f'{d:.3f}' for d in label_dice)}). "
        f"Meta set: {args.meta} pool images with clean masks, the clean stream of the paired sampler in every "
        "row; the other pool images are the noisy stream (clean masks in the `clean` row). Test split "
        "(400 images); mean ± std over seeds (std blank with one seed). Gap recovered = "
        "(row − noisy) / (clean − noisy), blank while clean − noisy is within noise (the paired interval "
        "below). `noisy`, `clean`, `mwnet` and `rgs` train on the preset's `LOSS` (`REWEIGHT_LOSS = run`); "
        "MCPM's weighted term is the per-pixel BCE, and PNT, INT and PINT learn the noisy stream by per-pixel "
        "cross-entropy and squared error to the teacher, so `noisy-bce` (`noisy` on per-pixel BCE) is the row "
        "those four differ from in the weighting alone. Every row's real step is Adam at `LEARNING_RATE` "
        "except `mwnet-sgd`'s (the MW-Net authors' SGD 0.1, momentum 0.9).",
        "",
        "| row | trainer | seeds | test Dice | IoU | HD95 (px at 64x64) | Dice gap recovered "
        "| IoU gap recovered | train s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    paired = []

    def pm(v, s, digits=4):
        return f"{v:.{digits}f}" + ("" if pd.isna(s) else f" ± {s:.{digits}f}")

    ref = paired_gap(out, "clean")  # the gap clean - noisy, paired: a share of it needs it above noise
    shares = ref is None or ref[1][1] > 0
    for row, r in summary.iterrows():
        gap = "" if lo is None or hi is None or hi == lo or not shares else f"{(r['dice'] - lo) / (hi - lo):+.0%}"
        igap = ("" if ilo is None or ihi is None or ihi == ilo or not shares
                else f"{(r['iou'] - ilo) / (ihi - ilo):+.0%}")
        lines.append(f"| {row} | {trainer_label(row)} | {int(r['seeds'])} | {pm(r['dice'], r['dice_std'])} | "
                     f"{pm(r['iou'], r['iou_std'])} | {pm(r['hd95'], r['hd95_std'], 2)} | {gap} | {igap} | "
                     f"{r['train_s']:.0f} |")
        found = paired_gap(out, row) if row not in ("noisy", "clean", "clean-bce") else None
        if found:
            (d, dlo, dhi), (gap, gap_lo, gap_hi), (g, glo, ghi), seeds = found
            share = (f"{g:+.0%} [{glo:+.0%}, {ghi:+.0%}]" if gap_lo > 0 else  # a ratio needs a gap that is there
                     f"undefined: clean - noisy = {gap:+.4f} [{gap_lo:+.4f}, {gap_hi:+.4f}]")
            paired.append(f"| {row} | {','.join(map(str, seeds))} | {d:+.4f} [{dlo:+.4f}, {dhi:+.4f}] | {share} | "
                          f"{paired_delta(out, row, 'noisy-bce') if row != 'noisy-bce' else ''} |")
    if paired:
        lines += ["", "Paired against `noisy` and `clean` of the same seed, per test image (95% bootstrap intervals "
                  "over seeds, then test images; the gap recovered is a ratio of the resampled means), and "
                  "against `noisy-bce`, the loss control, on the seeds it has:", "",
                  "| row | seeds | Δ Dice vs noisy | Dice gap recovered | Δ Dice vs noisy-bce |",
                  "|---|---|---:|---:|---:|", *paired]
        cost = paired_delta(out, "clean", "noisy")
        lines += ["", f"Under the preset's loss, the noise costs clean - noisy = {cost}."] if cost else []
        bce_gap = paired_delta(out, "clean-bce", "noisy-bce")
        lines += ["", f"Under per-pixel BCE, the noise costs clean-bce - noisy-bce = {bce_gap}."] if bce_gap else []
        between = paired_contrast(out, ("clean", "noisy-bce"), ("noisy", "clean-bce"))
        lines += ["", "The two costs differ by (clean - noisy) - (clean-bce - noisy-bce) = "
                  f"{between}."] if between else []
        loss_effect = paired_delta(out, "clean-bce", "clean")
        lines += ["", "The loss alone, on the true masks (per-pixel BCE against the preset's soft Dice): "
                  f"clean-bce - clean = {loss_effect}."] if loss_effect else []
    extra = (f" --epochs {args.epochs}" if args.epochs else "") + (f" --pool {args.pool}" if args.pool else "") + (
        f" --meta {args.meta}" if args.meta != 100 else "")
    lines += ["", PAUSED[tag]] if tag in PAUSED else []
    lines += ["", f"Command: `python bench/robust_isic.py --kind {args.kind} --rate {args.rate:g} "
              f"--seeds {args.seeds}{extra}` (resumable); per-seed rows in "
              f"`bench/results/{out.relative_to(RESULTS)}/results.csv`, each row's per-image test metrics beside them.",
              ""]
    path = RESULTS / f"robust_isic2017_{tag}.md"
    path.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
