"""`dsal classify`: BoostMIS's closed loop on feature vectors (docs/methods.md#boostmis-on-feature-vectors), and
`dsal features`: the feature files from an image folder with a trained run's encoder.

Input folder: `train-`, `val-`, `test-features.npy` (N x D float) and `-targets.npy` (N int,
classes 0..C-1), the seed's format. One small MLP head (D -> 128 relu -> C softmax), made once
and trained by `trainers.booster.Booster` (SGD 0.03 with momentum and weight decay, batch 64, `steps`
updates a round), each round from its first weights again (BOOSTMIS_FRESH_HEAD; off: trained on
through the rounds), learns the labelled training samples plus the unlabelled ones the pseudo-label
rule keeps (`PSEUDO_RULES`, `--pseudo`): `adaptive`, BoostMIS's cutoff (`strategies.boostmis`:
eps_t from the learning status with N_A = the labels the last round added, and the `threshold`
rule); `fixed`, FixMatch's BOOSTMIS_TAU (0.95); `none`, no pseudo labels. An EMA copy (EMA_DECAY,
restarted with the head) is evaluated on the test split; the online head, the pseudo labeller,
queries the next K labels (`QUERIES`, `--strategy`): `boostmis` (VAT and class-balanced
density-aware entropy, among samples the pseudo labeller does not take), `entropy` or `random`.
The settings where the authors' code differs (`Booster.Settings`: BOOSTMIS_CUTOFF, _INITIAL, _ALIGN,
_OPTIMIZER, _LABELLER, _WARMUP, _FRESH_HEAD, EMA_DECAY, BOOSTMIS_TAU) are `ClassifySettings` fields by
their lower-case names (BOOSTMIS_THRESHOLD is `threshold`); their defaults are the configuration that
beat the no-pseudo-label baseline in issue 27.2's ablation (a fresh head each round, the global
cutoff, SGD; random first labels). Defaults not given are the `Config` defaults.
exp/NAME/results.csv: round, n_labelled, n_pseudo (unlabelled samples the final cutoffs keep),
accuracy, macro_f1; learning_curve.png; round_XX.npz (the labelled indices of round XX and the two
heads' weights after round XX-1, where round XX starts unless each round starts afresh) makes the loop
resumable.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from .config import Config
from .data import SPLITS
from .errors import DsalError
from .files import atomic_write, atomic_write_text
from .registry import registrar
from .run import round_name
from .settings import suggest
from .strategies.boostmis import (
    THRESHOLDS,
    BoostMISQuery,
    LearningStatus,
    boostmis_select,
    categorical_kl,
    knn_density,
    vat_score,
)
from .trainers.booster import INITIAL_SETS, Booster
from .trainers.boostmis import make_optimizer

# the BoostMIS settings of a segmentation run (VAT xi / eps, k), the Booster's (tau, threshold rule, cutoff,
# EMA decay, the authors' choices) and the seed
BoosterSettings = Booster.Settings  # bound once: a test may stand a spy in for `Booster`
QUERY, TRAINING, SEED = BoostMISQuery.Settings(), BoosterSettings(), Config().seed
FIELDS = ["round", "n_labelled", "n_pseudo", "accuracy", "macro_f1"]


# ------------------------------------------------------------------ pseudo-label rules
PSEUDO_RULES: dict[str, type[PseudoRule]] = {}
register_pseudo_rule = registrar(PSEUDO_RULES)  # @register_pseudo_rule("name"): --pseudo name


class PseudoRule:
    """Which of the online head's hard labels the `Booster` learns: a cutoff per class, made once a
    round. `n_active` is N_A, the labels the last round added; `queries` K; `threshold` a
    `strategies.boostmis.THRESHOLDS` name; `tau` the fixed confidence cutoff (BOOSTMIS_TAU); `cutoff`
    eps_t's rule (BOOSTMIS_CUTOFF, `strategies.boostmis.CUTOFFS`)."""

    def __init__(self, n_classes: int, n_active: int, queries: int, threshold: str = TRAINING.boostmis_threshold,
                 tau: float = TRAINING.boostmis_tau, cutoff: str = TRAINING.boostmis_cutoff) -> None:
        self.n_classes, self.n_active, self.queries = n_classes, n_active, queries
        self.threshold, self.tau, self.cutoff = threshold, float(tau), cutoff

    def cutoffs(self, confidence, pred_class, update: bool = True):
        """The cutoff per class [C] for this batch's confidences [N] and classes [N] (`update`: count them)."""
        raise NotImplementedError


