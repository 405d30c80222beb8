"""`dsal plan` on a folder of NIfTI volumes: the fingerprint on hand-made labels (anisotropic spacings, boxes
whose voxels and mm^3 are counted by hand), nnU-Net's patch rule, the budget rule with fake timings, the batch
counts of a volume run, and `dsal plan` end to end on real tiny U-Nets."""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from dsal_tf.cli import cli
from dsal_tf.config import load_config, resolve
from dsal_tf.plan import (
    EPOCH_STEPS,
    make_plan,
    measure_volume_steps,
    patch_ladder,
    predict_seconds,
    probe_sample,
    probe_volume_learning,
    schedule,
    table,
    volume_base_settings,
    volume_batches,
    volume_fingerprint,
    write_plan,
)
from dsal_tf.volume_space import SCORE_VOLUMES

# the planner times and probes the compiled step a run takes (eager steps would mislead it)
pytestmark = pytest.mark.compiled

FINE, COARSE = (1.0, 1.0, 3.0), (1.5, 1.5, 4.0)  # mm; both anisotropic (3 and 4 mm slices)
# (split, name, shape, spacing, boxes): a box is (start, size) in voxels; labels are the union of their boxes.
# Structures (26-connected): a 6x6x2 box (72 voxels, 216 mm^3) and a 2x2x1 one (4 voxels, 12 mm^3); 32 voxels
# at 1x1x3 mm (96 mm^3) and at 1.5x1.5x4 mm (288 mm^3); none; 6x6x3 (108, 324 mm^3) with a 1-voxel speck
# (under 1% of 108); val: 3x3x1 (9 voxels, 27 mm^3) and 5x5x2 (50, 150 mm^3); test: one voxel (never read).
VOLUMES = [
    ("train", "a", (24, 32, 8), FINE, [((4, 4, 2), (6, 6, 2)), ((15, 20, 6), (2, 2, 1))]),
    ("train", "b", (20, 28, 10), FINE, [((6, 8, 3), (4, 4, 2))]),
    ("train", "c", (16, 24, 6), COARSE, [((5, 9, 2), (4, 4, 2))]),
    ("train", "d", (22, 30, 8), FINE, []),
    ("train", "e", (26, 34, 9), FINE, [((8, 10, 3), (6, 6, 3)), ((22, 30, 0), (1, 1, 1))]),
    ("val", "v0", (24, 32, 8), FINE, [((9, 12, 4), (3, 3, 1))]),
    ("val", "v1", (20, 28, 8), FINE, [((6, 8, 3), (5, 5, 2))]),
    ("test", "t0", (24, 32, 8), FINE, [((1, 1, 1), (1, 1, 1))]),
]
TARGET = (1.0, 1.0, 3.0)  # the median training spacing per axis: (1, 1, 1.5, 1, 1) and (3, 3, 4, 3, 3)
# at 1x1x3 mm: a, b, d, e keep their shapes, c becomes (16 x 1.5, 24 x 1.5, 6 x 4 / 3) = (24, 36, 8)
RESAMPLED = [(24, 32, 8), (20, 28, 10), (24, 36, 8), (22, 30, 8), (26, 34, 9)]
DEPTH = 3


def _affine(spacing):
    a = np.diag([*spacing, 1.0])
    a[:3, 3] = (3.0, -2.0, 5.0)
    return a


def _label(shape, boxes):
    label = np.zeros(shape, np.uint8)
    for start, size in boxes:
        label[tuple(slice(s, s + n) for s, n in zip(start, size))] = 1
    return label


def write_volume(root, split, name, image, label, spacing):
    for folder, array in ((f"{split}Img", image), (f"{split}GT", label)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(array, _affine(spacing)), str(root / folder / f"{name}.nii.gz"))


def make_volumes(root):
    """MRI-like volumes: 100 + 80 on the label + noise, float32 (the darkest voxel is far above air)."""
    rng = np.random.default_rng(7)
    for split, name, shape, spacing, boxes in VOLUMES:
        label = _label(shape, boxes)
        image = (100.0 + 80.0 * label + rng.normal(0, 3, shape)).astype(np.float32)
        write_volume(root, split, name, image, label, spacing)
    return root


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    return make_volumes(tmp_path_factory.mktemp("plan_volumes"))


