"""One run folder (`exp/<name>/`), the only module that spells its file names.

Layout:
    constants.py        snapshot of the constants file the run started from
    config.json         the resolved configuration
    normalizer.json     training-pool statistics used for z-score
    plan.json           `PRESET = "auto"`: the plan (`dsal_tf/plan/`), with planned against actual minutes
    learning_curve.csv  one row per round (the loop's `CURVE_FIELDS`)
    STOPPED             why the loop ended for good (a stop rule), when it did
    serve.lock          `dsal serve`: held while a server drives the run
    label_studio.json   `dsal serve --connect`: the Label Studio project the run is connected to
    evaluation.csv      test-split evaluation, one row per round (`dsal evaluate`)
    round_XX/           round XX:
        pool.npz            the pool state the round trains on (labelled map + pseudo labels)
        scores.csv          every scored pool image and what the round chose for it (rounds >= 1)
        best.keras          the round's best checkpoint (plus history.csv)
        DONE                written last: the round is complete
        pseudo/             the pseudo masks as PNGs, for a person to inspect or delete
        to_annotate/        the request to a human oracle
        label_studio/       `dsal serve`: the round's received annotations and their journal
        score_parts/        `dsal score --shard` parts of the round's scores
        member_k/           ensemble member k (best.keras, DONE)
        test_metrics.csv    per test image (`dsal evaluate`)

A folder (a round, an ensemble member, a teacher-student model) counts as finished only once its
`DONE` marker exists; `Run.stage` writes it atomically after everything else, so a run killed at
any moment resumes from intact folders. Runs made before this module keep the same names.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from .config import Config, resolve
from .data import Normalizer
from .errors import DsalError
from .files import atomic_write, atomic_write_text
from .volume_space import VolumeNormalizer

CONFIG = "config.json"
CONSTANTS = "constants.py"
NORMALIZER = "normalizer.json"
PLAN = "plan.json"
SERVE_LOCK = "serve.lock"
LABEL_STUDIO = "label_studio.json"
LABEL_STUDIO_DIR = "label_studio"
CURVE = "learning_curve.csv"
STOPPED = "STOPPED"
EVALUATION = "evaluation.csv"
POOL = "pool.npz"
SCORES = "scores.csv"
CHECKPOINT = "best.keras"
DONE = "DONE"
PSEUDO_DIR = "pseudo"
TO_ANNOTATE = "to_annotate"
SCORE_PARTS = "score_parts"
TEST_METRICS = "test_metrics.csv"
ROUND_PREFIX = "round_"

# settings that may change between a run and its resumption
RESUMABLE_CHANGES = {"nb_iterations", "progress", "resume_on", "nb_overlays", "distribute", "tensorboard",
                     "stop_budget", "stop_patience", "stop_min_delta", "stop_agreement",
                     "cache_dir", "mixed_precision", "exp_dir", "data_path"}


def round_name(r: int) -> str:
    return f"{ROUND_PREFIX}{r:02d}"


def round_of(folder: Path) -> int:
    """The round number of a `round_XX` folder."""
    return int(Path(folder).name.split("_")[1])


def is_done(folder: Path) -> bool:
    """Whether a stage folder (a round, a member, a trained model) finished."""
    return (Path(folder) / DONE).is_file()


def done_marker(folder: Path) -> str | None:
    """The text of `folder`'s DONE marker, or None while it is not finished."""
    path = Path(folder) / DONE
    return path.read_text() if path.is_file() else None


class Stage:
    """The folder of one stage being written; `marker` becomes the text of its DONE file."""

    def __init__(self, folder: Path, marker: str = "ok"):
        self.folder = folder
        self.marker = marker


@contextmanager
def stage(folder: str | Path, marker: str = "ok") -> Iterator[Stage]:
    """Write a stage's outputs into `folder`, then its DONE marker, atomically, only if the body
    finished: an interrupted stage has no DONE and is redone. Set `.marker` in the body to record
    something in DONE (the loop's round row, the loss a model trained with)."""
    st = Stage(Path(folder), marker)
    st.folder.mkdir(parents=True, exist_ok=True)
    yield st
    atomic_write_text(st.folder / DONE, st.marker)


