"""The `dsal` command line. Options override `constants.py`; `main.py`/`test.py` call the same code."""

from __future__ import annotations

import errno
import functools
import sys
import time
from pathlib import Path

import click

from .console import quiet

quiet(verbose="--verbose" in sys.argv[1:])  # before TensorFlow loads (.components imports it)

from .components import load_config, names_help  # noqa: E402 (imports TensorFlow: after the line above)
from .config import PRESETS, Config, parse_set_options  # noqa: E402
from .errors import DsalError  # noqa: E402


def _echo(msg: str) -> None:
    click.echo(msg)


DISK_ERRORS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT}


def user_errors(fn):
    """Turn `DsalError` into one line on stderr and exit code 2; a traceback is for our bugs only."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .oracle import AwaitingAnnotation

        try:
            return fn(*args, **kwargs)
        except AwaitingAnnotation as exc:  # a person has masks to draw: not an error
            click.echo(str(exc))
            sys.exit(0)
        except DsalError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except OSError as exc:
            if exc.errno not in DISK_ERRORS:
                raise
            where = exc.filename or "a file"
            click.echo(f"error: cannot write {where}: {exc.strerror}; free disk space or make the folder writable, "
                       "then run the same command again (every complete round is intact)", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted; run the same command again to resume from the last complete round", err=True)
            sys.exit(130)

    return wrapper


def verbose_option(fn):
    """Accepted everywhere; read from sys.argv by `quiet()` above, before TensorFlow loads."""
    return click.option("--verbose", is_flag=True, expose_value=False,
                        help="Show TensorFlow's start-up lines and library warnings.")(fn)


def common_options(fn):
    opts = [
        verbose_option,
        click.option("--constants", "constants", default="constants.py", show_default=True,
                     help="Constants file to start from."),
        click.option("--preset", default=None, help=f"Named preset: {', '.join(PRESETS)}."),
        click.option("--exp", "exp_name", default=None, help="Experiment name (folder under EXP_DIR)."),
        click.option("--exp-dir", default=None, help="Where runs are written (default exp/)."),
        click.option("--data", "data_path", default=None, help="Data root in the orgData layout."),
        click.option("--seed", type=int, default=None),
        click.option("--set", "set_pairs", multiple=True, metavar="KEY=VALUE",
                     help="Override any constant, e.g. --set NB_ITERATIONS=5 (repeatable)."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def build_config(constants: str, set_pairs: tuple[str, ...], **options) -> Config:
    """The command's configuration, every name and setting checked (`components.load_config`)."""
    overrides = parse_set_options(set_pairs)
    overrides.update({k: v for k, v in options.items() if v is not None})
    return load_config(constants, overrides)


