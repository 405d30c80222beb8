"""bf16 against fp32 on the hippocampus volumes: train and validation Dice of a 3D U-Net after 300 steps.

    python bench/volume_precision_probe.py MIXED_PRECISION=off
    python bench/volume_precision_probe.py MIXED_PRECISION=bfloat16 [NORM=instance]

10 training volumes, batch 2, 16 filters, 6 epochs of 50 steps, validation on the 20 val volumes each epoch
(docs/gpus.md#precision). Data: ../shared/data/hippocampus (HIPPOCAMPUS_DATA overrides it)."""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# ruff: noqa: E402
from dsal_tf import train
from dsal_tf.components import load_config
from dsal_tf.model import HEADS
from dsal_tf.space import space_for

sets = dict(a.split("=") for a in sys.argv[1:])
sets = {k.lower(): (float(v) if "." in v else int(v) if v.isdigit() else v) for k, v in sets.items()}
data = os.environ.get("HIPPOCAMPUS_DATA", "../shared/data/hippocampus")
cfg = load_config(None, {"data_path": data, "exp_dir": "exp", "progress": False, "batch_size": 2, "base_filters": 16,
                         **sets})
print(train.set_precision(cfg), cfg.norm, cfg.loss, cfg.learning_rate)
space = space_for(cfg)
tr, va = space.load_split("train"), space.load_split("val")
norm = space.fit_normalizer(tr.images)
model = train.new_model(cfg, 0)
ds = space.train_stream(tr.images[:10], tr.masks[:10], norm, seed=0, heads=HEADS, repeat=True)
vs = space.eval_stream(va.images, va.masks, norm, heads=HEADS)
t = time.time()
h = model.fit(ds, steps_per_epoch=50, epochs=6, validation_data=vs, verbose=0)
print("train dice", [round(v, 3) for v in h.history["main_dice"]],
      "val", [round(v, 3) for v in h.history["val_main_dice"]], f"{time.time() - t:.0f}s")
