"""Every registered trainer on 3D volumes (NDHWC): the rank-generic pieces checked by hand against
their 2D forms (a volume reshaped to an image gives the same per-sample values), one or two train
steps of each trainer on a tiny 3D U-Net, the paired sampler routed through the run's space (patches
of volumes in 3D, the 2D stream unchanged), and the loop on a folder of NIfTI volumes with a
re-weighting trainer."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from dsal_tf import losses, trainers
from dsal_tf.model import build_unet
from dsal_tf.trainers import base, boostmis, reweight

from .test_volume_space import PATCH, make_volumes

SPATIAL = (8, 8, 8)  # a depth-3 U-Net halves three times
DS = (0.6, 0.3, 0.1)
HEADS = ("main", "side_1", "side_2")


def _tiny_unet(seed: int = 0, rank: int = 3) -> keras.Model:
    """A tiny U-Net as a volume run builds it (`rank` = 2: its 2D twin)."""
    keras.utils.set_random_seed(seed)
    return build_unet((None,) * rank + (1,), base_filters=2, depth=3, dropout=0.0)


def _volumes(n: int, seed: int, spatial=SPATIAL):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *spatial, 1)).astype("float32")
    y = (rng.random((n, *spatial, 1)) > 0.6).astype("float32")
    return tf.constant(x), tf.constant(y)


def _as_image(t):
    """[N,D,H,W,C] -> [N,D,H*W,C]: the same voxels laid out as a 2D image."""
    s = t.shape
    return tf.reshape(t, (s[0], s[1], s[2] * s[3], s[4]))


# ------------------------------------------------------------------ rank-generic pieces by hand
@pytest.mark.parametrize("loss", ["bce", "dice", "bce_dice"])
def test_pixel_weighted_loss_on_a_volume_is_its_flattened_image(loss):
    rng = np.random.default_rng(0)
    y = tf.constant((rng.random((2, 3, 4, 5, 1)) > 0.5).astype("float32"))
    p = tf.constant(rng.uniform(0.05, 0.95, (2, 3, 4, 5, 1)).astype("float32"))
    r = tf.constant(rng.uniform(0.0, 1.0, (2, 3, 4, 5, 1)).astype("float32"))
    got = base.pixel_weighted_loss(y, p, r, loss).numpy()
    assert got.shape == (2,)
    np.testing.assert_allclose(got, base.pixel_weighted_loss(_as_image(y), _as_image(p), _as_image(r), loss),
                               rtol=1e-6)
    yn, pn, rn = (np.asarray(t, np.float64).reshape(2, -1) for t in (y, p, r))
    bce = np.mean(rn * -(yn * np.log(pn) + (1 - yn) * np.log(1 - pn)), axis=1)
    dice = 1 - (2 * np.sum(rn * yn * pn, 1) + 1) / (np.sum(rn * yn, 1) + np.sum(rn * pn, 1) + 1)
    expected = {"bce": bce, "dice": dice, "bce_dice": bce + dice}[loss]
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_one_voxel_by_hand():
    """A 1x1x2 volume: r = [1, 0] keeps the first voxel only (y 1, p 0.5): BCE ln 2 / 2, Dice 1 - 2/2.5."""
    y = tf.constant([1.0, 0.0])[None, None, None, :, None]  # [1,1,1,2,1]
    p = tf.fill([1, 1, 1, 2, 1], 0.5)
    r = tf.constant([1.0, 0.0])[None, None, None, :, None]
    np.testing.assert_allclose(base.pixel_weighted_loss(y, p, r, "bce"), [np.log(2) / 2], rtol=1e-5)
    np.testing.assert_allclose(base.pixel_weighted_loss(y, p, r, "dice"), [0.2], rtol=1e-6)


@pytest.mark.parametrize("name", ["dice", "bce", "bce_dice"])
def test_per_sample_losses_and_dice_on_a_volume_are_its_flattened_image(name):
    y, _ = _volumes(2, 1, (3, 4, 5))
    p = tf.sigmoid(_volumes(2, 2, (3, 4, 5))[0])
    fn = losses.get_loss(name)
    np.testing.assert_allclose(fn(y, p), fn(_as_image(y), _as_image(p)), rtol=1e-6)
    np.testing.assert_allclose(losses.dice(y, p), losses.dice(_as_image(y), _as_image(p)), rtol=1e-6)


def test_rgm_kernel_term_on_a_volume_is_the_2d_formula():
    """`g_i = mean_{c,o} |sum_voxels f[i,..,c] d[i,..,o]|`: on a volume, the 2D einsum of the reshaped
    image, and the plain NumPy sum."""
    rng = np.random.default_rng(3)
    f = tf.constant(rng.normal(size=(2, 3, 4, 5, 3)).astype("float32"))
    d = tf.constant(rng.normal(size=(2, 3, 4, 5, 1)).astype("float32"))
    got = reweight.kernel_gradient_magnitude(f, d).numpy()
    image_2d = tf.reduce_mean(tf.abs(tf.einsum("nhwc,nhwo->nco", _as_image(f), _as_image(d))), axis=[1, 2])
    np.testing.assert_allclose(got, image_2d, rtol=1e-5)
    fn, dn = np.asarray(f, np.float64).reshape(2, -1, 3), np.asarray(d, np.float64).reshape(2, -1, 1)
    np.testing.assert_allclose(got, np.abs(np.einsum("npc,npo->nco", fn, dn)).mean(axis=(1, 2)), rtol=1e-5)
    # images go through the same flattening: the 2D formula unchanged
    np.testing.assert_allclose(reweight.kernel_gradient_magnitude(_as_image(f), _as_image(d)), image_2d, rtol=1e-6)


def _per_sample_grads(model, x, y, sources):
    loss_fn = base.resolve_loss("bce_dice")
    out = []
    for i in range(len(x)):
        with tf.GradientTape() as tape:
            li = base.per_sample_loss(model(x[i:i + 1]), y[i:i + 1], loss_fn, DS)[0]
        out.append([tf.zeros_like(s) if g is None else g for s, g in zip(sources, tape.gradient(li, sources))])
    return out


def test_rgs_and_rgm_scores_on_a_3d_unet_match_per_sample_gradients():
    """Trust by forward mode through Conv3D and the 3D side heads, informativeness by the closed form on the
    1x1x1 `main_logits` kernel, against one backward pass per sample."""
    model = _tiny_unet()
    (xn, yn), (xc, yc) = _volumes(3, 1), _volumes(2, 2)
    variables = model.trainable_variables
    e = reweight.trust_scores(model, xn, yn, xc, yc, "bce_dice", DS).numpy()
    with tf.GradientTape() as tape:
        clean = tf.reduce_mean(base.per_sample_loss(model(xc), yc, base.resolve_loss("bce_dice"), DS))
    g_clean = tape.gradient(clean, variables)
    per_sample = _per_sample_grads(model, xn, yn, variables)
    brute_e = [sum(float(tf.reduce_sum(a * b)) for a, b in zip(gi, g_clean) if b is not None) for gi in per_sample]
    np.testing.assert_allclose(e, brute_e, rtol=1e-3, atol=1e-7)

    g = reweight.informativeness_scores(model, xn, yn, "bce_dice", DS).numpy()
    kernel = model.get_layer("main_logits").kernel
    assert tuple(kernel.shape) == (1, 1, 1, 2, 1)
    brute_g = [float(tf.reduce_mean(tf.abs(gi[0]))) for gi in _per_sample_grads(model, xn, yn, [kernel])]
    np.testing.assert_allclose(g, brute_g, rtol=1e-3)


def test_pint_teacher_view_and_shares_on_volumes():
    """Without input noise every teacher pass is the teacher's own prediction: p_bar = p, u = H(p); the
    label mask broadcasts the image mask over every voxel."""
    from dsal_tf.strategies.entropy import binary_entropy

    trainer = trainers.make_trainer("pint", _tiny_unet(), loss="bce", passes=3, noise=0.0)
    x, _ = _volumes(2, 4)
    p_bar, u = trainer.teacher_view(x)
    p = trainer.teacher(x)["main"]
    assert p_bar.shape == (2, *SPATIAL, 1)
    np.testing.assert_allclose(p_bar, p, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(u, binary_entropy(p), rtol=1e-4, atol=1e-6)
    u = tf.constant([0.6, 0.1])[:, None, None, None, None] * tf.ones((2, *SPATIAL, 1))  # one value per volume
    pixel, image = trainer.masks(u)
    np.testing.assert_array_equal(image, [0.0, 1.0])  # the more certain half of the batch
    np.testing.assert_array_equal(pixel.numpy().reshape(2, -1).mean(axis=1), [0.0, 1.0])  # u < tau = 0.347
    np.testing.assert_array_equal(trainer.label_mask(pixel, tf.constant([0.0, 0.0])), pixel)
    np.testing.assert_array_equal(trainer.label_mask(pixel, tf.constant([1.0, 0.0])), tf.ones_like(pixel))


def test_mcpm_mask_net_has_the_segmenters_rank():
    t3 = trainers.make_trainer("mcpm", _tiny_unet(), loss="bce", ds_weights=(1.0, 0.0, 0.0))
    r = t3.meta_net(tf.zeros([2, 5, 7, 3, 1]))
    assert r.shape == (2, 5, 7, 3, 1) and np.all((r.numpy() > 0) & (r.numpy() < 1))
    assert tuple(t3.meta_net.get_layer("b1").kernel.shape) == (5, 5, 5, 1, 32)
    keras.utils.set_random_seed(0)
    t2 = trainers.make_trainer("mcpm", build_unet((16, 16, 1), base_filters=2, depth=3), loss="bce")
    assert tuple(t2.meta_net.get_layer("b1").kernel.shape) == (5, 5, 1, 32)  # images keep Conv2D


def test_boostmis_strong_view_is_per_item_on_volumes_and_unchanged_on_images():
    # no noise, an all-ones volume: each item is one constant c_i + o_i over all its voxels
    x = tf.ones((3, *SPATIAL, 1))
    v = boostmis.strong_view(x, keras.random.SeedGenerator(5), noise=0.0).numpy().reshape(3, -1)
    np.testing.assert_allclose(v, np.repeat(v[:, :1], v.shape[1], axis=1))
    assert len(set(np.round(v[:, 0], 6))) == 3 and np.all((v > 1 - 0.4 - 0.4) & (v < 1 + 0.4 + 0.4))
    # images: exactly the former NHWC formula with the same seed
    img = tf.random.stateless_normal((2, 6, 6, 1), seed=(1, 2))
    got = boostmis.strong_view(img, keras.random.SeedGenerator(7))
    gen = keras.random.SeedGenerator(7)
    c = 1.0 + keras.random.uniform((2, 1, 1, 1), -0.4, 0.4, seed=gen)
    o = keras.random.uniform((2, 1, 1, 1), -0.4, 0.4, seed=gen)
    np.testing.assert_array_equal(got, img * c + o + 0.2 * keras.random.normal(tf.shape(img), seed=gen))


# ------------------------------------------------------------------ one or two steps of every trainer
def _fit_two_steps(name: str, spatial=SPATIAL, precision: str = "off") -> dict:
    """Two steps of trainer `name` on random batches of a tiny U-Net (3D on NDHWC volumes by default,
    2D with a 2D `spatial`) under the precision `precision`; the fit's history."""
    from dsal_tf.config import resolve

    keras.mixed_precision.set_global_policy({"off": "float32", "bfloat16": "mixed_bfloat16"}[precision])
    model = _tiny_unet(rank=len(spatial))
    (xn, yn), (xc, yc) = _volumes(2, 1, spatial), _volumes(2, 2, spatial)
    cls = trainers.get_trainer(name)
    if name == "boostmis":  # a paired trainer on (expert batch, unlabelled pool batch), as the pool trainers
        trainer = trainers.make_trainer(name, model, loss="bce_dice", n_active=1, queries=2)
        data = ((xc, yc), xn)
    elif issubclass(cls, base.PairedTrainer):
        trainer = trainers.make_trainer(name, model, loss="bce_dice")
        data = ((xn, yn), (xc, yc))
    elif getattr(cls, "uses_pool", False):  # the semi-supervised pool trainers: (labelled, unlabelled)
        trainer = cls(model, cls.Settings.from_config(resolve({})), DS, seed=0, total_steps=2)
        data = ((xc, yc), xn)
    else:  # `standard`: the compiled U-Net itself
        from dsal_tf.train import compile_model

        trainer = compile_model(model, resolve({"mixed_precision": precision}))
        data = (xc, {h: yc for h in HEADS})
    if trainer is not model:
        trainer.compile(keras.optimizers.Adam(1e-3))
    before = [w.copy() for w in model.get_weights()]
    history = trainer.fit(tf.data.Dataset.from_tensors(data).repeat(2), epochs=1, verbose=0).history
    moved = any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    return {**history, "moved": moved}


