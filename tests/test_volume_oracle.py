"""The human oracle (`ORACLE = "files"`) on NIfTI volumes: the request (volumes, NIfTI prelabels on
each input's grid and affine, manifest, no Label Studio tasks), `dsal import-labels` checking every
volume before it copies any (NIfTI, 3D, the image's shape and affine, binary), and the round trip
through the loop. Tiny synthetic volumes with a flipped, shifted affine, as a scanner writes them."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from dsal_tf.active import run_active_learning
from dsal_tf.cli import cli
from dsal_tf.config import resolve
from dsal_tf.oracle import MANIFEST, ORACLES, README, TO_ANNOTATE, AwaitingAnnotation, read_manifest
from dsal_tf.space import space_for

SPACING = (1.0, 1.0, 2.0)
# pool volumes of different shapes (the padded grid is 24x24x16): prelabels must come back on each one's own
TRAIN = [("p0", (20, 22, 10)), ("p1", (22, 20, 11)), ("p2", (18, 24, 10)), ("p3", (24, 20, 12)),
         ("p4", (20, 20, 10))]
VAL = [("q0", (20, 22, 10)), ("q1", (22, 22, 11))]


def _affine(origin=(30.0, -12.0, 5.0)):
    """x flipped (radiological), 1 x 1 x 2 mm, off the origin: an affine a mask must keep exactly."""
    a = np.diag([-SPACING[0], SPACING[1], SPACING[2], 1.0])
    a[:3, 3] = origin
    return a


def _volume(folder: Path, split: str, name: str, shape, seed: int) -> None:
    rng = np.random.default_rng(seed)
    idx = np.indices(shape).astype(np.float64)
    centre = (np.asarray(shape) - 1) / 2 + rng.uniform(-1.5, 1.5, 3)
    label = (np.sqrt(sum(((idx[a] - centre[a]) * SPACING[a]) ** 2 for a in range(3))) <= 5.0).astype(np.uint8)
    image = 100.0 + 80.0 * label + rng.normal(0, 3, shape)
    nib.save(nib.Nifti1Image(image.astype(np.float32), _affine()), str(folder / f"{split}Img" / f"{name}.nii.gz"))
    nib.save(nib.Nifti1Image(label, _affine()), str(folder / f"{split}GT" / f"{name}.nii.gz"))


@pytest.fixture(scope="module")
def truth(tmp_path_factory) -> Path:
    """The dataset with every mask: the annotator's answers."""
    root = tmp_path_factory.mktemp("vol_truth")
    for split, items in (("train", TRAIN), ("val", VAL)):
        (root / f"{split}Img").mkdir()
        (root / f"{split}GT").mkdir()
        for k, (name, shape) in enumerate(items):
            _volume(root, split, name, shape, seed=10 * len(split) + k)
    return root


def _values(data: Path, tmp_path: Path, **extra) -> dict:
    return dict(data_path=str(data), exp_dir=str(tmp_path / "exp"), exp_name="vol", oracle="files", depth=3,
                base_filters=4, batch_size=2, patch_size=(16, 16, 16), steps_per_epoch=2, nb_labeled=3,
                nb_iterations=1, nb_next_sample=2, pseudo_epoch=2, nb_initial_epochs=1, nb_active_epochs=1,
                progress=False, mixed_precision="off", **extra)


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _pending(cfg) -> tuple[Path, list[dict]]:
    manifests = sorted(Path(cfg.run_dir).glob(f"round_*/{TO_ANNOTATE}/{MANIFEST}"))
    return manifests[-1].parent, read_manifest(manifests[-1])


