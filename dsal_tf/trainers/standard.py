"""`standard`: plain Keras `fit` of the compiled U-Net on every label alike (oracle and pseudo)."""

from __future__ import annotations

from .base import fit_plain, register_trainer


@register_trainer("standard")
class Standard:
    """No wrapper model: `fit_job` is the whole trainer (it ignores the unlabelled pool)."""

    @classmethod
    def fit_job(cls, job) -> dict:
        return fit_plain(job)
