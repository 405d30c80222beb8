"""`Booster`: BoostMIS's semi-supervised update of a classification head on feature vectors
(`dsal classify`, docs/methods.md#boostmis-on-feature-vectors); not a segmentation trainer, so not in `TRAINERS`.

Batches are `((x_unlabelled,), (x_labelled, y_labelled))`, features `[B,D]`, labels `[B]` int; a
benchmark that knows the unlabelled targets may pass `((x_unlabelled, y_hidden), ...)`: they are
never learned, only tallied (`pl_kept`, `pl_correct`: kept pseudo labels and right ones per class).
Each step the labeller (`labeller`: the online `head`, or `ema_head`) gives hard labels on a weak
view of the unlabelled batch (Gaussian noise 0.05 on standardised features), optionally
distribution-aligned (`p_target`), kept where the confidence reaches the cutoff of the label's class
(`rule.cutoffs`, a `classify.PSEUDO_RULES` class or a `LearningStatus`), and the head learns them
by CE on a strong view (feature dropout 0.3, noise 0.3) beside CE on the labelled batch; before
update `warmup` (counted from `step0`) the pseudo-label term is off. With `weight_decay` the
kernels' gradients get `wd * w` added (PyTorch's coupled L2, what the authors' SGD does; biases
excluded). Then `ema_head` moves after `head` with Mean Teacher's warm-up `min(1 - 1/(step+1), ema)`;
`step0` = the updates of earlier rounds when the same two heads train on through the rounds (0 when
each round starts from the first weights, BOOSTMIS_FRESH_HEAD).

`Booster.Settings` holds the choices where the authors' code and today's defaults differ
(issue 27.2); `bench/bench_boostmis.py --ablation` turns each on alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from ..strategies.boostmis import align_distribution, confident
from .base import ema_update, mean_teacher_decay
from .boostmis import OPTIMIZERS, BoostMISTrainer, choice, l2_gradients

WEAK_NOISE = 0.05  # weak view: x + 0.05 N(0, 1)
DROP = 0.3  # strong view: each feature zeroed with probability 0.3 (the rest scaled by 1 / 0.7) ...
STRONG_NOISE = 0.3  # ... plus 0.3 N(0, 1)
ALIGN_MOMENTUM = 0.999  # distribution alignment: p_model's running mean (ReMixMatch / TorchSSL)


def random_initial(targets: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` sorted indices drawn without replacement, whatever their classes (ours)."""
    return np.sort(rng.choice(len(targets), n, replace=False))


