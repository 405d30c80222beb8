"""Train: run (or resume) the active-learning loop configured by constants.py.

Same as `dsal run`; every option of `python main.py --help` overrides a constant.
TensorFlow's start-up lines are kept off the console; `--verbose` shows them (dsal_tf/console.py).
"""

import sys

from dsal_tf.console import quiet

quiet(verbose="--verbose" in sys.argv[1:])  # before dsal_tf.cli, whose imports load TensorFlow

from dsal_tf.cli import main_py  # noqa: E402

if __name__ == "__main__":
    main_py()
