"""The CEAL-style active-learning loop with a strong (oracle) and a weak (pseudo) labeler.

A round is one public call on a round context: `run_round(ctx)` scores the unlabelled pool,
selects, asks the oracle and trains (round 0: takes the first labels and trains). The loop is a
few lines over it; the components (strategy, weak labeler, trainer, oracle, space, stop rules)
come from `components.build` and the loop never branches on their names.

The run folder's layout is `run.Run`'s (`dsal_tf/run.py`). Every decision of a round (its pool
state and scores) is written before training starts, and a round counts as complete only once
its DONE marker exists, so an interrupted run resumes from the last complete round with the same
pool state.
"""

from __future__ import annotations

import csv
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import determinism, train
from .components import Components, build, resolved
from .config import Config
from .data import Normalizer, Rows, Split
from .determinism import reset_seed_generators
from .errors import DsalError
from .evaluate import saved_config
from .files import atomic_write
from .model import with_features
from .oracle import AwaitingAnnotation, waiting_message
from .pool import Pool
from .run import (  # noqa: F401 (RESUMABLE_CHANGES, STOPPED: re-exported)
    POOL,
    PSEUDO_DIR,
    RESUMABLE_CHANGES,
    SCORE_PARTS,
    SCORES,
    STOPPED,
    Run,
    done_marker,
    is_done,
    stage,
)

CURVE_FIELDS = ["round", "n_oracle", "n_pseudo", "val_dice", "train_s", "score_s", "stop"]


@dataclass
class RoundContext:
    """What a round reads and changes (MONAI's engine state): the resolved config, the run folder,
    the components, the pool's data and state, the validation split, the normalizer and the model.
    `on_phase(name)` hears when a round starts "scoring" the pool and "training" (MONAI's events: `dsal
    serve` shows them)."""

    cfg: Config
    run: Run
    parts: Components
    pool_data: Split
    val: Split | None
    normalizer: Normalizer | None
    log: Callable[[str], None] = print
    round: int = 0
    pool: Pool | None = None
    model: Any = None
    started: float = 0.0
    score_s: float = 0.0
    on_phase: Callable[[str], None] = lambda name: None

    @property
    def round_dir(self) -> Path:
        return self.run.round_dir(self.round)

    @property
    def seed(self) -> int:
        """The round's training and scoring seed: SEED * 1000 + round (the one place it is spelled)."""
        return self.cfg.seed * 1000 + self.round

    @property
    def epochs(self) -> int:
        return self.cfg.nb_initial_epochs if self.round == 0 else self.cfg.nb_active_epochs

    def fit_job(self, model, training_set: tuple, out_dir: Path, epochs: int, seed: int,
                from_scratch: bool) -> train.FitJob:
        """A fit of `model` on `training_set` (x, y, is_pseudo) with this round's pool, validation and
        space; `from_scratch`: `model` is new, not the previous round's (see `train.FitJob`)."""
        x, y, is_pseudo = training_set
        return train.FitJob(model, self.cfg, x, y, is_pseudo, self.val, self.normalizer, out_dir, epochs, seed,
                            unlabelled=self.unlabelled_rows()[0], space=self.parts.space, from_scratch=from_scratch)

    def unlabelled_rows(self, idx: np.ndarray | None = None) -> tuple[Rows, Rows]:
        """Pool images and masks `idx` (default: the unlabelled ones), read lazily from the memory map."""
        idx = self.pool.unlabelled if idx is None else idx
        return Rows(self.pool_data.images, idx), Rows(self.pool_data.masks, idx)


def round_dir(run_dir: Path, r: int) -> Path:
    return Run(run_dir).round_dir(r)


def completed_rounds(run_dir: Path) -> list[int]:
    return Run(run_dir).completed()


def open_run(cfg: Config, constants_path: str | Path | None = None, log: Callable[[str], None] = print) -> RoundContext:
    """Check everything (names, settings, every data file), then create or reopen the run folder
    and return the context of its first round; the resolved config (precision, every setting of
    the chosen components) is what config.json records."""
    cfg = resolved(cfg.replace(mixed_precision=train.resolve_precision(cfg)))
    parts = build(cfg)
    splits = parts.space.load_splits()  # validates every file before anything is written
    if cfg.nb_labeled > len(splits["train"]):
        raise DsalError(
            f"NB_LABELED = {cfg.nb_labeled} but {cfg.data_path}/trainImg has only {len(splits['train'])} images; "
            "lower NB_LABELED or add images"
        )
    rule = parts.query.base_selection
    run = Run.create(cfg, constants_path, fixed={"nb_iterations": f"the selection rule '{rule.name}' spreads its "
                                                 "draw's schedule over NB_ITERATIONS rounds"}
                     if rule.round_schedule else None)
    if run.normalizer_file.is_file():
        normalizer = parts.space.load_normalizer(run.normalizer_file)
    else:
        normalizer = parts.space.fit_normalizer(splits["train"].images)
        normalizer.save(run.normalizer_file)
    determinism.apply(cfg)  # seeds (and DETERMINISTIC op determinism) before any model is built
    train.set_precision(cfg)
    return RoundContext(cfg, run, parts, splits["train"], splits["val"], normalizer, log)