def balanced_initial(targets: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` sorted indices with the same count per class (the authors' first labels): `n // C` each, the
    remainder to the classes in a random order; a class with too few samples gives all it has and the
    others fill its share, as evenly as the pool allows."""
    y = np.asarray(targets)
    classes = np.unique(y)
    pools = {c: rng.permutation(np.flatnonzero(y == c)) for c in classes}
    quota = {c: 0 for c in classes}
    n = min(int(n), len(y))
    while sum(quota.values()) < n:
        open_ = [c for c in classes if quota[c] < len(pools[c])]
        share, extra = divmod(n - sum(quota.values()), len(open_))
        order = rng.permutation(open_)
        for i, c in enumerate(order):
            quota[c] = min(len(pools[c]), quota[c] + share + (i < extra))
    return np.sort(np.concatenate([pools[c][:quota[c]] for c in classes]).astype(np.int64))


INITIAL_SETS = {"random": random_initial, "balanced": balanced_initial}  # BOOSTMIS_INITIAL: the first expert labels


def pseudo_label_tally(cls, keep, targets, n_classes: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Per pseudo-label class [C]: kept labels, and kept labels equal to the (hidden) target."""
    cls = tf.reshape(tf.cast(cls, tf.int32), [-1])
    keep = tf.reshape(tf.cast(keep, tf.float32), [-1])
    right = keep * tf.cast(tf.equal(cls, tf.reshape(tf.cast(targets, tf.int32), [-1])), tf.float32)
    return (tf.math.unsorted_segment_sum(keep, cls, n_classes),
            tf.math.unsorted_segment_sum(right, cls, n_classes))


class Booster(keras.Model):
    """Trains `head` (online) with `fit` and keeps `ema_head` (evaluated) after it.
    Heads map `[N,D]` to `{"prob": [N,C] softmax, "features": [N,H]}`."""

    @dataclass(frozen=True)
    class Settings(BoostMISTrainer.Settings):  # the segmentation trainer's (META_SIZE does not apply here)
        # on feature vectors the defaults are the configuration that beat the no-pseudo-label baseline in issue
        # 27.2's ablation (bench/results/boostmis_ablation.md): a fresh head each round, the global cutoff, SGD
        boostmis_optimizer: str = "sgd"  # "sgd": 0.03, momentum 0.9, weight decay 5e-4 (authors') or "adam" 1e-3
        boostmis_initial: str = "random"  # first expert labels: "random" or "balanced" per class (authors' code)
        boostmis_align: bool = False  # distribution alignment of the pseudo labeller (authors' code: off)
        boostmis_fresh_head: bool = True  # each round from the run's first weights; False: one head through them

        def check(self):
            super().check()
            choice("boostmis_initial", self.boostmis_initial, INITIAL_SETS)

    def __init__(self, head: keras.Model, ema_head: keras.Model, rule, seed: int, step0: int = 0,
                 settings: Booster.Settings | None = None, p_target=None):
        """`settings`: EMA_DECAY, BOOSTMIS_LABELLER, BOOSTMIS_WARMUP and BOOSTMIS_OPTIMIZER's weight decay (the
        optimizer itself is `compile`'s); `step0`: updates before this round that the warm-up counts (0: it
        starts again)."""
        super().__init__()
        s = settings if settings is not None else Booster.Settings()
        s.check()
        self.head, self.ema_head, self.rule = head, ema_head, rule
        self.ema, self.step0, self.warmup = float(s.ema_decay), int(step0), int(s.boostmis_warmup)
        self.weight_decay = float(OPTIMIZERS[s.boostmis_optimizer][2])
        self.use_ema_labels = s.boostmis_labeller == "ema"
        self.gen = keras.random.SeedGenerator(seed)
        self.tracker = keras.metrics.Mean(name="loss")
        self.kept = keras.metrics.Mean(name="kept_fraction")
        n_classes = int(rule.n_classes)
        self.p_target = None if p_target is None else tf.constant(np.asarray(p_target, np.float32))
        self.p_model = tf.Variable(tf.zeros([n_classes]), trainable=False, name="p_model")
        self.pl_kept = tf.Variable(tf.zeros([n_classes]), trainable=False, name="pl_kept")
        self.pl_correct = tf.Variable(tf.zeros([n_classes]), trainable=False, name="pl_correct")
        self.n_classes = n_classes

    @property
    def metrics(self):
        return [self.tracker, self.kept]

    def labeller_prob(self, x, update: bool = True):
        """The labeller's class probabilities [N,C] on `x`, distribution-aligned when `p_target` is set
        (`update`: p_model moves, starting at the first batch's mean)."""
        labeller = self.ema_head if self.use_ema_labels else self.head
        p = tf.stop_gradient(labeller(x, training=False)["prob"])
        if self.p_target is None:
            return p
        mean = tf.reduce_mean(p, axis=0)
        p_model = tf.where(tf.reduce_sum(self.p_model) > 0,
                           ALIGN_MOMENTUM * self.p_model + (1.0 - ALIGN_MOMENTUM) * mean, mean)
        if update:
            self.p_model.assign(p_model)
        return align_distribution(p, p_model, self.p_target)

    def pseudo_labels(self, x, update: bool = True):
        """Hard labels [N] of the labeller on `x` [N,D] and their keep mask [N] (`update`: the rule counts them)."""
        p = self.labeller_prob(x, update)
        conf, cls = tf.reduce_max(p, axis=1), tf.argmax(p, axis=1)
        return cls, confident(conf, cls, self.rule.cutoffs(conf, cls, update))

    def train_step(self, data):
        (x_u, *hidden), (x_l, y_l) = data
        cls, keep = self.pseudo_labels(x_u + WEAK_NOISE * keras.random.normal(tf.shape(x_u), seed=self.gen))
        step = self.optimizer.iterations + self.step0
        keep = keep * tf.cast(step >= self.warmup, tf.float32)
        if hidden:
            kept, right = pseudo_label_tally(cls, keep, hidden[0], self.n_classes)
            self.pl_kept.assign_add(kept)
            self.pl_correct.assign_add(right)
        drop = tf.cast(keras.random.uniform(tf.shape(x_u), seed=self.gen) > DROP, tf.float32) / (1.0 - DROP)
        strong = x_u * drop + STRONG_NOISE * keras.random.normal(tf.shape(x_u), seed=self.gen)
        with tf.GradientTape() as tape:
            sup = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y_l, self.head(x_l)["prob"]))
            ce_u = keras.losses.sparse_categorical_crossentropy(cls, self.head(strong)["prob"])
            loss = sup + tf.reduce_mean(keep * ce_u)
        theta = self.head.trainable_variables
        grads = l2_gradients(tape.gradient(loss, theta), theta, self.weight_decay)
        decay = mean_teacher_decay(step, self.ema)  # read before this update
        self.optimizer.apply_gradients(zip(grads, theta))
        ema_update(self.ema_head, self.head, decay)
        self.tracker.update_state(loss)
        self.kept.update_state(tf.reduce_mean(keep))
        return {m.name: m.result() for m in self.metrics}
