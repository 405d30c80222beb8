"""The active-learning pool as data (after baal's `labelled_map`).

`labelled_map[i]` is 0 while image i is unlabelled and `r + 1` once the oracle labelled it in
round r (round 0 is the initial random set). Pseudo labels are per round: their indices and
masks are replaced every round, and pseudo-labelled images stay in the unlabelled pool.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import DsalError


@dataclass
class Pool:
    labelled_map: np.ndarray  # int32 [N]
    pseudo_idx: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    pseudo_masks: np.ndarray | None = None  # uint8 [P,*spatial,1] in {0,1} (images or volumes)

    @classmethod
    def initial(cls, size: int, n_labelled: int, seed: int) -> Pool:
        if n_labelled > size:
            raise DsalError(
                f"NB_LABELED = {n_labelled} but the training pool has only {size} images; "
                f"lower NB_LABELED or add images to trainImg"
            )
        rng = np.random.default_rng(seed)
        lm = np.zeros(size, np.int32)
        lm[rng.choice(size, n_labelled, replace=False)] = 1
        return cls(lm)

    @classmethod
    def from_labelled(cls, size: int, idx: np.ndarray) -> Pool:
        """Round 0 with the images `idx` labelled."""
        lm = np.zeros(size, np.int32)
        lm[np.asarray(idx, np.int64)] = 1
        return cls(lm)

    @property
    def labelled(self) -> np.ndarray:
        return np.flatnonzero(self.labelled_map)

    @property
    def unlabelled(self) -> np.ndarray:
        return np.flatnonzero(self.labelled_map == 0)

    def label(self, idx: np.ndarray, round_: int) -> None:
        idx = np.asarray(idx, np.int64)
        if np.any(self.labelled_map[idx]):
            raise ValueError("asked to label images that are already labelled")
        self.labelled_map[idx] = round_ + 1

    def set_pseudo(self, idx: np.ndarray, masks: np.ndarray | None) -> None:
        idx = np.asarray(idx, np.int64)
        if np.any(self.labelled_map[idx]):
            raise ValueError("pseudo labels must come from the unlabelled pool")
        self.pseudo_idx, self.pseudo_masks = idx, masks

    def training_set(self, images: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Images, labels and an is-pseudo flag for everything the model trains on this round."""
        lab = self.labelled
        x = images[lab]
        y = masks[lab]
        flag = np.zeros(len(lab), bool)
        if len(self.pseudo_idx):
            x = np.concatenate([x, images[self.pseudo_idx]])
            y = np.concatenate([y, self.pseudo_masks])
            flag = np.concatenate([flag, np.ones(len(self.pseudo_idx), bool)])
        return x, y, flag

    def save(self, path: Path) -> None:
        tmp = Path(str(path) + ".tmp.npz")
        masks = self.pseudo_masks if self.pseudo_masks is not None else np.zeros((0,), np.uint8)
        np.savez_compressed(tmp, labelled_map=self.labelled_map, pseudo_idx=self.pseudo_idx, pseudo_masks=masks)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> Pool:
        with np.load(path) as z:
            masks = z["pseudo_masks"]
            return cls(z["labelled_map"].astype(np.int32), z["pseudo_idx"].astype(np.int64),
                       masks if masks.ndim > 1 else None)  # [P,*spatial,1]; the placeholder is 1-D
