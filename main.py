"""Train: run (or resume) the active-learning loop configured by constants.py.

Same as `dsal run`; every option of `python main.py --help` overrides a constant.
"""

from dsal_tf.cli import main_py

if __name__ == "__main__":
    main_py()
