"""`dsal predict` and `dsal export` on a tiny trained volume run (NIfTI in, NIfTI out): masks keep each
input's name, grid and affine and equal `predict_file`'s; the probabilities agree with the cached
sliding-window path; bad input is one line and exit code 2; an export plus its sidecar is enough to
predict a volume."""

from __future__ import annotations

import json
import shutil

import cv2
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from dsal_tf.cli import cli
from dsal_tf.config import resolve

from .test_volume_space import PATCH, make_volumes

pytestmark = pytest.mark.slow  # every test reads the module's trained run


@pytest.fixture(scope="module")
def volume_run(tmp_path_factory):
    """One round-0 run on the tiny NIfTI dataset of tests/test_volume_space.py (BASE_FILTERS 4, one
    epoch), trained once for the module; the tests only read it."""
    from dsal_tf.active import run_active_learning

    root = tmp_path_factory.mktemp("vol_predict")
    data = make_volumes(root / "orgData")
    cfg = resolve(dict(data_path=str(data), exp_dir=str(root / "exp"), exp_name="volpred", depth=3, base_filters=4,
                       batch_size=2, patch_size=PATCH, nb_labeled=2, nb_iterations=0, nb_initial_epochs=1,
                       nb_active_epochs=1, pseudo_epoch=1, progress=False, mixed_precision="off"))
    run_active_learning(cfg, log=lambda m: None)
    return cfg


