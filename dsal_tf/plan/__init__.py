"""`dsal plan`: choose the input size and training settings from the data, within a time budget.

nnU-Net's self-configuration, for this product and for the machine at hand:

1. **Fingerprint** (`fingerprint`), streaming: image sizes and colour mode from file headers (no
   decode), intensity statistics from a seeded sample of training images decoded one at a time,
   and from every train/val mask (decoded one at a time; the test split is never looked at) the
   foreground fraction and the connected components (8-connectivity) in pixels at the original size.
   Structures are the components of at least `SPECK_FRACTION` of their mask's largest one; the
   specks below that (nearest-neighbour resizing leaves a few in ISIC masks) are counted apart.
2. **Candidates** (`size_ladder`): sizes that keep the median aspect and divide by 2**DEPTH, times
   base filters. The size rule: the 5th-percentile structure must keep `MIN_STRUCTURE_PIXELS`
   pixels after resizing.
3. **Measured steps** (`measure_steps`, `search_candidates`): a few real Keras training, validation
   and DSAL scoring steps of each candidate U-Net on this machine, after warm-up.
4. **Budget rule** (`predict_seconds`, `choose`): predicted run time = data loading + initial
   epochs + rounds x (scoring pass + epochs), from the measured per-step times, for the protocol
   that will run (with full supervision: the whole pool, no rounds); the preferred candidate whose
   prediction fits the budget wins.
5. **Learning probe** (`probe_learning`, `probe_verdict`): the would-be choice trains
   `PROBE_STEPS` steps on the pool; if its training soft Dice does not rise, the next recipe
   (`RECIPES`: nnU-Net's Dice + cross-entropy over the batch), then the next candidate, is tried.
   Refusals and their reasons stay in `plan.json`; the probe's warm step time corrects the 3-step one.
   Planning counts against the budget (`Planning.left_s`), and the probes take at most `PROBE_SHARE` of it
   (`probe_target`: fewer steps, or a cheaper stand-in, or no probe and a warning).

When a `PRESET = "auto"` run ends, `record_actual` writes its actual minutes into `plan.json` beside the
prediction.

`make_plan` runs all five, as named steps over one `Planning` (see its docstring), and returns a
JSON-able dict; `write_plan` saves `plan.json` and a ready constants file. `PRESET = "auto"` runs the
plan on first use (`plan_for_run`).

A folder of NIfTI volumes (`make_volume_plan`, the one branch on the rank, in `make_plan`) goes through the
same steps with its own fingerprint (`volume_fingerprint`: shapes, spacings, the target spacing and the shapes
resampled to it, CT or MRI, components in voxels and mm^3), nnU-Net's patch rule (`patch_ladder`) and the
volume space's own streams, sliding-window inferer and batch counts (`measure_volume_steps`,
`probe_volume_learning`, `volume_batches`); docs/planning.md describes both.

The files:

- `core.py`: the steps images and volumes share (schedule, budget rule, memory, the probe's core and verdict,
  `Planning`, `search_candidates`, `choose_learning`, `fit_choice`, `decide`) and their constants; it imports
  neither planner.
- `images.py`: the 2-D image planner (`fingerprint`, `size_ladder`, `candidate`, `measure_steps`,
  `probe_learning`, `plan_reasons`, `plan_warnings`, `make_image_plan`).
- `volumes.py`: the 3-D volume planner (`volume_fingerprint`, `patch_ladder`, `volume_candidate`,
  `measure_volume_steps`, `probe_volume_learning`, `make_volume_plan`, `volume_table`).
- here: `make_plan` (the one branch on the rank), the plan file's output (`constants_text`, `table`, `write_plan`)
  and `PRESET = "auto"` (`explicit_values`, `plan_for_run`); the planners' names that callers and tests use are
  imported here, so they still import from `dsal_tf.plan`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import Config, read_constants, resolve
from ..volumes import dataset_rank
from .core import choose, choose_learning, predict_seconds, probe_verdict, schedule
from .images import (
    INTENSITY_SAMPLE,
    component_areas,
    fingerprint,
    make_image_plan,
    measure_steps,
    probe_learning,
    size_ladder,
)
from .volumes import (
    EPOCH_STEPS,  # noqa: F401  (outside __all__, imported from dsal_tf.plan by the tests)
    component_voxels,
    make_volume_plan,
    measure_volume_steps,
    patch_ladder,
    probe_sample,  # noqa: F401  (as EPOCH_STEPS)
    probe_volume_learning,
    volume_base_settings,  # noqa: F401  (as EPOCH_STEPS)
    volume_batches,  # noqa: F401  (as EPOCH_STEPS)
    volume_fingerprint,
    volume_table,
)


def make_plan(
    data_path: str | Path,
    budget_minutes: float = 15.0,
    fixed: dict[str, Any] | None = None,
    measure: Callable[[Config], dict] | None = None,
    log: Callable[[str], None] = print,
    sample: int = INTENSITY_SAMPLE,
    full_supervision: bool = False,
    probe: Callable[[Config, int], dict] | None = None,
) -> dict[str, Any]:
    """Fingerprint `data_path`, measure candidates, probe the choice, and choose the settings (a JSON-able dict).

    `fixed`: settings the user set (constants file, command line); they hold in every candidate.
    `full_supervision`: plan the run `--full-supervision` makes (the whole pool labelled, no rounds).
    `measure(cfg) -> timing dict` defaults to `measure_steps`, `probe(cfg, steps) -> probe dict` to
    `probe_learning`; with injected timings and no probe, nothing is probed (tests).

    A folder of NIfTI volumes goes to `make_volume_plan` (volumes.py), images to `make_image_plan` (images.py),
    whose steps, in order, are: `fingerprint`, `planning`, `size_ladder`, `search_candidates`, `choose_learning`,
    `fit_choice`, `plan_reasons`, `plan_warnings`."""
    fixed = {k.lower(): v for k, v in (fixed or {}).items() if k.lower() not in ("preset",)}
    fixed["data_path"] = str(data_path)
    if dataset_rank(data_path) == 3:  # NIfTI volumes: the rank is decided here once, as `space.space_for` does
        return make_volume_plan(data_path, budget_minutes, fixed, measure, log, full_supervision, probe)
    return make_image_plan(data_path, budget_minutes, fixed, measure, log, sample, full_supervision, probe)


def constants_text(plan: dict, exp_name: str | None = None) -> str:
    """A ready constants file with the planned settings."""
    s = plan["choice"]["settings"]
    fp = plan["fingerprint"]
    lines = [
        f'"""Planned by `dsal plan` for {fp["data_path"]} (budget {plan["budget_minutes"]} min, predicted '
        f'{plan["choice"]["predicted"]["total_s"] / 60:.1f} min). Reasons: plan.json."""',
        "",
        'PRESET = "demo"  # the base; every planned setting is below',
        f"DATA_PATH = {fp['data_path']!r}",
    ]
    if exp_name:
        lines.append(f"EXP_NAME = {exp_name!r}")
    lines += [f"{k.upper()} = {v!r}" for k, v in s.items()]
    return "\n".join(lines) + "\n"


