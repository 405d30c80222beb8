"""The strong labeler (oracle) behind one small interface that the loop calls.

- `simulated` (benchmarks): every pool mask is already on disk and asking reveals it.
- `files` (a person with unlabelled images): asking writes `round_XX/to_annotate/` (the images or
  volumes as they are, the model's masks on their grid as a starting point, a manifest, a README and,
  for 2D images, a Label Studio tasks file) and the loop stops until the masks are in `trainGT/`
  (`dsal import-labels`). What depends on the rank (mask files, their names and checks) is the
  space's (`space.py`, `volume_space.py`).

Both oracles make the same decisions from the same scores: only where the masks come from differs.
The first labels (round 0) come from `initial_selection`: random (the paper's protocol) or k-center
greedy on small thumbnails, which spreads a cold start over the pool.
"""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import Config
from .data import Split
from .errors import DsalError
from .files import atomic_dir
from .registry import registrar
from .run import TO_ANNOTATE, Run
from .settings import Settings, suggest
from .strategies.ranking import k_center_greedy

ORACLES: dict[str, type[Oracle]] = {}
register_oracle = registrar(ORACLES)
MANIFEST = "manifest.csv"
README = "README.txt"
MANIFEST_FIELDS = ["name", "file", "rank", "uncertainty", "agreement"]


class AwaitingAnnotation(Exception):
    """The loop stopped to wait for a person's masks (not an error: the CLI prints it, exit 0)."""


