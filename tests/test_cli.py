"""The `dsal` CLI through click's CliRunner: help, exit codes, one-line errors, nothing lost. A new interpreter
only where the test needs one: what a fresh `python main.py` prints before TensorFlow is loaded."""

import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from dsal_tf.cli import cli

ROOT = Path(__file__).resolve().parents[1]
WIDE = {"terminal_width": 10_000, "max_content_width": 10_000}  # one line per option: nothing wrapped


def help_text(*args: str) -> str:
    result = CliRunner().invoke(cli, [*args, "--help"], **WIDE)
    assert result.exit_code == 0, result.output
    return result.output


def option_line(text: str, option: str) -> str:
    lines = [line for line in text.splitlines() if re.match(rf"\s*{re.escape(option)}\b", line)]
    assert len(lines) == 1, f"no single {option} line in:\n{text}"
    return lines[0]


def names_in(line: str) -> set[str]:
    return set(re.findall(r"[\w-]+", line))


def write_constants(path, data, exp_dir):
    path.write_text(
        f'DATA_PATH = "{data}"\nEXP_DIR = "{exp_dir}"\nIMG_ROWS = 32\nIMG_COLS = 32\nBASE_FILTERS = 2\n'
        "NB_LABELED = 8\nNB_ITERATIONS = 1\nNB_NEXT_SAMPLE = 4\nNB_INITIAL_EPOCHS = 1\n"
        "NB_ACTIVE_EPOCHS = 1\nBATCH_SIZE = 8\nPROGRESS = False\nNB_OVERLAYS = 1\nDEPTH = 3\n"
    )
    return path