# Traced (as a run traces them) for one trainer of each family, eager for the variants that share its
# step: rgs and rgm are rgsm's two halves, int and pnt PINT's two gates, `standard` is Keras's own step
# (traced in the determinism tests). A trace costs 5-15 s here.
TRACED = {"bcp", "boostmis", "mcpm", "mean_teacher", "mwnet", "pint", "rgsm", "uniform"}


@pytest.mark.slow
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.compiled) if n in TRACED else n
                                  for n in sorted(trainers.TRAINERS)])
def test_every_trainer_takes_steps_on_volumes(name):
    history = _fit_two_steps(name)
    assert np.isfinite(history["loss"]).all(), history
    assert history["moved"]  # the wrapped (or EMA) U-Net changed


@pytest.mark.parametrize("name", [n if n in ("mwnet", "mcpm") else pytest.param(n, marks=pytest.mark.slow)
                                  for n in sorted(TRACED)])
def test_every_trainer_family_takes_steps_under_bf16(name):
    """`MIXED_PRECISION` is bf16 by default on this CPU and on recent GPUs: every trainer must run under
    it (MW-Net's weight net computed in bf16 and could not multiply the float32 losses). One trainer of
    each family, as `TRACED` (rgs/rgm are rgsm's halves, int/pnt PINT's gates; `standard` is Keras's own
    step, trained in bf16 by the loop tests)."""
    history = _fit_two_steps(name, spatial=(16, 16), precision="bfloat16")
    assert np.isfinite(history["loss"]).all(), history
    assert history["moved"]
    if name in ("mwnet", "mcpm"):
        meta_net = trainers.make_trainer(name, _tiny_unet(rank=2)).meta_net
        assert {layer.compute_dtype for layer in meta_net.layers[1:]} == {"float32"}


