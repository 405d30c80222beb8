"""`dsal plan`: the fingerprint on hand-made masks, the size rule, the budget rule with fake timings, the
learning probe with fake probes and the full-supervision protocol."""

import json
import math

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from dsal_tf.cli import cli
from dsal_tf.config import load_config, resolve
from dsal_tf.errors import DsalError
from dsal_tf.plan import (
    choose,
    fingerprint,
    make_plan,
    predict_seconds,
    probe_verdict,
    record_actual,
    schedule,
    size_ladder,
)
from dsal_tf.plan.core import (
    BUDGET_MARGIN,
    MIN_PROBE_STEPS,
    PROBE_SHARE,
    PROBE_STEPS,
    Planning,
    choose_learning,
    probe_target,
)

# the planner times and probes the compiled step a run takes (eager steps would mislead it)
pytestmark = pytest.mark.compiled

H, W = 48, 72  # most images; one training image is 64x96 (same aspect 1.5)


def _square(mask, r, c, side):
    mask[r:r + side, c:c + side] = 255


def _write(root, split, name, mask, rng):
    (root / f"{split}Img").mkdir(parents=True, exist_ok=True)
    (root / f"{split}GT").mkdir(parents=True, exist_ok=True)
    grey = rng.integers(0, 256, size=mask.shape, dtype=np.uint8)
    cv2.imwrite(str(root / f"{split}Img" / f"{name}.png"), np.dstack([grey] * 3))  # grey stored as RGB
    cv2.imwrite(str(root / f"{split}GT" / f"{name}_segmentation.png"), mask)


@pytest.fixture(scope="module")
def hand_data(tmp_path_factory):
    """Components (8-connected): train 9 + 25, none, 100 + a diagonal pair (2), 400 + a 1-pixel speck;
    val 16; test 1 (never read)."""
    root = tmp_path_factory.mktemp("hand")
    rng = np.random.default_rng(0)
    m0 = np.zeros((H, W), np.uint8)
    _square(m0, 2, 2, 3)
    _square(m0, 20, 30, 5)
    m1 = np.zeros((H, W), np.uint8)
    m2 = np.zeros((64, 96), np.uint8)
    _square(m2, 10, 10, 10)
    m2[40, 40] = m2[41, 41] = 255  # touching diagonally: one component of 2 pixels
    m3 = np.zeros((H, W), np.uint8)
    _square(m3, 20, 40, 20)
    m3[2, 2] = 255  # under 1% of the 400-pixel component: a speck
    mv = np.zeros((H, W), np.uint8)
    _square(mv, 5, 5, 4)
    mt = np.zeros((H, W), np.uint8)
    mt[1, 1] = 255
    for split, name, mask in [("train", "a", m0), ("train", "b", m1), ("train", "c", m2), ("train", "d", m3),
                              ("val", "v", mv),
                              ("test", "t", mt)]:
        _write(root, split, name, mask, rng)
    return root


def test_fingerprint_on_hand_made_masks(hand_data):
    fp = fingerprint(hand_data, sample=8)
    assert fp["counts"] == {"train": 4, "val": 1, "test": 1}
    assert fp["image_size"]["median_rows"] == H and fp["image_size"]["median_cols"] == W
    assert fp["image_size"]["rows_range"] == [48, 64] and fp["image_size"]["median_aspect"] == 1.5
    m = fp["masks"]
    assert m["masks_read"] == 5 and m["empty_masks"] == 1 and m["components"] == 6 and m["specks_ignored"] == 1
    assert m["component_pixels_min"] == 2
    assert m["component_pixels_p5"] == pytest.approx(2 + 0.25 * (9 - 2))  # 5th percentile of 2, 9, 16, 25, 100, 400
    assert m["component_pixels_median"] == (16 + 25) / 2
    assert m["all_components_min"] == 1 and m["all_components_p5"] == pytest.approx(1.3)  # the speck; not test's
    fractions = [34 / (H * W), 0.0, 102 / (64 * 96), 401 / (H * W), 16 / (H * W)]
    assert m["foreground_fraction_mean"] == pytest.approx(np.mean(fractions), abs=1e-5)
    assert fp["color"] == "gray" and fp["intensity"]["grey_stored_as_rgb"]
    assert fp["intensity"]["dtype"] == "uint8" and not fp["intensity"]["looks_like_ct_hu"]