@register_pseudo_rule("adaptive")
class AdaptiveCutoff(PseudoRule):
    """BoostMIS: eps_t from the learning status (`LearningStatus`) and the `threshold` rule."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.status = LearningStatus(self.n_classes, self.tau, self.n_active, self.queries, rule=self.threshold,
                                     cutoff=self.cutoff)

    def cutoffs(self, confidence, pred_class, update: bool = True):
        return self.status.thresholds(confidence, pred_class, update)


@register_pseudo_rule("fixed")
class FixedCutoff(PseudoRule):
    """FixMatch: every class at `tau`."""

    def cutoffs(self, confidence, pred_class, update: bool = True):
        return tf.fill([self.n_classes], self.tau)


@register_pseudo_rule("none")
class NoPseudoLabels(PseudoRule):
    """Labelled samples only: a cutoff above every confidence keeps no pseudo label."""

    def cutoffs(self, confidence, pred_class, update: bool = True):
        return tf.fill([self.n_classes], np.inf)


# ------------------------------------------------------------------ queries
QUERIES: dict[str, type[FeatureQuery]] = {}
register_feature_query = registrar(QUERIES)  # @register_feature_query("name"): --strategy name


class FeatureQuery:
    """Picks the oracle's next samples from the unlabelled features; a query overrides `rank`.
    `xi`, `eps`: VAT; `knn`: the density's k; `seed`: VAT's random start."""

    def __init__(self, xi: float = QUERY.boostmis_xi, eps: float = QUERY.boostmis_eps,
                 knn: int = QUERY.boostmis_knn, seed: int = SEED) -> None:
        self.xi, self.eps, self.knn, self.seed = xi, eps, knn, seed

    def __call__(self, head, x_unl: np.ndarray, taken: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
        """Positions into `x_unl` [N,D] of the next `n` samples; `taken` [N]: the pseudo labeller keeps them."""
        return self.rank(head, x_unl, taken, min(n, len(x_unl)), rng)

    def rank(self, head, x_unl: np.ndarray, taken: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError


def class_entropy(p: np.ndarray) -> np.ndarray:
    """Entropy of class distributions [N,C] -> [N]."""
    return -np.sum(p * np.log(np.clip(p, 1e-7, 1.0)), axis=1)


@register_feature_query("boostmis")
class BoostMISFeatureQuery(FeatureQuery):
    """VAT and class-balanced density-aware entropy (`strategies.boostmis.boostmis_select`), among the
    samples the pseudo labeller does not take."""

    def rank(self, head, x_unl, taken, n, rng):
        out = head(x_unl, training=False)
        p = out["prob"].numpy()

        def prob_fn(z):
            return head(z, training=False)["prob"]

        vat = vat_score(prob_fn, tf.constant(x_unl), self.xi, self.eps, seed=(self.seed, 1), kl=categorical_kl).numpy()
        dae = np.full(p.shape, np.nan)
        dae[np.arange(len(p)), p.argmax(1)] = class_entropy(p) * knn_density(out["features"].numpy(), self.knn)
        return boostmis_select(vat, dae, taken, n)


@register_feature_query("random")
class RandomFeatureQuery(FeatureQuery):
    def rank(self, head, x_unl, taken, n, rng):
        return rng.permutation(len(x_unl))[:n]


@register_feature_query("entropy")
class EntropyFeatureQuery(FeatureQuery):
    """The head's most uncertain samples (ties: lower position)."""

    def rank(self, head, x_unl, taken, n, rng):
        return np.argsort(-class_entropy(head(x_unl, training=False)["prob"].numpy()), kind="stable")[:n]


STRATEGIES = tuple(QUERIES)  # ("boostmis", "random", "entropy")
PSEUDO = tuple(PSEUDO_RULES)  # ("adaptive", "fixed", "none")


