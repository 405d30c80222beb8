"""Evaluate every round's model of the experiment configured by constants.py on the test split.

Same as `dsal evaluate`; see `python test.py --help`.
TensorFlow's start-up lines are kept off the console; `--verbose` shows them (dsal_tf/console.py).
"""

import sys

from dsal_tf.console import quiet

quiet(verbose="--verbose" in sys.argv[1:])  # before dsal_tf.cli, whose imports load TensorFlow

from dsal_tf.cli import test_py  # noqa: E402

if __name__ == "__main__":
    test_py()