# ------------------------------------------------------------------ the streams
def test_the_paired_sampler_on_images_is_the_2d_stream_unchanged():
    """Through `ImageSpace.train_stream` the paired batches are bit for bit `make_paired_dataset`'s."""
    from dsal_tf.config import resolve
    from dsal_tf.space import ImageSpace

    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (7, 16, 16, 1), dtype=np.uint8)
    y = (rng.random((7, 16, 16, 1)) > 0.5).astype(np.uint8)
    cfg = resolve({"batch_size": 2, "augment": True, "img_rows": 16, "img_cols": 16})

    def prep(batch):
        return tf.cast(batch, tf.float32) / 255.0

    via_space = base.paired_dataset(base.space_stream(ImageSpace(cfg), prep), (x[:4], y[:4]), (x[4:], y[4:]),
                                    seed=3, repeat=True).take(5)
    direct = base.make_paired_dataset((x[:4], y[:4]), (x[4:], y[4:]), 2, seed=3, preprocess=prep, augment=True,
                                      repeat=True).take(5)
    for a, b in zip(via_space, direct):
        for ta, tb in zip(tf.nest.flatten(a), tf.nest.flatten(b)):
            np.testing.assert_array_equal(ta, tb)
    assert base.steps_per_epoch(5, 3, 2, ImageSpace(cfg)) == 3 == base.steps_per_epoch(5, 3, 2)