def test_fingerprint_flags_16_bit_ct(tmp_path):
    rng = np.random.default_rng(1)
    for split in ("train", "val"):
        (tmp_path / f"{split}Img").mkdir()
        (tmp_path / f"{split}GT").mkdir()
        hu = np.full((32, 32), -1000, np.int32)  # air, then a body of soft tissue and bone
        hu[8:24, 8:24] = rng.integers(-100, 1500, size=(16, 16))
        cv2.imwrite(str(tmp_path / f"{split}Img" / "s.png"), (hu + 1024).astype(np.uint16))
        cv2.imwrite(str(tmp_path / f"{split}GT" / "s.png"), np.zeros((32, 32), np.uint8))
    fp = fingerprint(tmp_path)
    assert fp["intensity"]["dtype"] == "uint16" and fp["intensity"]["looks_like_ct_hu"]
    assert fp["color"] == "gray" and fp["masks"]["components"] == 0


def test_size_rule_rejects_64_when_structures_vanish():
    fp = {"image_size": {"median_rows": 256, "median_cols": 256}, "masks": {"component_pixels_p5": 40.0}}
    ladder = size_ladder(fp, depth=4, min_pixels=16)
    assert ladder[0]["img_rows"] == 64 and ladder[0]["p5_structure_pixels"] == 2.5  # 40 / 16
    assert not ladder[0]["meets_size_rule"]
    # 40 (s/256)^2 >= 16  <=>  s >= 161.9: the first multiple of 16 is 176
    assert [s["img_rows"] for s in ladder if s["meets_size_rule"]] == [176, 192, 208, 224, 240, 256]
    assert ladder[-1]["img_rows"] == 256  # never above the data's own size


def test_size_ladder_keeps_aspect_and_divides():
    fp = {"image_size": {"median_rows": 200, "median_cols": 300}, "masks": {"component_pixels_p5": None}}
    ladder = size_ladder(fp, depth=4)
    assert [s["img_rows"] for s in ladder] == [64, 80, 96, 112, 128, 144, 160, 176, 192]
    for s in ladder:
        assert s["img_rows"] % 16 == 0 and s["img_cols"] % 16 == 0 and s["meets_size_rule"]
        assert abs(s["img_cols"] / s["img_rows"] - 1.5) < 0.13
    assert (ladder[0]["img_rows"], ladder[0]["img_cols"]) == (64, 96)


def test_predicted_time_by_hand(tmp_path):
    cfg = resolve(dict(nb_labeled=10, batch_size=4, nb_initial_epochs=2, nb_active_epochs=1, nb_iterations=2,
                       nb_next_sample=5, pseudo_policy="confidence", pseudo_epoch=2, nb_pseudo_initial=3,
                       pseudo_rate=1))
    timing = dict(train_step_s=1.0, eval_step_s=0.5, score_step_s=0.25, epoch_overhead_s=0.1, trace_s=2.0)
    p = predict_seconds(cfg, timing, n_pool=30, n_val=5, load_s=3.0)
    # initial: 2 x (3 + 2 x 0.5 + 0.1); round 1: score 20 -> 5 batches, train 15 -> 4 batches;
    # round 2: score 15 -> 4 batches, train 20 oracle + 3 pseudo -> 6 batches
    assert p["train_s"] == pytest.approx(2 * 4.1 + 5.1 + 7.1)
    assert p["score_s"] == pytest.approx(5 * 0.25 + 4 * 0.25)
    assert p["total_s"] == pytest.approx(3.0 + 2.0 + 20.4 + 2.25)


def _cand(rows, filters, seconds, rule=True):
    return dict(img_rows=rows, img_cols=rows, base_filters=filters, batch_size=16, predicted_s=seconds,
                meets_size_rule=rule)