def load_feature_splits(folder: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """`{split: (features [N,D] float32, targets [N] int64)}`, checked."""
    folder = Path(folder)
    out = {}
    for split in SPLITS:
        fx, fy = folder / f"{split}-features.npy", folder / f"{split}-targets.npy"
        for f in (fx, fy):
            if not f.is_file():
                raise DsalError(f"{f} not found; --features needs train-, val- and test-features.npy / -targets.npy")
        x, y = np.load(fx), np.load(fy)
        if x.ndim != 2 or not np.issubdtype(x.dtype, np.number):
            raise DsalError(f"{fx} must be an N x D numeric array, got shape {x.shape} ({x.dtype})")
        if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer) or (y < 0).any():
            raise DsalError(f"{fy} must hold {len(x)} non-negative integer class labels, "
                            f"got shape {y.shape} ({y.dtype})")
        if not np.isfinite(x).all():
            raise DsalError(f"{fx} has NaN or infinite values; fix or drop those rows")
        out[split] = (x.astype(np.float32), y.astype(np.int64))
    dims = {s: v[0].shape[1] for s, v in out.items()}
    if len(set(dims.values())) != 1:
        raise DsalError(f"feature sizes differ between splits in {folder}: {dims}")
    return out


def macro_f1(y: np.ndarray, pred: np.ndarray, n_classes: int) -> float:
    """Mean over classes present in `y` or `pred` of 2 TP / (2 TP + FP + FN)."""
    f1 = []
    for c in range(n_classes):
        tp = np.sum((pred == c) & (y == c))
        fp = np.sum((pred == c) & (y != c))
        fn = np.sum((pred != c) & (y == c))
        if tp + fp + fn:
            f1.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1)) if f1 else 0.0


def build_head(dim: int, n_classes: int, hidden: int = 128) -> keras.Model:
    """The MLP head: `[N,D]` -> `{"prob": [N,C] softmax, "features": [N,hidden]}` (the density's space)."""
    inp = keras.Input((dim,), name="features_in")
    h = keras.layers.Dense(hidden, activation="relu", name="hidden")(inp)
    p = keras.layers.Dense(n_classes, activation="softmax", name="prob")(h)
    return keras.Model(inp, {"prob": p, "features": h}, name="mlp_head")


def save_round(path: Path, labelled: np.ndarray, head, ema_head) -> None:
    """round_XX.npz: the round's labelled indices and the heads' weights (online and EMA) after the round
    before: round XX starts from them unless each round starts afresh (BOOSTMIS_FRESH_HEAD)."""
    weights = {f"{k}_{i}": w for k, m in (("online", head), ("ema", ema_head)) for i, w in enumerate(m.get_weights())}
    atomic_write(path, lambda tmp: np.savez(tmp, labelled=labelled, **weights))


def load_round(path: Path, head=None, ema_head=None) -> np.ndarray:
    """The labelled indices of round_XX.npz; sets the heads' weights where the file has them."""
    with np.load(path) as z:
        if head is not None and "online_0" in z.files:
            for k, m in (("online", head), ("ema", ema_head)):
                m.set_weights([z[f"{k}_{i}"] for i in range(len(m.weights))])
        return z["labelled"]


def _plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    n = [r["n_labelled"] for r in rows]
    ax.plot(n, [r["accuracy"] for r in rows], "o-", label="accuracy")
    ax.plot(n, [r["macro_f1"] for r in rows], "s--", label="macro F1")
    ax.set_xlabel("expert labels")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@dataclass(frozen=True)