def _draw(truth: Path, manifest: list[dict], out: Path) -> Path:
    """The annotator: the true mask of exactly each requested volume, in a fresh folder."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    for row in manifest:
        shutil.copyfile(truth / "trainGT" / f"{row['name']}.nii.gz", out / f"{row['name']}.nii.gz")
    return out


def _import(cfg, folder: Path, *flags: str):
    """`dsal import-labels` as a person types it: `--masks folder`, or the given flags instead."""
    return CliRunner().invoke(cli, ["import-labels", "--exp-dir", cfg.exp_dir, "--exp", cfg.name,
                                    *(flags or ("--masks", str(folder)))])


@pytest.fixture
def cold_start(truth, tmp_path):
    """A person's copy (one pool mask drawn already, p0) and a run waiting for its first 2 volumes
    (nothing trained: fast)."""
    data = tmp_path / "people"
    shutil.copytree(truth, data)
    for p in (data / "trainGT").iterdir():
        if p.name != "p0.nii.gz":
            p.unlink()
    cfg = resolve(_values(data, tmp_path))
    with pytest.raises(AwaitingAnnotation, match="waiting for 2 of 3") as wait:
        run_active_learning(cfg, log=lambda m: None)
    assert README in str(wait.value) and "import-labels" in str(wait.value)
    return cfg, data


# ------------------------------------------------------------------ the request
def test_a_cold_start_asks_for_whole_volumes(cold_start, truth):
    cfg, data = cold_start
    folder, manifest = _pending(cfg)
    assert folder == Path(cfg.run_dir) / "round_00" / TO_ANNOTATE
    names = [m["name"] for m in manifest]
    assert len(names) == 2 and "p0" not in names  # p0 is drawn already: never asked
    assert [m["file"] for m in manifest] == [f"{n}.nii.gz" for n in names]
    for m in manifest:  # the volume itself, unchanged
        assert (folder / m["file"]).read_bytes() == (data / "trainImg" / m["file"]).read_bytes()
    assert not list((folder / "prelabels").iterdir())  # no model yet
    assert not (folder / "tasks.json").exists()  # Label Studio tasks are 2D only
    readme = (folder / README).read_text()
    assert "no tasks.json" in readme and "<image>.nii.gz" in readme and f"--exp {cfg.name}" in readme


def test_prelabels_are_nifti_on_each_input_grid_and_affine(truth, tmp_path):
    """The oracle writes the model's masks (here: the true ones, on the input's grid, as
    `masks_at_original_size` returns them) as NIfTI with the input's shape, affine and voxels."""
    cfg = resolve(_values(truth, tmp_path))
    space = space_for(cfg)
    pool = space.load_splits(["train"])["train"]
    idx = np.array([3, 1])
    prelabels = [np.asarray(nib.load(str(truth / "trainGT" / pool.files[i].name)).dataobj) for i in idx]
    round_dir = tmp_path / "round_01"
    ORACLES["files"].from_config(cfg).request(round_dir, idx, pool, scores={"agreement": np.array([0.5, 0.25])},
                                              positions=np.array([1, 0]), prelabels=prelabels)
    folder = round_dir / TO_ANNOTATE
    manifest = read_manifest(folder / MANIFEST)
    assert [m["name"] for m in manifest] == ["p3", "p1"] and [m["agreement"] for m in manifest] == ["0.25", "0.5"]
    for m, want in zip(manifest, prelabels, strict=True):
        pre = nib.load(str(folder / "prelabels" / f"{m['name']}.nii.gz"))
        image = nib.load(str(truth / "trainImg" / m["file"]))
        assert pre.shape == image.shape == want.shape and np.allclose(pre.affine, image.affine, atol=1e-6)
        assert np.array_equal(np.asarray(pre.dataobj), want)
    assert not (folder / "tasks.json").exists()


# ------------------------------------------------------------------ the import
def test_import_copies_checked_volumes_once(cold_start, truth, tmp_path):
    cfg, data = cold_start
    _, manifest = _pending(cfg)
    drawn = _draw(truth, manifest, tmp_path / "drawn")
    result = _import(cfg, drawn)
    assert result.exit_code == 0, result.output
    for m in manifest:  # the dataset's naming (same name), the bytes as drawn
        assert (data / "trainGT" / m["file"]).read_bytes() == (drawn / m["file"]).read_bytes()
    assert sorted((data / "trainGT").iterdir()) == sorted(data / "trainGT" / n for n in
                                                          ["p0.nii.gz", *(m["file"] for m in manifest)])
    again = _import(cfg, drawn)
    assert again.exit_code == 0 and "nothing changed" in again.output
    record = json.loads((Path(cfg.run_dir) / "round_00" / "imports.json").read_text())
    assert [r["new_or_changed"] for r in record] == [2, 0] and len(record[0]["files"][0]["sha256"]) == 64


def _bad_variants(truth: Path, name: str) -> dict:
    """{what: writes a bad mask for volume `name` into a folder}."""
    good = nib.load(str(truth / "trainGT" / f"{name}.nii.gz"))
    label = np.asarray(good.dataobj)

    def save(array, affine=None):
        return lambda path: nib.save(nib.Nifti1Image(array, good.affine if affine is None else affine), str(path))

    shifted = good.affine.copy()
    shifted[:3, 3] += (0.0, 0.0, 4.0)
    grey = label.copy()
    grey[0, 0, 0] = 7

    def corrupt(path):
        whole = Path(truth / "trainGT" / f"{name}.nii.gz").read_bytes()
        path.write_bytes(whole[:-64])  # a truncated download: the header reads, the voxels do not

    def not_gzip(path):
        path.write_bytes(gzip.compress(b"\0" * 100)[:20] + b"garbage")

    return {
        "shape": (save(label[:-1]), "re-export the label on the image's grid"),
        "affine": (save(label, shifted), "different affine"),
        "values": (save(grey), "expected {0,1} or {0,255}"),
        "corrupt gz": (corrupt, "cannot read the voxels"),
        "not nifti": (not_gzip, "as NIfTI"),
        "4D": (save(np.stack([label, label], axis=-1)), "is 4D"),
    }


