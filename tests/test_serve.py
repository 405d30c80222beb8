"""`dsal serve`: the Label Studio ML backend.

Fast tests call the handlers as plain methods on a cold-start run (no model is trained): the brush RLE,
the labelling config, the predictions, the webhook's journal and its refusals. The slow end-to-end test
runs a real Label Studio server (its own virtual environment) and a real headless Chromium against
`dsal serve`; it never skips in CI: a missing server or browser fails it with what is missing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from http.server import ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pytest

from dsal_tf.active import run_active_learning
from dsal_tf.config import resolve
from dsal_tf.errors import DsalError
from dsal_tf.oracle import AwaitingAnnotation
from dsal_tf.serve import RunLock, make_handler
from dsal_tf.serve.backend import Backend
from dsal_tf.serve.datastore import Datastore, confidences
from dsal_tf.serve.labels import (
    BadRequest,
    check_results,
    decode,
    encode,
    label_config_xml,
    parse_label_config,
    prediction,
    task_name,
)

from .conftest import tiny_values
from .test_oracle import unlabelled_copy

CUSTOM_CONFIG = """<View>
  <Header value="Draw the lesion"/>
  <Image name="photo" value="$img"/>
  <BrushLabels name="paint" toName="photo"><Label value="skin"/><Label value="mole" background="red"/></BrushLabels>