# ------------------------------------------------------------------------------------ fingerprint
def test_volume_fingerprint_by_hand(volumes):
    fp = volume_fingerprint(volumes, {"depth": DEPTH})
    assert fp["space"] == "volume" and fp["counts"] == {"train": 5, "val": 2, "test": 1}
    assert fp["shape"] == {"median": [22, 30, 8], "min": [16, 24, 6], "max": [26, 34, 10]}
    sp = fp["spacing"]
    assert sp["median"] == [1, 1, 3] and sp["target"] == list(TARGET) and sp["min"] == [1, 1, 3]
    assert sp["max"] == [1.5, 1.5, 4] and sp["distinct"] == 2 and sp["target_from"] == "the pool's median spacing"
    assert sp["anisotropy"] == 3.0 and sp["slice_axis"] == 2  # 3 mm slices against 1 mm in-plane
    assert fp["resampled_shape"] == {"median": [24, 32, 8], "min": [20, 28, 8], "max": [26, 36, 10]}
    assert fp["pool_voxels"] == sum(math.prod(s) for s in RESAMPLED)
    assert fp["grid"] == [32, 40, 16]  # the largest resampled shape of every split, (26, 36, 10), up to multiples of 8
    m = fp["masks"]
    assert m["masks_read"] == 7 and m["empty_masks"] == 1 and m["volumes_without_label"] == 0
    assert m["components"] == 7 and m["specks_ignored"] == 1 and m["all_components_min"] == 1
    # structures: 4, 9, 32, 32, 50, 72, 108 voxels; 12, 27, 96, 150, 216, 288, 324 mm^3
    assert m["component_voxels_min"] == 4 and m["component_voxels_median"] == 32
    assert m["component_voxels_p5"] == pytest.approx(4 + 0.3 * (9 - 4))
    assert m["component_mm3_min"] == 12 and m["component_mm3_median"] == 150
    assert m["component_mm3_p5"] == pytest.approx(12 + 0.3 * (27 - 12))
    assert m["component_target_voxels_min"] == 4  # 12 mm^3 in voxels of 1 x 1 x 3 mm
    # extents (mm) per axis: 6 2 4 6 6 3 5 | the same | 6 3 6 8 9 3 6: medians 5, 5, 6 -> 5, 5, 2 voxels at 1x1x3
    assert m["box_mm_median"] == [5, 5, 6] and m["box_target_voxels"] == [5, 5, 2]
    sizes = {name: math.prod(shape) for _, name, shape, _, _ in VOLUMES}
    fractions = [76 / sizes["a"], 32 / sizes["b"], 32 / sizes["c"], 0.0, 109 / sizes["e"], 9 / sizes["v0"],
                 50 / sizes["v1"]]
    assert m["foreground_fraction_mean"] == pytest.approx(np.mean(fractions), abs=1e-5)
    it = fp["intensity"]
    assert it["modality"] == "MRI" and it["sampled_volumes"] == 5 and it["dtypes"] == ["float32"]
    assert fp["load_s_per_volume"] > 0


def test_volume_fingerprint_respects_a_user_spacing(volumes):
    fp = volume_fingerprint(volumes, {"depth": DEPTH, "spacing": (2.0, 2.0, 3.0)})
    assert fp["spacing"]["target"] == [2.0, 2.0, 3.0] and fp["spacing"]["target_from"] == "SPACING, set by the user"
    # a: (24, 32, 8) at 1x1x3 -> (12, 16, 8); c: (16, 24, 6) at 1.5x1.5x4 -> (12, 18, 8)
    assert fp["resampled_shape"]["median"] == [12, 16, 8]
    assert fp["masks"]["component_target_voxels_min"] == 1  # 12 mm^3 in voxels of 12 mm^3


def test_ct_is_recognised_and_windowed(tmp_path):
    """Air at -1000 HU, soft tissue at 40, and 200 labelled voxels at -50, -49, ..., 149 HU."""
    for split in ("train", "val"):
        image = np.full((10, 10, 10), -1000, np.int16)
        image[2:8, 2:8, 2:8] = 40
        label = np.zeros(image.shape, np.uint8)
        label[2:7, 2:7, 2:10] = 1
        image[label > 0] = np.arange(200) - 50
        write_volume(tmp_path, split, "ct", image, label, (1.0, 1.0, 1.0))
    fp = volume_fingerprint(tmp_path, {"depth": DEPTH})
    it = fp["intensity"]
    assert it["modality"] == "CT" and it["min"] == -1000 and it["dtypes"] == ["int16"]
    assert it["foreground_p00_5"] == pytest.approx(-50 + 0.005 * 199) and it["foreground_p99_5"] == pytest.approx(
        -50 + 0.995 * 199)
    base = volume_base_settings(fp, DEPTH)
    assert base["volume_normalization"][0] == "ct" and base["ct_window"][0] == (-49, 148)


