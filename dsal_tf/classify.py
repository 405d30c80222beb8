"""`dsal classify`: BoostMIS's closed loop on feature vectors (METHODS.md section 6), and
`dsal features`: the feature files from an image folder with a trained run's encoder.

Input folder: `train-`, `val-`, `test-features.npy` (N x D float) and `-targets.npy` (N int,
classes 0..C-1), the seed's format. One small MLP head (D -> 128 relu -> C softmax), made once
and trained on through the rounds (Adam 1e-3, batch 64, `steps` updates a round), learns the
labelled training samples plus, with `pseudo` adaptive or fixed, the unlabelled ones: the online
head's hard labels on a weak view (Gaussian noise 0.05 on standardised features), kept where the
confidence reaches the cutoff (adaptive: `strategies.boostmis`, eps_t from the learning status with
N_A = the labels the last round added, and the `threshold` rule; fixed: 0.95, FixMatch), CE of a
strong view (feature dropout 0.3, noise 0.3). An EMA copy (decay 0.99, also kept across rounds) is
evaluated on the test split; the online head, the pseudo labeller, queries the next K labels:
`boostmis` (VAT and class-balanced density-aware entropy, among samples the pseudo labeller does
not take), `entropy` or `random`. exp/NAME/results.csv: round, n_labelled, n_pseudo (unlabelled
samples the final cutoffs keep), accuracy, macro_f1; learning_curve.png; round_XX.npz (the
labelled indices of round XX and the two heads' weights it starts from) makes the loop resumable.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .data import SPLITS
from .errors import DsalError
from .files import atomic_write, atomic_write_text
from .run import round_name

STRATEGIES = ("boostmis", "random", "entropy")
PSEUDO = ("adaptive", "fixed", "none")
FIXED_TAU = 0.95
FIELDS = ["round", "n_labelled", "n_pseudo", "accuracy", "macro_f1"]


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


def build_head(dim: int, n_classes: int, hidden: int = 128):
    import keras

    inp = keras.Input((dim,), name="features_in")
    h = keras.layers.Dense(hidden, activation="relu", name="hidden")(inp)
    p = keras.layers.Dense(n_classes, activation="softmax", name="prob")(h)
    return keras.Model(inp, {"prob": p, "features": h}, name="mlp_head")


def make_booster(head, ema_head, n_classes: int, pseudo: str, n_active: int, queries: int, ema: float, seed: int,
                 threshold: str = "global", step0: int = 0):
    """A Keras Model whose `train_step` takes `((x_unlabelled,), (x_labelled, y_labelled))` batches;
    it trains `head` (online) and moves `ema_head` after it, with decay `min(1 - 1/(step+1), ema)` (Mean
    Teacher's warm-up; `step0` = the updates of earlier rounds). `n_active`: N_A, the last round's additions."""
    import keras
    import tensorflow as tf

    from .strategies.boostmis import LearningStatus, confident
    from .trainers.base import ema_update, mean_teacher_decay

    class Booster(keras.Model):
        def __init__(self):
            super().__init__()
            self.head, self.ema_head = head, ema_head
            self.gen = keras.random.SeedGenerator(seed)
            self.status = LearningStatus(n_classes, FIXED_TAU, n_active, queries, rule=threshold)
            self.tracker = keras.metrics.Mean(name="loss")
            self.kept = keras.metrics.Mean(name="kept_fraction")

        @property
        def metrics(self):
            return [self.tracker, self.kept]

        def pseudo_labels(self, x, update: bool = True):
            """Hard labels [N] of the online head on `x` [N,D] and their keep mask [N] (`update`: count them)."""
            p = tf.stop_gradient(self.head(x, training=False)["prob"])
            conf, cls = tf.reduce_max(p, axis=1), tf.argmax(p, axis=1)
            tau = tf.fill([n_classes], FIXED_TAU) if pseudo == "fixed" else self.status.thresholds(conf, cls, update)
            return cls, confident(conf, cls, tau)

        def train_step(self, data):
            (x_u,), (x_l, y_l) = data
            unsup_w = 0.0 if pseudo == "none" else 1.0
            cls, keep = self.pseudo_labels(x_u + 0.05 * keras.random.normal(tf.shape(x_u), seed=self.gen))
            drop = tf.cast(keras.random.uniform(tf.shape(x_u), seed=self.gen) > 0.3, tf.float32) / 0.7
            strong = x_u * drop + 0.3 * keras.random.normal(tf.shape(x_u), seed=self.gen)
            with tf.GradientTape() as tape:
                sup = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y_l, self.head(x_l)["prob"]))
                ce_u = keras.losses.sparse_categorical_crossentropy(cls, self.head(strong)["prob"])
                loss = sup + unsup_w * tf.reduce_mean(keep * ce_u)
            grads = tape.gradient(loss, self.head.trainable_variables)
            decay = mean_teacher_decay(self.optimizer.iterations + step0, ema)  # read before this update
            self.optimizer.apply_gradients(zip(grads, self.head.trainable_variables))
            ema_update(self.ema_head, self.head, decay)
            self.tracker.update_state(loss)
            self.kept.update_state(unsup_w * tf.reduce_mean(keep))
            return {m.name: m.result() for m in self.metrics}

    return Booster()


def query(strategy: str, booster, x_unl: np.ndarray, taken: np.ndarray, n: int, rng, xi: float, eps: float,
          knn: int, seed: int) -> np.ndarray:
    """Positions into `x_unl` of the next `n` samples for the oracle."""
    import tensorflow as tf

    from .strategies.boostmis import boostmis_select, categorical_kl, knn_density, vat_score

    n = min(n, len(x_unl))
    if strategy == "random":
        return rng.permutation(len(x_unl))[:n]
    out = booster.head(x_unl, training=False)
    p = out["prob"].numpy()
    ent = -np.sum(p * np.log(np.clip(p, 1e-7, 1.0)), axis=1)
    if strategy == "entropy":
        return np.argsort(-ent, kind="stable")[:n]

    def prob_fn(z):
        return booster.head(z, training=False)["prob"]

    vat = vat_score(prob_fn, tf.constant(x_unl), xi, eps, seed=(seed, 1), kl=categorical_kl).numpy()
    dae = np.full(p.shape, np.nan)
    dae[np.arange(len(p)), p.argmax(1)] = ent * knn_density(out["features"].numpy(), knn)
    return boostmis_select(vat, dae, taken, n)


def save_round(path: Path, labelled: np.ndarray, head, ema_head) -> None:
    """round_XX.npz: the round's labelled indices and the weights it starts from (online and EMA head)."""
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


def run_classify(features: str | Path, run_dir: str | Path, labeled: int, queries: int, iterations: int,
                 strategy: str = "boostmis", pseudo: str = "adaptive", seed: int = 0, steps: int = 200,
                 batch_size: int = 64, xi: float = 10.0, eps: float = 1.0, knn: int = 10, log=print,
                 threshold: str = "global") -> Path:
    """Run or resume the loop; returns `run_dir` (results.csv, learning_curve.png, round_XX.npz).
    `threshold`: the adaptive cutoff rule, `strategies.boostmis.THRESHOLDS` (BOOSTMIS_THRESHOLD)."""
    import keras
    import pandas as pd
    import tensorflow as tf

    from .strategies.boostmis import THRESHOLDS

    if strategy not in STRATEGIES or pseudo not in PSEUDO or threshold not in THRESHOLDS:
        raise DsalError(f"--strategy must be one of {STRATEGIES}, --pseudo one of {PSEUDO} and the threshold "
                        f"rule one of {sorted(THRESHOLDS)}")
    if labeled < 1 or queries < 0 or iterations < 0 or steps < 1:
        raise DsalError("--labeled >= 1, --queries >= 0, --iterations >= 0 and --steps >= 1")
    data = load_feature_splits(features)
    (x, y), (xt, yt) = data["train"], data["test"]
    n_classes = int(max(y.max(), data["val"][1].max(), yt.max())) + 1
    if labeled > len(x):
        raise DsalError(f"--labeled {labeled} exceeds the {len(x)} training samples")
    mean, std = x.mean(0), x.std(0) + 1e-6
    x, xt = (x - mean) / std, (xt - mean) / std
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    settings = dict(features=str(Path(features).resolve()), labeled=labeled, queries=queries, strategy=strategy,
                    pseudo=pseudo, seed=seed, steps=steps, batch_size=batch_size, xi=xi, eps=eps, knn=knn,
                    threshold=threshold)
    sfile = run / "settings.json"
    if sfile.is_file() and json.loads(sfile.read_text()) != settings:
        raise DsalError(f"{run} was started with other settings ({sfile}); use another --exp or delete it")
    atomic_write_text(sfile, json.dumps(settings, indent=2))
    csv = run / "results.csv"
    rows = pd.read_csv(csv).to_dict("records") if csv.is_file() else []
    first = run / f"{round_name(0)}.npz"
    if not first.is_file():
        start = np.sort(np.random.default_rng([seed, 0]).choice(len(x), labeled, replace=False))
        atomic_write(first, lambda tmp: np.savez(tmp, labelled=start))
    keras.utils.set_random_seed(seed * 1000)
    head = build_head(x.shape[1], n_classes)  # one head through the rounds, not a fresh one each round
    ema_head = keras.Model.from_config(head.get_config())
    ema_head.set_weights(head.get_weights())
    ema_head.trainable = False
    for r in range(len(rows), iterations + 1):
        labelled = load_round(run / f"{round_name(r)}.npz", head, ema_head)
        n_added = len(labelled) - len(load_round(run / f"{round_name(r - 1)}.npz")) if r else 0  # N_A
        unl = np.setdiff1d(np.arange(len(x)), labelled)
        keras.utils.set_random_seed(seed * 1000 + r)
        booster = make_booster(head, ema_head, n_classes, pseudo, n_active=n_added, queries=max(queries, 1),
                               ema=0.99, seed=seed * 1000 + r, threshold=threshold, step0=r * steps)
        booster.compile(optimizer=keras.optimizers.Adam(1e-3))
        x_u = x[unl] if len(unl) else x[labelled]
        lab = tf.data.Dataset.from_tensor_slices((x[labelled], y[labelled])).repeat().shuffle(4096, seed=seed)
        ulb = tf.data.Dataset.from_tensor_slices((x_u,)).repeat().shuffle(4096, seed=seed + 1)
        ds = tf.data.Dataset.zip((ulb.batch(batch_size), lab.batch(batch_size))).take(steps)
        booster.fit(ds, epochs=1, verbose=0, shuffle=False)  # the datasets shuffle
        pred = ema_head(xt, training=False)["prob"].numpy().argmax(1)
        taken = np.zeros(len(unl), bool)
        if pseudo != "none" and len(unl):
            taken = booster.pseudo_labels(x[unl], update=False)[1].numpy() > 0
        # the next round's labels are chosen even after the last round, so more --iterations resume from here
        rng = np.random.default_rng([seed, r + 1])
        picks = query(strategy, booster, x[unl], taken, queries, rng, xi, eps, knn, seed) if len(unl) else unl
        save_round(run / f"{round_name(r + 1)}.npz", np.sort(np.r_[labelled, unl[picks]]), head, ema_head)
        rows.append(dict(round=r, n_labelled=len(labelled), n_pseudo=int(taken.sum()),
                         accuracy=round(float(np.mean(pred == yt)), 5),
                         macro_f1=round(macro_f1(yt, pred, n_classes), 5)))
        table = pd.DataFrame(rows, columns=FIELDS)
        atomic_write(csv, lambda tmp, table=table: table.to_csv(tmp, index=False))
        log(f"round {r}: {len(labelled)} labelled, {int(taken.sum())} pseudo, accuracy {rows[-1]['accuracy']:.4f}, "
            f"macro F1 {rows[-1]['macro_f1']:.4f}")
    _plot(rows, run / "learning_curve.png", f"{strategy} / pseudo {pseudo}")
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