@pytest.mark.parametrize("budget,expected", [(360, (128, 32)), (250, (128, 16)), (60, (128, 8)), (10, (128, 8))])
def test_choose_with_fake_timings(budget, expected):
    cands = [_cand(64, 16, 100, rule=False), _cand(128, 16, 200), _cand(160, 16, 400), _cand(128, 32, 350),
             _cand(128, 8, 50)]
    best, why = choose(cands, budget)
    assert (best["img_rows"], best["base_filters"]) == expected
    assert ("no candidate fits" in why) == (budget == 10)


def _fake_measure(cfg):
    """Per-batch seconds growing with pixels and filters, like the real U-Net (no clock involved)."""
    step = 2e-3 * cfg.img_rows * cfg.img_cols / 4096 * cfg.base_filters / 16 * cfg.batch_size / 16
    return dict(train_step_s=step, eval_step_s=step / 3, score_step_s=step / 3, epoch_overhead_s=0.0,
                trace_s=0.0)


def _small_structures(tmp_path):
    """256x256 images, each with one 6x6 structure: 36 px, 2.25 px at 64x64."""
    rng = np.random.default_rng(2)
    for split, n in (("train", 16), ("val", 4), ("test", 2)):
        for i in range(n):
            mask = np.zeros((256, 256), np.uint8)
            _square(mask, 40 + 5 * i, 60 + 3 * i, 6)
            _write(tmp_path, split, f"s{i:02d}", mask, rng)
    return tmp_path


def test_plan_budget_rule_with_fake_timings(tmp_path):
    data = _small_structures(tmp_path)
    full = make_plan(data, budget_minutes=1000, measure=_fake_measure, log=lambda m: None)
    s = full["choice"]["settings"]
    assert (s["img_rows"], s["img_cols"], s["base_filters"]) == (256, 256, 32)  # everything fits: the largest
    assert s["loss"] == "dice" and s["color"] == "gray"
    # 36 px need s >= 256 sqrt(16/36) = 170.7 -> 176; nothing smaller is even measured
    assert min(c["img_rows"] for c in full["candidates"]) == 176
    tight = make_plan(data, budget_minutes=0.1, measure=_fake_measure, log=lambda m: None)
    t = tight["choice"]
    assert t["predicted"]["total_s"] <= 6
    best = [c for c in tight["candidates"] if c["img_rows"] == t["settings"]["img_rows"]
            and c["base_filters"] == t["settings"]["base_filters"]][0]
    assert best["meets_size_rule"]
    better = [c for c in tight["candidates"] if (c["img_rows"], c["base_filters"] >= 16)
              > (best["img_rows"], best["base_filters"] >= 16) and c["meets_size_rule"]]
    # planning and the margin count against the 6 s
    assert better and all(c["predicted_s"] > (1 - BUDGET_MARGIN) * 6 - tight["plan_s"] for c in better)


def test_no_fit_cuts_epochs(tmp_path):
    data = _small_structures(tmp_path)
    # 0.3 s: below even the 150-step floor (50 epochs of 1 step, about 0.5 s of fake time), whatever the decode time
    plan = make_plan(data, budget_minutes=0.005, measure=_fake_measure, log=lambda m: None)
    s = plan["choice"]["settings"]
    assert s["img_rows"] == 176 and s["base_filters"] == 8  # the fastest candidate meeting the size rule
    assert "no candidate fits" in plan["choice"]["reasons"]["img_rows"]
    assert s["nb_initial_epochs"] == 50 and s["nb_active_epochs"] == 1  # 150 initial steps is the floor
    assert any("nothing fits" in w for w in plan["warnings"])


@pytest.mark.slow
def test_plan_cli_measures_and_writes_a_usable_constants_file(tiny_data, tmp_path):
    out = tmp_path / "p" / "plan.json"
    result = CliRunner().invoke(cli, ["plan", "--data", str(tiny_data), "--budget-minutes", "5", "--out", str(out),
                                      "--set", "BASE_FILTERS=2", "--set", "BATCH_SIZE=4"])
    assert result.exit_code == 0, result.output
    plan = json.loads(out.read_text())
    c = plan["candidates"][0]
    assert c["train_step_s"] > 0 and c["score_step_s"] > 0 and c["predicted_s"] > 0
    assert plan["choice"]["settings"]["base_filters"] == 2 and plan["choice"]["reasons"]["base_filters"] == \
        "set by the user"
    cfg = load_config(out.with_name("plan_constants.py"))
    assert (cfg.img_rows, cfg.img_cols) == (48, 48) and cfg.data_path == str(tiny_data)


