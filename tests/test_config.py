import dataclasses

import pytest

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
        load_config(f)


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
    ],
)
def test_bad_values_name_the_setting(values, match):
    with pytest.raises(DsalError, match=match):
        resolve(values)


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
