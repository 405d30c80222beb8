"""Experiment settings, read once into a frozen, validated config (dsal_tf/config.py).

Pick a preset, then override what you need: the preset fills in everything you leave out.
Order (later wins): built-in defaults < PRESET < this file < command-line options.
Any name here must be a known constant; a typo is reported with the closest valid name.
Full table: README.md, "Constants".
"""

# demo (embedded synthetic data, minutes on a laptop CPU), isic2017 (the paper),
# isic2017-cpu (reduced ISIC protocol for 2 CPU cores), bone_age (BCE, no z-score)
PRESET = "demo"

# --- common overrides (uncomment to use) -----------------------------------------
# EXP_NAME = "my-run"            # folder under exp/; default "<preset>-<strategy>-s<seed>"
# DATA_PATH = "orgData"          # {trainImg,trainGT,valImg,valGT,testImg,testGT}
# SEED = 0
# QUERY_STRATEGY = "dsal"        # dsal, random, ...
# PSEUDO_POLICY = "confidence"   # confidence, random, none
# NB_LABELED = 40                # initial oracle labels
# NB_ITERATIONS = 3              # active-learning rounds
# NB_NEXT_SAMPLE = 20            # oracle labels per round
# PSEUDO_EPOCH = 2               # first round with pseudo labels
# NB_PSEUDO_INITIAL = 20         # pseudo labels then, growing by PSEUDO_RATE per round
# PSEUDO_RATE = 20
# NB_INITIAL_EPOCHS = 15
# NB_ACTIVE_EPOCHS = 8
# IMG_ROWS = 64
# IMG_COLS = 64
# COLOR = "rgb"                  # or "gray"
# NORMALIZATION = "zscore"       # or "unit" (/255)
# LOSS = "auto"                  # dice, bce, bce_dice; auto: dice on images, bce_dice on volumes
# BASE_FILTERS = 8
# LEARNING_RATE = 1e-3
# BATCH_SIZE = 16
# MIXED_PRECISION = "auto"   # auto (bf16 where the hardware has it), off, float16, bfloat16
# TRAINER = "standard"           # standard, rgs, rgm, rgsm (noisy-teacher re-weighting)