def parse_int_list(text: str, option: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise DsalError(f"{option} {text!r} must be comma-separated integers, e.g. 0,1,2") from None


def parse_name_list(text: str, option: str, valid: list[str]) -> list[str]:
    """Comma-separated names, each checked against `valid` (checked before any data is written)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    for n in names:
        if n not in valid:
            raise DsalError(f"{option}: unknown name {n!r}; choose from {valid}")
    return names


def ensure_data(cfg: Config, log=_echo) -> None:
    """With no data in the default `orgData/`, write the embedded synthetic set there first."""
    train_dir = Path(cfg.data_path) / "trainImg"
    if train_dir.is_dir() and any(train_dir.iterdir()):
        return
    if Path(cfg.data_path).name != "orgData":
        return  # a user-given path: let the loader say what is missing
    from .synthetic import make_synthetic

    counts = make_synthetic(cfg.data_path, cfg.synthetic_counts, cfg.synthetic_size, cfg.seed)
    log(f"no data in {cfg.data_path}/: wrote the embedded synthetic lesion dataset there "
        f"({counts['train']} train, {counts['val']} val, {counts['test']} test images)")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@verbose_option
def cli() -> None:
    """dsal-tf: label-efficient segmentation with deeply supervised active learning."""


@cli.command()
@common_options
@click.option("--iterations", "nb_iterations", type=int, default=None, help="Active-learning rounds.")
@click.option("--labeled", "nb_labeled", type=int, default=None, help="Initial oracle labels.")
@click.option("--queries", "nb_next_sample", type=int, default=None, help="Oracle labels per round.")
@click.option("--initial-epochs", "nb_initial_epochs", type=int, default=None)
@click.option("--epochs", "nb_active_epochs", type=int, default=None, help="Epochs per round.")
@click.option("--strategy", "query_strategy", default=None, help=f"Query strategy: {names_help('query_strategy')}.")
@click.option("--pseudo", "pseudo_policy", default=None,
              help=f"Pseudo-label policy: {names_help('pseudo_policy')}, or auto (the strategy's own).")
@click.option("--selection", default=None, help=f"Selection rule: {names_help('selection')}, or auto.")
@click.option("--trainer", default=None, help=f"Trainer: {names_help('trainer')} (dsal_tf/trainers/).")
@click.option("--oracle", default=None,
              help=f"{names_help('oracle')}: simulated reveals the masks on disk; files exports requests and waits "
                   "for dsal import-labels.")
@click.option("--batch-size", type=int, default=None)
@click.option("--lr", "learning_rate", type=float, default=None)
@click.option("--base-filters", type=int, default=None)
@click.option("--precision", "mixed_precision", type=click.Choice(["auto", "off", "float16", "bfloat16"]), default=None,
              help="MIXED_PRECISION: auto (bf16 where the hardware has it, the default), off, float16 or bfloat16.")
@click.option("--resume/--no-resume", "resume_on", default=None)
@click.option("--progress/--no-progress", default=None)
@click.option("--full-supervision", is_flag=True,
              help="Reference run: label the whole pool, no queries, the same total epochs.")
@user_errors
def run(constants, set_pairs, full_supervision, **options) -> None:
    """Run (or resume) the active-learning loop."""
    started = time.perf_counter()
    cfg = build_config(constants, set_pairs, **options)
    ensure_data(cfg)
    from .run import Run

    plan_file = Run.of(cfg).plan_file if cfg.preset == "auto" else None
    planned_here = plan_file is not None and not plan_file.is_file()
    if plan_file is not None:  # plan from the data on first use; the plan is stored in the run folder
        from .plan import explicit_values, plan_for_run

        cfg = plan_for_run(cfg, explicit_values(constants, {**parse_set_options(set_pairs), **options}), log=_echo,
                           full_supervision=full_supervision)
    from .active import run_active_learning

    if full_supervision:
        from .compare import full_supervision_config

        cfg = full_supervision_config(cfg, options.get("exp_name"))
    from .serve import served_by

    holder = served_by(cfg.run_dir)
    if holder:  # the server's worker owns the run folder: a second writer would race it
        raise DsalError(f"{cfg.run_dir} is driven by dsal serve ({holder}); it runs the rounds itself: stop "
                        "that server first to run the loop from the command line")
    run_dir = run_active_learning(cfg, constants_path=constants)
    if plan_file is not None:  # planned against actual minutes, in plan.json
        from .plan import record_actual

        record_actual(plan_file, run_dir, time.perf_counter() - started, planned_here, log=_echo)
    _echo(f"done: {run_dir} (evaluate with: python test.py --exp {cfg.name})")


@cli.command()
@common_options
@click.option("--rounds", default=None, help="Comma-separated rounds to evaluate (default: all).")
@user_errors
def evaluate(constants, set_pairs, rounds, **options) -> None:
    """Evaluate every round's model of an experiment on the test split."""
    cfg = build_config(constants, set_pairs, **options)
    from .evaluate import evaluate_run

    wanted = parse_int_list(rounds, "--rounds") if rounds else None
    evaluate_run(cfg, rounds=wanted, log=_echo)


@cli.command()
@common_options
@click.option("--strategies", default="dsal,ceal,random,entropy", show_default=True,
              help="Comma-separated query strategies, each optionally +SELECTION (e.g. dsal+diverse).")
@click.option("--pseudo", default=None,
              help="One weak labeler for every strategy (default: each strategy's own; CEAL uses ceal).")
@click.option("--baseline", default="random", show_default=True,
              help="Strategy the paired differences are taken against.")
@click.option("--seeds", default="0,1,2", show_default=True, help="Comma-separated seeds.")
@click.option("--name", default=None, help="Comparison folder under EXP_DIR (default compare-<preset>).")
@click.option("--full-supervision/--no-full-supervision", default=True, show_default=True,
              help="Also train the full-supervision reference per seed.")
@click.option("--iterations", "nb_iterations", type=int, default=None)
@click.option("--progress/--no-progress", default=None)
@user_errors
def compare(constants, set_pairs, strategies, seeds, name, full_supervision, pseudo, baseline, **options) -> None:
    """Run several strategies on the same data, split, seeds and budget, and compare them."""
    cfg = build_config(constants, set_pairs, **options)
    from .compare import parse_strategy_list, run_comparison
    from .strategies import PSEUDO_POLICIES

    names = parse_strategy_list(strategies)
    if pseudo is not None:
        parse_name_list(pseudo, "--pseudo", sorted(PSEUDO_POLICIES))
    ensure_data(cfg)
    run_comparison(cfg, names, parse_int_list(seeds, "--seeds"), name or f"compare-{cfg.preset}",
                   full_supervision, log=_echo, pseudo=pseudo, baseline=baseline)


@cli.command("noisy-teacher")
@common_options
@click.option("--experts", "n_expert", type=int, default=200, show_default=True,
              help="Size of the expert-labelled subset the teacher trains on.")
@click.option("--variants", default="teacher,equal,uniform,rgs,rgs+al,rgsm+al", show_default=True,
              help="Comma-separated: teacher, equal, uniform (same sampler and step as rgs, w=1/B), rgs, "
                   "rgs+al, rgm, rgsm+al.")
@click.option("--seeds", default="0", show_default=True)
@click.option("--name", default=None, help="Folder under EXP_DIR (default noisy-teacher-<preset>-e<experts>).")
@click.option("--progress/--no-progress", default=None)
@user_errors
def noisy_teacher(constants, set_pairs, n_expert, variants, seeds, name, **options) -> None:
    """Teacher on expert labels, students on its machine labels re-weighted by gradient trust."""
    cfg = build_config(constants, set_pairs, **options)
    from .teacher_student import VARIANTS, run_noisy_teacher

    names = parse_name_list(variants, "--variants", list(VARIANTS))
    ensure_data(cfg)
    run_noisy_teacher(cfg, n_expert, names, parse_int_list(seeds, "--seeds"),
                      name or f"noisy-teacher-{cfg.preset}-e{n_expert}", log=_echo)


@cli.command()
@common_options
@click.option("--round", "round_", type=int, required=True, help="The round to score (its previous round is done).")
@click.option("--shard", required=True, metavar="I/N", help="Score slice I of N (0-based), e.g. --shard 0/4.")
@click.option("--progress/--no-progress", default=None)
@user_errors
def score(constants, set_pairs, round_, shard, **options) -> None:
    """Score one slice of a round's pool; the round merges the slices when all N are there."""
    cfg = build_config(constants, set_pairs, **options)
    from .active import score_shard

    try:
        i, n = (int(v) for v in shard.split("/"))
    except ValueError:
        raise DsalError(f"--shard {shard!r} must be I/N, e.g. --shard 0/4") from None
    score_shard(cfg, round_, i, n, log=_echo)


@cli.command("import-labels")
@common_options
@click.option("--masks", "masks_dir", default=None, type=click.Path(path_type=Path),
              help="Folder of drawn masks, one per manifest row (<image>_segmentation.png or <image>.png).")
@click.option("--label-studio", "label_studio", default=None, type=click.Path(path_type=Path),
              help="A Label Studio JSON export of brush annotations instead of --masks.")
@user_errors
def import_labels(constants, set_pairs, masks_dir, label_studio, **options) -> None:
    """Check the masks a round asked for and copy them into trainGT/ (all or nothing)."""
    cfg = build_config(constants, set_pairs, **options)
    from .annotate import import_label_studio, import_masks

    if (masks_dir is None) == (label_studio is None):
        raise DsalError("import-labels needs exactly one of --masks DIR or --label-studio FILE")
    if label_studio is not None:
        import_label_studio(cfg, label_studio, log=_echo)
    else:
        import_masks(cfg, masks_dir, log=_echo)


@cli.command()
@common_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=int, default=9090, show_default=True)
@click.option("--connect", "studio_url", default=None, metavar="URL",
              help="A Label Studio server: create or reuse the project, import the round's tasks, register this "
                   "backend (docs/label-studio.md).")