@pytest.mark.parametrize("what", ["shape", "affine", "values", "corrupt gz", "not nifti", "4D"])
def test_a_bad_volume_stops_the_import_and_trainGT_is_unchanged(cold_start, truth, tmp_path, what):
    cfg, data = cold_start
    _, manifest = _pending(cfg)
    bad = sorted(m["name"] for m in manifest)[-1]  # the last one checked: no earlier one may be copied
    folder = _draw(truth, manifest, tmp_path / "drawn")
    write, says = _bad_variants(truth, bad)[what]
    write(folder / f"{bad}.nii.gz")
    before = _digest(data / "trainGT")
    result = _import(cfg, folder)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and f"{bad}.nii.gz" in lines[0] and says in lines[0], result.output
    assert _digest(data / "trainGT") == before == {"p0.nii.gz": before["p0.nii.gz"]}
    assert not (Path(cfg.run_dir) / "round_00" / "imports.json").exists()


def test_every_bad_volume_is_one_line(cold_start, truth, tmp_path):
    cfg, data = cold_start
    _, manifest = _pending(cfg)
    folder = _draw(truth, manifest, tmp_path / "drawn")
    a, b = sorted(m["name"] for m in manifest)
    _bad_variants(truth, a)["values"][0](folder / f"{a}.nii.gz")
    _bad_variants(truth, b)["affine"][0](folder / f"{b}.nii.gz")
    (folder / "notes.txt").write_text("a file that is no mask")
    result = _import(cfg, folder)
    assert result.exit_code == 2 and "<image>.nii.gz or <image>_segmentation.nii.gz" in result.output
    (folder / "notes.txt").unlink()
    result = _import(cfg, folder)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 2, result.output
    assert f"{a}.nii.gz" in lines[0] and "{0,1}" in lines[0] and f"{b}.nii.gz" in lines[1] and "affine" in lines[1]
    assert sorted(p.name for p in (data / "trainGT").iterdir()) == ["p0.nii.gz"]


def test_label_studio_exports_are_refused_for_volumes(cold_start, tmp_path):
    cfg, _ = cold_start
    export = tmp_path / "export.json"
    export.write_text("[]")
    result = _import(cfg, export, "--label-studio", str(export))
    assert result.exit_code == 2 and "--masks" in result.output


def test_masks_go_under_the_dataset_naming_and_keep_their_extension(truth, tmp_path):
    found = {"p1": Path("drawn/p1.nii.gz"), "p2": Path("drawn/p2_segmentation.nii")}
    gt = tmp_path / "trainGT"
    same = space_for(resolve(_values(truth, tmp_path))).mask_targets(gt, found)
    assert same == {"p1": gt / "p1.nii.gz", "p2": gt / "p2.nii"}
    isic = space_for(resolve(_values(truth, tmp_path, mask_naming="isic"))).mask_targets(gt, found)
    assert isic == {"p1": gt / "p1_segmentation.nii.gz", "p2": gt / "p2_segmentation.nii"}


# ------------------------------------------------------------------ the round trip
@pytest.mark.slow
def test_the_loop_goes_on_after_each_import(cold_start, truth, tmp_path):
    """Cold start, import, round 0 trains and round 1 asks with NIfTI prelabels on each volume's own
    grid; import again and round 1 trains: the human oracle's loop on volumes, end to end."""
    from dsal_tf.run import Run

    cfg, data = cold_start
    _, manifest = _pending(cfg)
    assert _import(cfg, _draw(truth, manifest, tmp_path / "drawn0")).exit_code == 0
    with pytest.raises(AwaitingAnnotation, match="round 1: waiting for 2 of 2"):
        run_active_learning(cfg, log=lambda m: None)
    folder, manifest = _pending(cfg)
    assert folder.parent.name == "round_01" and all(m["agreement"] for m in manifest)
    for m in manifest:
        pre = nib.load(str(folder / "prelabels" / f"{m['name']}.nii.gz"))
        image = nib.load(str(data / "trainImg" / m["file"]))
        assert pre.shape == image.shape and np.allclose(pre.affine, image.affine, atol=1e-6)
        assert set(np.unique(np.asarray(pre.dataobj)).tolist()) <= {0, 1}
        assert (folder / m["file"]).is_file()
    assert _import(cfg, _draw(truth, manifest, tmp_path / "drawn1")).exit_code == 0
    run_active_learning(cfg, log=lambda m: None)
    assert Run(cfg.run_dir).completed() == [0, 1]
    assert len(list((data / "trainGT").iterdir())) == 5  # p0, then 2 + 2 drawn
