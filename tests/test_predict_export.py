"""`dsal predict` and `dsal export` on a real (tiny) trained run: real checkpoints, real exports."""

import json

import cv2
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from dsal_tf.cli import cli
from dsal_tf.errors import DsalError
from dsal_tf.export import export_model
from dsal_tf.predict import PredictSettings, choose_round, load_round, predict_folder, to_original

pytestmark = pytest.mark.slow


@pytest.fixture
def trained(tiny_run):
    """The session's shared tiny run (rounds 0..2); predicting and exporting only read it."""
    return tiny_run


def new_images(folder):
    """Images nobody has seen, of other sizes and kinds than the training set."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    cv2.imwrite(str(folder / "wide.jpg"), rng.integers(0, 255, (30, 70, 3), dtype=np.uint8))
    cv2.imwrite(str(folder / "gray.png"), rng.integers(0, 255, (64, 40), dtype=np.uint8))
    square = np.full((32, 32, 3), 40, np.uint8)
    cv2.circle(square, (16, 16), 9, (200, 120, 90), -1)
    cv2.imwrite(str(folder / "square.png"), square)
    return folder


@pytest.mark.compiled  # predict's traced batch function
def test_predict_keeps_names_and_sizes(trained, tmp_path):
    src = new_images(tmp_path / "in")
    table = predict_folder(trained, src, tmp_path / "out", "last", probabilities=True, overlays=True,
                           progress=False, log=lambda m: None)
    assert table["name"].tolist() == ["gray", "square", "wide"]
    for name, shape in (("wide", (30, 70)), ("gray", (64, 40)), ("square", (32, 32))):
        mask = cv2.imread(str(tmp_path / "out" / f"{name}.png"), cv2.IMREAD_GRAYSCALE)
        assert mask.shape == shape and set(np.unique(mask)) <= {0, 255}
        assert cv2.imread(str(tmp_path / "out" / "probabilities" / f"{name}.png")).shape[:2] == shape
        assert (tmp_path / "out" / "overlays" / f"{name}.jpg").is_file()
    saved = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert saved["agreement"].between(0, 1).all() and len(saved) == 3

    # at the model's own size, the mask is the model's thresholded main head, pixel for pixel
    cfg, _, model, normalizer = load_round(trained, "last")
    img = cv2.cvtColor(cv2.imread(str(src / "square.png")), cv2.COLOR_BGR2RGB)
    prob = model(normalizer(img[None]))["main"].numpy()[0]
    mask = cv2.imread(str(tmp_path / "out" / "square.png"), cv2.IMREAD_GRAYSCALE) > 0
    assert np.array_equal(mask, to_original(prob, (32, 32)) > 0.5)
    assert np.array_equal(mask, prob[..., 0] > 0.5)

    # the CLI's positional form and a PredictSettings are the same call
    again = predict_folder(trained, src, tmp_path / "again", settings=PredictSettings("last", progress=False),
                           log=lambda m: None)
    pd.testing.assert_frame_equal(again, predict_folder(trained, src, tmp_path / "pos", "last", False, False, 0.8,
                                                        None, False, log=lambda m: None))
    pd.testing.assert_frame_equal(again, table)
    for name in ("wide", "gray", "square"):
        assert (tmp_path / "again" / f"{name}.png").read_bytes() == (tmp_path / "out" / f"{name}.png").read_bytes()
    with pytest.raises(TypeError, match="not both"):
        predict_folder(trained, src, tmp_path / "out3", "last", settings=PredictSettings())

    with pytest.raises(DsalError, match="is the input folder"):
        predict_folder(trained, src, src, log=lambda m: None)
    (src / "broken.png").write_bytes(b"")
    with pytest.raises(DsalError, match="broken.png is empty"):
        predict_folder(trained, src, tmp_path / "out2", log=lambda m: None)


def test_round_choice(trained):
    run = trained.run_dir
    curve = pd.read_csv(run / "learning_curve.csv")
    assert choose_round(run, "last") == 2
    assert choose_round(run, "best") == int(curve.loc[curve["val_dice"].idxmax(), "round"])
    assert choose_round(run, "0") == 0
    with pytest.raises(DsalError, match="round 7 .* is not finished"):
        choose_round(run, 7)


def test_savedmodel_export_matches_the_keras_model(trained, tmp_path):
    import tensorflow as tf

    path = export_model(trained, tmp_path / "export", "savedmodel", "last", log=lambda m: None)
    sidecar = json.loads((tmp_path / "export" / "dsal_export.json").read_text())
    assert sidecar["input"]["trained_size"] == [32, 32] and sidecar["output"]["threshold"] == 0.5
    cfg, _, model, normalizer = load_round(trained, "last")
    x = np.random.default_rng(1).integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    want = model(normalizer(x))["main"].numpy()
    served = tf.saved_model.load(str(path))
    got = served.serve(tf.constant(x)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    bigger = served.serve(tf.constant(np.repeat(np.repeat(x, 2, 1), 2, 2))).numpy()  # resized inside
    assert bigger.shape == (2, 32, 32, 1)


def test_onnx_export_matches_the_keras_model(trained, tmp_path):
    pytest.importorskip("tf2onnx")
    ort = pytest.importorskip("onnxruntime")
    result = CliRunner().invoke(cli, ["export", "--exp-dir", trained.exp_dir, "--exp", trained.name,
                                      "--round", "last", "--format", "onnx", "-o", str(tmp_path / "onnx")])
    assert result.exit_code == 0, result.output
    cfg, _, model, normalizer = load_round(trained, "last")
    x = np.random.default_rng(2).integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    want = model(normalizer(x))["main"].numpy()
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"))
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_predict_command_line(trained, tmp_path):
    src = new_images(tmp_path / "in")
    args = ["predict", "--exp-dir", trained.exp_dir, "--exp", trained.name, "-i", str(src), "-o",
            str(tmp_path / "out"), "--no-progress"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "3 masks from round" in result.output and "images/s" in result.output
    args[args.index("-i") + 1] = str(tmp_path / "nothing-here")
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and "not found" in result.output