@pytest.fixture(scope="module")
def volume_data(tmp_path_factory):
    return make_volumes(tmp_path_factory.mktemp("vol_trainers"))


def _vol_cfg(data, tmp_path, **settings):
    from dsal_tf.config import resolve

    return resolve(dict(data_path=str(data), exp_dir=str(tmp_path / "exp"), exp_name="vol", depth=3, base_filters=2,
                        batch_size=2, progress=False, patch_size=PATCH, mixed_precision="off", **settings))


def test_the_paired_sampler_on_volumes_draws_patches(volume_data, tmp_path):
    """`fit_paired`'s streams on a volume space: both sides are PATCH_SIZE patches of the volumes, the
    noisy side's from the noisy volumes (here all background), and an epoch is the space's patch epoch."""
    from dsal_tf.volume_space import VolumeSpace

    space = VolumeSpace.from_config(_vol_cfg(volume_data, tmp_path))
    train = space.load_split("train")
    x, y = np.asarray(train.images), np.asarray(train.masks)
    blank = np.zeros_like(y)
    ds = base.paired_dataset(base.space_stream(space, space.fit_normalizer()), (x[:3], blank[:3]), (x[3:], y[3:]),
                             seed=0, repeat=True).take(4)
    clean_foreground = 0.0
    for (xn, yn), (xc, yc) in ds:
        assert xn.shape == xc.shape == (2, *PATCH, 1) and xn.dtype == tf.float32
        assert float(tf.reduce_sum(yn)) == 0.0
        clean_foreground += float(tf.reduce_sum(yc))
    assert clean_foreground > 0
    assert base.steps_per_epoch(3, 3, 2, space) == space.steps_per_epoch(3) > 2  # patches, not ceil(3 / 2)


