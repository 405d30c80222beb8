"""Semi-supervised trainers on the whole pool: BCP's box and copy-paste math on hand-made arrays,
the EMA teacher, and both trainers through the loop."""

import math

import numpy as np
import pytest
import tensorflow as tf

from dsal_tf.trainers.semisup import box_mask, copy_paste, largest_component, paste_labelled


def test_box_mask_is_one_box_of_two_thirds_of_each_side_per_sample():
    m = box_mask(tf.zeros([5, 9, 12, 1]), 2 / 3, tf.constant([3, 4])).numpy()
    assert m.shape == (5, 9, 12, 1) and set(np.unique(m)) == {0.0, 1.0}
    for item in m[..., 0]:
        rows, cols = np.flatnonzero(item.any(1)), np.flatnonzero(item.any(0))
        assert len(rows) == 6 and len(cols) == 8  # round(2/3 * 9), round(2/3 * 12)
        assert item.sum() == 6 * 8 and np.all(np.diff(rows) == 1) and np.all(np.diff(cols) == 1)
    m3 = box_mask(tf.zeros([2, 6, 6, 3, 1]), 0.5, tf.constant([1, 2])).numpy()
    assert m3.shape == (2, 6, 6, 3, 1) and m3[0].sum() == 3 * 3 * 2  # 3D: round(0.5 * 3) = 2


def test_copy_paste_mixes_both_ways_with_the_matching_targets_and_weights():
    """One 1x4 'image' per batch: box = pixels 1-2. Hand-computed."""
    m = tf.constant([[[[0.0], [1.0], [1.0], [0.0]]]])
    x_l, y_l = tf.constant([[[[1.0], [2.0], [3.0], [4.0]]]]), tf.constant([[[[1.0], [1.0], [0.0], [0.0]]]])
    x_u, y_u = tf.constant([[[[10.0], [20.0], [30.0], [40.0]]]]), tf.constant([[[[0.0], [0.0], [1.0], [1.0]]]])
    x, t, w = (v.numpy()[:, 0, :, 0] for v in copy_paste(x_l, y_l, x_u, y_u, m, 0.5))
    np.testing.assert_array_equal(x, [[10, 2, 3, 40], [1, 20, 30, 4]])  # labelled in the box / unlabelled in it
    np.testing.assert_array_equal(t, [[0, 1, 0, 1], [1, 0, 1, 0]])
    np.testing.assert_array_equal(w, [[0.5, 1, 1, 0.5], [1, 0.5, 0.5, 1]])  # expert pixels 1, teacher's 0.5


def test_the_out_mix_pastes_each_unlabelled_image_into_another_labelled_one():
    """Batch of 2 (1x4 'images', box = pixels 1-2): the in-mix pairs (l0, u0), (l1, u1); the out-mix
    pastes u0 into l1 and u1 into l0 (the labelled batch rolled by one), so x_in + x_out != x_l + x_u."""
    m = tf.constant([[[[0.0], [1.0], [1.0], [0.0]]]] * 2)
    x_l = tf.constant([[[[1.0], [2.0], [3.0], [4.0]]], [[[5.0], [6.0], [7.0], [8.0]]]])
    y_l = tf.constant([[[[1.0], [1.0], [1.0], [1.0]]], [[[0.0], [0.0], [0.0], [0.0]]]])
    x_u = tf.constant([[[[10.0], [20.0], [30.0], [40.0]]], [[[50.0], [60.0], [70.0], [80.0]]]])
    y_u = tf.constant([[[[0.0], [1.0], [0.0], [1.0]]], [[[1.0], [0.0], [1.0], [0.0]]]])
    x, t, w = (v.numpy()[:, 0, :, 0] for v in copy_paste(x_l, y_l, x_u, y_u, m, 0.5))
    np.testing.assert_array_equal(x, [[10, 2, 3, 40], [50, 6, 7, 80],    # in: l_i in the box of u_i
                                      [5, 20, 30, 8], [1, 60, 70, 4]])   # out: u_0 in l_1, u_1 in l_0
    np.testing.assert_array_equal(t, [[0, 1, 1, 1], [1, 0, 0, 0], [0, 1, 0, 0], [1, 0, 1, 1]])
    np.testing.assert_array_equal(w[2:], [[1, 0.5, 0.5, 1]] * 2)