def run_active_learning(cfg: Config, constants_path: str | Path | None = None, log: Callable[[str], None] = print,
                        initial_model: Path | None = None, on_phase: Callable[[str], None] | None = None) -> Path:
    """Run (or resume) the whole loop; returns the run folder.

    `initial_model`: a finished round-0 folder to reuse (strategy comparisons share it per seed).
    `on_phase(name)`: called when a round starts "scoring" and "training" (`RoundContext.on_phase`).
    Raises `AwaitingAnnotation` when a human oracle (`ORACLE = "files"`) has masks to draw; running
    again after they are imported goes on from there."""
    ctx = open_run(cfg, constants_path, log)
    if on_phase is not None:
        ctx.on_phase = on_phase
    info = ctx.run.stopped()
    if info is not None:
        log(f"{ctx.run.path} stopped after round {info['round']}: {info['reason']} "
            f"(delete {ctx.run.stopped_file} to go on)")
        return ctx.run.path
    start = next(r for r in range(ctx.cfg.nb_iterations + 2) if not ctx.run.is_done(r))
    if start > ctx.cfg.nb_iterations:
        log(f"{ctx.run.path}: all {ctx.cfg.nb_iterations} rounds are already complete")
    elif start > 0:
        log(f"resuming {ctx.run.path} after round {start - 1}")
    with train.get_distribution(ctx.cfg).scope():
        for r in range(start, ctx.cfg.nb_iterations + 1):
            ctx.round = r
            if r == 0 and initial_model is not None and reuse_initial(ctx, initial_model):
                continue
            reason = run_round(ctx)
            if reason is not None:
                _stop(ctx.run.path, r - 1, reason, log)
                break
    return ctx.run.path


def reuse_initial(ctx: RoundContext, initial_model: Path) -> bool:
    """Round 0 copied from a finished round-0 folder (a comparison's shared initial model)."""
    if not is_done(initial_model):
        return False
    shutil.copytree(initial_model, ctx.round_dir, dirs_exist_ok=True)
    _append_curve(ctx.run.path, json.loads(done_marker(ctx.round_dir)))
    ctx.log(f"round 0: reusing the initial model of {initial_model}")
    return True


def run_round(ctx: RoundContext) -> str | None:
    """One round: the first labels (round 0), or score, select and ask the oracle; then train.
    Returns why the loop stops instead (a stop rule), or None."""
    ctx.started, ctx.score_s = time.perf_counter(), 0.0
    if ctx.round == 0:
        first_labels(ctx)
    else:
        reason = decide(ctx)
        if reason is not None:
            return reason
    train_round(ctx)
    return None


def first_labels(ctx: RoundContext) -> None:
    """Round 0: the initial labelled set (asked of the oracle where its masks do not exist) and a new model."""
    folder, oracle, data = ctx.run, ctx.parts.oracle, ctx.pool_data
    if folder.pool_file(0).is_file():  # a cold start already asked for its masks
        ctx.pool = Pool.load(folder.pool_file(0))
    else:
        known = oracle.known(data)
        picks = oracle.first_labels(lambda: ctx.parts.space.thumbnails(data.images), known, ctx.cfg.nb_labeled,
                                    ctx.cfg.seed)
        ctx.pool = Pool.from_labelled(len(data), picks)
        ctx.round_dir.mkdir(parents=True, exist_ok=True)
        ctx.pool.save(folder.pool_file(0))
        asked = ctx.pool.labelled[~known[ctx.pool.labelled]]
        if len(asked):
            oracle.request(ctx.round_dir, asked, data)
    await_masks(ctx)
    ctx.model = train.new_model(ctx.cfg, ctx.cfg.seed)