@click.option("--token", envvar="LABEL_STUDIO_API_KEY", default=None,
              help="Label Studio API token (personal access or legacy) for --connect [env LABEL_STUDIO_API_KEY].")
@click.option("--project", "project_id", type=int, default=None, help="Use this Label Studio project id.")
@click.option("--document-root", default="/", show_default=True,
              help="Label Studio's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT (the run must be below it).")
@click.option("--backend-url", default=None, help="How Label Studio reaches this server (default http://HOST:PORT).")
@click.option("--label", default=None, help="The foreground's BrushLabels label (default: the config's only one).")
@user_errors
def serve(constants, set_pairs, host, port, studio_url, token, project_id, document_root, backend_url, label,
          **options) -> None:
    """Serve a run with ORACLE = files as a Label Studio ML backend: prelabels, ranking, annotations in."""
    cfg = build_config(constants, set_pairs, **options)
    from .serve import serve as serve_run
    from .serve.studio import Studio

    studio = None
    if studio_url is not None:
        if not token:
            raise DsalError("--connect needs --token TOKEN (or LABEL_STUDIO_API_KEY): Label Studio's account "
                            "settings show it")
        studio = Studio(studio_url, token, backend_url or f"http://{host}:{port}", document_root, project_id)
    serve_run(cfg, host, port, studio, label, log=_echo)


