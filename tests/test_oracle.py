"""The human oracle (`ORACLE = "files"`): cold start, requests, imports, stop criteria.

The end-to-end test plays the annotator with the synthetic ground truth and checks that the
files oracle labels exactly what the simulated oracle labels: the two modes are one algorithm.
"""

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from dsal_tf.active import STOPPED, completed_rounds, run_active_learning
from dsal_tf.annotate import import_label_studio, import_masks
from dsal_tf.cli import cli
from dsal_tf.config import resolve
from dsal_tf.errors import DsalError
from dsal_tf.oracle import MANIFEST, ORACLES, TO_ANNOTATE, AwaitingAnnotation, read_manifest
from dsal_tf.pool import Pool
from dsal_tf.strategies import k_center_greedy

from .conftest import tiny_values


# ------------------------------------------------------------------ hand-made cases
def test_k_center_greedy_spreads_and_skips_duplicates():
    x = np.array([[0.0], [1.0], [10.0], [10.0], [20.0], [11.0]])
    # around center 0: farthest is 20, then the first 10 (distance 10 to both), never its duplicate
    assert k_center_greedy(x, 2, centers=[0]).tolist() == [4, 2]
    assert k_center_greedy(x, 3, centers=[0]).tolist()[:2] == [4, 2]
    assert 3 not in k_center_greedy(x, 3, centers=[0]).tolist()
    # no centers: the first pick is index 0 (or rng-drawn), the rest spread out
    assert k_center_greedy(x, 2).tolist() == [0, 4]
    assert len(k_center_greedy(x, 99, centers=[0])) == 5


def initial_labels(cfg, images, known):
    """Round 0's labels as the loop takes them: the oracle's rule over the space's thumbnails."""
    from dsal_tf.space import space_for

    oracle = ORACLES[cfg.oracle].from_config(cfg)
    return oracle.first_labels(lambda: space_for(cfg).thumbnails(images), known, cfg.nb_labeled, cfg.seed)


def stop_reason(cfg, run, pool):
    """The first stop rule's reason before the next round queries (what `active.stop_reason` asks)."""
    from dsal_tf.components import build
    from dsal_tf.run import Run

    return next((why for rule in build(cfg).stop_rules if (why := rule.before_query(pool, Run(run)))), None)


def test_initial_random_labels_match_the_original_protocol():
    cfg = resolve(dict(nb_labeled=5, seed=1))
    images = np.zeros((20, 8, 8, 3), np.uint8)
    chosen = initial_labels(cfg, images, np.zeros(20, bool))
    assert np.array_equal(chosen, Pool.initial(20, 5, seed=1).labelled)


def test_initial_kcenter_keeps_known_labels_and_adds_spread_ones():
    cfg = resolve(dict(nb_labeled=3, seed=0, initial_selection="kcenter"))
    images = np.zeros((6, 8, 8, 1), np.uint8)
    images[:, :, :, 0] = np.array([0, 0, 0, 250, 120, 250], np.uint8)[:, None, None]
    known = np.array([True, False, False, False, False, False])
    chosen = initial_labels(cfg, images, known)
    # image 0 is known (black); the farthest is the first white one (3), then mid-grey (4)
    assert chosen.tolist() == [0, 3, 4]


def test_stop_reason_budget_and_patience(tmp_path):
    cfg = resolve(dict(stop_budget=10, stop_patience=2, stop_min_delta=0.01))
    run = tmp_path
    pool = Pool.from_labelled(20, np.arange(10))
    assert "budget" in stop_reason(cfg, run, pool)
    pool = Pool.from_labelled(20, np.arange(4))
    pd.DataFrame({"round": [0, 1, 2], "val_dice": [0.80, 0.805, 0.809]}).to_csv(run / "learning_curve.csv")
    assert "not improved" in stop_reason(cfg, run, pool)  # best of last 2 < 0.80 + 0.01
    pd.DataFrame({"round": [0, 1, 2], "val_dice": [0.80, 0.805, 0.811]}).to_csv(run / "learning_curve.csv")
    assert stop_reason(cfg, run, pool) is None


# ------------------------------------------------------------------ helpers
def unlabelled_copy(src, dst):
    """The synthetic set with every training mask removed: what a person starts from."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "trainGT")
    (dst / "trainGT").mkdir()
    return dst


def pending(run):
    rounds = sorted(run.glob(f"round_*/{TO_ANNOTATE}/{MANIFEST}"))
    return rounds[-1].parent, read_manifest(rounds[-1])


def annotate(truth, manifest, out):
    """The person: draw (copy) exactly the requested masks into a fresh folder."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    for row in manifest:
        shutil.copyfile(truth / "trainGT" / f"{row['name']}_segmentation.png",
                        out / f"{row['name']}_segmentation.png")
    return out


