"""The label-noise simulator: fraction, determinism, byte-identical clean files, recipe, source untouched."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from click.testing import CliRunner

from dsal_tf.cli import cli
from dsal_tf.corrupt import choose, corrupt_folder, corrupt_mask
from dsal_tf.errors import DsalError


def _digests(root) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _square(n: int = 32, lo: int = 10, hi: int = 22) -> np.ndarray:
    m = np.zeros((n, n), np.uint8)
    m[lo:hi, lo:hi] = 255
    return m


@pytest.mark.parametrize("n, rate, k", [(10, 0.4, 4), (24, 0.5, 12), (5, 0.0, 0), (5, 1.0, 5), (3, 0.5, 2)])
def test_choose_takes_round_rate_n(n, rate, k):
    picked = choose(n, rate, seed=0)
    assert len(picked) == k == len(set(picked.tolist())) and np.all(np.diff(picked) > 0)
    np.testing.assert_array_equal(picked, choose(n, rate, seed=0))


def test_dilate_and_erode_by_hand():
    mask = _square()
    grown, p = corrupt_mask(mask, "dilate", np.random.default_rng(0))
    shrunk, q = corrupt_mask(mask, "erode", np.random.default_rng(0))
    assert p == q and p["radius"] == 1  # 2-6% of a 32 px side rounds to 1 px
    # a radius-1 disk is the 4-neighbourhood: the 12x12 square gains 4 x 12 edge pixels, loses its 44-pixel rim
    assert grown.sum() == 144 + 48 and shrunk.sum() == 100
    assert np.all(grown >= (mask > 0)) and np.all(shrunk <= (mask > 0))


def test_elastic_keeps_a_binary_mask_and_is_seeded():
    mask = _square(64, 20, 44)
    a, pa = corrupt_mask(mask, "elastic", np.random.default_rng([3, 1]))
    b, pb = corrupt_mask(mask, "elastic", np.random.default_rng([3, 1]))
    assert a.dtype == bool and a.shape == mask.shape and pa == pb and np.array_equal(a, b)
    assert -45 <= pa["angle"] <= 45 and 0.8 <= pa["zoom"] <= 2 and 1 <= pa["sigma"] <= 11
    assert not np.array_equal(a, mask > 0)


def test_corrupt_folder(tiny_data, tmp_path):
    before = _digests(tiny_data)
    out = tmp_path / "noisy"
    recipe = corrupt_folder(tiny_data, out, 0.5, "dilate", seed=1, log=lambda m: None)
    assert _digests(tiny_data) == before  # the source is only read
    assert recipe["n_train"] == 24 and recipe["n_corrupted"] == 12
    assert json.loads((out / "recipe.json").read_text()) == recipe
    after = _digests(out)
    changed = {k for k in before if after[k] != before[k]}
    assert changed == {f"trainGT/{name}" for name in recipe["corrupted"]}  # everything else byte-identical
    assert set(after) - set(before) == {"recipe.json"}
    # determinism: the same seed gives the same bytes, another seed another choice
    again = corrupt_folder(tiny_data, tmp_path / "again", 0.5, "dilate", seed=1, log=lambda m: None)
    assert _digests(tmp_path / "again") == after and again["corrupted"] == recipe["corrupted"]
    other = corrupt_folder(tiny_data, tmp_path / "other", 0.5, "dilate", seed=2, log=lambda m: None)
    assert set(other["corrupted"]) != set(recipe["corrupted"])
    # rerun on a finished output: nothing to do; different settings or an unsafe target: refused
    assert corrupt_folder(tiny_data, out, 0.5, "dilate", seed=1, log=lambda m: None) == recipe
    with pytest.raises(DsalError, match="different corruption"):
        corrupt_folder(tiny_data, out, 0.4, "dilate", seed=1, log=lambda m: None)
    with pytest.raises(DsalError, match="outside"):
        corrupt_folder(tiny_data, tiny_data / "inside", 0.5, "dilate", log=lambda m: None)


def test_cli_corrupt(tiny_data, tmp_path):
    runner = CliRunner()
    out = tmp_path / "el"
    res = runner.invoke(cli, ["corrupt", "--data", str(tiny_data), "--out", str(out), "--rate", "0.25",
                              "--kind", "elastic", "--seed", "0"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "recipe.json").read_text())["n_corrupted"] == 6
    bad = runner.invoke(cli, ["corrupt", "--data", str(tiny_data), "--out", str(tmp_path / "x"), "--rate", "1.5"])
    assert bad.exit_code == 2 and "--rate" in bad.output
