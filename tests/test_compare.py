import numpy as np
import pandas as pd
import pytest

from dsal_tf.compare import aulc, full_supervision_config, run_comparison, spearman_table
from dsal_tf.config import resolve

from .conftest import tiny_values


def test_aulc_is_the_mean_dice_over_the_label_range():
    # trapezoids: (0.5+0.7)/2*10 + (0.7+0.7)/2*10 = 6 + 7 = 13, over 20 labels -> 0.65
    assert aulc([10, 20, 30], [0.5, 0.7, 0.7]) == pytest.approx(0.65)
    assert aulc([10], [0.4]) == pytest.approx(0.4)


def test_spearman_of_uncertainty_against_real_error(tmp_path):
    rd = tmp_path / "round_01"
    rd.mkdir()
    pd.DataFrame({"uncertainty": [0.1, 0.2, 0.3, 0.4], "true_dice": [0.9, 0.8, 0.7, 0.1]}).to_csv(
        rd / "scores.csv", index=False)
    rd2 = tmp_path / "round_02"
    rd2.mkdir()
    pd.DataFrame({"uncertainty": [0.0, 0.0], "true_dice": [0.9, 0.8]}).to_csv(rd2 / "scores.csv", index=False)
    rows = spearman_table(tmp_path)
    assert rows[0] == {"round": 1, "spearman": pytest.approx(1.0)}
    assert np.isnan(rows[1]["spearman"])


def test_full_supervision_config(tiny_cfg):
    full = full_supervision_config(tiny_cfg)
    assert full.nb_labeled == 24 and full.nb_iterations == 0
    assert full.nb_initial_epochs == tiny_cfg.nb_initial_epochs + 2 * tiny_cfg.nb_active_epochs


@pytest.mark.slow
def test_tiny_comparison_shares_the_initial_model(tiny_data, tmp_path):
    cfg = resolve(tiny_values(tiny_data, tmp_path, nb_iterations=1, pseudo_epoch=1, mc_passes=2))
    summary = run_comparison(cfg, ["dsal", "ceal", "entropy"], [0], "cmp", log=lambda m: None)
    out = tmp_path / "exp" / "cmp"
    assert set(summary["strategy"]) == {"dsal", "ceal", "entropy", "full"}
    init = (out / "init-s0" / "round_00" / "best.keras").read_bytes()
    for s in ("dsal", "ceal", "entropy"):
        assert (out / f"{s}-s0" / "round_00" / "best.keras").read_bytes() == init
    comparison = pd.read_csv(out / "comparison.csv")
    assert len(comparison) == 3 * 2  # 3 strategies x rounds 0..1
    assert (out / "learning_curves.png").is_file() and (out / "spearman.csv").is_file()
    # a rerun with one strategy finds it finished and still summarizes every finished run
    again = run_comparison(cfg, ["dsal"], [0], "cmp", log=lambda m: None)
    pd.testing.assert_frame_equal(summary, again, check_exact=False, atol=1e-4)
