"""Evaluate every round's model of the experiment configured by constants.py on the test split.

Same as `dsal evaluate`; see `python test.py --help`.
"""

from dsal_tf.cli import test_py

if __name__ == "__main__":
    test_py()
