"""`standard`: plain Keras `fit` of the compiled U-Net on every label alike (oracle and pseudo)."""

from __future__ import annotations

from .base import fit_plain, register_trainer


@register_trainer("standard")
class Standard:
    """No wrapper model: `fit_arrays` is the whole trainer."""

    @classmethod
    def fit_arrays(cls, model, cfg, x, y, is_noisy, val, normalizer, callbacks, epochs, seed, verbose="auto"):
        return fit_plain(model, cfg, x, y, val, normalizer, callbacks, epochs, seed, verbose)
