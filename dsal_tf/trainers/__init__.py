"""Trainers, picked by name (`TRAINER`): one algorithm per file on the shared core in `base.py`.

| name | file | what it does with the noisy batch (or the pool) |
|---|---|---|
| `standard` | `standard.py` | none: plain `fit` on every label alike |
| `uniform` | `uniform.py` | `w_i = 1/B` through the paired sampler (the control) |
| `rgs`, `rgm`, `rgsm` | `reweight.py` | gradient trust / magnitude (noisy teacher) |
| `mwnet` | `mwnet.py` | per-sample weights from a meta-learned weight net |
| `mcpm` | `mcpm.py` | per-pixel weights on the pixel BCE from a meta-learned mask net |
| `pnt`, `int`, `pint` | `pint.py` | after a supervised warm-up, EMA-teacher uncertainty gates label vs. teacher |
| `boostmis` | `boostmis.py` | EMA-teacher pixel labels above adaptive class thresholds replace the noisy masks |
| `bcp` | `bcp.py` | semi-supervised: labelled and unlabelled pool images copy-pasted both ways, EMA teacher |
| `mean_teacher` | `mean_teacher.py` | semi-supervised control: consistency with an EMA teacher, no mixing |

`bcp` and `mean_teacher` (`semisup.py`) learn from the whole unlabelled pool (`train.FitJob.unlabelled`)
every step; under them the whole-image pseudo labels default to none (`PSEUDO_POLICY = "auto"`).

`booster.py` holds `Booster`, the same pseudo labels for `dsal classify`'s head on feature vectors
(`classify.PSEUDO_RULES` gives its cutoffs); it trains no segmenter, so it is not in `TRAINERS`.

`train.fit` calls `TRAINERS[cfg.trainer].fit_job(job)` with a `train.FitJob` (the training set, the
unlabelled pool as a lazily read stream, validation, callbacks, the run's space) and never branches on the
name. Every trainer takes its streams from `job.space` and is rank-generic: the same code trains on 2D
images (NHWC) and on patches of 3D volumes (NDHWC). The loss
of a run is `PairedTrainer.loss_for(cfg)`: `LOSS`, except `uniform` and `rgs`/`rgm`/`rgsm`, which use
`REWEIGHT_LOSS` (BCE + Dice by default, `base.reweight_loss_name`).
"""

from . import bcp, boostmis, mcpm, mean_teacher, mwnet, pint, reweight, standard, uniform  # noqa: F401  (registration)
from .base import (
    DS_WEIGHTS,
    TRAINERS,
    PairedTrainer,
    make_paired_dataset,
    paired_dataset,
    per_sample_loss,
    pixel_weighted_loss,
    register_trainer,
    resolve_loss,
    reweight_loss_name,
    split_clean,
)
from .booster import Booster
from .reweight import (
    ReweightedTrainer,
    combine_weights,
    informativeness_scores,
    kernel_gradient_magnitude,
    normalize_positive,
    trust_scores,
)


def get_trainer(name: str) -> type:
    from ..errors import DsalError

    if name not in TRAINERS:
        raise DsalError(f"TRAINER = {name!r} is not one of {sorted(TRAINERS)}")
    return TRAINERS[name]


def make_trainer(name: str, segmenter, **kwargs) -> PairedTrainer:
    """A wrapping trainer by registry name (not `standard`, which has no wrapper)."""
    from ..errors import DsalError

    cls = get_trainer(name)
    if not issubclass(cls, PairedTrainer):
        raise DsalError(f"trainer {name!r} has no wrapper model; use one of "
                        f"{sorted(n for n, c in TRAINERS.items() if issubclass(c, PairedTrainer))}")
    return cls(segmenter, **kwargs)


__all__ = [
    "DS_WEIGHTS", "TRAINERS", "Booster", "PairedTrainer", "ReweightedTrainer", "combine_weights", "get_trainer",
    "informativeness_scores", "kernel_gradient_magnitude", "make_paired_dataset", "make_trainer",
    "normalize_positive", "paired_dataset", "per_sample_loss", "pixel_weighted_loss", "register_trainer",
    "resolve_loss", "reweight_loss_name", "split_clean", "trust_scores",
]