# ------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_files_oracle_labels_what_the_simulated_oracle_labels(tiny_run, tmp_path):
    # the simulated oracle's run is the shared tiny run (rounds 0-2, pseudo labels from round 2). The person
    # takes pseudo labels from round 1 (PSEUDO_EPOCH = 1: the oracle's picks come first and do not depend
    # on it), so one query round covers every request: a cold start, then a round with the model's masks
    # and pseudo labels to reject. The shared run's first labels are random (the simulated oracle's "auto"):
    # the person's are too (the files oracle's own cold start, k-center, runs in `cold_start` below)
    sim, tiny_data = tiny_run.run_dir, Path(tiny_run.data_path)
    data = unlabelled_copy(tiny_data, tmp_path / "people")
    cfg = resolve(tiny_values(data, tmp_path, exp_name="human", oracle="files", initial_selection="random",
                              nb_iterations=1, pseudo_epoch=1))
    run = cfg.run_dir
    asked_rounds, messages = [], []
    for _ in range(6):
        try:
            run_active_learning(cfg, log=messages.append)
            break
        except AwaitingAnnotation as wait:
            assert "import-labels" in str(wait)
            folder, manifest = pending(run)
            r = int(folder.parent.name.split("_")[1])
            asked_rounds.append(r)
            if r > 0:  # the model's masks come along, at the images' original size (48x48 here)
                pre = cv2.imread(str(folder / "prelabels" / f"{manifest[0]['name']}.png"), cv2.IMREAD_GRAYSCALE)
                assert pre.shape == (48, 48) and set(np.unique(pre)) <= {0, 255}
                assert manifest[0]["agreement"] != "" and [int(m["rank"]) for m in manifest] == [1, 2, 3, 4]
                tasks = json.loads((folder / "tasks.json").read_text())
                assert [t["data"]["name"] for t in tasks] == [m["name"] for m in manifest]
            assert sorted(p.name for p in folder.glob("*.jpg")) == sorted(m["file"] for m in manifest)
            if r == 1:  # a person rejects one pseudo label by deleting its PNG
                pngs = sorted((run / "round_01" / "pseudo").glob("*.png"))
                assert len(pngs) == 3 and cv2.imread(str(pngs[0]), cv2.IMREAD_GRAYSCALE).shape == (48, 48)
                pngs[0].unlink()
            import_masks(cfg, annotate(tiny_data, manifest, tmp_path / f"drawn{r}"), log=messages.append)
    assert asked_rounds == [0, 1]  # a cold start (empty trainGT), then every round
    assert completed_rounds(run) == [0, 1]
    for r in (0, 1):
        a = Pool.load(sim / f"round_{r:02d}" / "pool.npz")
        b = Pool.load(run / f"round_{r:02d}" / "pool.npz")
        assert np.array_equal(a.labelled_map, b.labelled_map), f"round {r}"
    assert len(Pool.load(run / "round_01" / "pool.npz").pseudo_idx) == 2  # the deleted one did not train
    assert pd.read_csv(run / "learning_curve.csv")["n_pseudo"].tolist() == [0, 2]
    scores = pd.read_csv(run / "round_01" / "scores.csv")
    assert scores["true_dice"].isna().all()  # no hidden masks to compare with
    assert scores["agreement"].notna().all()


@pytest.fixture
def cold_start(tiny_data, tmp_path):
    """A run waiting for its first 8 masks (no model trained yet: fast)."""
    data = unlabelled_copy(tiny_data, tmp_path / "people")
    cfg = resolve(tiny_values(data, tmp_path, exp_name="cold", oracle="files"))
    with pytest.raises(AwaitingAnnotation, match="waiting for 8 of 8"):
        run_active_learning(cfg, log=lambda m: None)
    folder, manifest = pending(cfg.run_dir)
    assert len(manifest) == 8 and not list((folder / "prelabels").glob("*.png"))  # no model yet
    return cfg, data, manifest


def _bad(cfg, data, folder, match):
    before = sorted(p.name for p in (data / "trainGT").iterdir())
    with pytest.raises(DsalError, match=match):
        import_masks(cfg, folder, log=lambda m: None)
    assert sorted(p.name for p in (data / "trainGT").iterdir()) == before == []


