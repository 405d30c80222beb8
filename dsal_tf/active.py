"""The CEAL-style active-learning loop with a strong (oracle) and a weak (pseudo) labeler.

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
from pathlib import Path

import cv2
import numpy as np

from . import determinism
from .config import Config
from .data import Normalizer, Rows, load_splits
from .determinism import reset_seed_generators
from .errors import DsalError
from .evaluate import saved_config
from .files import atomic_dir, atomic_write
from .pool import Pool
from .predict import masks_at_original_size, original_size
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


def round_dir(run_dir: Path, r: int) -> Path:
    return Run(run_dir).round_dir(r)


def completed_rounds(run_dir: Path) -> list[int]:
    return Run(run_dir).completed()


def prepare_run_dir(cfg: Config, constants_path: str | Path | None = None) -> Path:
    """Create or reopen `exp/<name>`; refuse to mix a finished run with different settings."""
    return Run.create(cfg, constants_path).path


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


def run_active_learning(
    cfg: Config,
    constants_path: str | Path | None = None,
    log: Callable[[str], None] = print,
    initial_model: Path | None = None,
) -> Path:
    """Run (or resume) the whole loop; returns the run folder.

    `initial_model`: a finished round-0 folder to reuse (strategy comparisons share it per seed).
    Raises `AwaitingAnnotation` when a human oracle (`ORACLE = "files"`) has masks to draw; running
    again after they are imported goes on from there.
    """
    from . import train
    from .oracle import ORACLES, AwaitingAnnotation, initial_labels, waiting_message
    from .strategies import PSEUDO_POLICIES, QUERY_STRATEGIES, pseudo_policy_name

    cfg = cfg.replace(mixed_precision=train.resolve_precision(cfg))  # config.json records the choice made
    splits = load_splits(cfg)  # validates every file before anything is written
    pool_data, val = splits["train"], splits["val"]
    if cfg.nb_labeled > len(pool_data):
        raise DsalError(
            f"NB_LABELED = {cfg.nb_labeled} but {cfg.data_path}/trainImg has only {len(pool_data)} images; "
            "lower NB_LABELED or add images"
        )
    oracle = ORACLES[cfg.oracle](cfg)
    folder = Run.create(cfg, constants_path)
    run = folder.path
    info = folder.stopped()
    if info is not None:
        log(f"{run} stopped after round {info['round']}: {info['reason']} (delete {folder.stopped_file} to go on)")
        return run
    norm_path = folder.normalizer_file
    if norm_path.is_file():
        normalizer = Normalizer.load(norm_path)
    else:
        normalizer = Normalizer.fit(pool_data.images, cfg.normalization)
        normalizer.save(norm_path)

    determinism.apply(cfg)  # seeds (and DETERMINISTIC op determinism) before any model is built
    train.set_precision(cfg)
    strategy = train.get_distribution(cfg)
    query = QUERY_STRATEGIES[cfg.query_strategy](cfg)
    pseudo = PSEUDO_POLICIES[pseudo_policy_name(cfg)](cfg)

    def await_masks(r: int, pool: Pool) -> None:
        missing = oracle.missing(pool.labelled, pool_data)
        if len(missing):
            asked = int(np.sum(pool.labelled_map == r + 1))
            raise AwaitingAnnotation(waiting_message(cfg, r, len(missing), asked))

    done = folder.completed()
    start = 0
    while start in done:
        start += 1
    if start > cfg.nb_iterations:
        log(f"{run}: all {cfg.nb_iterations} rounds are already complete")
    elif start > 0:
        log(f"resuming {run} after round {start - 1}")
    model = None
    with strategy.scope():
        for r in range(start, cfg.nb_iterations + 1):
            rd = folder.round_dir(r)
            t0 = time.perf_counter()
            score_s = 0.0
            if r == 0 and initial_model is not None and is_done(initial_model):
                shutil.copytree(initial_model, rd, dirs_exist_ok=True)
                _append_curve(run, json.loads(done_marker(rd)))
                log(f"round 0: reusing the initial model of {initial_model}")
                continue
            if r == 0:
                if folder.pool_file(r).is_file():  # a cold start already asked for its masks
                    pool = Pool.load(folder.pool_file(r))
                else:
                    known = oracle.known(pool_data)
                    pool = Pool.from_labelled(len(pool_data), initial_labels(cfg, pool_data.images, known))
                    rd.mkdir(parents=True, exist_ok=True)
                    pool.save(folder.pool_file(r))
                    asked = pool.labelled[~known[pool.labelled]]
                    if len(asked):
                        oracle.request(rd, asked, pool_data)
                await_masks(r, pool)
                model = train.new_model(cfg, cfg.seed)
                epochs = cfg.nb_initial_epochs
            else:
                decided = folder.decided(r)  # survives interruption
                pool = Pool.load(folder.pool_file(r if decided else r - 1))
                reason = None if decided else stop_reason(cfg, run, pool)
                if reason is None and model is None:
                    # `fit` left the previous round's best weights in `model`; a fresh process loads them.
                    # Keeping the model object keeps its compiled graphs (no retracing each round).
                    model = train.load_model(folder.checkpoint(r - 1), cfg)
                if decided:
                    log(f"round {r}: reusing the saved selection")
                elif reason is None:
                    score_s, reason = _query_round(cfg, r, pool, pool_data, val, model, normalizer, query, pseudo,
                                                   oracle, rd, log)
                if reason is not None:
                    _stop(run, r - 1, reason, log)
                    break
                await_masks(r, pool)
                _drop_deleted_pseudo(pool, pool_data.names, rd, log)
                train.reset_optimizer(model, cfg.learning_rate)
                epochs = cfg.nb_active_epochs
            x, y, is_pseudo = pool.training_set(pool_data.images, pool_data.masks)
            log(f"round {r}/{cfg.nb_iterations}: training on {len(pool.labelled)} oracle + "
                f"{int(is_pseudo.sum())} pseudo labels for {epochs} epochs")
            with stage(rd) as st:  # DONE, with the round's row, last
                t1 = time.perf_counter()
                history = train.fit(model, cfg, x, y, is_pseudo, val, normalizer, rd, epochs,
                                    seed=cfg.seed * 1000 + r)
                train_s = time.perf_counter() - t1
                val_dice = max(history.get("val_main_dice", [float("nan")]) or [float("nan")])
                row = dict(round=r, n_oracle=len(pool.labelled), n_pseudo=int(is_pseudo.sum()),
                           val_dice=round(float(val_dice), 5), train_s=round(train_s, 2), score_s=round(score_s, 2))
                _append_curve(run, row)
                st.marker = json.dumps({**row, "wall_s": round(time.perf_counter() - t0, 2)})
            log(f"round {r}: val Dice {val_dice:.4f}")
    return run


def stop_reason(cfg: Config, run: Path, pool: Pool) -> str | None:
    """Why the loop should end before querying again (expert budget, flat validation Dice), or None."""
    if cfg.stop_budget and len(pool.labelled) >= cfg.stop_budget:
        return f"expert budget STOP_BUDGET = {cfg.stop_budget} labels reached ({len(pool.labelled)} used)"
    k = cfg.stop_patience
    path = Run(run).curve_file
    if k and path.is_file():
        with path.open() as f:
            dice = [float(row["val_dice"]) for row in csv.DictReader(f)]
        if len(dice) > k and max(dice[-k:]) < max(dice[:-k]) + cfg.stop_min_delta:
            return f"validation Dice has not improved by {cfg.stop_min_delta} for {k} rounds (STOP_PATIENCE)"
    return None


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


def _drop_deleted_pseudo(pool: Pool, names: list[str], rd: Path, log) -> None:
    """A pseudo label whose `round_XX/pseudo/<stem>.png` a person deleted does not train."""
    folder = rd / PSEUDO_DIR
    if not folder.is_dir() or not len(pool.pseudo_idx):
        return
    keep = np.array([(folder / f"{names[i]}.png").is_file() for i in pool.pseudo_idx], bool)
    if keep.all():
        return
    pool.set_pseudo(pool.pseudo_idx[keep], pool.pseudo_masks[keep] if keep.any() else None)
    pool.save(rd / POOL)
    log(f"round {rd.name}: {int((~keep).sum())} pseudo labels were deleted from {folder}; training without them")


def _write_pseudo_pngs(folder: Path, idx: np.ndarray, masks: np.ndarray, pool_data) -> None:
    """Each pseudo mask at its image's original size (0/255 PNG), for a person to inspect or delete."""
    with atomic_dir(folder) as tmp:
        for i, mask in zip(idx, masks):
            h, w = original_size(pool_data.files[i])
            big = cv2.resize(mask[..., 0].astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
            cv2.imwrite(str(tmp / f"{pool_data.names[i]}.png"), big * 255)


def shard_positions(n: int, shard: int, n_shards: int, batch_size: int) -> np.ndarray:
    """Positions of shard `shard` of `n_shards` over `n` scored images, cut at batch boundaries so
    every batch of a shard is a batch of the single pass (same images, same scores)."""
    batches = np.array_split(np.arange(-(-n // batch_size)), n_shards)[shard]
    if not len(batches):
        return np.zeros(0, np.int64)
    return np.arange(batches[0] * batch_size, min((batches[-1] + 1) * batch_size, n))


def _score(cfg, r, pool, pool_data, val, model, normalizer, query, rd, idx) -> dict:
    """Per-image scores of pool images `idx`, read from the (memory-mapped) pool batch by batch."""
    from . import train

    def train_member(out_dir: Path, start: Path | None, seed: int):
        """One more model on the previous round's training set (for ensemble strategies)."""
        x, y, is_pseudo = pool.training_set(pool_data.images, pool_data.masks)  # before this round's labels
        m = train.load_model(start, cfg) if start is not None else train.new_model(cfg, seed)
        epochs = cfg.nb_active_epochs if start is not None else cfg.nb_initial_epochs
        train.fit(m, cfg, x, y, is_pseudo, val, normalizer, out_dir, epochs, seed)
        return m

    reset_seed_generators(model, cfg.seed * 1000 + r)  # MC-dropout scores do not depend on the history
    query.prepare(model, r, rd.parent, train_member)
    return query.score_pool(model, Rows(pool_data.images, idx), Rows(pool_data.masks, idx), normalizer,
                            train.eval_batch_size(cfg), progress=cfg.progress)


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


def score_shard(cfg: Config, r: int, shard: int, n_shards: int, log: Callable[[str], None] = print) -> Path:
    """Score one slice of round `r`'s unlabelled pool (`dsal score --shard i/n`) with round r-1's
    model and write `round_XX/score_parts/part_i_of_n.npz`; the round merges the parts when all exist,
    so several processes or machines can share one round's scoring."""
    from . import train
    from .strategies import QUERY_STRATEGIES

    cfg = saved_config(cfg)
    folder = Run.of(cfg)
    run = folder.path
    if not 0 <= shard < n_shards:
        raise DsalError(f"--shard {shard}/{n_shards}: the shard must be in 0..{n_shards - 1}")
    if r < 1 or not folder.is_done(r - 1):
        raise DsalError(f"round {r} of {run} cannot be scored: round {r - 1} is not finished; train it first")
    if folder.scores_file(r).is_file():
        raise DsalError(f"round {r} of {run} has already chosen its images; nothing to score")
    splits = load_splits(cfg, ("train", "val"))
    pool_data, val = splits["train"], splits["val"]
    pool = Pool.load(folder.pool_file(r - 1))
    determinism.apply(cfg)
    train.set_precision(cfg)
    model = train.load_model(folder.checkpoint(r - 1), cfg)
    unl = pool.unlabelled
    idx = unl[shard_positions(len(unl), shard, n_shards, train.eval_batch_size(cfg))]
    rd = folder.round_dir(r)
    scores = _score(cfg, r, pool, pool_data, val, model, folder.normalizer(),
                    QUERY_STRATEGIES[cfg.query_strategy](cfg), rd, idx)
    out = folder.score_parts(r) / f"part_{shard}_of_{n_shards}.npz"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: np.savez(tmp, index=idx, **scores))
    log(f"scored {len(idx)} of {len(unl)} pool images for round {r}: {out}")
    return out


def _query_round(cfg, r, pool, pool_data, val, model, normalizer, query, pseudo, oracle, rd, log):
    """Score the unlabelled pool (or merge its shards), pick oracle and pseudo labels, save them and
    ask the oracle.

    Returns (scoring seconds, stop reason or None): a pool that already agrees with itself
    (`STOP_AGREEMENT`) ends the loop before anything is chosen."""
    from .train import eval_batch_size

    unl = pool.unlabelled
    t = time.perf_counter()
    scores = _merged_parts(rd, unl, eval_batch_size(cfg), log)
    if scores is None:
        scores = _score(cfg, r, pool, pool_data, val, model, normalizer, query, rd, unl)
    score_s = time.perf_counter() - t
    if "true_dice" in scores:  # only meaningful where the mask exists
        scores["true_dice"] = np.where(pool_data.has_mask[unl], scores["true_dice"], np.nan)
    if cfg.stop_agreement and "agreement" in scores:
        mean = float(np.mean(scores["agreement"]))
        if mean >= cfg.stop_agreement:
            return score_s, f"mean pool agreement {mean:.4f} >= STOP_AGREEMENT = {cfg.stop_agreement}"
    oracle_idx, pseudo_idx = choose_labels(cfg, r, pool, pool_data, unl, scores, model, normalizer, query, pseudo,
                                           oracle, rd)
    log(f"round {r}: {len(oracle_idx)} images to the oracle, {len(pseudo_idx)} pseudo labels "
        f"(scored {len(unl)} in {score_s:.1f}s)")
    return score_s, None


def choose_labels(cfg, r, pool, pool_data, unl, scores, model, normalizer, query, pseudo, oracle, rd):
    """Round `r`'s selection from the scores of the unlabelled pool images `unl`: the oracle picks
    (labelled in `pool`, asked of the oracle), the pseudo labels (masks from the disk-backed `pred`
    store, PNGs for inspection), `scores.csv`, and the saved pool last. Reads only the chosen
    images; returns (oracle indices, pseudo indices) into the pool."""
    from .strategies.pseudo import with_foreground

    rng = np.random.default_rng([cfg.seed, r])
    n_oracle = min(cfg.nb_next_sample, len(unl))
    if cfg.stop_budget:
        n_oracle = min(n_oracle, cfg.stop_budget - len(pool.labelled))
    picks = query.select(scores, n_oracle, rng, r)
    oracle_idx = unl[picks]
    pool.label(oracle_idx, r)
    available = np.setdiff1d(np.arange(len(unl)), picks)
    available = with_foreground(scores, available, cfg.pseudo_min_foreground)
    n_pseudo = min(cfg.nb_pseudo(r), len(available))
    chosen = pseudo.select(scores, available, n_pseudo, rng) if n_pseudo else np.zeros(0, np.int64)
    masks = pseudo.labels(scores, chosen, Rows(pool_data.images, unl)) if len(chosen) else None
    pool.set_pseudo(unl[chosen], masks)
    rd.mkdir(parents=True, exist_ok=True)
    if len(chosen):
        _write_pseudo_pngs(rd / PSEUDO_DIR, unl[chosen], masks, pool_data)
    prelabels = None
    if oracle.wants_prelabels() and len(picks):
        prelabels = masks_at_original_size(model, pool_data.images[oracle_idx],
                                           [pool_data.files[i] for i in oracle_idx], normalizer, cfg.batch_size)
    oracle.request(rd, oracle_idx, pool_data, scores, picks, prelabels)
    _write_scores(rd / SCORES, pool_data.names, unl, scores, oracle_idx, unl[chosen])
    pool.save(rd / POOL)  # last: a saved pool with its scores means the round is decided (`Run.decided`)
    return oracle_idx, unl[chosen]