def round_option(fn):
    return click.option("--round", "which", default="best", show_default=True,
                        help="best (highest validation Dice), last, or a round number.")(fn)


@cli.command()
@common_options
@round_option
@click.option("-i", "--input", "in_dir", required=True, type=click.Path(path_type=Path),
              help="Folder of images (a volume run: of .nii.gz/.nii volumes).")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Where <name>.png masks (original size; volumes: <file> on the input's grid and affine) and "
                   "predictions.csv go.")
@click.option("--probabilities", is_flag=True, help="Also write probabilities/<name>.png (p x 255; volumes: NIfTI).")
@click.option("--overlays", is_flag=True, help="Also write overlays/<name>.jpg (prediction contour in red).")
@click.option("--flag-below", type=float, default=0.8, show_default=True,
              help="Flag images whose side-head agreement is below this in predictions.csv.")
@click.option("--batch-size", type=int, default=None)
@click.option("--progress/--no-progress", default=None)
@user_errors
def predict(constants, set_pairs, which, in_dir, out_dir, probabilities, overlays, flag_below, batch_size,
            **options) -> None:
    """Segment a folder of new images (or NIfTI volumes) with a trained run; masks keep each input's name and size."""
    cfg = build_config(constants, set_pairs, **options)
    from .predict import predict_folder

    predict_folder(cfg, in_dir, out_dir, which, probabilities, overlays, flag_below, batch_size,
                   progress=cfg.progress, log=_echo)


@cli.command()
@common_options
@round_option
@click.option("--format", "fmt", type=click.Choice(["savedmodel", "onnx"]), default="savedmodel", show_default=True)
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(path_type=Path))
@user_errors
def export(constants, set_pairs, which, fmt, out_dir, **options) -> None:
    """Export a round's main head with resizing and normalization inside (uint8 images in; a volume run: windows of
    the preprocessed volume in, every preprocessing setting in dsal_export.json)."""
    cfg = build_config(constants, set_pairs, **options)
    from .export import export_model

    export_model(cfg, out_dir, fmt, which, log=_echo)


