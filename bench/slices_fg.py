"""Foreground-aware random against random where many items have nothing to segment: 2D slices of the
hippocampus MRI volumes (docs/methods.md#foreground-aware-random).

    python bench/results_queue.py run --only slices-fg/ ...        # the rows, one job per (row, seed)
    python bench/slices_fg.py row ROW SEED [--data HIPPO] [--exp-dir EXP]   # one row (writes the slices first)
    python bench/slices_fg.py table [--exp-dir EXP]                 # rewrite the table

ISIC 2017 has a lesion in every image and COVID-CT infection in every slice, so there `random_fg` is plain
random. Cut into slices along the first axis, the hippocampus volumes are the case the baseline is for:
about a third of the slices hold no hippocampus. `write_slices` turns the first `VOLUMES` volumes of each
split of `--data` into PNG slices in the orgData layout (`EXP/hippocampus-slices`, once; intensities scaled
per volume from the 1st to the 99th percentile to 0-255, masks {0,255}, names `<volume>_<slice>.png`), so a
pool slice and its test neighbours never share a volume. Each row is one `dsal compare` call
(`compare_argv`): the `isic2017-cpu` network on grey 64x64 slices with `SETTINGS` (Dice + BCE over the batch,
as slices without foreground need), 100 random expert slices, then 50 a round for 5 rounds, every row from
the seed's initial model, full supervision on the whole pool. The table reads `compare`'s summary and paired
differences (test Dice per slice, an empty slice predicted empty scoring 1), and adds what the baseline is
about: the share of the oracle's picks that hold foreground, and the paired differences on the test slices
with foreground and on the empty ones.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from compare_table import queue_records, row_table_main, runs_grid  # noqa: E402
from hippocampus import result_sections  # noqa: E402

RESULTS = Path(os.environ.get("RESULTS_DIR") or ROOT / "bench" / "results")
NAME = "compare-hippocampus-slices"
PREFIX = "slices-fg/"
ROWS = ("random", "random_fg", "random_fg@fgonly")  # RANDOM_FG_SHARE 0.67 (nnActive's split) and 1
SEEDS = (0, 1, 2)
ITERATIONS = 5
VOLUMES = {"train": 40, "val": 10, "test": 40}  # the first volumes of each split (sorted names)
AXIS = 0  # slicing axis: ~37% of these slices hold no foreground
SETTINGS = {"COLOR": "gray", "LOSS": "bce_dice", "BATCH_DICE": "true", "NB_LABELED": 100, "NB_NEXT_SAMPLE": 50,
            "NB_PSEUDO_INITIAL": 20, "PSEUDO_RATE": 20}
TABLE = "slices_fg.md"


def slices_dir(exp_dir: Path) -> Path:
    return exp_dir / "hippocampus-slices"


def to_uint8(volume: np.ndarray) -> np.ndarray:
    """Intensities scaled per volume from its 1st to its 99th percentile onto 0-255 (clipped)."""
    lo, hi = np.percentile(volume, [1, 99])
    return np.clip(np.round((volume - lo) / max(hi - lo, 1e-6) * 255), 0, 255).astype(np.uint8)


def write_slices(data: str | Path, out: Path, volumes: dict[str, int] = VOLUMES, axis: int = AXIS) -> dict:
    """The slices of the first `volumes[split]` volumes of each split of `data` as PNG pairs under `out`
    (written once, atomically: a folder being written is never taken for a finished one); returns what
    `out/slices.json` records (slices and the share without foreground, per split)."""
    import cv2

    from dsal_tf.volumes import find_volume_pairs, read_label, read_volume, volume_stem

    record = out / "slices.json"
    info = {"data": str(Path(data).resolve()), "axis": axis, "volumes": dict(volumes)}
    if record.is_file():
        done = json.loads(record.read_text())
        if {k: done.get(k) for k in info} == info:
            return done
        raise SystemExit(f"{out} holds slices of other volumes ({record}); delete it, or use another --exp-dir")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    for split, n in volumes.items():
        img_dir, gt_dir = tmp / f"{split}Img", tmp / f"{split}GT"
        img_dir.mkdir(parents=True)
        gt_dir.mkdir(parents=True)
        slices = empty = 0
        for image_path, label_path in find_volume_pairs(data, split)[:n]:
            image = read_volume(image_path)
            label = read_label(label_path, image) > 0
            pixels = np.moveaxis(to_uint8(image.array), axis, 0)
            masks = np.moveaxis(label, axis, 0)
            stem = volume_stem(image_path)
            for k in range(len(pixels)):
                name = f"{stem}_{k:02d}"  # volumes here have under 100 slices along any axis
                for path, array in ((img_dir / f"{name}.png", pixels[k]),
                                    (gt_dir / f"{name}_segmentation.png", masks[k].astype(np.uint8) * 255)):
                    if not cv2.imwrite(str(path), array):
                        raise SystemExit(f"could not write {path}; check the disk and {out.parent}")
                slices += 1
                empty += int(not masks[k].any())
        info[split] = {"slices": slices, "empty_share": round(empty / max(slices, 1), 4)}
    (tmp / "slices.json").write_text(json.dumps(info, indent=1))
    shutil.rmtree(out, ignore_errors=True)  # an unfinished folder (no slices.json)
    tmp.rename(out)
    return info


def compare_argv(data: Path, row: str, seed: int) -> tuple[str, ...]:
    """The `dsal compare` arguments of one row and seed (row "full": full supervision only)."""
    sets = [a for k, v in SETTINGS.items() for a in ("--set", f"{k}={v}")]
    return ("compare", "--preset", "isic2017-cpu", "--data", str(data), "--no-progress", "--name", NAME,
            "--iterations", str(ITERATIONS), "--strategies", "" if row == "full" else row, "--seeds", str(seed),
            "--baseline", "random", "--full-supervision" if row == "full" else "--no-full-supervision", *sets)


def run_row(data: str, row: str, seed: int, exp_dir: Path) -> None:
    slices = slices_dir(exp_dir)
    write_slices(data, slices)
    subprocess.run([sys.executable, "-m", "dsal_tf.cli", *compare_argv(slices, row, seed), "--exp-dir", str(exp_dir)],
                   cwd=ROOT, check=True)


def has_foreground(gt_dir: Path, names) -> np.ndarray:
    """Whether each named slice's mask holds foreground."""
    import cv2

    return np.array([cv2.imread(str(gt_dir / f"{n}_segmentation.png"), cv2.IMREAD_GRAYSCALE).any() for n in names])