class ClassifySettings:
    """The options of the loop (`dsal classify`), checked when made. `labeled`: initial expert labels;
    `queries`: labels per round (K); `iterations`: query rounds; `strategy`: a `QUERIES` name; `pseudo`: a
    `PSEUDO_RULES` name; `steps`, `batch_size`: head updates per round and their batch; `xi`, `eps`, `knn`: the
    query's VAT and density; `threshold`: the adaptive cutoff rule, `strategies.boostmis.THRESHOLDS`
    (BOOSTMIS_THRESHOLD); the rest: `Booster.Settings` by name (`booster`; `booster_options` makes them from
    one). The positional order is `run_classify`'s."""

    labeled: int
    queries: int
    iterations: int
    strategy: str = "boostmis"
    pseudo: str = "adaptive"
    seed: int = SEED
    steps: int = 200
    batch_size: int = 64
    xi: float = QUERY.boostmis_xi
    eps: float = QUERY.boostmis_eps
    knn: int = QUERY.boostmis_knn
    threshold: str = TRAINING.boostmis_threshold
    boostmis_tau: float = TRAINING.boostmis_tau
    boostmis_cutoff: str = TRAINING.boostmis_cutoff
    boostmis_labeller: str = TRAINING.boostmis_labeller
    boostmis_warmup: int = TRAINING.boostmis_warmup
    boostmis_optimizer: str = TRAINING.boostmis_optimizer
    boostmis_initial: str = TRAINING.boostmis_initial
    boostmis_align: bool = TRAINING.boostmis_align
    boostmis_fresh_head: bool = TRAINING.boostmis_fresh_head
    ema_decay: float = TRAINING.ema_decay

    def __post_init__(self) -> None:
        if self.strategy not in QUERIES or self.pseudo not in PSEUDO_RULES or self.threshold not in THRESHOLDS:
            raise DsalError(f"--strategy must be one of {STRATEGIES}, --pseudo one of {PSEUDO} and the threshold "
                            f"rule one of {sorted(THRESHOLDS)}")
        if self.labeled < 1 or self.queries < 0 or self.iterations < 0 or self.steps < 1:
            raise DsalError("--labeled >= 1, --queries >= 0, --iterations >= 0 and --steps >= 1")
        checked = BoosterSettings.from_values(booster_values(self), "dsal classify")  # one line naming it
        for name, value in booster_options(checked).items():
            object.__setattr__(self, name, value)  # coerced: settings.json records what the loop ran

    @property
    def booster(self) -> BoosterSettings:
        return BoosterSettings(**booster_values(self))

    def record(self, features: str | Path) -> dict:
        """What settings.json holds: a resumed run must match it (`iterations` may grow)."""
        return {"features": str(Path(features).resolve()),
                **{k: v for k, v in asdict(self).items() if k != "iterations"}}

    @classmethod
    def recorded(cls, saved: dict) -> dict:
        """An earlier settings.json as `record` gives it today: a setting it lacks (added since) had the default
        of its day, `RECORDED_BEFORE` where that differs from today's."""
        return {**{f.name: f.default for f in fields(cls) if f.default is not MISSING and f.name != "iterations"},
                **RECORDED_BEFORE, **saved}


# the defaults a settings.json without these fields ran with: a run from before issue 27.2's ablation recorded
# neither threshold nor optimizer, or ran with these; every run from before BOOSTMIS_FRESH_HEAD trained one head
RECORDED_BEFORE = {"threshold": "global", "boostmis_optimizer": "adam", "boostmis_fresh_head": False}


# Booster.Settings fields by their ClassifySettings names (META_SIZE has no meaning here)
BOOSTER_NAMES = {n: "threshold" if n == "boostmis_threshold" else n
                 for n in BoosterSettings.names() if n != "meta_size"}


def booster_values(s: ClassifySettings) -> dict:
    """The `Booster.Settings` fields of `s`, by their constant names."""
    return {n: getattr(s, field) for n, field in BOOSTER_NAMES.items()}


def booster_options(settings: BoosterSettings) -> dict:
    """`ClassifySettings` keywords for a `Booster.Settings`: `ClassifySettings(..., **booster_options(s))`."""
    return {field: getattr(settings, n) for n, field in BOOSTER_NAMES.items()}


def classify_options(values: Mapping[str, Any], source: str = "--set") -> dict:
    """`ClassifySettings` keywords from `{CONSTANT: value}` (`--set BOOSTMIS_CUTOFF=constant`), coerced and
    checked; one line for a name `dsal classify` does not take."""
    values = {k.lower(): v for k, v in values.items()}
    for name in values:
        if name not in BOOSTER_NAMES:
            options = sorted(n.upper() for n in BOOSTER_NAMES)
            raise DsalError(f"{source} {name.upper()}: dsal classify takes {', '.join(options)}"
                            + suggest(name.upper(), options))
    return booster_options(BoosterSettings.from_values(values, source))