def test_pre_training_mix_pastes_each_labelled_image_into_the_next():
    """BCP's pre-training (the authors' code): labelled pairs only. Batch of 2 (1x4 'images', box = pixels
    1-2): item 0 takes item 1's box, item 1 item 0's, with their masks."""
    m = tf.constant([[[[0.0], [1.0], [1.0], [0.0]]]] * 2)
    x_l = tf.constant([[[[1.0], [2.0], [3.0], [4.0]]], [[[5.0], [6.0], [7.0], [8.0]]]])
    y_l = tf.constant([[[[1.0], [1.0], [0.0], [0.0]]], [[[0.0], [0.0], [1.0], [1.0]]]])
    x, y = (v.numpy()[:, 0, :, 0] for v in paste_labelled(x_l, y_l, m))
    np.testing.assert_array_equal(x, [[1, 6, 7, 4], [5, 2, 3, 8]])
    np.testing.assert_array_equal(y, [[1, 0, 1, 0], [0, 1, 0, 1]])


def test_bcp_pre_training_learns_the_mixed_labelled_pairs():
    """With `BCP_PRETRAIN_MIX` the pre-training loss is the plain supervised loss of the pasted pair (the box
    this step draws); without it, of the labelled batch itself; the unlabelled batch never enters."""
    import keras

    from dsal_tf.model import build_unet
    from dsal_tf.trainers.bcp import BCP
    from dsal_tf.trainers.semisup import PoolTeacherTrainer

    x_l = tf.random.stateless_normal((2, 16, 16, 1), (1, 2))
    y_l = tf.cast(x_l > 0, tf.float32)
    x_u = tf.random.stateless_normal((2, 16, 16, 1), (3, 4))

    def trainer(mix):
        keras.utils.set_random_seed(0)
        return BCP(build_unet((16, 16, 1), base_filters=2, depth=3), BCP.Settings(bcp_pretrain_mix=mix), seed=3,
                   total_steps=4)

    mixed = trainer(True)
    loss = mixed.supervised(((x_l, y_l), x_u))[0]
    again = trainer(True)  # the same seed: the same box, drawn by hand
    x, y = paste_labelled(x_l, y_l, box_mask(y_l, again.settings.bcp_box, again.stamp()))
    assert not np.array_equal(x.numpy(), x_l.numpy())
    np.testing.assert_allclose(loss, PoolTeacherTrainer.supervised(again, ((x, y), None))[0], rtol=1e-6)
    plain = trainer(False).supervised(((x_l, y_l), x_u))[0]  # each loss from a fresh trainer: the same draws
    np.testing.assert_allclose(plain, PoolTeacherTrainer.supervised(trainer(False), ((x_l, y_l), None))[0],
                               rtol=1e-6)
    assert abs(float(loss) - float(plain)) > 1e-4


@pytest.mark.parametrize("from_scratch, step, expected", [
    (True, 0, math.exp(-5)), (True, 49, math.exp(-5)),  # pre-training (50 of 100 steps): the ramp waits
    (True, 50, math.exp(-5)), (True, 50 + 7.5, math.exp(-5 * 0.25)), (True, 65, 1.0), (True, 99, 1.0),
    (False, 0, math.exp(-5)), (False, 15, math.exp(-5 * 0.25)), (False, 30, 1.0)])
def test_the_mean_teacher_ramp_starts_after_the_pre_training(from_scratch, step, expected):
    """MT_RAMPUP = 0.3 of the steps that use the pool: of the 50 after pre-training from scratch (a ramp
    of 15 steps from step 50), of all 100 for a model that goes on (30 steps from step 0)."""
    from dsal_tf.model import build_unet
    from dsal_tf.trainers.mean_teacher import MeanTeacher

    t = MeanTeacher(build_unet((16, 16, 1), base_filters=2, depth=3),
                    MeanTeacher.Settings(semisup_pretrain=0.5, mt_rampup=0.3, mt_consistency=2.0), seed=0,
                    total_steps=100, from_scratch=from_scratch)
    np.testing.assert_allclose(t.consistency_weight(step).numpy(), 2.0 * expected, rtol=1e-5)


def test_largest_component_keeps_the_biggest_blob_per_item():
    m = np.zeros((2, 6, 6, 1), np.float32)
    m[0, 0:2, 0:2] = 1
    m[0, 3:6, 3:6] = 1
    out = largest_component(m)
    assert out[0].sum() == 9 and out[0, 4, 4, 0] == 1 and out[0, 0, 0, 0] == 0
    assert out[1].sum() == 0


def test_pool_trainers_default_to_no_whole_image_pseudo_labels():
    from dsal_tf.components import build, pseudo_name
    from dsal_tf.config import resolve

    for trainer in ("bcp", "mean_teacher"):
        cfg = resolve({"trainer": trainer})
        assert pseudo_name(cfg) == "none" and build(cfg).pseudo.name == "none"
        assert pseudo_name(cfg.replace(pseudo_policy="confidence")) == "confidence"  # asked for: kept
    assert pseudo_name(resolve({})) == "confidence"


BCP = dict(trainer="bcp", nb_iterations=1, query_strategy="entropy")