def pick_shares(folder: Path, gt_dir: Path) -> list[str]:
    """Markdown lines: per row, the share of the oracle's picks (rounds 1 on) whose mask holds foreground,
    per seed, beside the pool's share."""
    import pandas as pd

    lines = ["| row | " + " | ".join(f"seed {s}" for s in SEEDS) + " | pool |", "|---|" + "---|" * (len(SEEDS) + 1)]
    pool = None
    for row in ROWS:
        cells = []
        for seed in SEEDS:
            files = sorted((folder / f"{row}-s{seed}").glob("round_*/scores.csv"))
            if not files:
                cells.append("-")
                continue
            scores = pd.concat([pd.read_csv(f) for f in files])
            picks = scores[scores["chosen"] == "oracle"]["name"]
            cells.append(f"{has_foreground(gt_dir, picks).mean():.2f} ({len(picks)})" if len(picks) else "-")
            if pool is None:
                first = pd.read_csv(files[0])
                pool = has_foreground(gt_dir, first["name"]).mean()
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {'-' if pool is None else f'{pool:.2f}'} |")
    return lines


def split_differences(folder: Path, gt_dir: Path) -> list[str]:
    """Markdown lines: each row minus `random`, final-round test Dice paired per slice over the seeds every row
    finished, on the test slices with foreground and on the empty ones (bootstrap 95% intervals)."""
    import pandas as pd

    from dsal_tf.compare import bootstrap_ci

    final = f"round_{ITERATIONS:02d}"
    seeds = [s for s in SEEDS if all((folder / f"{r}-s{s}" / final / "test_metrics.csv").is_file() for r in ROWS)]
    if not seeds:
        return ["(no seed has every row yet)"]
    tables = {(r, s): pd.read_csv(folder / f"{r}-s{s}" / final / "test_metrics.csv") for r in ROWS for s in seeds}
    names = tables[ROWS[0], seeds[0]]["name"]
    fg = has_foreground(gt_dir, names)
    lines = ["| test slices | seeds | n | random | " + " | ".join(f"{r} | difference" for r in ROWS[1:]) + " |",
             "|---|---|---|---|" + "---|---|" * (len(ROWS) - 1)]
    for label, keep in (("with foreground", fg), ("empty", ~fg), ("all", np.ones_like(fg))):
        for group in ([s] for s in seeds) if len(seeds) > 1 else ():
            lines.append(split_row(label, keep, group, tables, names, bootstrap_ci))
        lines.append(split_row(label, keep, seeds, tables, names, bootstrap_ci))
    return lines