def run_classify(features: str | Path, run_dir: str | Path, *args, settings: ClassifySettings | None = None,
                 log=print, **options) -> Path:
    """Run or resume the loop; returns `run_dir` (results.csv, learning_curve.png, round_XX.npz).

    Either `settings`, or the `ClassifySettings` fields as arguments: `run_classify(features, run_dir, labeled,
    queries, iterations, strategy, pseudo, seed, steps, ...)`, the others by keyword."""
    if settings is None:
        settings = ClassifySettings(*args, **options)
    elif args or options:
        raise TypeError("run_classify takes either settings= or the ClassifySettings fields, not both")
    return classify_loop(features, run_dir, settings, log)


def classify_loop(features: str | Path, run_dir: str | Path, settings: ClassifySettings, log=print,
                  on_round: Callable[[dict], None] | None = None) -> Path:
    """`run_classify` with its options in `settings`. `on_round`, for benchmarks, gets each round run here
    (not the resumed ones) as its results.csv row with accuracy and macro F1 unrounded, plus `labelled`
    (indices), `test_pred` [N_test] (the EMA head's classes) and the Booster's per-class tally of the pseudo
    labels it learned, `pl_kept` and `pl_correct` [C] (the training targets are known: a simulated oracle)."""
    import pandas as pd

    s = settings
    data = load_feature_splits(features)
    (x, y), (xt, yt) = data["train"], data["test"]
    n_classes = int(max(y.max(), data["val"][1].max(), yt.max())) + 1
    if s.labeled > len(x):
        raise DsalError(f"--labeled {s.labeled} exceeds the {len(x)} training samples")
    mean, std = x.mean(0), x.std(0) + 1e-6
    x, xt = (x - mean) / std, (xt - mean) / std
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    recorded = s.record(features)
    sfile = run / "settings.json"
    if sfile.is_file() and s.recorded(json.loads(sfile.read_text())) != recorded:
        raise DsalError(f"{run} was started with other settings ({sfile}); use another --exp or delete it")
    atomic_write_text(sfile, json.dumps(recorded, indent=2))
    csv = run / "results.csv"
    rows = pd.read_csv(csv).to_dict("records") if csv.is_file() else []
    first = run / f"{round_name(0)}.npz"
    if not first.is_file():
        start = INITIAL_SETS[s.boostmis_initial](y, s.labeled, np.random.default_rng([s.seed, 0]))
        atomic_write(first, lambda tmp: np.savez(tmp, labelled=start))
    query = QUERIES[s.strategy](s.xi, s.eps, s.knn, s.seed)
    keras.utils.set_random_seed(s.seed * 1000)
    head = build_head(x.shape[1], n_classes)
    first_weights = head.get_weights()
    ema_head = keras.Model.from_config(head.get_config())
    ema_head.set_weights(first_weights)
    ema_head.trainable = False
    fresh = s.boostmis_fresh_head  # each round from the first weights, or one head through the rounds
    for r in range(len(rows), s.iterations + 1):
        labelled = load_round(run / f"{round_name(r)}.npz", *(() if fresh else (head, ema_head)))
        if fresh:
            head.set_weights(first_weights)
            ema_head.set_weights(first_weights)
        n_added = len(labelled) - len(load_round(run / f"{round_name(r - 1)}.npz")) if r else 0  # N_A
        unl = np.setdiff1d(np.arange(len(x)), labelled)
        keras.utils.set_random_seed(s.seed * 1000 + r)
        rule = PSEUDO_RULES[s.pseudo](n_classes, n_added, max(s.queries, 1), s.threshold, s.boostmis_tau,
                                      s.boostmis_cutoff)
        optimizer = make_optimizer(s.boostmis_optimizer)[0]
        p_target = np.bincount(y[labelled], minlength=n_classes) / len(labelled) if s.boostmis_align else None
        booster = Booster(head, ema_head, rule, s.seed * 1000 + r, step0=0 if fresh else r * s.steps,
                          settings=s.booster, p_target=p_target)
        booster.compile(optimizer=optimizer)
        u = unl if len(unl) else labelled
        lab = tf.data.Dataset.from_tensor_slices((x[labelled], y[labelled])).repeat().shuffle(4096, seed=s.seed)
        # the unlabelled targets ride along only for the Booster's tally (never learned)
        ulb = tf.data.Dataset.from_tensor_slices((x[u], y[u])).repeat().shuffle(4096, seed=s.seed + 1)
        ds = tf.data.Dataset.zip((ulb.batch(s.batch_size), lab.batch(s.batch_size))).take(s.steps)
        booster.fit(ds, epochs=1, verbose=0, shuffle=False)  # the datasets shuffle
        pred = ema_head(xt, training=False)["prob"].numpy().argmax(1)
        taken = booster.pseudo_labels(x[unl], update=False)[1].numpy() > 0 if len(unl) else np.zeros(0, bool)
        # the next round's labels are chosen even after the last round, so more --iterations resume from here
        rng = np.random.default_rng([s.seed, r + 1])
        picks = query(head, x[unl], taken, s.queries, rng) if len(unl) else unl
        save_round(run / f"{round_name(r + 1)}.npz", np.sort(np.r_[labelled, unl[picks]]), head, ema_head)
        accuracy, f1 = float(np.mean(pred == yt)), macro_f1(yt, pred, n_classes)
        rows.append(dict(round=r, n_labelled=len(labelled), n_pseudo=int(taken.sum()),
                         accuracy=round(accuracy, 5), macro_f1=round(f1, 5)))
        table = pd.DataFrame(rows, columns=FIELDS)
        atomic_write(csv, lambda tmp, table=table: table.to_csv(tmp, index=False))
        log(f"round {r}: {len(labelled)} labelled, {int(taken.sum())} pseudo, accuracy {rows[-1]['accuracy']:.4f}, "
            f"macro F1 {rows[-1]['macro_f1']:.4f}")
        if on_round is not None:
            on_round(dict(rows[-1], accuracy=accuracy, macro_f1=f1, labelled=labelled, test_pred=pred,
                          pl_kept=booster.pl_kept.numpy(), pl_correct=booster.pl_correct.numpy()))
    _plot(rows, run / "learning_curve.png", f"{s.strategy} / pseudo {s.pseudo}")
    return run