# ------------------------------------------------------------------ the loop on volumes
@pytest.mark.slow
def test_the_loop_runs_rgs_on_a_volume_folder(volume_data, tmp_path):
    """DSAL's whole-volume pseudo labels are the noisy stream, the oracle's volumes the clean one: round 1
    trains RGS on patches of both and validates on whole volumes."""
    import pandas as pd

    from dsal_tf.active import run_active_learning
    from dsal_tf.run import Run

    cfg = _vol_cfg(volume_data, tmp_path, nb_labeled=2, nb_iterations=1, nb_next_sample=1, pseudo_epoch=1,
                   nb_pseudo_initial=1, nb_initial_epochs=1, nb_active_epochs=1, query_strategy="dsal",
                   trainer="rgs", foreground_oversample=0.5, steps_per_epoch=2)
    run_active_learning(cfg, log=lambda m: None)
    run = Run(cfg.run_dir)
    assert run.completed() == [0, 1]
    curve = pd.read_csv(cfg.run_dir / "learning_curve.csv")
    assert curve["n_pseudo"].iloc[-1] > 0  # round 1 had a noisy stream
    history = pd.read_csv(run.round_dir(1) / "history.csv")
    assert {"mean_weight", "kept_fraction", "val_main_dice"} <= set(history.columns)  # the paired trainer ran
    assert np.isfinite(history["loss"]).all()