@pytest.mark.slow
def test_preset_auto_plans_once_and_stores_the_plan(tiny_data, tmp_path):
    const = tmp_path / "constants.py"
    const.write_text(f'PRESET = "auto"\nDATA_PATH = "{tiny_data}"\nEXP_DIR = "{tmp_path / "exp"}"\n'
                     "BASE_FILTERS = 2\nNB_ITERATIONS = 1\nNB_INITIAL_EPOCHS = 1\nNB_ACTIVE_EPOCHS = 1\n"
                     "PROGRESS = False\nPLAN_BUDGET_MINUTES = 5\n")
    args = ["run", "--constants", str(const), "--exp", "auto"]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0, first.output
    run = tmp_path / "exp" / "auto"
    plan = json.loads((run / "plan.json").read_text())
    saved = json.loads((run / "config.json").read_text())
    assert saved["preset"] == "auto" and saved["img_rows"] == 48 and saved["base_filters"] == 2
    assert saved["nb_iterations"] == 1 and saved["nb_labeled"] == plan["choice"]["settings"]["nb_labeled"]
    assert saved["nb_labeled"] == math.ceil(24 * 600 / 1600)
    actual = plan["actual"]  # the finished run wrote its minutes beside the prediction
    assert actual["rounds"] == 2 and actual["planned_in_this_command"] and actual["total_s"] >= plan["plan_s"]
    assert actual["train_s"] > 0 and "PRESET auto: planned" in first.output
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0 and "using the stored plan" in again.output
    assert "took" in again.output and "(resumed)" in again.output
    assert not json.loads((run / "plan.json").read_text())["actual"]["planned_in_this_command"]


@pytest.mark.parametrize("before,after,learned", [(0.03, 0.2, True), (0.03, 0.004, False), (0.03, 0.045, False),
                                                  (0.3, 0.33, True), (0.03, float("nan"), False)])
def test_probe_verdict(before, after, learned):
    ok, why = probe_verdict(before, after, 100)
    assert ok == learned
    assert "100 steps" in why or "nan" in why
    if after < before:
        assert "fell towards all-background" in why


def _fake_probe(learns, calls=None):
    """Soft Dice 0.03 -> 0.2 where `learns(cfg)`, else -> 0.004 (a collapse); no clock involved. Each call's
    (input side, base filters, steps) is appended to `calls`."""
    def probe(cfg, steps):
        if calls is not None:
            calls.append((cfg.img_rows, cfg.base_filters, steps))
        return dict(steps=steps, soft_dice_before=0.03, soft_dice_after=0.2 if learns(cfg) else 0.004,
                    train_step_s=None)
    return probe


def _plan(data, learns, **kw):
    return make_plan(data, budget_minutes=1000, measure=_fake_measure, log=lambda m: None,
                     probe=_fake_probe(learns), **kw)


def test_plan_refuses_a_candidate_that_does_not_learn(tmp_path):
    data = _small_structures(tmp_path)
    plan = _plan(data, lambda cfg: cfg.base_filters < 32)
    s = plan["choice"]["settings"]
    assert (s["img_rows"], s["base_filters"], s["loss"], s["batch_dice"]) == (256, 16, "dice", False)
    refused = [c for c in plan["candidates"] if "refused" in c]
    assert [(c["img_rows"], c["base_filters"]) for c in refused] == [(256, 32)]
    assert len(refused[0]["probes"]) == 2 and "fell towards all-background" in refused[0]["refused"]
    assert plan["probe"]["chosen"]["soft_dice_after"] == 0.2


