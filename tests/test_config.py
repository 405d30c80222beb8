import dataclasses

import pytest

from dsal_tf.components import check_names
from dsal_tf.components import load_config as load_checked
from dsal_tf.config import PRESETS, load_config, parse_set_options, resolve
from dsal_tf.errors import DsalError


def test_defaults_and_preset_layering(tmp_path):
    f = tmp_path / "constants.py"
    f.write_text('PRESET = "isic2017-cpu"\nNB_ITERATIONS = 2\n')
    cfg = load_config(f, {"seed": 7})
    assert cfg.img_rows == PRESETS["isic2017-cpu"]["img_rows"]  # from the preset
    assert cfg.nb_iterations == 2  # the file beats the preset
    assert cfg.seed == 7  # the command line beats the file
    assert cfg.name == "isic2017-cpu-dsal-s7"


def test_unknown_constant_suggests_the_closest_name(tmp_path):
    f = tmp_path / "constants.py"
    f.write_text("NB_ITERATION = 3\n")
    with pytest.raises(DsalError, match=r"unknown constant NB_ITERATION .*did you mean 'NB_ITERATIONS'"):
        load_checked(f)
    f.write_text("MC_PASES = 3\n")  # an algorithm's setting: known to the class that declares it
    with pytest.raises(DsalError, match=r"unknown constant MC_PASES .*did you mean 'MC_PASSES'"):
        load_checked(f)


@pytest.mark.parametrize(
    "values, match",
    [
        ({"img_rows": 100}, "IMG_ROWS .* divisible by"),
        ({"loss": "dise"}, "LOSS .*did you mean 'dice'"),
        ({"query_strategy": "dsla"}, "QUERY_STRATEGY .*did you mean 'dsal'"),
        ({"nb_labeled": 0}, "NB_LABELED .* > 0"),
        ({"dropout": 1.5}, "DROPOUT"),
        ({"nb_iterations": "many"}, "NB_ITERATIONS .* not a valid int"),
        ({"ds_weights": (1.0, 2.0)}, "DS_WEIGHTS"),
        ({"preset": "isic"}, "PRESET .*did you mean"),
        ({"trainer": "rgz"}, "TRAINER .*did you mean 'rgs'"),
        ({"mc_passes": 0}, "MC_PASSES must be > 0"),
        ({"rgs_lambda": 2.0}, "RGS_LAMBDA must be in"),
        ({"boostmis_threshold": "global!"}, "BOOSTMIS_THRESHOLD .*did you mean 'global'"),
        ({"initial_selection": "kcentre"}, "INITIAL_SELECTION .*did you mean 'kcenter'"),
        ({"query_strategy": "random", "selection": "power"}, "SELECTION = 'power' .*random.* set SELECTION"),
        ({"query_strategy": "random_fg", "selection": "rank"}, "SELECTION = 'rank' .*random_fg"),
    ],
)
def test_bad_values_name_the_setting(values, match):
    with pytest.raises(DsalError, match=match):
        check_names(resolve(values))


def test_random_takes_auto_or_diverse_selection():
    for selection in ("auto", "diverse"):
        check_names(resolve({"query_strategy": "random", "selection": selection}))


