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