def test_plan_takes_the_next_recipe_when_the_planned_loss_collapses(tmp_path):
    data = _small_structures(tmp_path)
    plan = _plan(data, lambda cfg: cfg.loss == "bce_dice" and cfg.batch_dice)
    s = plan["choice"]["settings"]
    assert (s["img_rows"], s["base_filters"], s["loss"], s["batch_dice"]) == (256, 32, "bce_dice", True)
    assert "refused the planned loss" in plan["choice"]["reasons"]["loss"]
    with pytest.raises(DsalError, match="no planned candidate learned"):
        _plan(data, lambda cfg: False)
    with pytest.raises(DsalError, match="no planned candidate learned"):  # a loss the user fixed is kept
        _plan(data, lambda cfg: cfg.loss == "bce_dice" and cfg.batch_dice, fixed={"LOSS": "dice"})


def test_full_supervision_plans_the_whole_pool(tmp_path):
    data = _small_structures(tmp_path)
    plan = make_plan(data, budget_minutes=1000, measure=_fake_measure, log=lambda m: None, full_supervision=True)
    s, pred = plan["choice"]["settings"], plan["choice"]["predicted"]
    sched = schedule(16, s["batch_size"])
    assert s["nb_labeled"] == 16 and s["nb_iterations"] == 0 and plan["full_supervision"]
    assert s["nb_initial_epochs"] == sched["nb_initial_epochs"] + 5 * sched["nb_active_epochs"]
    best = [c for c in plan["candidates"]
            if (c["img_rows"], c["base_filters"]) == (s["img_rows"], s["base_filters"])][0]
    per_epoch = math.ceil(16 / s["batch_size"]) * best["train_step_s"] + best["eval_step_s"]  # 4 val images: 1 batch
    assert pred["train_s"] == pytest.approx(s["nb_initial_epochs"] * per_epoch, abs=0.02) and pred["score_s"] == 0


# ------------------------------------------------------------------ planning inside its budget (issue 25)
def _row(side, filters, step_s, predicted_s, trace_s=0.0, rule=True):
    return dict(img_rows=side, img_cols=side, base_filters=filters, batch_size=16, train_step_s=step_s,
                trace_s=trace_s, predicted_s=predicted_s, meets_size_rule=rule)


def test_probe_target_by_hand():
    big, small, other = _row(256, 32, 7.0, 100, trace_s=10), _row(256, 16, 0.5, 50, trace_s=5), _row(64, 16, 0.1, 9,
                                                                                                    rule=False)
    # 45 s: 0.8 x (45 - 10) / 7 = 4 steps at the choice; 0.8 x (45 - 5) / 0.5 = 64 at the cheaper 256 (not at the
    # faster 64x64, which is on the other side of the size rule)
    assert probe_target(big, [big, small, other], 45.0) == (small, 64)
    assert probe_target(big, [big, small, other], 10_000.0) == (big, PROBE_STEPS)  # capped
    assert probe_target(big, [big, small, other], 20.0) is None  # 0.8 x 15 / 0.5 = 24 < MIN_PROBE_STEPS
    assert MIN_PROBE_STEPS == 30


def _planning(budget_s, planned_s_ago=0.0):
    import time

    return Planning(fp={}, fixed={}, base={}, n_pool=10, n_val=2, memory=2**30, load_s=0.0, budget_s=budget_s,
                    started=time.perf_counter() - planned_s_ago)


def test_planning_time_counts_against_the_budget():
    rows = [_row(128, 16, 0.1, 70), _row(64, 16, 0.05, 30)]
    best, *_ = choose_learning(_planning(120.0), rows, {}, None, [])
    assert best["img_rows"] == 128  # 70 s fits 120
    best, why, *_ = choose_learning(_planning(120.0, planned_s_ago=60.0), rows, {}, None, [])
    assert best["img_rows"] == 64 and "minutes the budget leaves after planning" in why  # 60 s left