def decide(ctx: RoundContext) -> str | None:
    """Round r >= 1 up to training: the saved selection, or a stop rule's reason, or a new selection."""
    r, folder = ctx.round, ctx.run
    decided = folder.decided(r)  # survives interruption
    ctx.pool = Pool.load(folder.pool_file(r if decided else r - 1))
    reason = None if decided else stop_reason(ctx)
    if reason is None and ctx.model is None:
        # `fit` left the previous round's best weights in the model; a fresh process loads them.
        # Keeping the model object keeps its compiled graphs (no retracing each round).
        ctx.model = train.load_model(folder.checkpoint(r - 1), ctx.cfg)
    if decided:
        ctx.log(f"round {r}: reusing the saved selection")
    elif reason is None:
        reason = query_round(ctx)
    if reason is not None:
        return reason
    await_masks(ctx)
    _drop_deleted_pseudo(ctx)
    train.reset_optimizer(ctx.model, ctx.cfg.learning_rate)
    return None


def stop_reason(ctx: RoundContext) -> str | None:
    """Why the loop should end before querying again (a stop rule's one line), or None."""
    return next((why for rule in ctx.parts.stop_rules if (why := rule.before_query(ctx.pool, ctx.run))), None)


def await_masks(ctx: RoundContext) -> None:
    """Stop for a person's masks (`AwaitingAnnotation`) while any labelled image has none."""
    missing = ctx.parts.oracle.missing(ctx.pool.labelled, ctx.pool_data)
    if len(missing):
        asked = int(np.sum(ctx.pool.labelled_map == ctx.round + 1))
        raise AwaitingAnnotation(waiting_message(ctx.cfg, ctx.round, len(missing), asked))


def train_round(ctx: RoundContext) -> None:
    """Train on the round's oracle and pseudo labels; the round's row and DONE are written last."""
    r, rd = ctx.round, ctx.round_dir
    x, y, is_pseudo = ctx.pool.training_set(ctx.pool_data.images, ctx.pool_data.masks)
    ctx.on_phase("training")
    ctx.log(f"round {r}/{ctx.cfg.nb_iterations}: training on {len(ctx.pool.labelled)} oracle + "
            f"{int(is_pseudo.sum())} pseudo labels for {ctx.epochs} epochs")
    with stage(rd) as st:
        t1 = time.perf_counter()
        # round 0 trains the new model of `first_labels`; later rounds go on from the previous round's
        history = train.fit(ctx.fit_job(ctx.model, (x, y, is_pseudo), rd, ctx.epochs, ctx.seed, from_scratch=r == 0))
        train_s = time.perf_counter() - t1
        val_dice = max(history.get("val_main_dice", [float("nan")]) or [float("nan")])
        row = dict(round=r, n_oracle=len(ctx.pool.labelled), n_pseudo=int(is_pseudo.sum()),
                   val_dice=round(float(val_dice), 5), train_s=round(train_s, 2), score_s=round(ctx.score_s, 2))
        _append_curve(ctx.run.path, row)
        st.marker = json.dumps({**row, "wall_s": round(time.perf_counter() - ctx.started, 2)})
    ctx.log(f"round {r}: val Dice {val_dice:.4f}")


def query_round(ctx: RoundContext) -> str | None:
    """Score the unlabelled pool (or merge its shards), pick oracle and pseudo labels, save them and
    ask the oracle; or a stop rule's reason once the scores are known (nothing chosen then)."""
    unl = ctx.pool.unlabelled
    ctx.on_phase("scoring")
    t = time.perf_counter()
    scores = _merged_parts(ctx.round_dir, unl, ctx.parts.space.eval_batch_size, ctx.log)
    if scores is None:
        scores = score_round(ctx, unl)
    ctx.score_s = time.perf_counter() - t
    if "true_dice" in scores:  # only meaningful where the mask exists
        scores["true_dice"] = np.where(ctx.pool_data.has_mask[unl], scores["true_dice"], np.nan)
    reason = next((why for rule in ctx.parts.stop_rules if (why := rule.after_scoring(scores))), None)
    if reason is not None:
        return reason
    oracle_idx, pseudo_idx = choose_labels(ctx, unl, scores)
    ctx.log(f"round {ctx.round}: {len(oracle_idx)} images to the oracle, {len(pseudo_idx)} pseudo labels "
            f"(scored {len(unl)} in {ctx.score_s:.1f}s)")
    return None


