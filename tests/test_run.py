"""The run folder: its names (those of runs made before `run.py`), resume checks, stage markers."""

import json

import pytest

from dsal_tf.config import resolve
from dsal_tf.errors import DsalError
from dsal_tf.files import atomic_dir
from dsal_tf.run import Run, done_marker, is_done, stage

from .conftest import tiny_values


def finished(run: Run, r: int, val_dice: float) -> None:
    with stage(run.round_dir(r)) as st:
        st.marker = json.dumps({"round": r})
    rows = "".join(f"{i},{8 + i},0,{d},0,0,\n" for i, d in enumerate(val_dice_of(run) + [val_dice]))
    run.curve_file.write_text("round,n_oracle,n_pseudo,val_dice,train_s,score_s,stop\n" + rows)


def val_dice_of(run: Run) -> list[float]:
    if not run.curve_file.is_file():
        return []
    return [float(line.split(",")[3]) for line in run.curve_file.read_text().splitlines()[1:]]


def test_layout_keeps_the_names_of_older_runs(tmp_path):
    run = Run(tmp_path / "exp" / "a")
    p = run.path
    assert (run.config_file, run.normalizer_file, run.curve_file, run.stopped_file) == (
        p / "config.json", p / "normalizer.json", p / "learning_curve.csv", p / "STOPPED")
    rd = p / "round_03"
    assert run.round_dir(3) == rd
    assert (run.pool_file(3), run.scores_file(3), run.checkpoint(3)) == (
        rd / "pool.npz", rd / "scores.csv", rd / "best.keras")
    assert (run.pseudo_dir(3), run.to_annotate(3), run.score_parts(3), run.member_dir(3, 2)) == (
        rd / "pseudo", rd / "to_annotate", rd / "score_parts", rd / "member_2")


def test_completed_and_choose(tmp_path):
    run = Run(tmp_path / "r")
    with pytest.raises(DsalError, match="no finished round"):
        run.choose("last")
    for r, d in enumerate([0.5, 0.8, 0.7]):
        finished(run, r, d)
    run.round_dir(3).mkdir()  # started, not finished
    (run.round_dir(3) / "pool.npz").write_bytes(b"")
    assert run.completed() == [0, 1, 2]
    assert (run.choose("last"), run.choose("best"), run.choose(" 0 ")) == (2, 1, 0)
    with pytest.raises(DsalError, match="round 3 .* is not finished"):
        run.choose(3)
    with pytest.raises(DsalError, match="must be best, last or a round number"):
        run.choose("worst")
    assert not run.decided(3)
    (run.round_dir(3) / "scores.csv").write_text("")
    assert run.decided(3)


def test_stage_marks_done_only_after_its_body(tmp_path):
    with pytest.raises(RuntimeError), stage(tmp_path / "m"):
        raise RuntimeError("killed")
    assert (tmp_path / "m").is_dir() and not is_done(tmp_path / "m")
    with stage(tmp_path / "m", "bce_dice"):
        pass
    assert done_marker(tmp_path / "m") == "bce_dice" and done_marker(tmp_path / "x") is None
    assert [p.name for p in (tmp_path / "m").iterdir()] == ["DONE"]  # no temporary file left


def test_atomic_dir_replaces_whole_or_not_at_all(tmp_path):
    out = tmp_path / "pseudo"
    with atomic_dir(out) as tmp:
        (tmp / "a.png").write_bytes(b"1")
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "b.png").write_bytes(b"2")
        raise RuntimeError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pseudo"]
    assert [p.name for p in out.iterdir()] == ["a.png"]
    with atomic_dir(out) as tmp:
        (tmp / "c.png").write_bytes(b"3")
    assert [p.name for p in out.iterdir()] == ["c.png"]


def test_create_refuses_changed_settings_of_a_finished_run(tiny_data, tmp_path):
    cfg = resolve(tiny_values(tiny_data, tmp_path))
    run = Run.create(cfg)
    assert json.loads(run.config_file.read_text()) == json.loads(cfg.to_json())
    assert run.saved_config() == cfg
    Run.create(cfg.replace(learning_rate=cfg.learning_rate * 2))  # nothing finished yet: allowed
    run = Run.create(cfg)
    finished(run, 0, 0.5)
    Run.create(cfg.replace(nb_iterations=cfg.nb_iterations + 3))  # a resumable change
    with pytest.raises(DsalError, match="was run with LEARNING_RATE"):
        Run.create(cfg.replace(learning_rate=cfg.learning_rate * 2))
    with pytest.raises(DsalError, match="RESUME_ON is False"):
        Run.create(cfg.replace(resume_on=False))
    with pytest.raises(DsalError, match="no run at"):
        Run(tmp_path / "nothing").saved_config()


def test_a_moved_run_is_opened_where_it_is(tmp_path):
    old = tmp_path / "old" / "cmp" / "dsal-s0"
    old.mkdir(parents=True)
    (old / "config.json").write_text(json.dumps({"exp_dir": str(tmp_path / "old"), "exp_name": "cmp/dsal-s0"}))
    new = tmp_path / "moved" / "cmp" / "dsal-s0"
    new.parent.mkdir(parents=True)
    old.rename(new)
    assert Run(new).saved_config().run_dir == new


@pytest.mark.parametrize("strategy, selection, refused", [
    ("claspe", "auto", True),  # its own rule, score_power: beta runs from 1 to 100 over NB_ITERATIONS rounds
    ("claspe", "diverse", True),  # diverse thins candidates that its own rule (score_power) draws
    ("dsal", "power", True),
    ("dsal", "auto", False),  # rank: no schedule, more rounds are a resumable change
    ("dsal", "diverse", False),
    ("random", "auto", False),
])
def test_iterations_stay_fixed_under_a_round_schedule(tiny_data, tmp_path, strategy, selection, refused):
    from dsal_tf.active import open_run

    cfg = resolve({**tiny_values(tiny_data, tmp_path), "query_strategy": strategy, "selection": selection})
    ctx = open_run(cfg, log=lambda m: None)
    finished(ctx.run, 0, 0.5)
    longer = cfg.replace(nb_iterations=cfg.nb_iterations + 2)
    if refused:
        with pytest.raises(DsalError, match=r"NB_ITERATIONS = .*spreads its draw's schedule.*--exp NEW_NAME"):
            open_run(longer, log=lambda m: None)
        assert json.loads(ctx.run.config_file.read_text())["nb_iterations"] == cfg.nb_iterations  # nothing changed
    else:
        assert open_run(longer, log=lambda m: None).cfg.nb_iterations == cfg.nb_iterations + 2