def table(plan: dict) -> str:
    """The short printed summary: fingerprint, candidates, choice."""
    if plan.get("space") == "volume":
        return volume_table(plan)
    fp, ch = plan["fingerprint"], plan["choice"]
    m, im = fp["masks"], fp["image_size"]
    out = [
        f"data {fp['data_path']}: {fp['counts']['train']} pool, {fp['counts']['val']} val, "
        f"{fp['counts']['test']} test; "
        f"median {im['median_rows']:.0f}x{im['median_cols']:.0f} ({fp['color']}, {fp['intensity']['dtype']}); "
        f"foreground {m['foreground_fraction_mean']}; components p5 {m['component_pixels_p5']} px, "
        f"min {m['component_pixels_min']} px",
        f"{'size':>9} {'filters':>7} {'batch':>5} {'p5 px':>7} {'rule':>4} {'train ms':>8} {'score ms':>8} "
        f"{'predicted':>9} {'probe':>7}",
    ]
    for c in plan["candidates"]:
        out.append(f"{c['img_rows']:>4}x{c['img_cols']:<4} {c['base_filters']:>7} {c['batch_size']:>5} "
                   f"{c['p5_structure_pixels'] if c['p5_structure_pixels'] is not None else '-':>7} "
                   f"{'ok' if c['meets_size_rule'] else 'no':>4} {c['train_step_s'] * 1000:>8.0f} "
                   f"{c['score_step_s'] * 1000:>8.0f} {c['predicted_s'] / 60:>7.1f} m "
                   f"{'refused' if 'refused' in c else 'learned' if c.get('probes') else '-':>7}")
    s = ch["settings"]
    out.append(f"chosen: {s['img_rows']}x{s['img_cols']}, {s['base_filters']} filters, batch {s['batch_size']}, "
               f"loss {s['loss']}{' (batch Dice)' if s.get('batch_dice') else ''}, "
               f"{s['nb_initial_epochs']}+{s['nb_iterations']}x{s['nb_active_epochs']} epochs; "
               f"predicted {ch['predicted']['total_s'] / 60:.1f} min of {plan['budget_minutes']} "
               f"(planning took {plan['plan_s']:.0f} s)")
    out += [f"refused {c['img_rows']}x{c['img_cols']} f{c['base_filters']}: {c['refused']}"
            for c in plan["candidates"] if "refused" in c]
    out += [f"warning: {w}" for w in plan["warnings"]]
    return "\n".join(out)


