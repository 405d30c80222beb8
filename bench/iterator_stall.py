"""Does dropping a tf.data iterator stall? The reproduction behind `data.steady` (bench/results/speed.md).

    python bench/iterator_stall.py [--fits 4]

A small Keras model fits 3 epochs of 40 steps on our `make_dataset` stream (640 random 64x64 RGB
images), `--fits` times with tf.data's autotuner on and as many with it off. Printed per fit: the fit's
wall time and the time from `on_train_end` to `fit` returning, which is where Keras drops its iterator.
Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from dsal_tf import data  # noqa: E402


class EndClock(keras.callbacks.Callback):
    def on_train_end(self, logs=None):
        self.t = time.perf_counter()


def with_autotune(ds, on: bool):
    options = tf.data.Options()
    options.autotune.enabled = on
    return ds.with_options(options)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fits", type=int, default=4)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (640, 64, 64, 3), dtype=np.uint8)
    y = (rng.random((640, 64, 64, 1)) > 0.5).astype(np.uint8)
    norm = data.Normalizer.fit(x, "zscore")
    inp = keras.Input((64, 64, 3))
    hidden = keras.layers.Conv2D(64, 3, padding="same")(inp)
    out = keras.layers.Conv2D(1, 3, padding="same", activation="sigmoid")(hidden)
    model = keras.Model(inp, out)
    model.compile("adam", "bce")
    print("| autotuner | fit s | on_train_end -> return, ms |\n|---|---:|---:|")
    for on in (True, False):
        for trial in range(args.fits):
            stream = data.make_dataset(x, y, norm, 16, shuffle=True, augment=True, seed=trial, repeat=True)
            ds = with_autotune(stream, on)
            clock = EndClock()
            t0 = time.perf_counter()
            model.fit(ds, epochs=3, steps_per_epoch=40, verbose=0, callbacks=[clock])
            t1 = time.perf_counter()
            print(f"| {'on' if on else 'off'} | {t1 - t0:.2f} | {1000 * (t1 - clock.t):.0f} |", flush=True)


if __name__ == "__main__":
    main()