def score_round(ctx: RoundContext, idx: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image scores of pool images `idx` with the context's model (round r-1's), read from the
    memory-mapped pool batch by batch."""
    query, cfg = ctx.parts.query, ctx.cfg

    def train_member(out_dir: Path, start: Path | None, seed: int):
        """One more model on the previous round's training set (for ensemble strategies)."""
        x, y, is_pseudo = ctx.pool.training_set(ctx.pool_data.images, ctx.pool_data.masks)
        m = train.load_model(start, cfg) if start is not None else train.new_model(cfg, seed)
        epochs = cfg.nb_active_epochs if start is not None else cfg.nb_initial_epochs
        train.fit(ctx.fit_job(m, (x, y, is_pseudo), out_dir, epochs, seed, from_scratch=start is None))
        return m

    reset_seed_generators(ctx.model, ctx.seed)  # MC-dropout scores do not depend on the history
    query.prepare(ctx.model, ctx.round, ctx.run.path, train_member)
    images, masks = ctx.unlabelled_rows(idx)
    return ctx.parts.space.score_pool(query, ctx.model, images, masks, ctx.normalizer, progress=cfg.progress,
                                      with_features=with_features if query.selection.needs_features else None)


def choose_labels(ctx: RoundContext, unl: np.ndarray, scores: dict) -> tuple[np.ndarray, np.ndarray]:
    """The round's selection from the scores of the unlabelled pool images `unl`: the oracle picks
    (labelled in the pool, asked of the oracle), the pseudo labels (masks from the disk-backed `pred`
    store, written for inspection), `scores.csv`, and the saved pool last. Reads only the chosen
    images; returns (oracle indices, pseudo indices) into the pool."""
    cfg, r, pool, data, space = ctx.cfg, ctx.round, ctx.pool, ctx.pool_data, ctx.parts.space
    rng = np.random.default_rng([cfg.seed, r])
    n_oracle = min(cfg.nb_next_sample, len(unl))
    for rule in ctx.parts.stop_rules:
        n_oracle = rule.cap(n_oracle, pool)
    picks = ctx.parts.query.select(scores, n_oracle, rng, r)
    oracle_idx = unl[picks]
    pool.label(oracle_idx, r)
    available = ctx.parts.pseudo.candidates(scores, np.setdiff1d(np.arange(len(unl)), picks))
    n_pseudo = min(cfg.nb_pseudo(r), len(available))
    chosen = ctx.parts.pseudo.select(scores, available, n_pseudo, rng) if n_pseudo else np.zeros(0, np.int64)
    masks = ctx.parts.pseudo.labels(scores, chosen, Rows(data.images, unl)) if len(chosen) else None
    pool.set_pseudo(unl[chosen], masks)
    ctx.round_dir.mkdir(parents=True, exist_ok=True)
    if len(chosen):
        space.write_masks(ctx.round_dir / PSEUDO_DIR, unl[chosen], masks, data)
    prelabels = None
    if ctx.parts.oracle.wants_prelabels() and len(picks):
        prelabels = space.masks_at_original_size(ctx.model, data.images[oracle_idx],
                                                 [data.files[i] for i in oracle_idx], ctx.normalizer)
    ctx.parts.oracle.request(ctx.round_dir, oracle_idx, data, scores, picks, prelabels)
    _write_scores(ctx.round_dir / SCORES, data.names, unl, scores, oracle_idx, unl[chosen])
    pool.save(ctx.round_dir / POOL)  # last: a saved pool with its scores means the round is decided
    return oracle_idx, unl[chosen]


def score_shard(cfg: Config, r: int, shard: int, n_shards: int, log: Callable[[str], None] = print) -> Path:
    """Score one slice of round `r`'s unlabelled pool (`dsal score --shard i/n`) with round r-1's
    model and write `round_XX/score_parts/part_i_of_n.npz`; the round merges the parts when all exist,
    so several processes or machines can share one round's scoring."""
    cfg = resolved(saved_config(cfg))
    run = Run.of(cfg)
    if not 0 <= shard < n_shards:
        raise DsalError(f"--shard {shard}/{n_shards}: the shard must be in 0..{n_shards - 1}")
    if r < 1 or not run.is_done(r - 1):
        raise DsalError(f"round {r} of {run.path} cannot be scored: round {r - 1} is not finished; train it first")
    if run.scores_file(r).is_file():
        raise DsalError(f"round {r} of {run.path} has already chosen its images; nothing to score")
    parts = build(cfg)
    splits = parts.space.load_splits(("train", "val"))
    normalizer = parts.space.load_normalizer(run.normalizer_file)
    ctx = RoundContext(cfg, run, parts, splits["train"], splits["val"], normalizer, log, round=r,
                       pool=Pool.load(run.pool_file(r - 1)))
    determinism.apply(cfg)
    train.set_precision(cfg)
    ctx.model = train.load_model(run.checkpoint(r - 1), cfg)
    unl = ctx.pool.unlabelled
    idx = unl[shard_positions(len(unl), shard, n_shards, parts.space.eval_batch_size)]
    scores = score_round(ctx, idx)
    out = run.score_parts(r) / f"part_{shard}_of_{n_shards}.npz"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: np.savez(tmp, index=idx, **scores))
    log(f"scored {len(idx)} of {len(unl)} pool images for round {r}: {out}")
    return out