def new_volumes(cfg, folder):
    """Volumes to segment: two test volumes as they are, one val volume saved uncompressed (`.nii`),
    and one with a flipped axis and a shifted origin in its affine."""
    folder.mkdir()
    data = cfg.data_path
    for name in ("t0", "t1"):
        shutil.copy(f"{data}/testImg/{name}.nii.gz", folder / f"{name}.nii.gz")
    w1 = nib.load(f"{data}/valImg/w1.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(w1.dataobj), w1.affine), str(folder / "w1.nii"))
    affine = np.diag([-1.0, 1.0, 2.0, 1.0])
    affine[:3, 3] = (30.0, -5.0, 2.0)
    nib.save(nib.Nifti1Image(np.asarray(nib.load(f"{data}/valImg/w0.nii.gz").dataobj), affine),
             str(folder / "flipped.nii.gz"))
    return folder


def _predict(cfg, src, out, *extra):
    return CliRunner().invoke(cli, ["predict", "--exp-dir", cfg.exp_dir, "--exp", cfg.name, "--round", "last",
                                    "-i", str(src), "-o", str(out), "--no-progress", *extra])


def test_predict_volumes_keeps_names_grids_and_affines(volume_run, tmp_path):
    from dsal_tf.predict import load_round
    from dsal_tf.volume_space import VolumeSpace, predict_file

    src = new_volumes(volume_run, tmp_path / "in")
    result = _predict(volume_run, src, tmp_path / "out", "--probabilities", "--overlays")
    assert result.exit_code == 0, result.output
    assert "4 masks from round 0" in result.output and "volumes/s" in result.output
    files = sorted(p.name for p in src.iterdir())
    assert sorted(p.name for p in (tmp_path / "out").glob("*.nii*")) == files  # the input's names, .nii kept

    cfg, _, model, normalizer = load_round(volume_run, "last")
    table = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert table["file"].tolist() == files and table["name"].tolist() == ["flipped", "t0", "t1", "w1"]
    assert table["agreement"].between(0, 1).all() and table["check"].dtype == bool
    for row in table.itertuples():
        source = nib.load(str(src / row.file))
        written = nib.load(str(tmp_path / "out" / row.file))
        mask = np.asarray(written.dataobj)
        assert written.shape == source.shape == (row.depth, row.height, row.width)
        np.testing.assert_array_equal(written.affine, source.affine)
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
        assert row.foreground_fraction == pytest.approx(mask.mean(), abs=1e-6)
        prob = nib.load(str(tmp_path / "out" / "probabilities" / row.file))
        np.testing.assert_array_equal(prob.affine, source.affine)
        p = prob.get_fdata()
        assert p.shape == source.shape and p.min() >= 0 and p.max() <= 1 + 1e-6
        np.testing.assert_array_equal(p > 0.5, mask > 0)  # p x 255 keeps the side of 0.5
        picture = cv2.imread(str(tmp_path / "out" / "overlays" / f"{row.name}.jpg"))
        assert picture is not None and picture.shape[0] == 192  # three planes in one row
        # the mask is predict_file's, voxel for voxel
        predict_file(model, src / row.file, tmp_path / "direct" / row.file, normalizer, cfg.batch_size)
        np.testing.assert_array_equal(mask, np.asarray(nib.load(str(tmp_path / "direct" / row.file)).dataobj))

    # the probabilities agree with the cached path (volumes stored as float16 on the padded grid)
    space = VolumeSpace.from_config(cfg)
    test = space.load_split("test")
    cached = space.predict(model, test.images, normalizer)
    for i, name in enumerate(test.names):
        want = space.to_original(cached[i], test.files[i], 1)
        got = nib.load(str(tmp_path / "out" / "probabilities" / f"{name}.nii.gz")).get_fdata()
        np.testing.assert_allclose(got, want, atol=0.01)


def _one_error_line(result, *words) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def test_bad_inputs_exit_2_on_one_line(volume_run, tiny_run, tmp_path):
    t0 = f"{volume_run.data_path}/testImg/t0.nii.gz"

    mixed = tmp_path / "mixed"  # a PNG among the volumes
    mixed.mkdir()
    shutil.copy(t0, mixed)
    cv2.imwrite(str(mixed / "slice.png"), np.zeros((8, 8), np.uint8))
    _one_error_line(_predict(volume_run, mixed, tmp_path / "o1"), "slice.png", "2D image", "3D volumes")

    flat = tmp_path / "flat"  # a 2D NIfTI for a 3D run
    flat.mkdir()
    shutil.copy(t0, flat)
    nib.save(nib.Nifti1Image(np.zeros((20, 24), np.float32), np.eye(4)), str(flat / "slice.nii.gz"))
    _one_error_line(_predict(volume_run, flat, tmp_path / "o2"), "slice.nii.gz", "2D NIfTI", "20x24")

    vols = tmp_path / "vols"  # a 3D volume for a 2D run
    vols.mkdir()
    shutil.copy(t0, vols)
    _one_error_line(_predict(tiny_run, vols, tmp_path / "o3"), "t0.nii.gz", "2D images")
    _one_error_line(_predict(tiny_run, mixed, tmp_path / "o4"), "t0.nii.gz", "NIfTI volume")

    twins = tmp_path / "twins"  # t0.nii and t0.nii.gz would both be row t0
    twins.mkdir()
    shutil.copy(t0, twins)
    img = nib.load(t0)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), img.affine), str(twins / "t0.nii"))
    _one_error_line(_predict(volume_run, twins, tmp_path / "o6"), "t0.nii", "rename")
    assert not any((tmp_path / f"o{k}").exists() for k in (1, 2, 3, 4, 6))  # nothing written before the checks pass

    truncated = tmp_path / "truncated"  # a header that reads and voxels that do not: the others are written
    truncated.mkdir()
    shutil.copy(t0, truncated)
    whole = (tmp_path / "vols" / "t0.nii.gz").read_bytes()
    (truncated / "cut.nii.gz").write_bytes(whole[: len(whole) // 2])
    result = _predict(volume_run, truncated, tmp_path / "o7")
    summary, error = result.output.strip().splitlines()
    assert result.exit_code == 2 and summary.startswith("1 masks from round 0")
    assert error.startswith("error: 1 volume(s) could not be decoded") and "cut.nii.gz" in error
    assert (tmp_path / "o7" / "t0.nii.gz").is_file() and not (tmp_path / "o7" / "cut.nii.gz").exists()


def test_export_of_a_volume_run_predicts_a_volume(volume_run, tmp_path):
    """The SavedModel and `dsal_export.json` alone (plus the generic NIfTI and window helpers) give the
    masks `dsal predict` writes: the sidecar names every preprocessing and window setting."""
    import tensorflow as tf

    from dsal_tf.export import export_model
    from dsal_tf.predict import load_round
    from dsal_tf.sliding import sliding_window_outputs
    from dsal_tf.volume_space import SlidingInferer, content_box
    from dsal_tf.volumes import load_case, resize

    path = export_model(volume_run, tmp_path / "export", "savedmodel", "last", log=lambda m: None)
    side = json.loads((tmp_path / "export" / "dsal_export.json").read_text())
    assert side["input"]["name"] == "window" and side["input"]["patch_size"] == list(PATCH)
    assert side["input"]["multiple_of"] == 8 and side["output"]["threshold"] == 0.5
    assert side["preprocessing"]["normalization"] == "zscore" and side["preprocessing"]["spacing"] == [1.0, 1.0, 2.0]
    assert side["sliding_window"]["overlap"] == 0.5 and side["sliding_window"]["blend"] == "gaussian"

    served = tf.saved_model.load(str(path))
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(f"{volume_run.data_path}/testImg/t1.nii.gz", src)
    assert _predict(volume_run, src, tmp_path / "out").exit_code == 0

    pre, win = side["preprocessing"], side["sliding_window"]
    case = load_case(src / "t1.nii.gz", None, pre["spacing"], pre["normalization"], pre["ct_window"])
    low, high = content_box(case.image)
    box = tuple(slice(int(a), int(b)) for a, b in zip(low, high))
    prob = np.zeros(case.image.shape, np.float32)
    prob[box] = sliding_window_outputs(lambda b: served.serve(tf.constant(b)), case.image[box][..., None],
                                       win["patch_size"], win["overlap"], 2, win["sigma_scale"])["main"]
    _, _, model, normalizer = load_round(volume_run, "last")
    keras_prob = SlidingInferer(model, PATCH).volume(case.image[..., None])["main"][..., 0]
    np.testing.assert_allclose(prob, keras_prob, atol=1e-5)
    mask = resize(prob, case.source.shape, 1) > side["output"]["threshold"]
    written = np.asarray(nib.load(str(tmp_path / "out" / "t1.nii.gz")).dataobj) > 0
    assert np.mean(mask != written) < 1e-3  # voxels within float rounding of 0.5 may differ


def test_onnx_export_of_a_volume_run(volume_run, tmp_path):
    pytest.importorskip("tf2onnx")
    ort = pytest.importorskip("onnxruntime")
    from dsal_tf.predict import load_round

    result = CliRunner().invoke(cli, ["export", "--exp-dir", volume_run.exp_dir, "--exp", volume_run.name,
                                      "--round", "last", "--format", "onnx", "-o", str(tmp_path / "onnx")])
    assert result.exit_code == 0, result.output
    _, _, model, _ = load_round(volume_run, "last")
    x = np.random.default_rng(3).normal(size=(2, 16, 24, 32, 1)).astype(np.float32)  # any multiple of 8
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"))
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(got, model(x)["main"].numpy(), atol=1e-4)