def write_plan(plan: dict, out: str | Path, exp_name: str | None = None) -> tuple[Path, Path]:
    """`plan.json` at `out` and the constants file beside it (`<stem>_constants.py`)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(plan, indent=2, default=float))
    tmp.replace(out)
    const = out.with_name(f"{out.stem}_constants.py")
    const.write_text(constants_text(plan, exp_name))
    return out, const


def explicit_values(constants: str | Path | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """What the user set: the constants file's names, then the command line's (lower-case keys)."""
    values: dict[str, Any] = {}
    if constants is not None and Path(constants).is_file():
        values.update({k.lower(): v for k, v in read_constants(constants).items()})
    values.update({k.lower(): v for k, v in overrides.items() if v is not None})
    return values


def plan_for_run(cfg: Config, user: dict[str, Any], log: Callable[[str], None] = print,
                 full_supervision: bool = False) -> Config:
    """`PRESET = "auto"`: plan on first use, store `plan.json` in the run folder, and resolve
    planned settings < constants file < command line. A resumed run reuses its stored plan.
    `full_supervision`: the run is `--full-supervision`; the plan predicts and fits that protocol."""
    from ..run import Run

    path = Run.of(cfg).plan_file
    if path.is_file():
        plan = json.loads(path.read_text())
        log(f"PRESET auto: using the stored plan {path}")
    else:
        log(f"PRESET auto: planning for {cfg.data_path} within {cfg.plan_budget_minutes} min")
        plan = make_plan(cfg.data_path, cfg.plan_budget_minutes, fixed=user, log=log,
                         full_supervision=full_supervision)
        write_plan(plan, path)
        log(table(plan))
    settings = {**plan["choice"]["settings"], **{k: v for k, v in user.items() if k != "preset"}}
    return resolve({**settings, "preset": "auto"}, source=f"the plan {path} and your settings")


def record_actual(plan_file: str | Path, run_dir: str | Path, command_s: float, planned_here: bool,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write the finished run's actual minutes beside the plan's prediction (`plan.json`'s `actual`) and log the
    two: training and scoring summed over the rounds of `run_dir`'s learning curve, and the command's wall time
    `command_s`, which is the whole job when the plan was made by the same command (`planned_here`; a resumed
    run's earlier commands are not counted)."""
    import pandas as pd

    from ..files import atomic_write_text
    from ..run import Run

    plan_file = Path(plan_file)
    plan = json.loads(plan_file.read_text())
    curve = pd.read_csv(Run(run_dir).curve_file)
    predicted = plan["choice"]["predicted"]
    actual = {"rounds": int(len(curve)), "train_s": round(float(pd.to_numeric(curve["train_s"]).sum()), 1),
              "score_s": round(float(pd.to_numeric(curve["score_s"]).sum()), 1), "command_s": round(command_s, 1),
              "planned_in_this_command": planned_here}
    planned_s = plan["plan_s"] + predicted["total_s"]
    if planned_here:
        actual.update(total_s=round(command_s, 1), planned_total_s=round(planned_s, 1),
                      within_budget=command_s <= 60.0 * plan["budget_minutes"])
    plan["actual"] = actual
    atomic_write_text(plan_file, json.dumps(plan, indent=2, default=float))
    took = f"took {command_s / 60:.1f} min" + ("" if planned_here else " in this command (resumed)")
    log(f"PRESET auto: planned {planned_s / 60:.1f} min of {plan['budget_minutes']:g} (planning "
        f"{plan['plan_s'] / 60:.1f}), {took}; training {predicted['train_s'] / 60:.1f} planned / "
        f"{actual['train_s'] / 60:.1f} actual, scoring {predicted['score_s'] / 60:.1f} / {actual['score_s'] / 60:.1f} "
        f"min ({plan_file})")
    return actual


__all__ = ["fingerprint", "component_areas", "size_ladder", "schedule", "predict_seconds", "choose",
           "choose_learning", "probe_learning", "probe_verdict", "measure_steps", "make_plan", "write_plan",
           "plan_for_run", "table", "explicit_values", "volume_fingerprint", "component_voxels", "patch_ladder",
           "make_volume_plan", "measure_volume_steps", "probe_volume_learning", "volume_table", "record_actual"]
