"""The `isic2017` preset is the DSAL reference code's protocol, and `@reference` carries its data settings.

The expected values are read off the reference code (github.com/jacobzhaoziyuan/DSAL at 6bf426e,
`src/`); each line names where. docs/methods.md#dsal lists what we do not copy.
"""

import json

import pytest

from dsal_tf.compare import VARIANTS, initial_changes, parse_strategy_spec, run_comparison
from dsal_tf.components import resolved
from dsal_tf.config import resolve
from dsal_tf.run import Run

from .conftest import tiny_values

REFERENCE = {
    "img_rows": 192, "img_cols": 240,  # constants.py:13-14, img_rows = 64 * 3, img_cols = 80 * 3
    "learning_rate": 1e-5,  # constants.py:15, lr; unet.py:153 Adam(lr=lr)
    "loss": "dice",  # constants.py:16, USE_BCE = False; unet.py:153 loss -dice_coef
    "normalization": "unit",  # constants.py:17, z_score = False: x / 255
    "pool_size": 1600, "nb_labeled": 600,  # constants.py:20-21, nb_train, nb_labeled
    "nb_iterations": 10, "nb_next_sample": 35,  # constants.py:26, 28
    "pseudo_epoch": 5, "nb_pseudo_initial": 20, "pseudo_rate": 20,  # constants.py:30-32
    "augment": False,  # constants.py:39, apply_augmentation = False
    "nb_initial_epochs": 15, "nb_active_epochs": 10, "batch_size": 32,  # constants.py:40-42
    "ds_weights": (0.6, 0.3, 0.1),  # constants.py:59, loss_weights
    "color": "gray",  # unet.py:89, input_size=(img_rows, img_cols, 1); test.py:38 cv2.IMREAD_GRAYSCALE
    "batch_dice": True,  # unet.py:6-13, dice_coef over K.flatten of the whole batch
    "base_filters": 32, "depth": 4, "dropout": 0.5,  # unet.py:102-120, 32..512 filters, 4 pools, Dropout(0.5)
    "dropout_at": "bottleneck", "side_upsampling": "nearest", "norm": "none",  # unet.py:120, 132-143, no BN
    "lr_schedule": "none",  # main.py:41, 90: ReduceLROnPlateau patience 40 / 25 > 15 / 10 epochs never fires
    "early_stop_patience": 0,  # main.py:44, 94: EarlyStopping only when "es" is in exp ("DSAL")
}
REFERENCE_SETTINGS = {  # algorithm settings the preset leaves at their class defaults
    "ds_ascend": True,  # constants.py:46, DS_ASCEND
    "conf_thres": True,  # constants.py:36, CONF_THRES
    "use_crf": False, "use_crf_thres": 0.98,  # constants.py:44, 49: post_process = "CRF" in exp
}


def test_isic2017_preset_is_the_reference_protocol():
    cfg = resolve({"preset": "isic2017"})
    assert {k: getattr(cfg, k) for k in REFERENCE} == REFERENCE
    assert cfg.channels == 1
    settings = resolved(cfg).settings
    assert {k: settings[k] for k in REFERENCE_SETTINGS} == REFERENCE_SETTINGS
    # main.py:82, utils.py:311: nb_pseudo_initial + pseudo_rate * (iteration - pseudo_epoch) from iteration 5 on
    assert [cfg.nb_pseudo(t) for t in (4, 5, 6, 10)] == [0, 20, 40, 120]


def test_isic2017_cpu_keeps_its_data_settings():
    """Its results tables were made with RGB, z-score, flips and per-image Dice."""
    cfg = resolve({"preset": "isic2017-cpu"})
    assert (cfg.color, cfg.normalization, cfg.augment, cfg.batch_dice) == ("rgb", "zscore", True, False)
    assert (cfg.img_rows, cfg.base_filters, cfg.batch_size, cfg.nb_next_sample) == (64, 16, 16, 70)


def test_a_saved_isic2017_run_keeps_its_own_values(tmp_path):
    """config.json holds every field, so the preset's new values never reach a run made before them."""
    before = resolve({"preset": "isic2017", "color": "rgb", "normalization": "zscore", "augment": True,
                      "batch_dice": False, "exp_dir": str(tmp_path), "exp_name": "old"})
    run = Run(tmp_path / "old")
    run.path.mkdir()
    run.config_file.write_text(before.to_json())
    saved = run.saved_config()
    assert (saved.color, saved.normalization, saved.augment, saved.batch_dice) == ("rgb", "zscore", True, False)
    assert saved == before


def test_reference_variant_is_the_presets_data_settings():
    reference = {"color": "gray", "normalization": "unit", "augment": False, "batch_dice": True}
    assert parse_strategy_spec("dsal@reference") == {"query_strategy": "dsal", **reference}
    assert VARIANTS["reference"] == {k: REFERENCE[k] for k in reference}


def test_reference_variant_gets_its_own_initial_model():
    cpu, paper = resolve({"preset": "isic2017-cpu"}), resolve({"preset": "isic2017"})
    reference = parse_strategy_spec("dsal@reference")
    # on isic2017-cpu every data setting differs, greyscale among them: a one-channel network
    assert initial_changes(cpu, reference) == {"color": "gray", "normalization": "unit", "augment": False,
                                               "batch_dice": True}
    assert cpu.replace(**initial_changes(cpu, reference)).channels == 1
    assert initial_changes(paper, reference) == {}  # the preset already has them: the shared model serves
    assert initial_changes(cpu, parse_strategy_spec("dsal@minfg")) == {}
    assert initial_changes(cpu, parse_strategy_spec("dsal@boostmis-trainer")) == {}
    assert initial_changes(cpu, parse_strategy_spec("dsal@pre8")) == VARIANTS["pre8"]
    assert initial_changes(cpu, parse_strategy_spec("claspe")) == {}


@pytest.mark.slow
def test_tiny_reference_row_trains_its_own_greyscale_initial_model(tiny_data, tmp_path):
    cfg = resolve(tiny_values(tiny_data, tmp_path, nb_iterations=1, pseudo_epoch=1, depth=3))
    run_comparison(cfg, ["dsal@reference"], [0], "cmp", full_supervision=False, log=lambda m: None)
    out = tmp_path / "exp" / "cmp"
    init = json.loads((out / "init@reference-s0" / "config.json").read_text())
    assert (init["color"], init["normalization"], init["augment"], init["batch_dice"]) == ("gray", "unit", False, True)
    row = Run(out / "dsal@reference-s0")
    assert row.completed() == [0, 1] and row.saved_config().channels == 1
    first = (row.path / "round_00" / "best.keras").read_bytes()
    assert first == (out / "init@reference-s0" / "round_00" / "best.keras").read_bytes()
    assert first != (out / "init-s0" / "round_00" / "best.keras").read_bytes()