@pytest.fixture(scope="session")  # session: built once per (xdist) process
def bcp_run(tiny_data, tmp_path_factory):
    """One finished `bcp` run (rounds 0 and 1), trained once for this module's slow tests: read it, or
    copy it with `copy_run` before changing it."""
    from dsal_tf.active import run_active_learning
    from dsal_tf.config import resolve

    from .conftest import tiny_values

    cfg = resolve(tiny_values(tiny_data, tmp_path_factory.mktemp("bcp"), **BCP))
    run_active_learning(cfg, log=lambda m: None)
    return cfg


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["bcp", "mean_teacher"])
def test_semisupervised_trainers_run_the_loop_and_save_the_teacher(trainer, request, tiny_data, tmp_path):
    """Every strategy combines with either trainer; the checkpoint is the EMA teacher, a plain U-Net."""
    import keras

    from dsal_tf.active import run_active_learning
    from dsal_tf.config import resolve
    from dsal_tf.run import Run

    from .conftest import tiny_values

    if trainer == "bcp":
        cfg = request.getfixturevalue("bcp_run")  # the same settings, shared with the tests below
    else:
        cfg = resolve(tiny_values(tiny_data, tmp_path, **{**BCP, "trainer": trainer}))
        run_active_learning(cfg, log=lambda m: None)
    run = Run(cfg.run_dir)
    assert run.completed() == [0, 1]
    history = (run.round_dir(1) / "history.csv").read_text()
    assert "val_main_dice" in history
    model = keras.models.load_model(run.checkpoint(1), compile=False)
    assert set(model.output_names) >= {"main", "side_1", "side_2"}
    assert not list(run.round_dir(1).glob("pseudo/*"))  # no whole-image pseudo labels under pool trainers


def test_halving_the_unlabelled_weight_halves_the_unlabelled_term():
    """BCE is a pixel mean: with the expert-labelled pixels predicted exactly, the whole loss is the
    teacher-labelled pixels' term, linear in BCP_UNLABELLED_WEIGHT."""
    from dsal_tf.trainers.base import pixel_weighted_loss

    m = tf.constant([[[[1.0], [1.0], [0.0], [0.0]]]])
    y_l = tf.constant([[[[1.0], [0.0], [1.0], [1.0]]]])
    y_u = tf.constant([[[[0.0], [1.0], [1.0], [0.0]]]])
    x = tf.zeros_like(m)
    _, t, w = copy_paste(x, y_l, x, y_u, m, 0.5)
    _, _, w_half = copy_paste(x, y_l, x, y_u, m, 0.25)
    p = tf.where(w == 1.0, t * 0.999999 + 0.0000005, 0.3 * tf.ones_like(t))  # exact where the expert labels
    full, half = pixel_weighted_loss(t, p, w, "bce").numpy(), pixel_weighted_loss(t, p, w_half, "bce").numpy()
    np.testing.assert_allclose(half, full / 2, rtol=1e-4)


def test_the_teacher_follows_the_student_by_ema():
    import keras

    from dsal_tf.model import build_unet
    from dsal_tf.trainers.bcp import BCP

    teacher = build_unet((16, 16, 1), base_filters=2, depth=3)
    trainer = BCP(teacher, BCP.Settings(ema_decay=0.9), seed=0)
    trainer.compile(optimizer=keras.optimizers.Adam(1e-2))
    before = [w.copy() for w in teacher.get_weights()]
    x_l = tf.random.stateless_normal((2, 16, 16, 1), (1, 2))
    y_l = tf.cast(x_l > 0, tf.float32)
    x_u = tf.random.stateless_normal((2, 16, 16, 1), (3, 4))
    trainer.train_step(((x_l, y_l), x_u))  # step 0: warm-up decay 0, the teacher becomes the student
    np.testing.assert_allclose(teacher.get_weights()[0], trainer.student.get_weights()[0], rtol=1e-6)
    assert not np.allclose(teacher.get_weights()[0], before[0])
    t0, s_before = teacher.get_weights()[0].copy(), trainer.student.get_weights()[0].copy()
    trainer.train_step(((x_l, y_l), x_u))  # step 1: decay min(1 - 1/2, 0.9) = 0.5
    s1 = trainer.student.get_weights()[0]
    np.testing.assert_allclose(teacher.get_weights()[0], 0.5 * t0 + 0.5 * s1, rtol=1e-5, atol=1e-7)
    assert not np.allclose(s1, s_before)