def test_config_is_frozen_and_round_trips_through_json():
    import json

    cfg = resolve({"preset": "bone_age"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 3
    assert resolve(json.loads(cfg.to_json())) == cfg
    assert cfg.loss == "bce" and cfg.normalization == "unit"


def test_nb_pseudo_schedule():
    cfg = resolve({"preset": "isic2017"})
    assert [cfg.nb_pseudo(t) for t in (1, 4, 5, 6, 10)] == [0, 0, 20, 40, 120]


def test_set_options_parse_literals():
    assert parse_set_options(("NB_ITERATIONS=5", "COLOR=gray", "DS_WEIGHTS=(1,0,0)")) == {
        "NB_ITERATIONS": 5, "COLOR": "gray", "DS_WEIGHTS": (1, 0, 0)}
    with pytest.raises(DsalError, match="KEY=VALUE"):
        parse_set_options(("NB_ITERATIONS",))


def test_algorithm_settings_live_with_their_class_and_round_trip():
    """`Config` holds loop, data, model and training fields; an algorithm's constants go to the class
    that declares them, keep the names users write, and come back from config.json unchanged."""
    import json

    from dsal_tf.components import build, owners, resolved
    from dsal_tf.config import FIELDS

    assert len(FIELDS) <= 60
    assert not set(FIELDS) & set(owners())  # each name is spelled in one place
    cfg = resolved(resolve({"query_strategy": "ceal", "MC_PASSES": "7", "TRAINER": "pint"}))
    assert cfg.to_dict()["mc_passes"] == 7 and cfg.to_dict()["pint_tau"] > 0  # the chosen classes' full settings
    assert resolve(json.loads(cfg.to_json())) == cfg
    parts = build(cfg)
    assert parts.query.settings.mc_passes == 7 and parts.query.selection.name == "histogram"
    assert parts.pseudo.name == "ceal" and parts.trainer.name == "pint"


def test_a_setting_shared_by_two_classes_has_one_default():
    """One constant may feed several classes (EMA_DECAY: PINT and BoostMIS); their defaults agree."""
    import dataclasses as dc

    from dsal_tf.components import owners
    from dsal_tf.settings import settings_class

    for name, classes in owners().items():
        defaults = {next(f.default for f in dc.fields(settings_class(c)) if f.name == name) for c in classes}
        assert len(defaults) == 1, (name, classes, defaults)


def test_a_config_saved_before_the_settings_moved_still_loads(tmp_path):
    """config.json files written when every setting was a `Config` field (flat, all 84) load and build."""
    import json
    from pathlib import Path

    from dsal_tf.components import build, resolved

    saved = json.loads((Path(__file__).parent / "fixtures" / "config_v1.json").read_text())
    cfg = resolved(resolve(saved, source="config_v1.json"))
    assert cfg.to_dict()["ds_ascend"] is True and cfg.to_dict()["rgs_lambda"] == -1.0
    build(cfg)


def test_the_configuration_reference_is_generated_from_the_code():
    """docs/configuration.md lists every constant of `Config` and of every registered class, as the code
    declares them today (regenerate: python -m dsal_tf.components --configuration docs/configuration.md)."""
    from pathlib import Path

    from dsal_tf.components import owners, with_table
    from dsal_tf.config import FIELDS

    page = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    assert with_table(page) == page, "docs/configuration.md is stale: regenerate it"
    for name in (*FIELDS, *owners()):
        assert f"`{name.upper()}`" in page


def test_auto_loss_is_dice_on_images_and_dice_plus_bce_on_volumes(tmp_path):
    """LOSS = "auto" resolves from the data: soft Dice for an image folder (or none yet), Dice + BCE for
    NIfTI volumes (nnU-Net's loss; soft Dice alone collapsed a hippocampus seed); an explicit LOSS stays."""
    from dsal_tf.config import resolve

    images, volumes = tmp_path / "images", tmp_path / "volumes"
    (images / "trainImg").mkdir(parents=True)
    (images / "trainImg" / "a.png").write_bytes(b"")
    (volumes / "trainImg").mkdir(parents=True)
    (volumes / "trainImg" / "a.nii.gz").write_bytes(b"")
    assert resolve({"data_path": str(images)}).loss == "dice"
    assert resolve({"data_path": str(tmp_path / "nothing-yet")}).loss == "dice"
    assert resolve({"data_path": str(volumes)}).loss == "bce_dice"
    assert resolve({"data_path": str(volumes), "loss": "dice"}).loss == "dice"
    assert resolve({"data_path": str(images), "loss": "bce"}).loss == "bce"
