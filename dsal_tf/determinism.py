"""Run-to-run determinism (`DETERMINISTIC`, on by default).

`apply(cfg)` seeds Python's `random`, NumPy, TensorFlow and Keras from the run's seed and turns on
`tf.config.experimental.enable_op_determinism()`, which also makes `tf.data` keep element order
and its random ops repeatable. Shuffles and augmentation already take the run's seed
(`data.make_dataset(seed=...)`, `train.fit(seed=cfg.seed * 1000 + round)`). Two runs of the
same command on the same machine then give bit-identical weights and pool states. The cost is
measured by `bench/bench_determinism.py`.

Op determinism is process-wide and cannot be switched off again once on (TensorFlow has no
public way back), so a process that once ran a deterministic loop stays deterministic.
"""

from __future__ import annotations

import os

import numpy as np


def seed_everything(seed: int) -> None:
    """Python, NumPy, TensorFlow and Keras global seeds (keras.utils.set_random_seed does all four)."""
    import keras

    keras.utils.set_random_seed(int(seed))


def enable_op_determinism() -> None:
    import tensorflow as tf

    os.environ["TF_DETERMINISTIC_OPS"] = "1"
    tf.config.experimental.enable_op_determinism()


def apply(cfg) -> None:
    """Seed everything from `cfg.seed`; with `DETERMINISTIC` also force deterministic ops."""
    seed_everything(cfg.seed)
    if cfg.deterministic:
        enable_op_determinism()


def reset_seed_generators(model, seed: int) -> None:
    """Set the state of every Keras `SeedGenerator` in `model` (dropout's random stream) from `seed`.

    These states are neither saved in checkpoints nor reset by `set_random_seed`, so without this
    a model reloaded on resume (or by a human-oracle round) would draw other dropout masks than
    the model that went straight through."""
    k = 0
    for v in model.non_trainable_variables:
        if v.path.endswith("seed_generator_state"):
            v.assign(np.array([int(seed), k], dtype=v.dtype))
            k += 1