def test_unknown_constant_exits_2_with_one_line(tmp_path):
    f = tmp_path / "constants.py"
    f.write_text("NB_ITERATONS = 3\n")
    result = CliRunner().invoke(cli, ["run", "--constants", str(f)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "NB_ITERATONS" in lines[0] and "NB_ITERATIONS" in lines[0]


def test_bad_set_value_exits_2(tmp_path):
    (tmp_path / "constants.py").write_text("")
    result = CliRunner().invoke(cli, ["run", "--constants", str(tmp_path / "constants.py"), "--set", "LOSS=dise"])
    assert result.exit_code == 2 and "did you mean 'dice'" in result.output


def test_make_synthetic(tmp_path):
    result = CliRunner().invoke(cli, ["make-synthetic", "--data", str(tmp_path / "d"), "--counts", "3,2,1",
                                      "--size", "32"])
    assert result.exit_code == 0, result.output
    assert len(os.listdir(tmp_path / "d" / "trainImg")) == 3
    assert len(os.listdir(tmp_path / "d" / "testGT")) == 1


def test_evaluate_without_run_exits_2(tmp_path):
    result = CliRunner().invoke(cli, ["evaluate", "--exp-dir", str(tmp_path), "--exp", "nothing"])
    assert result.exit_code == 2 and "train it first" in result.output


def test_evaluate_bad_rounds_is_one_line(tmp_path):
    result = CliRunner().invoke(cli, ["evaluate", "--exp-dir", str(tmp_path), "--exp", "x", "--rounds", "1,two"])
    assert result.exit_code == 2 and "--rounds" in result.output and "Traceback" not in result.output


@pytest.mark.slow
def test_run_evaluate_and_bad_data_keeps_saved_results(tiny_data, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    f = write_constants(tmp_path / "constants.py", data, tmp_path / "exp")
    runner = CliRunner()
    result = runner.invoke(cli, ["run", "--constants", str(f), "--exp", "cli", "--seed", "1"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "exp" / "cli"
    assert (run / "round_01" / "DONE").is_file() and (run / "constants.py").is_file()
    result = runner.invoke(cli, ["evaluate", "--constants", str(f), "--exp", "cli", "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert (run / "evaluation.csv").is_file() and "dice_mean" in result.output
    saved = {p: p.stat().st_mtime_ns for p in run.rglob("*")}

    next(iter((data / "trainGT").iterdir())).unlink()  # a mask goes missing
    result = runner.invoke(cli, ["run", "--constants", str(f), "--exp", "cli", "--seed", "1",
                                 "--iterations", "2"])
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1 and "missing mask for" in result.output
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == saved  # nothing saved was lost


def test_empty_orgdata_gets_the_synthetic_set(tmp_path):
    from dsal_tf.cli import ensure_data
    from dsal_tf.config import resolve

    cfg = resolve({"data_path": str(tmp_path / "orgData"), "synthetic_counts": (4, 2, 2), "synthetic_size": 32})
    said = []
    ensure_data(cfg, log=said.append)
    assert len(said) == 1 and "synthetic" in said[0]
    assert len(os.listdir(tmp_path / "orgData" / "trainImg")) == 4
    ensure_data(cfg, log=said.append)  # data present: nothing written, nothing said
    assert len(said) == 1
    other = resolve({"data_path": str(tmp_path / "mydata")})
    ensure_data(other, log=said.append)  # a user-given folder is never filled with fake data
    assert not (tmp_path / "mydata").exists()


@pytest.mark.parametrize("script, command, word", [("main.py", "run", "--full-supervision"),
                                                  ("test.py", "evaluate", "--rounds")])
def test_main_and_test_py_are_the_cli(script, command, word, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and f"Usage: {script} {command}" in out and word in out


@pytest.mark.parametrize("command", sorted(cli.commands))
def test_every_command_has_help(command):
    assert "Usage:" in help_text(command)


def test_an_unknown_option_is_a_usage_error():
    result = CliRunner().invoke(cli, ["run", "--no-such-option"])
    assert result.exit_code == 2 and "No such option" in result.output


def test_run_help_lists_every_registered_name():
    from dsal_tf.strategies import PSEUDO_POLICIES, QUERY_STRATEGIES
    from dsal_tf.trainers import TRAINERS

    text = help_text("run")
    for option, registry in (("--trainer", TRAINERS), ("--strategy", QUERY_STRATEGIES),
                             ("--pseudo", PSEUDO_POLICIES)):
        missing = sorted(set(registry) - names_in(option_line(text, option)))
        assert not missing, f"`dsal run --help` leaves out {option} {missing}"


def test_verbose_is_accepted_by_the_group_and_the_commands():
    assert "--verbose" in help_text()
    assert "--verbose" in help_text("run") and "--verbose" in help_text("evaluate")
    result = CliRunner().invoke(cli, ["--verbose", "run", "--verbose", "--help"])
    assert result.exit_code == 0, result.output


@pytest.mark.slow  # two new interpreters that load TensorFlow: 8 s
def test_a_fresh_main_py_prints_no_tensorflow_banner():
    """A real interpreter: TensorFlow's start-up lines appear only when it is first loaded in a process."""
    for script in ("main.py", "test.py"):
        env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "DSAL_VERBOSE")}
        proc = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=300,
                              check=False, cwd=ROOT, env=env)
        assert proc.returncode == 0 and proc.stdout.startswith("Usage:"), proc.stdout + proc.stderr
        assert proc.stderr == "", f"{script} --help wrote on stderr:\n{proc.stderr}"


FAKE_TENSORFLOW = """
import os
for line in (
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1796409838.589789   26769 port.cc:153] oneDNN custom operations are on.",
    "I0000 00:00:1796409838.590900   26769 cudart_stub.cc:31] Could not find cuda drivers on your machine.",
    "E0000 00:00:1796409838.590900   26769 cuda_dnn.cc:8310] Unable to register cuDNN factory",
    "W0000 00:00:1796409838.590900   26769 gpu_device.cc:2344] Cannot dlopen some GPU libraries.",
):
    os.write(2, (line + "\\n").encode())
if os.environ.get("FAKE_TF_FAILS"):
    raise ImportError("broken build")
"""


@pytest.mark.parametrize("how", ["quiet", "fails", "verbose"])
def test_quiet_console_drops_only_the_banner(tmp_path, how):
    """With a stand-in `tensorflow` that writes banner lines and one real warning straight to fd 2."""
    (tmp_path / "tensorflow").mkdir()
    (tmp_path / "tensorflow" / "__init__.py").write_text(FAKE_TENSORFLOW)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    env.pop("DSAL_VERBOSE", None)
    if how == "fails":
        env["FAKE_TF_FAILS"] = "1"
    code = (f"from dsal_tf.console import quiet; quiet(verbose={how == 'verbose'}); import tensorflow, logging; "
            "print(logging.getLogger('tensorflow').level)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False,
                          env=env)
    lines = proc.stderr.splitlines()
    assert "Cannot dlopen some GPU libraries." in proc.stderr  # a warning that matters is always shown
    if how == "quiet":
        assert proc.returncode == 0 and len(lines) == 1, proc.stderr
        assert proc.stdout.strip() == "40"  # logging.ERROR
    elif how == "fails":  # everything caught is shown with the traceback
        assert proc.returncode == 1 and "oneDNN" in proc.stderr and "ImportError: broken build" in proc.stderr
    else:
        assert proc.returncode == 0 and "oneDNN" in proc.stderr and proc.stdout.strip() == "0"


def test_compare_rejects_an_unknown_strategy(tmp_path):
    (tmp_path / "constants.py").write_text("")
    result = CliRunner().invoke(cli, ["compare", "--constants", str(tmp_path / "constants.py"),
                                      "--strategies", "dsal,ceel"])
    assert result.exit_code == 2 and "ceel" in result.output
