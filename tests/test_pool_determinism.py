"""The pool trainers (`bcp`, `mean_teacher`) repeat themselves from process to process, as plain training does.

Their step used to hold both objectives in one graph, `tf.cond(step < pretrain_steps, supervised, objective)`.
On CPU with oneDNN and two or more threads, that graph rounded differently from one process to the next
(the same process repeated itself): gradients differed in the last bits already in the
first pre-training step, and 500 steps made that 0.03 of validation Dice on the hippocampus volumes, in 3D
and in 2D alike, so runs of the same seed (and resumed rounds) did not agree. The same objectives traced
alone were bit-identical across processes (`python bench/pool_determinism_probe.py`:
before the fix 3 distinct results over 4 processes at the hippocampus size, 2 over 4 at ISIC's; after
it 1; a two-process test would catch it only some of the time). Now each phase is its own traced step
(`PoolTeacherTrainer.make_train_function`), switched at `pretrain_steps`."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from dsal_tf.model import build_unet
from dsal_tf.trainers.bcp import BCP
from dsal_tf.trainers.mean_teacher import MeanTeacher

CONTROL_FLOW = {"If", "StatelessIf", "Switch", "Merge"}


def _batch(spatial=(16, 16), n=2):
    x_l = tf.random.stateless_normal((n, *spatial, 1), (1, 2))
    return (x_l, tf.cast(x_l > 0, tf.float32)), tf.random.stateless_normal((n, *spatial, 1), (3, 4))


def _trainer(cls, total_steps=4, pretrain=0.5):
    keras.utils.set_random_seed(0)
    teacher = build_unet((16, 16, 1), base_filters=2, depth=3)
    trainer = cls(teacher, cls.Settings(semisup_pretrain=pretrain), seed=0, total_steps=total_steps)
    trainer.compile(optimizer=keras.optimizers.Adam(1e-2))
    return trainer


@pytest.mark.parametrize("cls", [BCP, MeanTeacher])
def test_each_traced_pool_step_holds_one_objective_and_no_cond(cls):
    """Pre-training and the method are traced apart: neither graph holds a `tf.cond` (the graph that did
    rounded differently in every process)."""
    trainer = _trainer(cls)
    data = _batch()
    for phase in (True, False):
        trainer.pretraining = phase
        graph = tf.function(trainer.train_step).get_concrete_function(data).graph
        found = {op.type for op in graph.get_operations()} & CONTROL_FLOW
        assert not found, f"pretraining={phase}: the step graph holds {sorted(found)}"


class _Phases(keras.callbacks.Callback):
    """After each step: is the teacher still the student's copy (pre-training: EMA decay 0)?"""

    def __init__(self):
        super().__init__()
        self.copy = []

    def on_train_batch_end(self, batch, logs=None):
        t, s = self.model.segmenter.get_weights(), self.model.student.get_weights()
        self.copy.append(all(np.array_equal(a, b) for a, b in zip(t, s)))


@pytest.mark.compiled
def test_fit_switches_from_pretraining_to_the_method_at_pretrain_steps(cls=BCP):
    """4 steps, SEMISUP_PRETRAIN = 0.5: two steps on the labels alone (the teacher a copy), then two of the
    method (the teacher an EMA of the student); the traced steps switch exactly there (the switch is the
    shared base's: mean_teacher takes it too)."""
    trainer = _trainer(cls)
    assert trainer.pretrain_steps == 2
    phases = _Phases()
    ds = tf.data.Dataset.from_tensors(_batch()).repeat()
    trainer.fit(ds, steps_per_epoch=4, epochs=1, verbose=0, callbacks=[phases])
    assert phases.copy == [True, True, False, False]
    assert trainer.pretraining is False and int(trainer.optimizer.iterations) == 4