@cli.command()
@click.option("--data", "src", required=True, help="orgData folder to read (never written).")
@click.option("--out", "out", required=True, help="New folder to write.")
@click.option("--rate", type=float, required=True, help="Fraction of training masks to corrupt, in [0, 1].")
@click.option("--kind", type=click.Choice(["dilate", "erode", "elastic"]), default="dilate", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--naming", default="auto", show_default=True, help="Mask naming: auto, isic or same.")
@user_errors
def corrupt(src, out, rate, kind, seed, naming) -> None:
    """Copy an orgData folder with a seeded fraction of training masks corrupted (label-noise simulator)."""
    from .corrupt import corrupt_folder

    corrupt_folder(src, out, rate, kind, seed, naming, log=_echo)


@cli.command("make-synthetic")
@common_options
@click.option("--counts", default=None, help="train,val,test image counts, e.g. 240,40,40.")
@click.option("--size", "synthetic_size", type=int, default=None, help="Image side in pixels.")
@click.option("--small", is_flag=True, help="Small lesions (1-3 per image, ~0.5% foreground) instead of one large one.")
@user_errors
def make_synthetic_cmd(constants, set_pairs, counts, small, **options) -> None:
    """Write the embedded synthetic lesion dataset (ISIC naming) into the data folder."""
    cfg = build_config(constants, set_pairs, synthetic_counts=counts, **options)
    from .synthetic import make_synthetic

    written = make_synthetic(cfg.data_path, cfg.synthetic_counts, cfg.synthetic_size, cfg.seed, small=small)
    _echo(f"wrote {written} to {cfg.data_path}/")


@cli.command()
@click.option("--data", "data_path", required=True, help="Data root in the orgData layout.")
@click.option("--budget-minutes", type=float, default=15.0, show_default=True,
              help="Run-time budget of the planned run (all rounds, training and scoring).")
@click.option("--out", default=None, help="plan.json path (default exp/plan-<data folder>/plan.json).")
@click.option("--constants", "constants", default=None,
              help="Constants file whose settings the plan must keep (default: none).")
@click.option("--set", "set_pairs", multiple=True, metavar="KEY=VALUE", help="A setting the plan must keep.")
@user_errors
def plan(data_path, budget_minutes, out, constants, set_pairs) -> None:
    """Plan the input size and training settings from the data, within a time budget."""
    from .plan import explicit_values, make_plan, table, write_plan

    name = f"plan-{Path(data_path).resolve().name}"
    result = make_plan(data_path, budget_minutes, fixed=explicit_values(constants, parse_set_options(set_pairs)),
                       log=_echo)
    path, const = write_plan(result, out or Path("exp") / name / "plan.json", exp_name=name)
    _echo(table(result))
    _echo(f"wrote {path} and {const} (run it with: python main.py --constants {const})")



@cli.command()
@click.option("--features", "features_dir", required=True, type=click.Path(path_type=Path),
              help="Folder with train-/val-/test-features.npy (N x D) and -targets.npy (N int).")
@click.option("--exp", "exp_name", required=True, help="Run folder under --exp-dir.")
@click.option("--exp-dir", default="exp", show_default=True)
@click.option("--labeled", type=int, default=50, show_default=True, help="Initial expert labels (random).")
@click.option("--queries", type=int, default=50, show_default=True, help="Expert labels per round (K).")
@click.option("--iterations", type=int, default=5, show_default=True, help="Query rounds.")
@click.option("--strategy", type=click.Choice(["boostmis", "random", "entropy"]), default="boostmis",
              show_default=True)
@click.option("--pseudo", type=click.Choice(["adaptive", "fixed", "none"]), default="adaptive", show_default=True,
              help="adaptive (BoostMIS), fixed (FixMatch threshold 0.95) or none.")
@click.option("--steps", type=int, default=200, show_default=True, help="MLP updates per round.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--set", "set_pairs", multiple=True, metavar="KEY=VALUE",
              help="A BoostMIS setting, e.g. --set BOOSTMIS_CUTOFF=constant (docs/methods.md#boostmis-deviations).")
@user_errors
def classify(features_dir, exp_name, exp_dir, labeled, queries, iterations, strategy, pseudo, steps, seed,
             set_pairs) -> None:
    """BoostMIS closed loop (adaptive pseudo labels + active queries) with an MLP head on feature vectors."""
    from .classify import classify_options, run_classify

    booster = classify_options(parse_set_options(set_pairs))
    run = run_classify(features_dir, Path(exp_dir) / exp_name, labeled, queries, iterations, strategy, pseudo,
                       seed, steps, log=_echo, **booster)
    _echo(f"wrote {run / 'results.csv'} and {run / 'learning_curve.png'}")


@cli.command()
@common_options
@round_option
@click.option("-i", "--input", "in_dir", required=True, type=click.Path(path_type=Path), help="Folder of images.")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Where <split>-features.npy, <split>-names.txt (and <split>-targets.npy) go.")
@click.option("--split", default="train", show_default=True, help="train, val or test (the file prefix).")
@click.option("--labels", default=None, type=click.Path(path_type=Path),
              help="CSV: image name, then 0/1 class columns; target = 1 + first positive column, 0 if none.")
@click.option("--columns", default=None, help="Comma-separated class columns of --labels (default: all).")
@user_errors
def features(constants, set_pairs, which, in_dir, out_dir, split, labels, columns, **options) -> None:
    """Bottleneck features (global average pooled) of an image folder with a trained run's U-Net."""
    cfg = build_config(constants, set_pairs, **options)
    from .classify import extract_features

    cols = [c.strip() for c in columns.split(",") if c.strip()] if columns else None
    extract_features(cfg, in_dir, out_dir, split, which, labels, cols, log=_echo)


def main_py() -> None:
    """`python main.py [options]` == `dsal run [options]`."""
    cli.main(args=["run", *sys.argv[1:]], prog_name="main.py")


def test_py() -> None:
    """`python test.py [options]` == `dsal evaluate [options]`."""
    cli.main(args=["evaluate", *sys.argv[1:]], prog_name="test.py")


if __name__ == "__main__":
    cli()