</View>"""


# ------------------------------------------------------------------ labels: config and RLE
def test_label_config_tags_are_found_by_type_not_name():
    cfg = parse_label_config(CUSTOM_CONFIG, label="mole")
    assert (cfg.image, cfg.image_key, cfg.brush, cfg.label) == ("photo", "img", "paint", "mole")
    assert parse_label_config(label_config_xml()).label == "lesion"  # the only label
    with pytest.raises(BadRequest, match="none of them 'lesion'.*--label"):
        parse_label_config(CUSTOM_CONFIG)  # two labels, neither the default
    for bad, match in [('<View><Image name="i" value="$i"/></View>', "no a BrushLabels"),
                       ('<View><Text name="t" value="$t"/></View>', "no an Image and a BrushLabels"),
                       ('<View><Image name="i" value="$i"/><BrushLabels name="b" toName="x"><Label value="a"/>'
                        '</BrushLabels></View>', "points at 'x'"),
                       ("<View", "not XML")]:
        with pytest.raises(BadRequest, match=match) as err:
            parse_label_config(bad)
        assert err.value.status == 400


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (48, 48), (17, 300)])
def test_brush_rle_round_trip(shape):
    rng = np.random.default_rng(sum(shape))
    mask = (rng.random(shape) > 0.6).astype(np.uint8)
    mask[: shape[0] // 2] = 1  # long runs (the RLE's 16-bit lengths) beside noise
    assert np.array_equal(decode(encode(mask), *shape), mask > 0)
    with pytest.raises(BadRequest, match="another image"):
        decode(encode(mask), shape[0] + 1, shape[1])


def test_prediction_is_one_region_at_the_mask_size_or_none():
    cfg = parse_label_config(CUSTOM_CONFIG, label="mole")
    mask = np.zeros((6, 9), np.uint8)
    mask[1:3, 2:7] = 1
    pred = prediction(mask, cfg, 0.25, "dsal-x-r01")
    assert (pred["score"], pred["model_version"]) == (0.25, "dsal-x-r01")
    (region,) = pred["result"]
    assert (region["from_name"], region["to_name"], region["type"]) == ("paint", "photo", "brushlabels")
    assert (region["original_height"], region["original_width"]) == (6, 9)
    assert region["value"]["brushlabels"] == ["mole"]
    assert np.array_equal(decode(region["value"]["rle"], 6, 9), mask > 0)
    assert prediction(np.zeros((6, 9)), cfg, 0.5, "v")["result"] == [] == prediction(None, cfg, None, "v")["result"]


def test_check_results_names_what_is_wrong():
    cfg = parse_label_config(label_config_xml())
    good = prediction(np.ones((4, 5)), cfg, None, "v")["result"]
    check_results(good, cfg, (4, 5), "a")
    check_results([], cfg, (4, 5), "a")  # nothing drawn: an empty mask
    cases = [([{**good[0], "type": "rectanglelabels"}], "'rectanglelabels' region"),
             ([{**good[0], "value": {**good[0]["value"], "brushlabels": ["hair"]}}], r"labelled \['hair'\]"),
             ([{**good[0], "from_name": "other"}], "from 'other'"),
             ([{**good[0], "value": {"format": "png", "brushlabels": ["lesion"]}}], "without an RLE"),
             (good, "drawn at 5x4 but its image is 6x4")]
    for results, match in cases:
        with pytest.raises(BadRequest, match=match) as err:
            check_results(results, cfg, (4, 6) if "6x4" in match else (4, 5), "annotation 3")
        assert err.value.status == 422 and "annotation 3" in str(err.value)


def test_task_name_from_name_field_or_url():
    assert task_name({"name": "SYN_1", "image": "/x/other.jpg"}) == "SYN_1"
    assert task_name({"image": "/data/local-files/?d=exp/r/to_annotate/SYN_2.jpg"}) == "SYN_2"
    assert task_name({"img": "/data/upload/1/0a1b2c3d-SYN_3.png"}, "img") == "SYN_3"


def test_confidences_follow_the_rank():
    rows = [{"rank": str(k), "uncertainty": u} for k, u in ((1, "0.9"), (2, "0.5"), (3, "0.1"))]
    assert confidences(rows) == pytest.approx([0.1, 0.5, 0.9])  # 1 - uncertainty: lowest first
    shuffled = [{**r, "uncertainty": u} for r, u in zip(rows, ["0.5", "0.9", "0.1"])]  # e.g. a diverse pick
    assert confidences(shuffled) == [0.25, 0.5, 0.75]
    assert confidences([{**r, "uncertainty": ""} for r in rows]) == [0.25, 0.5, 0.75]  # cold start


# ------------------------------------------------------------------ the handlers on a cold start
@pytest.fixture
def cold(tiny_data, tmp_path):
    """A run waiting for its first 8 masks (nothing trained) and a backend on it without a worker."""
    data = unlabelled_copy(tiny_data, tmp_path / "people")
    cfg = resolve(tiny_values(data, tmp_path, exp_name="cold", oracle="files"))
    with pytest.raises(AwaitingAnnotation):
        run_active_learning(cfg, log=lambda m: None)
    messages: list[str] = []
    return Backend(cfg, log=messages.append), tiny_data, messages


def annotation(backend, name, mask, aid, task_id=None, label="lesion", who=1):
    """A Label Studio webhook body for one annotation of `name` with `mask` drawn."""
    cfg = backend.label_config
    result = prediction(mask, cfg, None, "")["result"]
    for region in result:
        region["value"]["brushlabels"] = [label]
    task = {"id": task_id or aid + 100, "data": {"image": f"/data/local-files/?d=x/{name}.jpg"}}
    return {"action": "ANNOTATION_CREATED", "task": task, "project": {"label_config": label_config_xml()},
            "annotation": {"id": aid, "task": task["id"], "result": result, "completed_by": who,
                           "updated_at": "2026-01-01T00:00:00Z"}}


def truth(tiny_data, name) -> np.ndarray:
    return (cv2.imread(str(tiny_data / "trainGT" / f"{name}_segmentation.png"), cv2.IMREAD_GRAYSCALE) > 0)


def test_setup_health_and_predict(cold):
    backend, _, _ = cold
    assert backend.setup({"schema": label_config_xml()}) == (200, {"model_version": "dsal-cold-r00"})
    status, body = backend.health()
    assert status == 200 and (body["round"], body["state"], body["model_version"]) == (0, "waiting", "dsal-cold-r00")
    with pytest.raises(BadRequest, match="no a BrushLabels"):
        backend.setup({"schema": '<View><Image name="i" value="$i"/></View>'})
    rows = backend.store.requested(0)
    tasks = [{"data": {"image": f"/data/local-files/?d=a/{rows[1]['file']}"}}, {"data": {"name": "not-asked"}},
             {"data": {"name": rows[0]["name"]}}]
    status, body = backend.predict({"tasks": tasks, "label_config": label_config_xml()})
    first, unknown, second = body["results"]
    assert status == 200 and unknown == {"result": [], "score": None, "model_version": "dsal-cold-r00"}
    assert first["result"] == [] == second["result"]  # a cold start has no prelabels ...
    assert second["score"] < first["score"]  # ... but its k-center order: rank 1 first


def test_predict_returns_the_prelabel_png(cold):
    backend, _, _ = cold
    row = backend.store.requested(0)[2]
    pre = np.zeros((48, 48), np.uint8)
    pre[10:30, 5:40] = 255
    folder = backend.store.run.to_annotate(0) / "prelabels"
    cv2.imwrite(str(folder / f"{row['name']}.png"), pre)
    _, body = backend.predict({"tasks": [{"data": {"name": row["name"]}}]})
    (region,) = body["results"][0]["result"]
    assert np.array_equal(decode(region["value"]["rle"], 48, 48), pre > 0)


def test_webhook_keeps_masks_in_an_idempotent_journal(cold):
    backend, tiny_data, _ = cold
    store, rows = backend.store, backend.store.requested(0)
    a, b = rows[0]["name"], rows[1]["name"]
    status, body = backend.webhook(annotation(backend, a, truth(tiny_data, a), aid=1))
    assert status == 200 and body["accepted"] == [{"annotation": 1, "name": a, "changed": True}]
    assert body["missing"] == 7
    journal = store.journal(0)
    assert [(r["event"], r["annotation"], r["name"], r["who"]) for r in journal] == [("created", 1, a, 1)]
    kept = cv2.imread(str(store.folder(0) / journal[0]["mask"]), cv2.IMREAD_GRAYSCALE)
    assert np.array_equal(kept > 0, truth(tiny_data, a)) and set(np.unique(kept)) <= {0, 255}
    # the same annotation again: nothing changes, not even the journal
    again = {**annotation(backend, a, truth(tiny_data, a), aid=1), "action": "ANNOTATION_UPDATED"}
    status, body = backend.webhook(again)
    assert status == 200 and body["accepted"][0]["changed"] is False and store.journal(0) == journal
    # an update with another mask, then a second annotator on the same image: the latest wins, all journalled
    backend.webhook({**annotation(backend, a, np.zeros((48, 48)), aid=1), "action": "ANNOTATION_UPDATED"})
    backend.webhook(annotation(backend, a, truth(tiny_data, b), aid=2, task_id=101, who=7))
    assert [(r["event"], r["annotation"]) for r in store.journal(0)] == [("created", 1), ("updated", 1), ("created", 2)]
    assert store.live(0)[a]["annotation"] == 2 and store.live(0)[a]["who"] == 7
    # deleting the winner brings back the other annotation's mask
    status, body = backend.webhook({"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 2}, {"id": 99}]})
    assert status == 200 and body["names"] == [a]
    assert store.live(0)[a]["annotation"] == 1 and not (store.folder(0) / "masks" / "2.png").exists()
    assert backend.webhook({"action": "PROJECT_UPDATED"}) == (200, {"status": "ignored", "action": "PROJECT_UPDATED"})
    assert Datastore(backend.cfg).live(0) == store.live(0)  # a restarted server reads the same


def test_webhook_refuses_bad_annotations_and_touches_nothing(cold):
    backend, tiny_data, messages = cold
    store, rows = backend.store, backend.store.requested(0)
    a = rows[0]["name"]
    gt = Path(backend.cfg.data_path) / "trainGT"
    not_asked = next(p.stem for p in (tiny_data / "trainImg").iterdir() if p.stem not in {r["name"] for r in rows})
    good = annotation(backend, a, truth(tiny_data, a), aid=5)
    rect = json.loads(json.dumps(good))
    rect["annotation"]["result"][0]["type"] = "rectanglelabels"
    small = annotation(backend, a, np.ones((40, 48)), aid=5)
    cases = [(rect, 422, "'rectanglelabels' region"),
             (annotation(backend, a, truth(tiny_data, a), aid=5, label="hair"), 422, r"labelled \['hair'\]"),
             (annotation(backend, not_asked, np.ones((48, 48)), aid=5), 422, "did not ask for"),
             (small, 422, "drawn at 48x40 but its image is 48x48"),
             ({**good, "annotation": {**good["annotation"], "was_cancelled": True}}, 422, "was skipped")]
    for body, want, match in cases:
        status, answer = backend.webhook(body)
        assert status == want and answer["accepted"] == [], answer
        assert re.search(match, answer["error"]), answer["error"]
    assert store.journal(0) == [] and list(gt.iterdir()) == []
    assert len([m for m in messages if m.startswith("refused annotation 5")]) == len(cases)
    status, answer = backend.webhook({"action": "START_TRAINING"})
    assert status == 409 and "misses 8 of 8" in answer["error"]


def test_bulk_annotations_and_the_last_mask_starts_the_round(cold):
    backend, tiny_data, _ = cold
    rows = backend.store.requested(0)
    bodies = [annotation(backend, r["name"], truth(tiny_data, r["name"]), aid=10 + i) for i, r in enumerate(rows)]
    bulk = {"action": "ANNOTATIONS_CREATED", "project": bodies[0]["project"],
            "annotation": [b["annotation"] for b in bodies[:-1]], "task": [b["task"] for b in bodies[:-1]]}
    status, body = backend.webhook(bulk)
    assert status == 200 and len(body["accepted"]) == 7 and body["missing"] == 1 and backend.jobs.empty()
    status, body = backend.webhook(bodies[-1])
    assert status == 200 and body["missing"] == 0
    assert backend.state == "training" and backend.jobs.get()[0] == backend.advance  # the worker's next job
    status, body = backend.webhook({**bodies[0], "action": "ANNOTATION_UPDATED"})
    assert status == 409 and "training" in body["error"]
    _, info = backend.info()
    assert info["counts"] == {"requested": 8, "received": 8, "labelled": 8, "pseudo_labelled": 0}


def test_http_server_routes_and_refuses_bad_bodies(cold):
    backend, _, _ = cold
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(backend))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"

    def call(path, data=None):
        req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    try:
        assert call("/health")[1]["model_version"] == "dsal-cold-r00"
        assert call("/metrics")[1]["prelabel_dice"] == []
        assert call("/predict", b"not json")[0] == 400
        assert call("/predict", b"[1, 2]")[0] == 400
        for body, match in (({"action": "ANNOTATION_CREATED", "annotation": "x"}, "list of objects"),
                            ({"action": "ANNOTATIONS_DELETED", "annotations": [{"id": "seven"}]}, "no integer id"),
                            ({"action": "ANNOTATION_CREATED", "annotation": {"task": 1}}, "no integer id")):
            status, answer = call("/webhook", json.dumps(body).encode())
            assert status == 400 and match in answer["error"], answer
        status, body = call("/setup", json.dumps({"schema": "<View/>"}).encode())
        assert status == 400 and "no an Image and a BrushLabels" in body["error"]
        assert call("/nowhere")[0] == 404
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_the_worker_writes_what_the_handlers_queue(cold):
    backend, tiny_data, _ = cold
    a = backend.store.requested(0)[0]["name"]
    backend.start()
    try:
        assert backend.webhook(annotation(backend, a, truth(tiny_data, a), aid=3))[0] == 200
        assert backend._thread.is_alive() and list(backend.store.live(0)) == [a]
        assert backend.webhook({"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 3}]})[1]["names"] == [a]
        backend.state = "scoring"  # a job the worker refuses: its answer reaches the handler
        with pytest.raises(BadRequest, match="scoring"):
            backend.submit(lambda: backend._delete([3]))
    finally:
        backend.stop()
    assert not backend._thread.is_alive() and backend.store.live(0) == {}


def test_serve_needs_a_run_with_the_human_oracle(tiny_data, tmp_path):
    from dsal_tf.run import Run
    from dsal_tf.serve import serve

    cfg = resolve(tiny_values(tiny_data, tmp_path, exp_name="sim"))
    with pytest.raises(DsalError, match="no run at"):
        serve(cfg)
    Run.create(cfg)
    with pytest.raises(DsalError, match="ORACLE = 'simulated'.*dsal run --oracle files"):
        serve(cfg)
    Run.create(cfg.replace(exp_name="people", oracle="files"))
    with pytest.raises(DsalError, match="no round .* has asked for masks"):
        serve(cfg.replace(exp_name="people"))


def test_one_server_per_run(tmp_path):
    first = RunLock(tmp_path, "http://127.0.0.1:1")
    with pytest.raises(DsalError, match=r"already served \(pid \d+, http://127.0.0.1:1\)"):
        RunLock(tmp_path, "http://127.0.0.1:2")
    first.release()
    RunLock(tmp_path, "http://127.0.0.1:2").release()


def test_dsal_run_refuses_a_run_that_a_server_drives(tiny_data, tmp_path):
    """The server's worker owns the run folder: `dsal run` on it stops with one line (exit 2), and runs once
    the server is gone."""
    from click.testing import CliRunner

    from dsal_tf.cli import cli
    from dsal_tf.serve import served_by

    run = tmp_path / "exp" / "served"
    run.mkdir(parents=True)
    assert served_by(run) is None
    lock = RunLock(run, "http://127.0.0.1:9")
    assert served_by(run) == f"pid {os.getpid()}, http://127.0.0.1:9"
    args = ["run", "--data", str(tiny_data), "--exp-dir", str(tmp_path / "exp"), "--exp", "served", "--no-progress"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and "is driven by dsal serve (pid" in result.output
    assert result.output.count("\n") == 1 and not (run / "config.json").exists()
    lock.release()
    assert served_by(run) is None


# ------------------------------------------------------------------ end to end: Label Studio, dsal serve, Chromium
LS_VENV = Path(os.environ.get("DSAL_LABEL_STUDIO_VENV", Path.home() / ".cache" / "dsal-tf" / "label-studio"))
LS_USER, LS_PASSWORD, LS_TOKEN = "annotator@example.com", "dsal-e2e-password", "dsal0e2e0legacy0token0123"
GREEN_MARGIN = 90  # a brush pixel: green above red and blue by this much (#00ff00 at Label Studio's opacity)
BROWSER = r'''
import json, sys, time
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

url, user, password, chromium, driver_path, *pages = sys.argv[1:]
opts = webdriver.ChromeOptions()
opts.binary_location = chromium
for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,800"):
    opts.add_argument(arg)
driver = webdriver.Chrome(service=Service(driver_path), options=opts)
try:
    driver.get(url + "/user/login/")
    driver.find_element(By.NAME, "email").send_keys(user)
    driver.find_element(By.NAME, "password").send_keys(password)
    driver.find_element(By.CSS_SELECTOR, "button[type=submit], input[type=submit]").click()
    WebDriverWait(driver, 60).until(lambda d: "/user/login" not in d.current_url)
    for page, out in zip(pages[::2], pages[1::2]):
        driver.get(url + page)
        WebDriverWait(driver, 120).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".konvajs-content canvas"))
        time.sleep(4)  # the image and brush layers draw after the canvas exists
        stage = driver.find_element(By.CSS_SELECTOR, ".konvajs-content")
        driver.save_screenshot(out)
        print(json.dumps({"rect": stage.rect, "ratio": driver.execute_script("return window.devicePixelRatio")}))
finally:
    driver.quit()
'''


def tools() -> dict[str, Path]:
    """Label Studio (with selenium) in its own environment and Debian's Chromium; in CI a missing one fails."""
    found = {"label-studio": LS_VENV / "bin" / "label-studio", "python": LS_VENV / "bin" / "python",
             "chromium": Path(shutil.which("chromium") or "/usr/bin/chromium"),
             "chromedriver": Path(shutil.which("chromedriver") or "/usr/bin/chromedriver")}
    missing = [name for name, path in found.items() if not path.exists()]
    if not missing and subprocess.run([found["python"], "-c", "import selenium"], capture_output=True).returncode:
        missing.append("selenium")
    if missing:
        why = (f"missing {', '.join(missing)}: .ci/run installs them (label-studio and selenium in {LS_VENV}, "
               "set DSAL_LABEL_STUDIO_VENV to use another; apt-get install chromium chromium-driver)")
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why + " (this is not CI, so the test is skipped)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check, timeout: float, proc=None, log: Path | None = None):
    """Poll `check()` until it returns something truthy; fail with `what` and the log's tail otherwise."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            break
        try:
            got = check()
        except (OSError, ValueError, KeyError, TypeError):
            got = None
        if got:
            return got
        time.sleep(1)
    tail = log.read_text()[-3000:] if log is not None and log.is_file() else ""
    pytest.fail(f"timed out waiting for {what}\n{tail}")


@contextmanager
def process(args, log: Path, env: dict, cwd: Path | None = None):
    """A server process with its output in `log`, ended by its process id."""
    with log.open("a") as out:
        proc = subprocess.Popen([str(a) for a in args], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGINT)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)


def label_studio_env(root: Path, data: Path) -> dict:
    """A local Label Studio: sqlite in `data`, files served from `root`, a backend on loopback, a legacy
    token, no sign-up, no calls out."""
    return {**os.environ, "LABEL_STUDIO_BASE_DATA_DIR": str(data), "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
            "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(root), "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
            "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true", "LABEL_STUDIO_USERNAME": LS_USER,
            "LABEL_STUDIO_PASSWORD": LS_PASSWORD, "LABEL_STUDIO_USER_TOKEN": LS_TOKEN, "ML_BLOCK_LOCAL_IP": "false",
            "SSRF_PROTECTION_ENABLED": "false", "COLLECT_ANALYTICS": "false", "LATEST_VERSION_CHECK": "false",
            "CONVERTER_DOWNLOAD_RESOURCES": "false", "FEATURE_FLAGS_OFFLINE": "true"}


def get_json(url: str, token: str | None = None):
    req = urllib.request.Request(url, headers={"Authorization": f"Token {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def prediction_of(task, version: str) -> dict:
    preds = [p if isinstance(p, dict) else p.model_dump(mode="json") for p in task.predictions or []]
    return next(p for p in preds if p["model_version"] == version)


def region_mask(pred: dict, shape) -> np.ndarray:
    masks = [decode(r["value"]["rle"], r["original_height"], r["original_width"]) for r in pred["result"]]
    return np.any(masks, axis=0) if masks else np.zeros(shape, bool)


def brush_pixels(png: Path, rect: dict, ratio: float) -> int:
    """Pixels of the label's colour inside the labelling canvas of a screenshot."""
    shot = cv2.imread(str(png))[..., ::-1].astype(int)
    x0, y0 = int(rect["x"] * ratio), int(rect["y"] * ratio)
    crop = shot[y0:y0 + int(rect["height"] * ratio), x0:x0 + int(rect["width"] * ratio)]
    return int(np.sum(crop[..., 1] - np.maximum(crop[..., 0], crop[..., 2]) >= GREEN_MARGIN))