# ------------------------------------------------------------------------------------ patch rule
def _sizes(ladder):
    return [tuple(s["patch_size"]) for s in ladder]


def test_patch_ladder_on_the_fixture():
    # median (24, 32, 8) at 1x1x3 mm, DEPTH 3: the start (isotropic in mm) is clipped to the median; the slice
    # axis (8) is at its floor, so only the in-plane sides shrink: the tie 24/24 = 32/32 goes to the later axis
    ladder = patch_ladder((24, 32, 8), TARGET, depth=3, box=(5, 5, 2))
    assert _sizes(ladder) == [(16, 16, 8), (16, 24, 8), (24, 24, 8), (24, 32, 8)]
    assert all(s["meets_size_rule"] and s["structure_box"] == [5, 5, 2] for s in ladder)


def test_patch_ladder_hippocampus_like():
    # about 35 x 51 x 35 voxels at 1 mm: the default PATCH_SIZE (32, 48, 32) is the top at DEPTH 4
    assert _sizes(patch_ladder((35, 51, 35), (1.0, 1.0, 1.0), depth=4)) == [(32, 32, 32), (32, 48, 32)]
    # a structure 40 voxels long on the first axis: no patch holds it, the top (32 there) is the best there is
    ladder = patch_ladder((35, 51, 35), (1.0, 1.0, 1.0), depth=4, box=(40, 40, 20))
    assert [s["meets_size_rule"] for s in ladder] == [False, True]


@pytest.mark.parametrize("median,spacing,top,mm_ratio", [
    # thick slices: the slice axis keeps the median's few voxels (20 -> 16); in-plane 224 of 256 (0.8 mm)
    ((256, 256, 20), (0.8, 0.8, 5.0), (224, 224, 16), None),
    # 128**3 voxels isotropic in mm: 1/spacing x 127.1 = (181.6, 181.6, 63.6) -> (176, 176, 64), multiples of 16:
    # 123 x 123 x 128 mm, not 176 voxels on every side
    ((512, 512, 200), (0.7, 0.7, 2.0), (176, 176, 64), 1.1),
])
def test_patch_ladder_respects_anisotropy(median, spacing, top, mm_ratio):
    sizes = _sizes(patch_ladder(median, spacing, depth=4))
    assert sizes[-1] == top and sizes[0] == (32, 32, min(32, top[2]))
    assert all(p % 16 == 0 and p <= m for s in sizes for p, m in zip(s, median))
    assert all(abs(s[0] - s[1]) in (0, 16) and s[2] <= top[2] for s in sizes)  # in-plane sides shrink in turn
    assert [math.prod(s) for s in sizes] == sorted(math.prod(s) for s in sizes)
    if mm_ratio is not None:
        mm = [p * d for p, d in zip(top, spacing)]
        assert max(mm) / min(mm) < mm_ratio


# ------------------------------------------------------------------------------------ budget rule
def test_volume_batches_and_predicted_time_by_hand():
    grid = (32, 40, 16)
    count = volume_batches(grid)
    cfg = resolve(dict(depth=3, batch_size=2, patch_size=(16, 24, 8), steps_per_epoch=0, nb_labeled=2,
                       nb_iterations=2, nb_next_sample=1, nb_initial_epochs=3, nb_active_epochs=2,
                       pseudo_policy="none"))
    # one expected pass: 20480 / 3072 -> 7 patches a volume; 3 volumes -> 21 patches -> 11 steps of 2;
    # validation: one whole volume a batch; scoring: SCORE_VOLUMES volumes a call (score_pool's)
    assert count(cfg, "train", 3) == 11 and count(cfg, "val", 3) == 3
    assert count(cfg, "score", 3) == math.ceil(3 / SCORE_VOLUMES)
    assert count(cfg.replace(steps_per_epoch=10), "train", 3) == 10
    timing = dict(train_step_s=1.0, eval_step_s=0.5, score_step_s=0.25, epoch_overhead_s=0.1, trace_s=2.0,
                  round_trace_s=1.0)
    p = predict_seconds(cfg.replace(steps_per_epoch=10), timing, n_pool=5, n_val=2, load_s=3.0, batches=count)
    # initial: 3 x (10 + 2 x 0.5 + 0.1); rounds 1, 2: 2 x (10 + 1 + 0.1) each; scoring 3 then 2 unlabelled
    # volumes: their calls of 0.25 s (3 + 2 at one volume a call) and 1 s of tracing each round
    assert p["train_s"] == pytest.approx(3 * 11.1 + 2 * 2 * 11.1)
    calls = math.ceil(3 / SCORE_VOLUMES) + math.ceil(2 / SCORE_VOLUMES)
    assert p["score_s"] == pytest.approx(calls * 0.25 + 2 * 1.0)
    assert p["total_s"] == pytest.approx(3.0 + 2.0 + p["train_s"] + p["score_s"])