# ------------------------------------------------------------------ initial labels
def initial_labels(method: str, features, known: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Round 0's labelled set: `known` (bool [N], masks that already exist) plus picks up to `n`.

    `random` draws like the original protocol (`rng.choice` over the rest, seeded); `kcenter`
    spreads the picks over the pool on `features()` (the space's thumbnails), around what is
    already labelled."""
    rng = np.random.default_rng(seed)
    labelled = np.flatnonzero(known)
    need = max(n - len(labelled), 0)
    rest = np.flatnonzero(~known)
    if method == "random":
        new = rng.choice(rest, need, replace=False) if need else np.zeros(0, np.int64)
    else:
        new = k_center_greedy(features(), need, centers=labelled, rng=rng)
    return np.sort(np.concatenate([labelled, new]).astype(np.int64))


# ------------------------------------------------------------------ oracles
INITIAL_SELECTIONS = ("auto", "random", "kcenter")


class Oracle:
    """Answers the loop's requests for expert masks. Override `request` and `missing`."""

    name = "base"
    default_initial = "random"  # INITIAL_SELECTION = "auto"

    @dataclass(frozen=True)
    class Settings(Settings):
        initial_selection: str = "auto"  # first labels: random, kcenter (spread over the pool), auto (the oracle's own)

        def check(self):
            if self.initial_selection not in INITIAL_SELECTIONS:
                raise DsalError(f"INITIAL_SELECTION = {self.initial_selection!r} is not one of "
                                f"{list(INITIAL_SELECTIONS)}" + suggest(self.initial_selection, INITIAL_SELECTIONS))

    def __init__(self, settings: Settings | None = None):
        self.settings = settings if settings is not None else self.Settings()

    @classmethod
    def from_config(cls, cfg, space=None) -> Oracle:
        """The oracle of `cfg`; `space`: the run's space (`space_for(cfg)`), where the oracle writes files."""
        return cls(cls.Settings.from_config(cfg))

    def first_labels(self, features, known: np.ndarray, n: int, seed: int) -> np.ndarray:
        """Round 0's labels (`initial_labels`) by INITIAL_SELECTION, "auto" being the oracle's own."""
        method = self.settings.initial_selection
        return initial_labels(self.default_initial if method == "auto" else method, features, known, n, seed)

    def known(self, pool: Split) -> np.ndarray:
        """bool [N]: pool images that are labelled before anyone was asked (round 0)."""
        return np.zeros(len(pool), bool)

    def request(self, round_dir: Path, idx: np.ndarray, pool: Split, scores: dict | None = None,
                positions: np.ndarray | None = None, prelabels: list[np.ndarray] | None = None) -> None:
        """Ask for the masks of pool images `idx` (in priority order). `scores` and `positions`
        (rows of `idx` in `scores`) describe why; `prelabels` are the model's masks at original size."""

    def missing(self, idx: np.ndarray, pool: Split) -> np.ndarray:
        """Of the pool images `idx`, those whose masks have not arrived yet."""
        return np.zeros(0, np.int64)

    def wants_prelabels(self) -> bool:
        return False


@register_oracle("simulated")
class SimulatedOracle(Oracle):
    """Every mask is on disk already; the loop only pretends not to see the unlabelled ones."""


@register_oracle("files")
class FileOracle(Oracle):
    """A person draws the masks: requests are exported as files, answers come back through
    `dsal import-labels` (or by saving masks into trainGT/ directly). A cold start spreads its
    first picks over the pool (k-center greedy on thumbnails)."""

    default_initial = "kcenter"

    def __init__(self, settings: Oracle.Settings | None = None, space=None):
        super().__init__(settings)
        self.space = space  # the run's space (`space_for`): writes the request's masks

    @classmethod
    def from_config(cls, cfg, space=None) -> FileOracle:
        if space is None:
            from .space import space_for

            space = space_for(cfg)
        return cls(cls.Settings.from_config(cfg), space)

    def known(self, pool: Split) -> np.ndarray:
        return pool.has_mask.copy()

    def wants_prelabels(self) -> bool:
        return True

    def missing(self, idx, pool):
        idx = np.asarray(idx, np.int64)
        return idx[~pool.has_mask[idx]]

    def request(self, round_dir, idx, pool, scores=None, positions=None, prelabels=None):
        if self.space is None:  # built without a config: 2D images
            from .space import ImageSpace

            self.space = ImageSpace(None)
        write_request(round_dir / TO_ANNOTATE, idx, pool, scores, positions, prelabels, self.space)


def write_request(out: Path, idx: np.ndarray, pool: Split, scores: dict | None, positions: np.ndarray | None,
                  prelabels: list[np.ndarray] | None, space) -> None:
    """`out/`: the images or volumes (copies of the files), `prelabels/<name><mask suffix>` (the
    model's masks on each file's own grid, written by `space`), `manifest.csv`, `README.txt` and, where
    the space's items are Label Studio images, `tasks.json` (prelabels as predictions). Written to a
    temporary folder, then renamed."""
    with atomic_dir(out) as tmp:
        _write_request(tmp, out, idx, pool, scores, positions, prelabels, space)


def _write_request(tmp: Path, out: Path, idx, pool: Split, scores, positions, prelabels, space) -> None:
    (tmp / "prelabels").mkdir()
    rows, tasks = [], []
    for rank, i in enumerate(idx):
        src = pool.files[i]
        shutil.copyfile(src, tmp / src.name)
        row = {"name": pool.names[i], "file": src.name, "rank": rank + 1, "uncertainty": "", "agreement": ""}
        if scores is not None and positions is not None:
            for key in ("uncertainty", "agreement"):
                if key in scores:
                    row[key] = f"{float(scores[key][positions[rank]]):.6g}"
        rows.append(row)
        task = {"data": {"image": f"/data/local-files/?d={out.resolve().relative_to('/')}/{src.name}",
                         "name": pool.names[i]}}
        if prelabels is not None:
            space.write_mask_file(space.mask_file(tmp / "prelabels", pool.names[i]), prelabels[rank], src)
            if space.label_studio_tasks:
                task["predictions"] = [label_studio_prediction(prelabels[rank])]
        tasks.append(task)
    with (tmp / MANIFEST).open("w", newline="") as f:
        w = csv.DictWriter(f, MANIFEST_FIELDS)
        w.writeheader()
        w.writerows(rows)
    if space.label_studio_tasks:
        (tmp / "tasks.json").write_text(json.dumps(tasks))
    (tmp / README).write_text(request_readme(out, len(rows), prelabels is not None, space))


def request_readme(out: Path, n: int, with_prelabels: bool, space) -> str:
    """What a request holds and what to do with it, for the person who opens the folder."""
    run = out.parent.parent
    lines = [f"{n} items to annotate for {out.parent.name} of the run {run.name} (listed by priority in {MANIFEST}).",
             "",
             space.annotation_help,
             "Prelabels: prelabels/ holds the model's masks on each file's own grid, to correct rather than draw "
             "from scratch." if with_prelabels else "Prelabels: none (no model is trained yet).",
             "Label Studio: tasks.json imports these images with the prelabels as predictions."
             if space.label_studio_tasks else
             "Label Studio: no tasks.json (Label Studio tasks are 2D images; these items are not).",
             "",
             f"Put the masks ({space.mask_names}) in one folder, then run",
             f"  dsal import-labels --exp {run.name} --exp-dir {run.parent} --masks FOLDER",
             "and the training command again. The import checks every mask before it copies any."]
    return "\n".join(lines) + "\n"


def label_studio_prediction(mask: np.ndarray, label: str = "lesion") -> dict:
    """A Label Studio brush prediction for a {0,1} [H,W] mask (RLE by label-studio-sdk, extra `[labelstudio]`);
    without the extra, the tasks carry no pre-drawn masks."""
    try:
        from label_studio_sdk.converter.brush import mask2rle
    except ImportError:
        return {"model_version": "dsal-tf", "result": []}
    h, w = mask.shape[:2]
    return {"model_version": "dsal-tf", "result": [{
        "from_name": "label", "to_name": "image", "type": "brushlabels",
        "original_width": int(w), "original_height": int(h), "image_rotation": 0,
        "value": {"format": "rle", "rle": mask2rle((mask.reshape(h, w) > 0).astype(np.uint8) * 255),
                  "brushlabels": [label]},
    }]}


def read_manifest(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def waiting_message(cfg: Config, round_: int, n_missing: int, n_asked: int) -> str:
    where = Run.of(cfg).to_annotate(round_)
    hint = " (prelabels/ holds the model's masks to start from)" if round_ else ""
    return (f"round {round_}: waiting for {n_missing} of {n_asked} expert masks; draw them for the images in "
            f"{where}/{hint} as its {README} says, then run `dsal import-labels --exp {cfg.name} --masks DIR` "
            "and this command again")