def test_a_probe_takes_a_share_of_the_budget_and_a_stand_in_when_short():
    calls = []
    big, small = _row(256, 32, 7.0, 100, trace_s=10), _row(256, 16, 0.5, 50, trace_s=5)
    configs = {(256, 256, 32, 16): resolve(dict(img_rows=256, img_cols=256, base_filters=32)),
               (256, 256, 16, 16): resolve(dict(img_rows=256, img_cols=256, base_filters=16))}
    plan = _planning(900.0)  # a 15-minute budget: the probes may take 90 s, the first half of it
    best, _, recipe, learned = choose_learning(plan, [big, small], configs, _fake_probe(lambda c: True, calls),
                                               [{}], reserve=PROBE_SHARE * 900.0)
    assert best is big and recipe == {} and learned["probed_at"] == "256x256 f16"
    assert calls == [(256, 16, int(0.8 * (45 - 5) / 0.5))]  # 64 steps of the 0.5-s candidate, never 100 of 7 s
    calls.clear()
    big2, small2 = dict(big), _row(256, 16, 2.0, 50, trace_s=5)  # even the stand-in has no room for 30 steps
    best, _, _, learned = choose_learning(_planning(900.0), [big2, small2], configs,
                                          _fake_probe(lambda c: True, calls), [{}], reserve=90.0)
    assert calls == [] and learned is None and "leaves no room" in best["not_probed"]
    # the planned loss refused at the stand-in, and no room left for nnU-Net's recipe: that one is taken unprobed
    nnunet = {"loss": "bce_dice", "batch_dice": True}
    big3, small3 = _row(256, 32, 7.0, 100, trace_s=10), _row(256, 16, 0.5, 50, trace_s=5)
    refuse = _fake_probe(lambda c: c.loss == "bce_dice")

    def slow_refusal(cfg, steps):  # a probe that takes 1 s: of 48 s, 24 gave 30 steps, (48 - 1) / 2 gives 29
        import time

        time.sleep(1.0)
        return refuse(cfg, steps)

    best, _, recipe, learned = choose_learning(_planning(900.0), [big3, small3], configs, slow_refusal, [{}, nnunet],
                                               reserve=48.0)
    assert recipe == nnunet and learned is None and "taken unprobed" in best["not_probed"]
    assert [p["learned"] for p in best["probes"]] == [False]


def test_the_probe_step_time_corrects_the_prediction(tmp_path):
    """The probe's warm step time, as a ratio to the measured one, scales the choice's training step."""
    data = _small_structures(tmp_path)

    def probe(cfg, steps):
        measured = _fake_measure(cfg)["train_step_s"]
        return dict(steps=steps, soft_dice_before=0.03, soft_dice_after=0.2, train_step_s=1.5 * measured)

    plain = make_plan(data, budget_minutes=1000, measure=_fake_measure, log=lambda m: None)
    slower = make_plan(data, budget_minutes=1000, measure=_fake_measure, log=lambda m: None, probe=probe)
    assert slower["probe"]["chosen"]["step_margin"] == pytest.approx(1.5)
    assert slower["probe"]["train_step_s_from"] == "probe"
    assert slower["choice"]["predicted"]["train_s"] > 1.3 * plain["choice"]["predicted"]["train_s"]


def test_record_actual_writes_planned_against_actual(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    plan = {"budget_minutes": 12, "plan_s": 90.0,
            "choice": {"predicted": {"load_s": 5.0, "trace_s": 5.0, "train_s": 400.0, "score_s": 100.0,
                                     "total_s": 510.0}}}
    (run / "plan.json").write_text(json.dumps(plan))
    (run / "learning_curve.csv").write_text("round,n_oracle,n_pseudo,val_dice,train_s,score_s,stop\n"
                                            "0,10,0,0.5,300.5,0,\n1,20,0,0.6,150.0,60.25,\n")
    lines = []
    actual = record_actual(run / "plan.json", run, 700.0, True, log=lines.append)
    assert actual == {"rounds": 2, "train_s": 450.5, "score_s": 60.2, "command_s": 700.0,
                      "planned_in_this_command": True, "total_s": 700.0, "planned_total_s": 600.0,
                      "within_budget": True}
    assert json.loads((run / "plan.json").read_text())["actual"] == actual
    assert "planned 10.0 min of 12 (planning 1.5), took 11.7 min" in lines[0]
    resumed = record_actual(run / "plan.json", run, 800.0, False, log=lines.append)
    assert "total_s" not in resumed and "(resumed)" in lines[1]
