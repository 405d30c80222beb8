"""The `dsal` CLI through click's CliRunner: exit codes, one-line errors, nothing lost."""

import os

import pytest
from click.testing import CliRunner

from dsal_tf.cli import cli


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


def test_main_and_test_py_are_the_cli(tmp_path):
    import subprocess
    import sys

    for script, word in (("main.py", "--full-supervision"), ("test.py", "--rounds")):
        proc = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=120,
                              check=False)
        assert proc.returncode == 0 and word in proc.stdout


def test_compare_rejects_an_unknown_strategy(tmp_path):
    (tmp_path / "constants.py").write_text("")
    result = CliRunner().invoke(cli, ["compare", "--constants", str(tmp_path / "constants.py"),
                                      "--strategies", "dsal,ceel"])
    assert result.exit_code == 2 and "ceel" in result.output