def test_import_refuses_bad_masks_and_copies_nothing(cold_start, tiny_data, tmp_path):
    cfg, data, manifest = cold_start
    good = annotate(tiny_data, manifest, tmp_path / "good")
    first = good / f"{manifest[0]['name']}_segmentation.png"

    def variant(name, edit):
        folder = tmp_path / name
        shutil.copytree(good, folder)
        edit(folder)
        return folder

    not_asked = next(n for n in (p.stem for p in (tiny_data / "trainImg").iterdir())
                     if n not in {m["name"] for m in manifest})
    _bad(cfg, data, variant("extra", lambda f: shutil.copyfile(first, f / f"{not_asked}_segmentation.png")),
         "did not ask for")
    _bad(cfg, data, variant("missing", lambda f: (f / first.name).unlink()), r"no mask for .* \(1 of 8 missing\)")
    _bad(cfg, data, variant("size", lambda f: cv2.imwrite(str(f / first.name), np.zeros((10, 12), np.uint8))),
         "size mismatch")
    grey = np.zeros((48, 48), np.uint8)
    grey[:10], grey[10:20] = 100, 200
    _bad(cfg, data, variant("grey", lambda f: cv2.imwrite(str(f / first.name), grey)), "not binary")
    _bad(cfg, data, variant("pattern", lambda f: shutil.copyfile(first, f / "mask.jpg")), "must be named")
    _bad(cfg, data, variant("garbage", lambda f: (f / first.name).write_bytes(b"not a png")), "cannot decode")

    # the command line: one line on stderr, exit code 2
    result = CliRunner().invoke(cli, ["import-labels", "--exp-dir", cfg.exp_dir, "--exp", cfg.name,
                                      "--masks", str(tmp_path / "missing")])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "no mask for" in result.output

    assert import_masks(cfg, good, log=lambda m: None) == 8
    assert len(list((data / "trainGT").glob("*_segmentation.png"))) == 8  # the dataset's naming
    assert import_masks(cfg, good, log=lambda m: None) == 0  # twice: harmless
    record = json.loads((cfg.run_dir / "round_00" / "imports.json").read_text())
    assert len(record) == 2 and len(record[0]["files"]) == 8 and len(record[0]["files"][0]["sha256"]) == 64


def test_import_from_a_label_studio_export(cold_start, tiny_data, tmp_path):
    mask2rle = pytest.importorskip("label_studio_sdk.converter.brush").mask2rle
    cfg, data, manifest = cold_start
    tasks = []
    for row in manifest:
        truth = cv2.imread(str(tiny_data / "trainGT" / f"{row['name']}_segmentation.png"), cv2.IMREAD_GRAYSCALE)
        h, w = truth.shape
        region = {"type": "brushlabels", "original_width": w, "original_height": h,
                  "value": {"format": "rle", "rle": mask2rle(((truth > 0) * 255).astype(np.uint8)),
                            "brushlabels": ["lesion"]}}
        tasks.append({"data": {"image": f"/data/upload/1/0a1b2c3d-{row['file']}"},
                      "annotations": [{"result": [region]}]})
    export = tmp_path / "export.json"
    export.write_text(json.dumps(tasks))
    assert import_label_studio(cfg, export, log=lambda m: None) == 8
    for row in manifest:
        name = f"{row['name']}_segmentation.png"
        got = cv2.imread(str(data / "trainGT" / name), cv2.IMREAD_GRAYSCALE) > 0
        want = cv2.imread(str(tiny_data / "trainGT" / name), cv2.IMREAD_GRAYSCALE) > 0
        assert np.array_equal(got, want)


@pytest.mark.slow
def test_stop_criteria_end_the_loop_with_a_reason(tiny_run, tmp_path):
    from .conftest import copy_run

    # stop settings may change on resume: both runs go on from the shared run's round 0
    cfg = copy_run(tiny_run, tmp_path, keep_rounds=1, exp_name="budget", nb_iterations=4, stop_budget=14)
    logs = []
    run = run_active_learning(cfg, log=logs.append)
    # 8 initial + 4 + 2 (the budget caps round 2's queries), then the budget is spent
    curve = pd.read_csv(run / "learning_curve.csv", keep_default_na=False)
    assert curve["n_oracle"].tolist() == [8, 12, 14]
    assert curve["stop"].tolist()[:2] == ["", ""] and "budget" in curve["stop"].tolist()[2]
    assert completed_rounds(run) == [0, 1, 2] and (run / STOPPED).is_file()
    assert not (run / "round_03").exists()
    logs.clear()
    run_active_learning(cfg, log=logs.append)  # a rerun says why and does nothing
    assert any("stopped after round 2" in m for m in logs)

    agree = copy_run(tiny_run, tmp_path, keep_rounds=1, exp_name="agree", nb_iterations=2, stop_agreement=1e-6)
    run = run_active_learning(agree, log=lambda m: None)
    assert completed_rounds(run) == [0]
    assert "agreement" in json.loads((run / STOPPED).read_text())["reason"]