def _append_curve(run: Path, row: dict) -> None:
    path = Run(run).curve_file
    rows = []
    if path.is_file():
        with path.open() as f:
            rows = [r for r in csv.DictReader(f) if int(r["round"]) != row["round"]]
    rows.append({k: row.get(k, "") for k in CURVE_FIELDS})
    rows.sort(key=lambda r: int(r["round"]))

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, CURVE_FIELDS, restval="", extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    atomic_write(path, write)


def _write_scores(path: Path, names: list[str], pool_idx: np.ndarray, scores: dict, oracle: np.ndarray,
                  pseudo: np.ndarray) -> None:
    """Per scored image: index, name, every per-image score, and what the round chose for it.
    A score that cannot be known (NaN: the true Dice of an image nobody has drawn) is left empty."""
    keys = [k for k, v in scores.items() if v.ndim == 1]
    chosen = np.full(len(pool_idx), "", object)
    chosen[np.isin(pool_idx, oracle)] = "oracle"
    chosen[np.isin(pool_idx, pseudo)] = "pseudo"

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["index", "name", *keys, "chosen"])
            for j, i in enumerate(pool_idx):
                values = (float(scores[k][j]) for k in keys)
                w.writerow([int(i), names[i], *("" if np.isnan(v) else f"{v:.6g}" for v in values), chosen[j]])

    atomic_write(path, write)


def _stop(run: Path, last_round: int, reason: str, log) -> None:
    """End the loop for good: the reason goes to the learning curve (last round's row) and STOPPED."""
    folder = Run(run)
    with folder.curve_file.open() as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        if int(row["round"]) == last_round:
            _append_curve(run, {**row, "round": last_round, "stop": reason})
    folder.stop(last_round, reason)
    shutil.rmtree(folder.round_dir(last_round + 1), ignore_errors=True)  # nothing of it was decided
    log(f"stopped after round {last_round}: {reason}")


def _drop_deleted_pseudo(ctx: RoundContext) -> None:
    """A pseudo label whose mask file in `round_XX/pseudo/` a person deleted does not train."""
    pool, rd = ctx.pool, ctx.round_dir
    folder = rd / PSEUDO_DIR
    if not folder.is_dir() or not len(pool.pseudo_idx):
        return
    names = ctx.pool_data.names
    keep = np.array([ctx.parts.space.mask_file(folder, names[i]).is_file() for i in pool.pseudo_idx], bool)
    if keep.all():
        return
    pool.set_pseudo(pool.pseudo_idx[keep], pool.pseudo_masks[keep] if keep.any() else None)
    pool.save(rd / POOL)
    ctx.log(f"round {rd.name}: {int((~keep).sum())} pseudo labels were deleted from {folder}; "
            "training without them")


def shard_positions(n: int, shard: int, n_shards: int, batch_size: int) -> np.ndarray:
    """Positions of shard `shard` of `n_shards` over `n` scored images, cut at batch boundaries so
    every batch of a shard is a batch of the single pass (same images, same scores)."""
    batches = np.array_split(np.arange(-(-n // batch_size)), n_shards)[shard]
    if not len(batches):
        return np.zeros(0, np.int64)
    return np.arange(batches[0] * batch_size, min((batches[-1] + 1) * batch_size, n))


def _merged_parts(rd: Path, unl: np.ndarray, batch_size: int, log) -> dict | None:
    """The round's scores from `dsal score --shard` parts, when every part is there and current."""
    files = sorted((rd / SCORE_PARTS).glob("part_*_of_*.npz"))
    if not files:
        return None
    n = int(files[0].stem.split("_of_")[1])
    parts = []
    for i in range(n):
        path = rd / SCORE_PARTS / f"part_{i}_of_{n}.npz"
        want = unl[shard_positions(len(unl), i, n, batch_size)]
        if not path.is_file():
            log(f"{rd.name}: score part {i + 1} of {n} is missing; scoring the whole pool here")
            return None
        with np.load(path) as z:
            if not np.array_equal(z["index"], want):
                log(f"{rd.name}: {path.name} was scored for another pool state; scoring the whole pool here")
                return None
            if len(want):  # a shard past the last batch scored nothing
                parts.append({k: z[k] for k in z.files if k != "index"})
    log(f"{rd.name}: merged {n} score parts")
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
