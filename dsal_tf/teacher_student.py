"""The semi-supervised noisy-teacher workflow (docs/methods.md#noisy-teacher), standalone.

1. Train a teacher on an expert-labelled subset of the pool (NB_LABELED images by default).
2. The teacher annotates the rest of the pool: the machine (noisy) labels.
3. Train students, initialised from the teacher, on expert + machine labels with each variant's
   weighting, and evaluate everything on the test split.

Every student, `equal` included, trains on the noisy-teacher loss: per-sample BCE + Dice
(docs/methods.md#noisy-teacher-re-weighting), or `REWEIGHT_LOSS` when it says otherwise ("run" = `LOSS`); the teacher
trains on `LOSS`. The `loss` column of `results.csv` and `summary.csv` says which.

Layout (`exp/<name>/`): `s<seed>/teacher/`, `s<seed>/machine_labels.npz`, `s<seed>/<variant>/`
(its `DONE` file holds the loss it was trained with), `results.csv` (per variant and seed) and
`summary.csv` (mean and std over seeds).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from .compare import _difference_row
from .config import Config
from .data import Normalizer, load_splits
from .errors import DsalError
from .evaluate import evaluate_model, predict_main, summarize
from .files import atomic_write
from .metrics import dice
from .run import TEST_METRICS, done_marker, stage
from .trainers.base import reweight_loss_name

# variant -> (TRAINER, RGS_QUERY); "teacher" is the expert-only model itself. `equal` is a plain
# `fit` over expert + machine labels; `uniform` is the control for the re-weighted variants: the
# same paired sampler and step as `rgs` (each step B machine + B expert images, Adam on
# sum_i w_i L_i(machine) + mean_j L_j(expert)) with w_i = 1/B, so only the weights differ.
VARIANTS: dict[str, tuple[str, bool] | None] = {
    "teacher": None,
    "equal": ("standard", False),
    "uniform": ("uniform", False),
    "rgs": ("rgs", False),
    "rgs+al": ("rgs", True),
    "rgm": ("rgm", False),
    "rgsm+al": ("rgsm", True),
}


def student_config(cfg: Config, variant: str) -> Config:
    """The config a student trains with: its trainer and +AL flag, and the noisy-teacher loss as
    `LOSS`, so `equal` (a plain `fit` of the compiled U-Net) optimises the same L_i as the paired
    trainers (whose `loss_for` gives the same name)."""
    trainer, query = VARIANTS[variant]
    return cfg.replace(trainer=trainer, rgs_query=query, loss=reweight_loss_name(cfg))


def _train_once(out: Path, train_fn: Callable[[], None], loss: str, old_loss: str) -> None:
    """Run `train_fn` unless `out/DONE` says it already finished with `loss` (resumable).

    `DONE` holds the loss name; an older `DONE` ("ok") was written when every model trained on
    `old_loss` (LOSS). A finished model with another loss is an error, never silently reused.
    """
    recorded = done_marker(out)
    if recorded is not None:
        recorded = recorded.strip()
        recorded = old_loss if recorded == "ok" else recorded
        if recorded != loss:
            raise DsalError(f"{out} was trained with loss {recorded!r}, this run uses {loss!r} "
                            f"(REWEIGHT_LOSS / LOSS): delete that folder or use another --name")
        return
    with stage(out, loss):  # DONE (atomic) only after the model is saved
        train_fn()


def run_noisy_teacher(
    cfg: Config,
    n_expert: int,
    variants: list[str],
    seeds: list[int],
    name: str,
    log: Callable[[str], None] = print,
) -> pd.DataFrame:
    import keras

    from . import train

    splits = load_splits(cfg)
    pool, val, test = splits["train"], splits["val"], splits["test"]
    if not 0 < n_expert < len(pool):
        raise DsalError(f"--experts {n_expert} must be between 1 and {len(pool) - 1} (the pool has {len(pool)})")
    out = Path(cfg.exp_dir) / name
    out.mkdir(parents=True, exist_ok=True)
    normalizer = Normalizer.fit(pool.images, cfg.normalization)
    choice = train.set_precision(cfg)
    # the settings, precision resolved (the results tables state it)
    atomic_write(out / "config.json", lambda tmp: tmp.write_text(cfg.replace(mixed_precision=choice).to_json()))
    rows = []
    for seed in seeds:
        sd = out / f"s{seed}"
        expert = np.sort(np.random.default_rng([seed, n_expert]).choice(len(pool), n_expert, replace=False))
        machine = np.setdiff1d(np.arange(len(pool)), expert)
        teacher_dir = sd / "teacher"

        def train_teacher():
            model = train.new_model(cfg, seed)
            log(f"seed {seed}: teacher on {n_expert} expert labels")
            train.fit(train.FitJob(model, cfg, pool.images[expert], pool.masks[expert], np.zeros(n_expert, bool),
                                   val, normalizer, teacher_dir, cfg.nb_initial_epochs, seed))

        _train_once(teacher_dir, train_teacher, cfg.loss, cfg.loss)
        teacher = keras.models.load_model(teacher_dir / train.CHECKPOINT, compile=False)
        labels_file = sd / "machine_labels.npz"
        if not labels_file.is_file():
            prob = predict_main(teacher, pool.images[machine], normalizer, train.eval_batch_size(cfg))
            masks = (prob > 0.5).astype(np.uint8)
            atomic_write(labels_file, lambda tmp: np.savez_compressed(tmp, idx=machine, masks=masks))
        with np.load(labels_file) as z:
            machine_masks = z["masks"]
        true_dice = float(np.mean([dice(a, b) for a, b in zip(machine_masks, pool.masks[machine])]))
        log(f"seed {seed}: machine labels of {len(machine)} images, Dice to ground truth {true_dice:.4f}")
        x = np.concatenate([pool.images[expert], pool.images[machine]])
        y = np.concatenate([pool.masks[expert], machine_masks])
        is_machine = np.r_[np.zeros(len(expert), bool), np.ones(len(machine), bool)]

        for variant in variants:
            vd = teacher_dir if variant == "teacher" else sd / variant
            loss = cfg.loss
            if variant != "teacher":
                vcfg = student_config(cfg, variant)
                loss = vcfg.loss

                def train_student(vcfg=vcfg, vd=vd, variant=variant):
                    model = train.compile_model(keras.models.load_model(teacher_dir / train.CHECKPOINT,
                                                                        compile=False), vcfg)
                    log(f"seed {seed}: student {variant} on {len(expert)} expert + {len(machine)} machine labels")
                    history = train.fit(train.FitJob(model, vcfg, x, y, is_machine, val, normalizer, vd,
                                                     cfg.nb_active_epochs, seed, from_scratch=False))
                    (vd / "history.json").write_text(json.dumps(history, default=float))

                _train_once(vd, train_student, loss, cfg.loss)
            model = keras.models.load_model(vd / train.CHECKPOINT, compile=False)
            per_image, _ = evaluate_model(model, test, normalizer, train.eval_batch_size(cfg))
            per_image.to_csv(vd / TEST_METRICS, index=False)
            rows.append({"variant": variant, "seed": seed, "n_expert": n_expert, "loss": loss,
                         "machine_label_dice": true_dice, **summarize(per_image)})
    return write_tables(out, pd.DataFrame(rows), variants, seeds, log)


def write_tables(out: Path, results: pd.DataFrame, variants: list[str], seeds: list[int],
                 log: Callable[[str], None] = print) -> pd.DataFrame:
    """results.csv (per variant and seed), summary.csv (per variant over seeds) and differences.csv."""
    results.to_csv(out / "results.csv", index=False, float_format="%.4f")
    summary = (results.groupby("variant", sort=False)
               .agg(dice_mean=("dice_mean", "mean"), dice_std=("dice_mean", "std"),
                    iou_mean=("iou_mean", "mean"), iou_std=("iou_mean", "std"),
                    hd95_mean=("hd95_mean", "mean"), hd95_std=("hd95_mean", "std"),
                    hd95_penalized_mean=("hd95_penalized_mean", "mean"), seeds=("seed", "count"),
                    loss=("loss", "first"))
               .reset_index())
    summary.to_csv(out / "summary.csv", index=False, float_format="%.4f")
    differences = student_differences(out, variants, seeds)
    differences.to_csv(out / "differences.csv", index=False, float_format="%.4f")
    log(summary.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    log(f"wrote {out}/results.csv, summary.csv and differences.csv")
    return summary


def student_differences(out: Path, variants: list[str], seeds: list[int], baseline: str = "uniform") -> pd.DataFrame:
    """Test Dice of every variant minus `baseline` (the same-sampler control), paired per test image,
    per seed and pooled, with the bootstrap 95% interval over seeds and images of `dsal compare`."""

    def dice_of(variant, seed):
        vd = out / f"s{seed}" / variant
        path = (out / f"s{seed}" / "teacher" if variant == "teacher" else vd) / TEST_METRICS
        return pd.read_csv(path).set_index("name")["dice"] if path.is_file() else None

    rows = []
    if baseline not in variants:
        return pd.DataFrame(rows)
    for variant in (v for v in variants if v != baseline):
        per_seed = []
        for seed in seeds:
            a, b = dice_of(variant, seed), dice_of(baseline, seed)
            if a is None or b is None:
                continue
            diff = (a - b.reindex(a.index)).to_numpy()
            per_seed.append(diff)
            rows.append(_difference_row(variant, baseline, "dice", str(seed), diff))
        if len(per_seed) > 1:
            rows.append(_difference_row(variant, baseline, "dice", "all", np.stack(per_seed)))
    return pd.DataFrame(rows)
