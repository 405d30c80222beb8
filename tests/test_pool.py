import numpy as np
import pytest

from dsal_tf.errors import DsalError
from dsal_tf.pool import Pool


def test_initial_labelled_map_is_seeded_and_round_stamped():
    a, b = Pool.initial(20, 5, seed=1), Pool.initial(20, 5, seed=1)
    assert np.array_equal(a.labelled_map, b.labelled_map)
    assert (a.labelled_map == 1).sum() == 5 and len(a.unlabelled) == 15
    with pytest.raises(DsalError, match="NB_LABELED = 30 .* only 20"):
        Pool.initial(20, 30, seed=0)


def test_label_pseudo_training_set_and_round_trip(tmp_path):
    pool = Pool.initial(6, 2, seed=0)
    free = pool.unlabelled
    pool.label(free[:2], round_=1)
    assert sorted(pool.labelled_map[free[:2]]) == [2, 2]
    with pytest.raises(ValueError):
        pool.label(free[:1], round_=2)  # already labelled
    pseudo_masks = np.ones((1, 2, 2, 1), np.uint8)
    pool.set_pseudo(free[2:3], pseudo_masks)
    with pytest.raises(ValueError):
        pool.set_pseudo(free[:1], pseudo_masks)  # labelled images are not pseudo-labelled
    images = np.arange(6).reshape(6, 1, 1, 1).repeat(2, 1).repeat(2, 2).astype(np.uint8)
    masks = np.zeros((6, 2, 2, 1), np.uint8)
    x, y, flag = pool.training_set(images, masks)
    assert len(x) == 5 and flag.sum() == 1 and y[flag].sum() == 4
    assert x[flag][0, 0, 0, 0] == free[2]  # the pseudo image is the right one
    pool.save(tmp_path / "pool.npz")
    back = Pool.load(tmp_path / "pool.npz")
    assert np.array_equal(back.labelled_map, pool.labelled_map)
    assert np.array_equal(back.pseudo_idx, pool.pseudo_idx)
    assert np.array_equal(back.pseudo_masks, pseudo_masks)


def test_round_selection_reads_only_the_chosen_images_of_a_memmapped_pool(tmp_path):
    """Issue 17: the selection half of a round (oracle picks, pseudo masks from the disk-backed `pred`
    store, pseudo PNGs, scores.csv, the saved pool, the next training set) allocates per-image
    scalars only, never O(pool) image bytes: a fancy index or `np.asarray` of the memory-mapped pool
    or of `pred` would show up here."""
    import tracemalloc

    import cv2

    from dsal_tf.active import RoundContext, choose_labels
    from dsal_tf.components import build
    from dsal_tf.config import resolve
    from dsal_tf.data import Split
    from dsal_tf.run import Run
    from dsal_tf.space import disk_array

    n, side = 3000, 32
    path = tmp_path / "images.npy"
    out = np.lib.format.open_memmap(path, "w+", np.uint8, (n, side, side, 3))
    out[:] = 100
    out.flush()
    del out
    masks_path = tmp_path / "masks.npy"
    out = np.lib.format.open_memmap(masks_path, "w+", np.uint8, (n, side, side, 1))
    out[:] = 1
    out.flush()
    del out
    png = tmp_path / "one.png"  # every pool image's original file (only its size is read)
    cv2.imwrite(str(png), np.zeros((side, side), np.uint8))
    pool_data = Split([f"im{i}" for i in range(n)], np.load(path, mmap_mode="r"), np.load(masks_path, mmap_mode="r"),
                      files=[png] * n)
    cfg = resolve({"exp_dir": str(tmp_path / "exp")})
    pool = Pool.initial(n, cfg.nb_labeled, seed=0)
    unl = pool.unlabelled
    rng = np.random.default_rng(1)
    scores = {k: rng.random(len(unl)) for k in ("uncertainty", "agreement", "confidence", "foreground", "true_dice")}
    scores["pred"] = disk_array((len(unl), side, side, 1), np.uint8)  # what `score_pool` returns
    scores["pred"][:] = 1
    r = cfg.pseudo_epoch  # a round with pseudo labels
    ctx = RoundContext(cfg, Run(tmp_path), build(cfg), pool_data, None, None, round=r, pool=pool)
    tracemalloc.start()
    oracle_idx, pseudo_idx = choose_labels(ctx, unl, scores)
    x, y, flag = pool.training_set(pool_data.images, pool_data.masks)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(oracle_idx) == cfg.nb_next_sample and len(pseudo_idx) == cfg.nb_pseudo(r)
    assert len(x) == cfg.nb_labeled + cfg.nb_next_sample + cfg.nb_pseudo(r) and flag.sum() == len(pseudo_idx)
    assert len(list((ctx.round_dir / "pseudo").glob("*.png"))) == len(pseudo_idx)
    assert peak < pool_data.images.nbytes / 4, (peak, pool_data.images.nbytes)


@pytest.mark.parametrize("shape", [(2, 3, 3, 1), (2, 3, 4, 2, 1)])
def test_pseudo_masks_of_images_and_volumes_survive_a_round_trip(tmp_path, shape):
    pool = Pool.initial(8, 2, seed=0)
    masks = (np.arange(np.prod(shape)).reshape(shape) % 2).astype(np.uint8)
    pool.set_pseudo(pool.unlabelled[:2], masks)
    pool.save(tmp_path / "pool.npz")
    assert np.array_equal(Pool.load(tmp_path / "pool.npz").pseudo_masks, masks)  # volumes were dropped before
    empty = Pool.initial(8, 2, seed=0)
    empty.save(tmp_path / "empty.npz")
    assert Pool.load(tmp_path / "empty.npz").pseudo_masks is None
