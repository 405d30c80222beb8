"""The run folder as the server sees it (MONAI Label's datastore): which images the pending round asked
for, their prelabels and priority, and the masks annotators sent, by whom and when.

Each round that asks for masks keeps what arrives in `round_XX/label_studio/`:

    journal.json        every annotation event, in arrival order: event (created, updated, deleted),
                        annotation and task ids, image name, who (Label Studio user id), when (the
                        annotation's time), received (the server's time), the mask's SHA-256, and the
                        Dice between the round's prelabel and the mask (how much was corrected)
    masks/<id>.png      the mask of annotation <id> (0/255, the image's size), written atomically

The journal is the truth: an image's mask is that of its latest live annotation (the latest wins, both
stay in the journal); the same annotation sent twice changes nothing; a deleted one drops out. Masks
reach `trainGT/` only through `dsal import-labels`' own checks (`import_round`), so a crash of the
server never loses a received mask and never leaves `trainGT/` half written.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from ..annotate import import_masks, pending_round
from ..files import atomic_write, atomic_write_text
from ..metrics import dice
from ..oracle import MANIFEST, read_manifest
from ..pool import Pool
from ..run import TO_ANNOTATE, Run, round_of
from ..space import original_size

JOURNAL = "journal.json"
MASKS = "masks"


def confidences(rows: list[dict]) -> list[float]:
    """Label Studio's uncertainty sampling serves the lowest prediction score first, so each requested
    image's score is the strategy's confidence, 1 - uncertainty (DSAL: the side heads' agreement),
    when that orders the request as the strategy did (rank 1 lowest); otherwise (a random or
    diversity-thinned pick, a cold start) the rank's share, rank / (n + 1), in the same order."""
    try:
        conf = [1.0 - float(r["uncertainty"]) for r in rows]
    except (KeyError, TypeError, ValueError):
        conf = []
    if len(conf) == len(rows) and all(map(math.isfinite, conf)) and all(a < b for a, b in zip(conf, conf[1:])):
        return conf
    return [int(r["rank"]) / (len(rows) + 1) for r in rows]


class Datastore:
    """The pending round's request and the annotations that came back for it (one writer: the worker)."""

    def __init__(self, cfg):
        self.cfg = cfg  # the run's saved config
        self.run = Run.of(cfg)
        self._rows: dict[int, list[dict]] = {}
        self._sizes: dict[tuple[int, str], tuple[int, int]] = {}

    # ------------------------------------------------------------------ the request
    def round(self) -> int:
        """The latest round that asked for masks."""
        return pending_round(self.run.path)

    def rounds(self) -> list[int]:
        return self.run.rounds_with(f"{TO_ANNOTATE}/{MANIFEST}")

    def requested(self, r: int) -> list[dict]:
        """Round `r`'s manifest rows (name, file, rank, uncertainty, agreement), rank 1 first."""
        if r not in self._rows:
            self._rows[r] = read_manifest(self.run.to_annotate(r) / MANIFEST)
        return self._rows[r]

    def row(self, r: int, name: str) -> dict | None:
        return next((row for row in self.requested(r) if row["name"] == name), None)

    def image(self, r: int, name: str) -> Path:
        return self.run.to_annotate(r) / self.row(r, name)["file"]

    def size(self, r: int, name: str) -> tuple[int, int]:
        """(rows, cols) of a requested image as it decodes."""
        if (r, name) not in self._sizes:
            self._sizes[r, name] = original_size(self.image(r, name))
        return self._sizes[r, name]

    def prelabel(self, r: int, name: str) -> np.ndarray | None:
        """The model's {0,1} mask for a requested image at its original size (None in a cold start)."""
        path = self.run.to_annotate(r) / "prelabels" / f"{name}.png"
        mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE) if path.is_file() else None
        return None if mask is None else (mask > 127).astype(np.uint8)

    def scores(self, r: int) -> dict[str, float]:
        """{name: the score Label Studio orders round `r`'s tasks by} (`confidences`)."""
        rows = self.requested(r)
        return {row["name"]: s for row, s in zip(rows, confidences(rows))}

    # ------------------------------------------------------------------ the annotations
    def folder(self, r: int) -> Path:
        return self.run.label_studio_dir(r)

    def journal(self, r: int) -> list[dict]:
        path = self.folder(r) / JOURNAL
        return json.loads(path.read_text()) if path.is_file() else []

    def live(self, r: int) -> dict[str, dict]:
        """{image name: the record of its latest live annotation}."""
        latest: dict[int, dict] = {}
        for rec in self.journal(r):
            if rec["event"] == "deleted":
                latest.pop(rec["annotation"], None)
            else:
                latest.pop(rec["annotation"], None)  # re-inserted last: arrival order
                latest[rec["annotation"]] = rec
        return {rec["name"]: rec for rec in latest.values()}

    def missing(self, r: int) -> list[str]:
        live = self.live(r)
        return [row["name"] for row in self.requested(r) if row["name"] not in live]

    def record(self, r: int, meta: dict, mask: np.ndarray) -> bool:
        """Keep annotation `meta["annotation"]`'s mask (uint8 0/255) for round `r`; False when the same
        mask of the same annotation is already the live one (nothing is written then)."""
        aid = int(meta["annotation"])
        last = next((rec for rec in reversed(self.journal(r)) if rec["annotation"] == aid), None)
        png = cv2.imencode(".png", np.asarray(mask, np.uint8))[1].tobytes()
        digest = hashlib.sha256(png).hexdigest()
        if last is not None and last["event"] != "deleted" and last["sha256"] == digest:
            return False
        path = self.folder(r) / MASKS / f"{aid}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: tmp.write_bytes(png))
        pre = self.prelabel(r, meta["name"])
        rec = {"event": "created" if last is None or last["event"] == "deleted" else "updated", **meta,
               "annotation": aid, "received": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "sha256": digest,
               "mask": f"{MASKS}/{aid}.png", "dice_prelabel": None if pre is None else round(dice(pre, mask), 5)}
        self._append(r, rec)
        return True

    def delete(self, r: int, ids: list[int]) -> list[str]:
        """Drop the live annotations `ids` of round `r`; returns the names whose mask went with them."""
        live = {rec["annotation"]: rec for rec in self.live(r).values()}
        gone = [live[i] for i in ids if i in live]
        for rec in gone:
            self._append(r, {"event": "deleted", "annotation": rec["annotation"], "task": rec.get("task"),
                             "name": rec["name"], "received": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            (self.folder(r) / rec["mask"]).unlink(missing_ok=True)
        return [rec["name"] for rec in gone]

    def _append(self, r: int, rec: dict) -> None:
        atomic_write_text(self.folder(r) / JOURNAL, json.dumps([*self.journal(r), rec], indent=1))

    def import_round(self, r: int, log: Callable[[str], None] = print) -> int:
        """The live masks of round `r` into `trainGT/` through `dsal import-labels`' checks and journal."""
        live = self.live(r)
        with tempfile.TemporaryDirectory() as tmp:
            for name, rec in live.items():
                atomic_write(Path(tmp) / f"{name}.png", lambda t, rec=rec: t.write_bytes(
                    (self.folder(r) / rec["mask"]).read_bytes()))
            ids = ", ".join(str(rec["annotation"]) for rec in live.values())
            return import_masks(self.cfg, tmp, log, source=f"Label Studio annotations {ids} (dsal serve)")

    # ------------------------------------------------------------------ what /info and /metrics show
    def curve(self) -> list[dict]:
        path = self.run.curve_file
        if not path.is_file():
            return []
        with path.open() as f:
            return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]

    def corrections(self) -> list[dict]:
        """Per round: how far the annotators moved the prelabels (Dice prelabel vs submitted mask)."""
        out = []
        for r in self.rounds():
            values = [rec["dice_prelabel"] for rec in self.live(r).values() if rec.get("dice_prelabel") is not None]
            if values:
                out.append({"round": r, "n": len(values), "mean_dice": round(float(np.mean(values)), 5),
                            "min_dice": round(float(np.min(values)), 5)})
        return out

    def pool_counts(self) -> dict[str, int]:
        """Labelled and pseudo-labelled images in the latest saved pool state."""
        files = sorted(self.run.path.glob("round_*/pool.npz"), key=lambda p: round_of(p.parent))
        if not files:
            return {"labelled": 0, "pseudo_labelled": 0}
        pool = Pool.load(files[-1])
        return {"labelled": int(len(pool.labelled)), "pseudo_labelled": int(len(pool.pseudo_idx))}


def _number(text: str):
    try:
        value = float(text)
    except (TypeError, ValueError):
        return text
    return int(value) if value.is_integer() and "." not in text else value