def files_run_after_round_0(sim_cfg, root: Path):
    """The person's run: the simulated run's data with only round 0's masks drawn, so the files oracle
    takes the same first labels, trains round 0 and asks for round 1 (with prelabels)."""
    from dsal_tf.pool import Pool

    data = unlabelled_copy(Path(sim_cfg.data_path), root / "people")
    first = Pool.load(sim_cfg.run_dir / "round_00" / "pool.npz").labelled
    names = sorted(p.stem for p in (Path(sim_cfg.data_path) / "trainImg").iterdir())
    for i in first:
        shutil.copy(Path(sim_cfg.data_path) / "trainGT" / f"{names[i]}_segmentation.png", data / "trainGT")
    cfg = resolve(tiny_values(data, root, exp_name="studio", oracle="files", initial_selection="random"))
    with pytest.raises(AwaitingAnnotation, match="round 1: waiting for 4 of 4"):
        run_active_learning(cfg, log=lambda m: None)
    return cfg


class Session:
    """The test's Label Studio server, the run, and `dsal serve` (started and ended as the test goes)."""

    def __init__(self, found: dict, tmp_path: Path, cfg):
        from label_studio_sdk import LabelStudio

        self.found, self.tmp, self.cfg, self.store = found, tmp_path, cfg, Datastore(cfg)
        self.url, self.port = found["url"], free_port()
        self.backend = f"http://127.0.0.1:{self.port}"
        self.ls = LabelStudio(base_url=self.url, api_key=LS_TOKEN)
        self.log = tmp_path / "serve.log"
        self.project: int | None = None

    def serve(self):
        """`dsal serve --connect` as a person starts it (the token from the environment)."""
        args = [sys.executable, "-m", "dsal_tf.cli", "serve", "--exp", self.cfg.name, "--exp-dir", self.cfg.exp_dir,
                "--port", self.port, "--connect", self.url, "--document-root", self.found["root"]]
        return process(args, self.log, {**os.environ, "LABEL_STUDIO_API_KEY": LS_TOKEN},
                       cwd=Path(__file__).resolve().parents[1])

    def connected(self, proc) -> dict:
        info = wait_for("dsal serve to connect", lambda: (i := get_json(f"{self.backend}/info"))["label_studio"][
            "connected"] and i, 300, proc, self.log)
        self.project = info["label_studio"]["project"]
        return info

    def tasks(self, r: int) -> dict:
        return {t.data["name"]: t for t in self.ls.tasks.list(project=self.project, fields="all")
                if t.data.get("round") == r}

    def annotate(self, r: int, rows: list[dict]) -> None:
        """Annotators draw the true masks of `rows` in Label Studio (its API, which fires the webhook)."""
        tasks, cfg = self.tasks(r), parse_label_config(label_config_xml())
        for row in rows:
            mask = cv2.imread(str(self.found["truth"] / f"{row['name']}_segmentation.png"), cv2.IMREAD_GRAYSCALE)
            self.ls.annotations.create(id=tasks[row["name"]].id, result=prediction(mask, cfg, None, "")["result"])

    def check_round(self, r: int) -> dict:
        """Every task of round `r` has a prediction of its model version whose RLE is the prelabel PNG and
        whose score orders it like the manifest; the project serves the rank-1 task next, and its image."""
        version, rows = f"dsal-{self.cfg.name}-r{r:02d}", self.store.requested(r)
        assert self.ls.projects.get(self.project).model_version == version
        tasks = self.tasks(r)
        assert sorted(tasks) == sorted(row["name"] for row in rows)  # each once, whatever restarted
        for row, score in zip(rows, confidences(rows)):
            pred = prediction_of(tasks[row["name"]], version)
            pre = cv2.imread(str(self.store.run.to_annotate(r) / "prelabels" / f"{row['name']}.png"), 0)
            assert np.array_equal(region_mask(pred, pre.shape), pre > 0), row["name"]
            assert pred["score"] == pytest.approx(score)
        assert get_json(f"{self.url}/api/projects/{self.project}/next", LS_TOKEN)["data"]["name"] == rows[0]["name"]
        req = urllib.request.Request(self.url + tasks[rows[0]["name"]].data["image"],
                                     headers={"Authorization": f"Token {LS_TOKEN}"})
        with urllib.request.urlopen(req, timeout=30) as answer:
            assert answer.read() == (self.store.run.to_annotate(r) / rows[0]["file"]).read_bytes()
        return tasks

    def check_imported(self, r: int) -> None:
        """Round `r`'s masks reached trainGT/ as the annotators drew them, through the import's journal."""
        from dsal_tf.annotate import sha256

        live = self.store.live(r)
        imports = json.loads((self.cfg.run_dir / f"round_{r:02d}" / "imports.json").read_text())
        assert {f["name"]: f["sha256"] for f in imports[-1]["files"]} == {n: rec["sha256"] for n, rec in live.items()}
        for name, rec in live.items():
            gt = Path(self.cfg.data_path) / "trainGT" / f"{name}_segmentation.png"
            assert sha256(gt) == rec["sha256"]
            assert np.array_equal(cv2.imread(str(gt), 0) > 0, cv2.imread(str(self.found["truth"] / gt.name), 0) > 0)

    def screenshots(self, tasks: list, folder: Path) -> list[int]:
        """Headless Chromium logs in and opens each task's labelling page; brush pixels on each canvas."""
        folder.mkdir(parents=True, exist_ok=True)
        outs = [folder / f"task_{t.id}.png" for t in tasks]
        pages = [a for t, out in zip(tasks, outs) for a in (f"/projects/{self.project}/data?task={t.id}", out)]
        f = self.found
        done = subprocess.run([f["python"], "-c", BROWSER, self.url, LS_USER, LS_PASSWORD, f["chromium"],
                               f["chromedriver"], *pages], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        shown = [json.loads(line) for line in done.stdout.strip().splitlines()[-len(tasks):]]
        return [brush_pixels(out, s["rect"], s["ratio"]) for out, s in zip(outs, shown)]


@pytest.mark.slow
def test_label_studio_end_to_end(tiny_run, tmp_path):
    """A person's round through Label Studio: prelabels in, annotations back (one webhook lost while the
    server was killed), the next round trained, scored and shown, and the same labels as the simulated oracle."""
    from dsal_tf.pool import Pool

    found = tools()
    started, root, ls_port = time.monotonic(), tmp_path / "root", free_port()
    root.mkdir()
    found.update(url=f"http://127.0.0.1:{ls_port}", root=root, truth=Path(tiny_run.data_path) / "trainGT")
    ls_log = tmp_path / "label-studio.log"
    with process([found["label-studio"], "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", ls_port,
                  "--enable-legacy-api-token"], ls_log, label_studio_env(root, tmp_path / "ls-data")) as ls_proc:
        cfg = files_run_after_round_0(tiny_run, root)  # trains while Label Studio migrates its database
        wait_for("Label Studio to start", lambda: get_json(f"{found['url']}/health"), 300, ls_proc, ls_log)
        s = Session(found, tmp_path, cfg)
        rows = s.store.requested(1)
        with s.serve() as proc:
            s.connected(proc)
            assert [m.url for m in s.ls.ml.list(project=s.project)] == [s.backend]
            assert s.ls.projects.get(s.project).sampling == "Uncertainty sampling"
            s.check_round(1)
            s.annotate(1, rows[:2])
            assert sorted(s.store.live(1)) == sorted(r["name"] for r in rows[:2])  # on disk once answered
            os.kill(proc.pid, signal.SIGKILL)  # a crash in the middle of the round
            proc.wait(10)
        s.annotate(1, rows[2:3])  # while no server listens: its webhook is lost
        with s.serve() as proc:
            info = s.connected(proc)  # the same project, tasks and backend; the lost annotation fetched
            assert info["counts"]["received"] == 3 and len(s.ls.ml.list(project=s.project)) == 1
            s.annotate(1, rows[3:])
            wait_for("round 2's tasks", lambda: s.ls.projects.get(s.project).model_version == "dsal-studio-r02", 600,
                     proc, s.log)
            s.check_imported(1)
            new = s.check_round(2)
            sim, mine = (Pool.load(c.run_dir / "round_02" / "pool.npz") for c in (tiny_run, cfg))
            assert np.array_equal(mine.labelled_map, sim.labelled_map)  # the simulated oracle's choice, same seed
            metrics = get_json(f"{s.backend}/metrics")
            assert [c["round"] for c in metrics["learning_curve"]] == [0, 1]
            assert [(c["round"], c["n"]) for c in metrics["prelabel_dice"]] == [(1, 4)]
            # a prelabel (the round-2 task with the most foreground) and an annotator's mask, as a person sees them
            shown = [max(new.values(), key=lambda t: region_mask(prediction_of(t, "dsal-studio-r02"), (48, 48)).sum()),
                     s.tasks(1)[rows[0]["name"]]]
            assert all(n > 100 for n in s.screenshots(shown, cfg.run_dir / "label_studio")), "no brush on a canvas"
    print(f"end to end in {time.monotonic() - started:.0f}s")