def _fake_measure(cfg):
    """Seconds growing with patch voxels, filters and batch, like the real U-Net (no clock involved)."""
    from dsal_tf.volume_space import VolumeSettings

    voxels = math.prod(VolumeSettings.from_config(cfg).patch_size)
    step = 4e-3 * voxels / 2048 * cfg.base_filters / 16 * cfg.batch_size / 2
    return dict(train_step_s=step, eval_step_s=step, score_step_s=2 * step, epoch_overhead_s=0.0, trace_s=0.0,
                round_trace_s=0.0)


def _plan(data, budget, **kw):
    return make_plan(data, budget_minutes=budget, measure=_fake_measure, log=lambda m: None,
                     fixed={"DEPTH": DEPTH, **kw.pop("fixed", {})}, **kw)


def test_volume_plan_with_fake_timings(volumes):
    plan = _plan(volumes, 1000)
    s = plan["choice"]["settings"]
    assert plan["space"] == "volume"
    assert (s["patch_size"], s["base_filters"]) == ((24, 32, 8), 32)  # everything fits: the median shape, 32 filters
    assert s["spacing"] == TARGET and s["volume_normalization"] == "zscore" and "ct_window" not in s
    assert s["depth"] == DEPTH and s["loss"] == "bce_dice" and s["foreground_oversample"] == 0.33
    # a batch of two 16x16x8 patches already covers 4096 of the pool's 31892 voxels (> 5%): the smallest batch
    assert s["batch_size"] == 2
    # 2 initial labels (5 x 600 / 1600); one pass over them: 2 x ceil(20480 / 6144) / 2 = 4 steps -> at least 10
    assert s["nb_labeled"] == 2 and s["steps_per_epoch"] == EPOCH_STEPS[0] == 10
    assert (s["nb_initial_epochs"], s["nb_active_epochs"]) == (45, 20)  # 450 and 200 steps
    assert s == {**s, **{k: v for k, v in schedule(5, 2, lambda n: 10).items()}}
    ch = plan["choice"]
    assert "nnU-Net's rule" in ch["reasons"]["patch_size"] and "5x5x6 mm" in ch["reasons"]["patch_size"]
    assert any("smallest structure (12 mm^3) is 4 voxels" in w for w in plan["warnings"])
    text = table(plan)
    assert "chosen: patch 24x32x8 at 1x1x3 mm" in text and "MRI" in text
    # a tight budget: the largest candidate whose predicted time fits
    tight = _plan(volumes, plan["candidates"][-1]["predicted_s"] / 60 * 0.99)
    t = tight["choice"]
    assert t["predicted"]["total_s"] <= tight["budget_minutes"] * 60
    better = [c for c in tight["candidates"] if (math.prod(c["patch_size"]), c["base_filters"])
              > (math.prod(t["settings"]["patch_size"]), t["settings"]["base_filters"]) and c["base_filters"] >= 16]
    assert better and all(c["predicted_s"] > tight["budget_minutes"] * 60 for c in better)


def test_volume_plan_keeps_the_users_settings(volumes, tmp_path):
    plan = _plan(volumes, 1000, fixed={"PATCH_SIZE": "16, 16, 8", "STEPS_PER_EPOCH": 7, "BATCH_SIZE": 4},
                 full_supervision=True)
    s, r = plan["choice"]["settings"], plan["choice"]["reasons"]
    assert s["patch_size"] == (16, 16, 8) and s["steps_per_epoch"] == 7 and s["batch_size"] == 4
    assert r["patch_size"] == r["steps_per_epoch"] == "set by the user"
    assert s["nb_labeled"] == 5 and s["nb_iterations"] == 0  # full supervision: the whole pool, no rounds
    out, const = write_plan(plan, tmp_path / "plan.json", exp_name="vol")
    cfg = load_config(const)
    assert cfg.settings["patch_size"] == (16, 16, 8) and cfg.depth == DEPTH and cfg.data_path == str(volumes)
    assert json.loads(out.read_text())["choice"]["settings"]["patch_size"] == [16, 16, 8]