@pytest.mark.slow
def test_hidden_masks_of_unlabelled_images_never_reach_training(bcp_run, tmp_path):
    """The teacher labels the pool: replacing every mask the oracle has not revealed with a wrong one
    changes nothing in training (round 0 of `bcp`, bit for bit, against the shared run's round 0)."""
    import shutil

    import cv2
    import keras

    from dsal_tf.active import run_active_learning
    from dsal_tf.pool import Pool
    from dsal_tf.run import Run

    wrong = tmp_path / "wrong"
    shutil.copytree(bcp_run.data_path, wrong)
    labelled = set(Pool.load(Run(bcp_run.run_dir).pool_file(0)).labelled)
    names = sorted(p for p in (wrong / "trainGT").iterdir())
    assert 0 < len(labelled) < len(names)
    for i, mask in enumerate(names):
        if i not in labelled:
            img = cv2.imread(str(mask), cv2.IMREAD_GRAYSCALE)
            cv2.imwrite(str(mask), 255 - img)  # every hidden mask inverted
    cfg = bcp_run.replace(data_path=str(wrong), exp_dir=str(tmp_path / "exp"), nb_iterations=0)
    run_active_learning(cfg, log=lambda m: None)
    assert np.array_equal(Pool.load(Run(cfg.run_dir).pool_file(0)).labelled_map,
                          Pool.load(Run(bcp_run.run_dir).pool_file(0)).labelled_map)
    weights = [keras.models.load_model(Run(c.run_dir).checkpoint(0), compile=False).get_weights()
               for c in (bcp_run, cfg)]
    assert all(np.array_equal(a, b) for a, b in zip(*weights))


@pytest.mark.slow
def test_a_bcp_round_restarted_gives_the_uninterrupted_result(bcp_run, tmp_path):
    """Rounds are atomic: a round re-run after an interruption (here: resumed in a new run folder from
    the shared run's round 0) gives the same teacher as the uninterrupted run."""
    import keras

    from dsal_tf.active import run_active_learning
    from dsal_tf.run import Run

    from .conftest import copy_run

    resumed = copy_run(bcp_run, tmp_path, keep_rounds=1)
    run_active_learning(resumed, log=lambda m: None)
    assert Run(resumed.run_dir).completed() == [0, 1]
    a = keras.models.load_model(Run(bcp_run.run_dir).checkpoint(1), compile=False).get_weights()
    b = keras.models.load_model(Run(resumed.run_dir).checkpoint(1), compile=False).get_weights()
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("name", ["bcp", "mean_teacher"])
def test_a_new_model_learns_the_labels_alone_first_then_the_teacher_follows_from_a_copy(name):
    """SEMISUP_PRETRAIN = 0.5 of a 4-step fit from scratch: steps 0-1 train on the labelled batch only (the
    unlabelled batch changes nothing) with the teacher a copy of the student; step 2 is the method's own
    objective with the teacher at EMA_DECAY from that copy. A trained model (a later round) starts at once."""
    import keras

    from dsal_tf.model import build_unet
    from dsal_tf.trainers import TRAINERS

    cls = TRAINERS[name]
    x_l = tf.random.stateless_normal((2, 16, 16, 1), (1, 2))
    y_l = tf.cast(x_l > 0, tf.float32)

    def trainer_after(x_u, steps, from_scratch=True):
        keras.utils.set_random_seed(0)
        teacher = build_unet((16, 16, 1), base_filters=2, depth=3)
        t = cls(teacher, cls.Settings(ema_decay=0.9, semisup_pretrain=0.5), seed=0, total_steps=4,
                from_scratch=from_scratch)
        t.compile(optimizer=keras.optimizers.SGD(0.1))
        for _ in range(steps):
            t.train_step(((x_l, y_l), x_u))
        return t

    zeros, noise = tf.zeros((2, 16, 16, 1)), 50.0 * tf.random.stateless_normal((2, 16, 16, 1), (5, 6))
    a, b = trainer_after(zeros, 2), trainer_after(noise, 2)
    assert a.pretrain_steps == 2
    for wa, wb, wt in zip(a.student.get_weights(), b.student.get_weights(), a.segmenter.get_weights()):
        np.testing.assert_array_equal(wa, wb)  # the unlabelled batch did not reach the loss
        np.testing.assert_array_equal(wt, wa)  # the teacher is the student's copy
    t_before = a.segmenter.get_weights()[0].copy()
    a.train_step(((x_l, y_l), zeros))  # step 2: the method, EMA 0.9 from the copy
    np.testing.assert_allclose(a.segmenter.get_weights()[0], 0.9 * t_before + 0.1 * a.student.get_weights()[0],
                               rtol=1e-5, atol=1e-7)
    c, d = trainer_after(zeros, 1, from_scratch=False), trainer_after(noise, 1, from_scratch=False)
    assert c.pretrain_steps == 0
    assert not all(np.array_equal(wc, wd) for wc, wd in zip(c.student.get_weights(), d.student.get_weights()))
