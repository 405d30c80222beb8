"""Bringing a person's masks back into the pool (`dsal import-labels`).

A round run with `ORACLE = "files"` asks for masks in `round_XX/to_annotate/manifest.csv`. The
import checks every returned mask before it copies anything (named like the dataset's masks, one
per manifest row and nothing else; then the run's space checks each file against its image: for 2D
images decodable, binary and the image's size, for NIfTI volumes readable, 3D, binary and on the
image's grid, shape and affine), then copies them into `trainGT/` one atomic rename each and records
the import (time, source, files, SHA-256) in `round_XX/imports.json`. Importing the same masks twice
changes nothing. The import never branches on the rank: the space names, checks and places the files.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from .config import Config
from .errors import DsalError
from .evaluate import saved_config
from .files import atomic_write, atomic_write_text
from .oracle import MANIFEST, read_manifest
from .run import TO_ANNOTATE, Run, is_done
from .space import original_size, space_for

IMPORTS = "imports.json"


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def pending_round(run: Path) -> int:
    """The latest round that asked for masks."""
    asked = Run(run).rounds_with(f"{TO_ANNOTATE}/{MANIFEST}")
    if not asked:
        raise DsalError(f"no round of {run} has asked for masks (no round_XX/{TO_ANNOTATE}/{MANIFEST}); "
                        "run it with ORACLE = \"files\" (--oracle files) first")
    return asked[-1]


def check_masks(masks_dir: Path, manifest: list[dict], image_dir: Path, round_: int, space) -> dict[str, Path]:
    """{image name: mask file} for exactly the manifest's images, each checked by `space` against its
    image; an error otherwise, one line per bad file (every file is checked before any is reported)."""
    if not masks_dir.is_dir():
        raise DsalError(f"mask folder {masks_dir} not found; pass --masks FOLDER with the drawn masks")
    wanted = {row["name"]: row for row in manifest}
    found: dict[str, Path] = {}
    for p in sorted(masks_dir.iterdir()):
        if p.name.startswith(".") or p.is_dir():
            continue
        m = space.mask_pattern.fullmatch(p.name)
        if m is None:
            raise DsalError(f"{p}: a mask must be named {space.mask_names}; rename or remove it")
        stem = m.group("stem")
        if stem not in wanted:
            raise DsalError(f"{p} is a mask for {stem!r}, which round {round_} did not ask for "
                            f"(see its {MANIFEST}); remove it")
        if stem in found:
            raise DsalError(f"{found[stem].name} and {p.name} are both masks for {stem!r}; keep one")
        found[stem] = p
    missing = [n for n in wanted if n not in found]
    if missing:
        raise DsalError(f"no mask for {missing[0]!r} in {masks_dir} ({len(missing)} of {len(wanted)} missing); "
                        f"round {round_} asked for every image in its {MANIFEST}")
    failures = []
    for stem, p in found.items():
        try:
            space.check_mask(p, image_dir / wanted[stem]["file"])
        except DsalError as exc:
            failures.append(str(exc))
    if failures:
        raise DsalError("\n".join(failures))
    return found


def import_masks(cfg: Config, masks_dir: str | Path, log: Callable[[str], None] = print, source: str = "") -> int:
    """Check and copy the masks a round asked for into `trainGT/`; returns how many were new or changed."""
    cfg = saved_config(cfg)
    run = Run.of(cfg)
    r = pending_round(run.path)
    rd = run.round_dir(r)
    manifest = read_manifest(run.to_annotate(r) / MANIFEST)
    root = Path(cfg.data_path)
    space = space_for(cfg)
    found = check_masks(Path(masks_dir), manifest, root / "trainImg", r, space)
    gt = root / "trainGT"
    targets = space.mask_targets(gt, found)
    changed = [s for s in found if not targets[s].is_file() or sha256(targets[s]) != sha256(found[s])]
    if changed and is_done(rd):
        raise DsalError(f"round {r} of {cfg.name} already trained with other masks for {changed[0]!r}; "
                        "start a new run (--exp NEW) to train with corrected masks")
    gt.mkdir(parents=True, exist_ok=True)
    for stem in changed:  # every check passed: copy, one atomic rename per file
        atomic_write(targets[stem], lambda tmp, src=found[stem]: shutil.copyfile(src, tmp))
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "source": source or str(Path(masks_dir).resolve()),
              "new_or_changed": len(changed),
              "files": [{"name": s, "mask": targets[s].name, "sha256": sha256(targets[s])} for s in sorted(found)]}
    log_path = rd / IMPORTS
    history = json.loads(log_path.read_text()) if log_path.is_file() else []
    atomic_write_text(log_path, json.dumps([*history, record], indent=1))
    if changed:
        log(f"imported {len(changed)} masks into {gt}/ for round {r} of {cfg.name}; "
            "run the same training command again to go on")
    else:
        log(f"the {len(found)} masks of round {r} were already in {gt}/; nothing changed")
    return len(changed)


def _task_name(task: dict) -> str:
    data = task.get("data", {})
    if data.get("name"):
        return str(data["name"])
    image = str(data.get("image", "")).split("?d=")[-1]
    stem = Path(image).stem
    return re.sub(r"^[0-9a-f]{8}-", "", stem)  # Label Studio prefixes uploaded files with a hash


def masks_from_label_studio(export: Path, out_dir: Path, image_dir: Path, manifest: list[dict]) -> None:
    """Decode the brush annotations of a Label Studio JSON export into `<name>.png` masks (0/255).

    The latest non-cancelled annotation of each task counts; its brush regions are merged. A task
    annotated with no region is an empty mask. RLE decoding is label-studio-sdk's (extra `[labelstudio]`)."""
    try:
        from label_studio_sdk.converter.brush import decode_rle
    except ImportError:
        raise DsalError("reading Label Studio exports needs label-studio-sdk: "
                        "pip install 'dsal-tf[labelstudio]'") from None
    try:
        tasks = json.loads(Path(export).read_text())
    except (OSError, ValueError) as exc:
        raise DsalError(f"cannot read the Label Studio export {export}: {exc}; export it as JSON") from None
    if isinstance(tasks, dict):
        tasks = [tasks]
    files = {row["name"]: row["file"] for row in manifest}
    for task in tasks:
        name = _task_name(task)
        annotations = [a for a in task.get("annotations", []) if not a.get("was_cancelled")]
        if not annotations or name not in files:
            continue  # check_masks names what is missing or not asked for
        h, w = original_size(image_dir / files[name])
        mask = np.zeros((h, w), bool)
        for res in annotations[-1].get("result", []):
            value = res.get("value", {})
            if res.get("type") != "brushlabels" or value.get("format") != "rle":
                continue
            rh, rw = int(res["original_height"]), int(res["original_width"])
            mask |= cv2.resize((np.asarray(decode_rle(value["rle"])).reshape(rh, rw, 4)[..., 3] > 0)
                               .astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0
        cv2.imwrite(str(out_dir / f"{name}.png"), mask.astype(np.uint8) * 255)


def import_label_studio(cfg: Config, export: str | Path, log: Callable[[str], None] = print) -> int:
    """`import_masks` from a Label Studio JSON export of brush annotations."""
    run_cfg = saved_config(cfg)
    if not space_for(run_cfg).label_studio_tasks:
        raise DsalError(f"the items of {run_cfg.name} are not 2D images and Label Studio's tasks are; "
                        "import the masks as files with --masks FOLDER")
    run = Run.of(run_cfg)
    r = pending_round(run.path)
    manifest = read_manifest(run.to_annotate(r) / MANIFEST)
    with tempfile.TemporaryDirectory() as tmp:
        masks_from_label_studio(Path(export), Path(tmp), Path(run_cfg.data_path) / "trainImg", manifest)
        return import_masks(cfg, tmp, log, source=str(Path(export).resolve()))