def extract_features(cfg, in_dir: str | Path, out_dir: str | Path, split: str = "train", which="best",
                     labels: str | Path | None = None, columns: list[str] | None = None, log=print) -> Path:
    """`<split>-features.npy` (global-average-pooled bottleneck of the run's U-Net), `<split>-names.txt`
    and, with a `labels` CSV (first column the image name, then 0/1 indicator columns), `<split>-targets.npy`:
    1 + the first positive of `columns` (default: every column), 0 when none."""
    import pandas as pd

    from .model import with_features
    from .predict import _check_inputs, image_dataset, load_round

    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if split not in SPLITS:
        raise DsalError(f"--split must be one of {SPLITS}")
    files = _check_inputs(in_dir, out_dir)
    cfg, r, model, normalizer = load_round(cfg, which)
    fmodel = with_features(model)
    feats = []
    for xb, _, ok in image_dataset(files, cfg.img_rows, cfg.img_cols, cfg.color, cfg.batch_size):
        if not ok.numpy().all():
            raise DsalError(f"an image in {in_dir} could not be decoded; replace or remove it")
        feats.append(fmodel(normalizer(xb), training=False)["features"].numpy())
    out_dir.mkdir(parents=True, exist_ok=True)
    np.save(out_dir / f"{split}-features.npy", np.concatenate(feats).astype(np.float32))
    (out_dir / f"{split}-names.txt").write_text("".join(f"{f.stem}\n" for f in files))
    if labels is not None:
        table = pd.read_csv(labels)
        table = table.set_index(table.columns[0])
        cols = columns or list(table.columns)
        missing = [c for c in cols if c not in table.columns]
        absent = [f.stem for f in files if f.stem not in table.index]
        if missing or absent:
            raise DsalError(f"{labels}: columns {missing} / images {absent[:3]} not found; "
                            f"columns are {list(table.columns)}")
        ind = table.loc[[f.stem for f in files], cols].to_numpy() > 0.5
        np.save(out_dir / f"{split}-targets.npy", np.where(ind.any(1), ind.argmax(1) + 1, 0).astype(np.int64))
    log(f"wrote {len(files)} feature vectors ({feats[0].shape[1]} values each, round {r}) to {out_dir}")
    return out_dir