def split_row(label: str, keep: np.ndarray, seeds: list[int], tables: dict, names, bootstrap_ci) -> str:
    """One line of `split_differences`: the `keep` test slices over `seeds`."""
    dice = {r: np.array([tables[r, s].set_index("name").loc[names, "dice"].to_numpy()[keep] for s in seeds])
            for r in ROWS}
    cells = [", ".join(map(str, seeds)), f"{int(keep.sum())}", f"{dice['random'].mean():.4f}"]
    for r in ROWS[1:]:
        m, lo, hi = bootstrap_ci(dice[r] - dice["random"])
        cells += [f"{dice[r].mean():.4f}", f"{m:+.4f} [{lo:+.4f}, {hi:+.4f}]"]
    return f"| {label} | " + " | ".join(cells) + " |"


def table(exp_dir: Path) -> str:
    folder, slices = exp_dir / NAME, slices_dir(exp_dir)
    info = json.loads((slices / "slices.json").read_text()) if (slices / "slices.json").is_file() else None
    sets = ", ".join(f"{k}={v}" for k, v in SETTINGS.items())
    lines = ["# Foreground-aware random on 2D slices of the hippocampus MRI", "",
             f"`python bench/results_queue.py run --only {PREFIX}` (`bench/slices_fg.py`: one `dsal compare` per row "
             f"and seed). Slices along axis {AXIS} of the first {VOLUMES['train']} / {VOLUMES['val']} / "
             f"{VOLUMES['test']} train / val / test volumes of `../shared/data/hippocampus`, grey, resized to 64x64; "
             f"preset `isic2017-cpu` with {sets}, `--iterations {ITERATIONS}` (100 expert slices, then 50 a round; "
             "350 at the end). Test Dice per slice (an empty slice predicted empty scores 1); differences paired "
             "per test slice with the bootstrap 95% interval over seeds and slices. Only finished runs count.", ""]
    if info is not None:
        lines += ["Slices: " + ", ".join(f"{s} {info[s]['slices']} ({100 * info[s]['empty_share']:.0f}% without "
                                          "foreground)" for s in VOLUMES) + ".", ""]
    lines += ["## Runs (row x seed: minutes, peak memory of the job's process, commit)", ""]
    lines += runs_grid(queue_records(exp_dir, PREFIX), lambda row, seed: f"{PREFIX}{row}/s{seed}", (*ROWS, "full"),
                       seeds=SEEDS)
    lines += [line.replace("test volumes", "test slices") for line in result_sections(folder, None)]
    if info is not None and folder.is_dir():
        gt_dir = slices / "trainGT"
        lines += ["", f"## The oracle's picks with foreground (rounds 1-{ITERATIONS}; picks in brackets)", "",
                  *pick_shares(folder, gt_dir), "",
                  "## Final test Dice by kind of slice (paired differences from random)", "",
                  *split_differences(folder, slices / "testGT")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    return row_table_main(argv, __doc__, ROWS, run_row, table, RESULTS / TABLE)


if __name__ == "__main__":
    sys.exit(main())