class Run:
    """One run folder: its layout, creation and resumption, finished rounds and their models."""

    def __init__(self, path: str | Path, name: str | None = None):
        self.path = Path(path)
        self.name = name or self.path.name  # as the user names it (--exp), for messages

    @classmethod
    def of(cls, cfg: Config) -> Run:
        return cls(cfg.run_dir, cfg.name)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    # ------------------------------------------------------------------ layout
    @property
    def config_file(self) -> Path:
        return self.path / CONFIG

    @property
    def normalizer_file(self) -> Path:
        return self.path / NORMALIZER

    @property
    def plan_file(self) -> Path:
        return self.path / PLAN

    @property
    def serve_lock(self) -> Path:
        return self.path / SERVE_LOCK

    @property
    def label_studio_file(self) -> Path:
        return self.path / LABEL_STUDIO

    def label_studio_dir(self, r: int) -> Path:
        return self.round_dir(r) / LABEL_STUDIO_DIR

    @property
    def curve_file(self) -> Path:
        return self.path / CURVE

    @property
    def stopped_file(self) -> Path:
        return self.path / STOPPED

    @property
    def evaluation_file(self) -> Path:
        return self.path / EVALUATION

    def round_dir(self, r: int) -> Path:
        return self.path / round_name(r)

    def pool_file(self, r: int) -> Path:
        return self.round_dir(r) / POOL

    def scores_file(self, r: int) -> Path:
        return self.round_dir(r) / SCORES

    def checkpoint(self, r: int) -> Path:
        return self.round_dir(r) / CHECKPOINT

    def pseudo_dir(self, r: int) -> Path:
        return self.round_dir(r) / PSEUDO_DIR

    def to_annotate(self, r: int) -> Path:
        return self.round_dir(r) / TO_ANNOTATE

    def score_parts(self, r: int) -> Path:
        return self.round_dir(r) / SCORE_PARTS

    def test_metrics(self, r: int) -> Path:
        return self.round_dir(r) / TEST_METRICS

    def member_dir(self, r: int, k: int) -> Path:
        return self.round_dir(r) / f"member_{k}"

    def rounds_with(self, relative: str) -> list[int]:
        """Rounds whose folder holds `relative` (a file name or a sub-path), in order."""
        return sorted(round_of(p.relative_to(self.path).parts[0])
                      for p in self.path.glob(f"{ROUND_PREFIX}*/{relative}"))

    # ------------------------------------------------------------------ state
    def completed(self) -> list[int]:
        """Finished rounds (their DONE exists), in order."""
        return self.rounds_with(DONE)

    def done_files(self) -> list[Path]:
        return list(self.path.glob(f"{ROUND_PREFIX}*/{DONE}"))

    def is_done(self, r: int) -> bool:
        return is_done(self.round_dir(r))

    def decided(self, r: int) -> bool:
        """Round `r` chose its images (pool.npz and scores.csv are saved, pool.npz last)."""
        return self.pool_file(r).is_file() and self.scores_file(r).is_file()

    def stage(self, folder: Path, marker: str = "ok"):
        return stage(folder, marker)

    def stopped(self) -> dict | None:
        """{round, reason} of a run a stop rule ended, else None."""
        return json.loads(self.stopped_file.read_text()) if self.stopped_file.is_file() else None

    def stop(self, last_round: int, reason: str) -> None:
        atomic_write_text(self.stopped_file, json.dumps({"round": last_round, "reason": reason}))

    # ------------------------------------------------------------------ create / resume
    @classmethod
    def create(cls, cfg: Config, constants_path: str | Path | None = None, fixed: dict[str, str] | None = None) -> Run:
        """Create or reopen `exp/<name>`; refuse to mix a finished run with different settings.
        `fixed`: settings otherwise resumable (RESUMABLE_CHANGES) that this run must keep, each with the
        reason (NB_ITERATIONS under a selection whose schedule spans the rounds)."""
        run = cls.of(cfg)
        saved = run.config_file
        if saved.is_file() and run.completed():
            old = json.loads(saved.read_text())
            if not cfg.resume_on:
                raise DsalError(
                    f"{run.path} already holds a run and RESUME_ON is False; pass --exp NEW_NAME or delete {run.path}"
                )
            new = json.loads(cfg.to_json())
            # settings added to dsal-tf after the run started take their defaults; ignore them
            fixed = fixed or {}
            diff = [k for k in new if k in old and (k not in RESUMABLE_CHANGES or k in fixed) and old[k] != new[k]]
            if diff:
                k = diff[0]
                why = f" ({fixed[k]})" if k in fixed else ""
                raise DsalError(
                    f"{run.path} was run with {k.upper()} = {old.get(k)!r}, now {new[k]!r}{why}; "
                    f"use --exp NEW_NAME for new settings (nothing was changed)"
                )
        run.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(saved, cfg.to_json())
        if constants_path is not None and Path(constants_path).is_file():
            atomic_write(run.path / CONSTANTS, lambda tmp: shutil.copyfile(constants_path, tmp))
        return run

    def saved_config(self, progress: bool | None = None) -> Config:
        """The configuration the run was made with (image size, data, ...), not today's constants;
        `progress` (a display setting) is today's when given."""
        path = self.config_file
        if not path.is_file():
            raise DsalError(f"no run at {self.path}; train it first with: python main.py --exp {self.name}")
        saved = json.loads(path.read_text())
        if progress is not None:
            saved["progress"] = progress
        # a copied or moved run lives where it was opened, not where it was made
        saved["exp_name"] = saved.get("exp_name") or self.path.name
        depth = len(Path(saved["exp_name"]).parts)
        if len(self.path.parts) > depth and Path(*self.path.parts[-depth:]) == Path(saved["exp_name"]):
            saved["exp_dir"] = str(self.path.parents[depth - 1])
        return resolve(saved, source=str(path))

    # ------------------------------------------------------------------ finished rounds
    def choose(self, which: str | int) -> int:
        """`best` (highest validation Dice), `last` (latest complete round) or a round number."""
        done = self.completed()
        if not done:
            raise DsalError(f"{self.path} has no finished round yet; train it first with: "
                            f"python main.py --exp {self.path.name}")
        which = str(which).strip().lower()
        if which == "last":
            return done[-1]
        if which == "best":
            curve = pd.read_csv(self.curve_file)
            curve = curve[curve["round"].isin(done)]
            return int(curve.loc[curve["val_dice"].idxmax(), "round"])
        try:
            r = int(which)
        except ValueError:
            raise DsalError(f"--round {which!r} must be best, last or a round number, e.g. --round 3") from None
        if r not in done:
            raise DsalError(f"round {r} of {self.path} is not finished; finished rounds: {done}")
        return r

    def load_model(self, r: int):
        """Round `r`'s plain U-Net (uncompiled)."""
        import keras

        return keras.models.load_model(self.checkpoint(r), compile=False)

    def normalizer(self):
        """The run's input normalizer: per-channel statistics (images) or the volume pipeline's record."""
        if json.loads(self.normalizer_file.read_text()).get("space") == "volume":
            return VolumeNormalizer.load(self.normalizer_file)
        return Normalizer.load(self.normalizer_file)