# ------------------------------------------------------------------------------------ real U-Nets
@pytest.mark.slow
def test_measure_and_probe_on_tiny_volumes_are_quick(volumes):
    cfg = resolve(dict(data_path=str(volumes), depth=DEPTH, base_filters=2, batch_size=2, patch_size=(16, 16, 8),
                       steps_per_epoch=10, nb_labeled=2, mixed_precision="off"))
    images, masks = probe_sample(volumes)(cfg)
    assert images.shape == masks.shape == (5, 32, 40, 16, 1) and images.dtype == np.float16
    # a, b, e as they are; c's 4x4x2 box at 1.5x1.5x4 mm is 6x6x2 at 1x1x3 mm (nearest: 8 mm of slices -> 2)
    assert masks.sum() == 76 + 32 + 6 * 6 * 2 + 109
    kept = {}
    timing = measure_volume_steps(cfg, images, masks, keep=kept)  # traces the U-Net (seconds on 2 cores)
    assert all(timing[k] > 0 for k in ("train_step_s", "eval_step_s", "score_step_s")) and timing["trace_s"] > 0
    probe = probe_volume_learning(cfg, images, masks, steps=15, model=kept.pop(cfg.to_json()))
    assert probe["steps"] == 15 and probe["train_step_s"] > 0
    assert probe["probe_s"] < 10  # the measured model goes on: no second trace, 15 steps and 8 window passes
    assert 0 <= probe["soft_dice_before"] <= 1 and 0 <= probe["soft_dice_after"] <= 1


@pytest.mark.slow
def test_dsal_plan_on_volumes_writes_a_plan_the_run_accepts(volumes, tmp_path):
    from dsal_tf.components import build
    from dsal_tf.plan import plan_for_run

    out = tmp_path / "p" / "plan.json"
    # 15 s: even the smallest patch needs more (45 + 5 x 20 epochs of 10 steps), so one candidate is measured
    # (each traces a 3D U-Net for seconds), then the epochs are cut towards the 150-step floor
    result = CliRunner().invoke(cli, ["plan", "--data", str(volumes), "--budget-minutes", "0.25", "--out", str(out),
                                      "--set", f"DEPTH={DEPTH}", "--set", "BASE_FILTERS=4",
                                      "--set", "MIXED_PRECISION=off"])
    assert result.exit_code == 0, result.output
    plan = json.loads(out.read_text())
    assert plan["space"] == "volume" and "chosen: patch 16x16x8" in result.output
    [c] = plan["candidates"]
    assert c["train_step_s"] > 0 and c["score_step_s"] > 0 and c["predicted_s"] > 15
    # the probes' share of 15 s (1.5 s) has no room for 30 steps after a 3D trace: not probed, and it says so
    assert "probes" not in c and "leaves no room" in plan["probe"]["not_probed"] and plan["probe"]["chosen"] is None
    assert any("learning probe did not run" in w for w in plan["warnings"])
    assert "epochs cut to fit" in plan["choice"]["reasons"]["patch_size"]
    s = plan["choice"]["settings"]
    assert 15 <= s["nb_initial_epochs"] < 45 and 1 <= s["nb_active_epochs"] < 20  # the floor: 150 steps, 1 a round
    cfg = load_config(out.with_name("plan_constants.py"))
    parts = build(cfg)  # every planned name is a setting the run knows
    assert parts.space.rank == 3 and list(parts.space.patch_size) == s["patch_size"]
    assert parts.space.layout.spacing == TARGET and cfg.base_filters == 4 and cfg.depth == DEPTH
    # PRESET = "auto" with this plan stored in the run folder resolves to the same settings
    run_cfg = resolve(dict(preset="auto", data_path=str(volumes), exp_dir=str(tmp_path / "exp"), exp_name="auto"))
    run_cfg.run_dir.mkdir(parents=True)
    (run_cfg.run_dir / "plan.json").write_text(out.read_text())
    logged = []
    auto = plan_for_run(run_cfg, {"data_path": str(volumes)}, log=logged.append)
    assert "using the stored plan" in logged[0] and auto.preset == "auto"
    assert auto.settings["patch_size"] == s["patch_size"] and auto.settings["steps_per_epoch"] == s["steps_per_epoch"]
    assert build(auto).space.patch_size == tuple(s["patch_size"]) and auto.loss == s["loss"]
