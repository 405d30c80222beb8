"""A quiet console: the tool's own lines first, TensorFlow's start-up banner not at all.

Why this exists. Importing TensorFlow 2.21 on a CPU machine writes, twice (once per native library that
loads abseil logging), lines like

    WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
    I0000 00:00:... port.cc:153] oneDNN custom operations are on. You may see slightly different ...
    I0000 00:00:... cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.

before `dsal` or `python main.py` says anything. `TF_CPP_MIN_LOG_LEVEL=3` hides TensorFlow's own C++ log
(`cpu_feature_guard` and the like) but not these: abseil writes every message to stderr, whatever its level,
until a program calls `absl::InitializeLog()`, and TensorFlow never does. The only way to keep them off the
screen is to catch file descriptor 2 while `tensorflow` is imported. `TF_ENABLE_ONEDNN_OPTS=0` would silence
the oneDNN line too, but it changes the numbers, so it is not used.

What `quiet()` does, unless `verbose` is true (or `DSAL_VERBOSE=1` is set):

1. sets `TF_CPP_MIN_LOG_LEVEL=3` unless the user already set it (it must be set before TensorFlow loads);
2. imports `tensorflow` (the first time anything imports it, not now: `--help` stays free) with file
   descriptor 2 caught; afterwards the caught lines are written back to stderr, except the known start-up
   banner (the abseil notice, the oneDNN, CPU-feature and CUDA-driver notices, every `I` info line, and the
   CUDA plugin re-registration errors that every CUDA build prints). Anything else, e.g. a cuDNN library that
   fails to load on a GPU machine, still shows; if the import fails, everything caught is shown;
3. after the import, sets the `tensorflow` and `absl` Python loggers to ERROR ("INFO:tensorflow:Assets
   written to ...", retracing notices);
4. hides Python warnings that are library noise: deprecation warnings raised inside keras, tensorflow, absl
   and protobuf, and a short list of keras `UserWarning`s this tool triggers on purpose (`KERAS_NOISE`).

Kept visible: every warning and error of dsal_tf itself (its one-line `error:`/`warning:` messages on stderr
are plain writes, never touched), tracebacks, and every Python warning not listed above.

Call it first, before anything imports TensorFlow (`main.py`, `test.py` and `dsal_tf/cli.py` do). It is safe
to call more than once. If TensorFlow was already imported, steps 3 and 4 apply at once and step 2 is moot.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import os
import re
import sys
import tempfile
import warnings

_INSTALLED = False

# One caught stderr line that is start-up noise, not news.
BANNER = re.compile(
    r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|[I]\d{4} [\d:.]+\s+\d+ \S+\] "  # every abseil/TF info line
    r"|[WE]\d{4} [\d:.]+\s+\d+ (port|cpu_feature_guard|cudart_stub|cuda_dnn|cuda_fft|cuda_blas|cuda_executor"
    r"|computation_placer|py_utils|dso_loader)\.cc:\d+\] "
    r"|To enable the following instructions: .* rebuild TensorFlow with the appropriate compiler flags\."
    r"|TF-TRT Warning: Could not find TensorRT"
)

# Keras warnings about what this tool does on purpose (messages start with these).
KERAS_NOISE = (
    r"`shuffle=True` was passed",  # fit() on a tf.data stream the tool already shuffles, seeded
    r"Your `PyDataset` class should call",
    r"Do not pass an `input_shape`",
    r"The structure of `inputs` doesn't match the expected structure",
    r"Skipping variable loading for optimizer",  # evaluation loads a checkpoint without its optimizer
    r"Compiled the loaded model, but the compiled metrics have yet to be built",
)

LIBRARIES = r"(keras|tensorflow|tf_keras|absl|google\.protobuf|ml_dtypes|h5py|optree)(\.|$)"


def quiet(verbose: bool = False) -> None:
    """Keep TensorFlow's start-up banner and library noise off the console (see the module docstring)."""
    global _INSTALLED
    if verbose or os.environ.get("DSAL_VERBOSE", "").strip().lower() in ("1", "true", "yes", "on"):
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    _filter_warnings()
    if "tensorflow" in sys.modules:
        _quiet_loggers()
        return
    if not _INSTALLED:
        sys.meta_path.insert(0, _QuietTensorFlowFinder())
        _INSTALLED = True


def _filter_warnings() -> None:
    for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=LIBRARIES)
    for message in KERAS_NOISE:
        warnings.filterwarnings("ignore", message=message, category=UserWarning)


def _quiet_loggers() -> None:
    for name in ("tensorflow", "absl"):
        logging.getLogger(name).setLevel(logging.ERROR)
    absl_logging = sys.modules.get("absl.logging")
    if absl_logging is not None:
        absl_logging.set_verbosity(absl_logging.ERROR)


class _CaughtStderr:
    """File descriptor 2 goes to a temporary file; on exit it is restored and the lines that are not banner
    noise (all of them after an exception) are written back to stderr."""

    def __enter__(self):
        self.saved = None
        try:
            sys.stderr.flush()
            self.file = tempfile.TemporaryFile()
            self.saved = os.dup(2)
            os.dup2(self.file.fileno(), 2)
        except (OSError, ValueError, AttributeError):  # no usable fd 2: catch nothing
            self.saved = None
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.saved is None:
            return
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(self.saved, 2)
        os.close(self.saved)
        self.file.seek(0)
        text = self.file.read().decode("utf-8", "replace")
        self.file.close()
        lines = text.splitlines(keepends=True)
        kept = lines if exc_type is not None else [x for x in lines if not BANNER.match(x.strip())]
        if kept:
            sys.stderr.write("".join(kept))
            sys.stderr.flush()


class _QuietLoader(importlib.abc.Loader):
    """The real loader of `tensorflow`, run with stderr caught; the loggers are quieted after it."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = self.loader  # the package sees its own loader, as without us
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        with _CaughtStderr():
            self.loader.exec_module(module)
        _quiet_loggers()

    def __getattr__(self, name):
        return getattr(self.loader, name)


class _QuietTensorFlowFinder(importlib.abc.MetaPathFinder):
    """Finds `tensorflow` through the other finders and wraps its loader; every other module is left alone."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "tensorflow":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _QuietLoader(spec.loader)
                return spec
        return None
