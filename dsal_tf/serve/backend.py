"""The ML backend: Label Studio's calls as plain methods, and the one worker that owns the run folder.

The handlers (`health`, `setup`, `predict`, `webhook`, `info`, `metrics`) only read state and put work
in the worker's queue; they return (HTTP status, JSON body) and are tested without a server. The
worker (one thread) writes every received mask and journal line, runs the round once the last
requested mask is in (`dsal import-labels`' checks, training, scoring, the next request), and tells
Label Studio (`studio.Studio`) about the new tasks and model version. A mask is answered only once it
is on disk, so a killed server loses nothing it acknowledged; restarting goes on from the journal.
"""

from __future__ import annotations

import queue
import threading
import traceback
from collections.abc import Callable
from concurrent.futures import Future

from ..active import run_active_learning
from ..errors import DsalError
from ..oracle import AwaitingAnnotation
from .datastore import Datastore
from .labels import (
    LABEL,
    BadRequest,
    LabelConfig,
    check_results,
    label_config_xml,
    mask_from_results,
    parse_label_config,
    task_name,
)
from .labels import prediction as make_prediction

ANNOTATION_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED")
WAIT_S = 120.0  # a webhook waits this long for its mask to be written (the worker may be finishing a job)


class Backend:
    """One run served to Label Studio. `studio` (optional) pushes each new round's tasks."""

    def __init__(self, cfg, label: str | None = None, studio=None, log: Callable[[str], None] = print):
        self.cfg, self.label, self.studio, self.log = cfg, label, studio, log
        self.store = Datastore(cfg)
        self.state = "waiting"  # waiting (for masks), training, scoring, finished, error
        self.problem: str | None = None  # why the last round could not go on, for /health and /info
        self.label_config = parse_label_config(label_config_xml(label or LABEL), label)  # until /setup says
        self._configs: dict[str, LabelConfig] = {}
        self._cache: dict[tuple[int, str, str], dict] = {}
        self.jobs: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ state
    @property
    def round(self) -> int:
        return self.store.round()

    def model_version(self, r: int | None = None) -> str:
        """`dsal-<exp>-r<NN>`: the model whose prelabels round NN's tasks show."""
        return f"dsal-{self.cfg.name}-r{self.round if r is None else r:02d}"

    def config(self, xml: str | None) -> LabelConfig:
        """The tags of a project's labelling config (the last one /setup saw when a call carries none)."""
        if not xml:
            return self.label_config
        if xml not in self._configs:
            self._configs[xml] = parse_label_config(xml, self.label)
        return self._configs[xml]

    # ------------------------------------------------------------------ handlers
    def health(self) -> tuple[int, dict]:
        return 200, {"status": "UP", "model_class": "dsal-tf", "round": self.round, "state": self.state,
                     "model_version": self.model_version(), "problem": self.problem}

    def setup(self, body: dict) -> tuple[int, dict]:
        """Label Studio connects a project: its config must have an Image and a BrushLabels tag."""
        self.label_config = self.config(body.get("schema") or body.get("label_config") or "")
        return 200, {"model_version": self.model_version()}

    def predict(self, body: dict) -> tuple[int, dict]:
        """One prediction per task, in order: the round's prelabel (brush RLE at the image's size) with
        the score uncertainty sampling orders by; an image the round did not ask for gets none."""
        cfg = self.config(body.get("label_config"))
        r = self.round
        scores = self.store.scores(r)
        out = []
        for task in body.get("tasks") or []:
            name = task_name(task.get("data") or {}, cfg.image_key)
            if name not in scores:
                out.append({"result": [], "score": None, "model_version": self.model_version(r)})
                continue
            key = (r, name, repr(cfg))
            if key not in self._cache:
                self._cache[key] = make_prediction(self.store.prelabel(r, name), cfg, scores[name],
                                                   self.model_version(r))
            out.append(self._cache[key])
        return 200, {"results": out, "model_version": self.model_version(r)}

    def webhook(self, body: dict) -> tuple[int, dict]:
        """Label Studio's events: annotations in (single and bulk), deleted, and the Start Training button."""
        action = body.get("action")
        if action in ANNOTATION_EVENTS:
            return self._annotations(body, self.config((body.get("project") or {}).get("label_config")))
        if action == "ANNOTATIONS_DELETED":
            ids = [_id(a, "a deleted annotation") for a in _objects(body.get("annotations"), "annotations")]
            gone = self.submit(lambda: self._delete(ids))
            return 200, {"status": "deleted", "names": gone}
        if action == "START_TRAINING":
            return self._start_training()
        return 200, {"status": "ignored", "action": action}

    def info(self) -> tuple[int, dict]:
        """MONAI Label's /info: the round, the counts, the learning curve and the corrections."""
        r = self.round
        counts = {"requested": len(self.store.requested(r)), "received": len(self.store.live(r)),
                  **self.store.pool_counts()}
        studio = self.studio.describe() if self.studio is not None else None
        return 200, {"name": self.cfg.name, "round": r, "state": self.state, "model_version": self.model_version(),
                     "problem": self.problem, "counts": counts, "label_studio": studio,
                     "labelling_config": self.label_config.__dict__}

    def metrics(self) -> tuple[int, dict]:
        """The learning curve and, per round, the Dice between each prelabel and the submitted mask."""
        _, info = self.info()
        return 200, {"round": info["round"], "counts": info["counts"], "learning_curve": self.store.curve(),
                     "prelabel_dice": self.store.corrections()}

    # ------------------------------------------------------------------ webhook details
    def _annotations(self, body: dict, cfg: LabelConfig) -> tuple[int, dict]:
        annotations, tasks = body.get("annotation"), body.get("task")
        if isinstance(annotations, dict):
            annotations, tasks = [annotations], [tasks] if isinstance(tasks, dict) else []
        annotations, tasks = _objects(annotations, "annotation"), _objects(tasks or [], "task")
        by_id = {t.get("id"): t for t in tasks}
        accepted, refused, status = [], [], 200
        for ann in annotations:
            task = by_id.get(ann.get("task")) or (tasks[0] if len(tasks) == 1 else {})
            try:
                accepted.append(self._annotation(ann, task, cfg))
            except BadRequest as exc:
                self.log(f"refused annotation {ann.get('id')}: {exc}")
                refused.append({"annotation": ann.get("id"), "error": str(exc)})
                status = exc.status if status == 200 else status
        answer = {"accepted": accepted, "refused": refused, "round": self.round,
                  "missing": len(self.store.missing(self.round))}
        if refused:
            answer["error"] = refused[0]["error"]
        return status, answer

    def _annotation(self, ann: dict, task: dict, cfg: LabelConfig) -> dict:
        """Check one annotation against the pending round (no decoding), then have the worker keep it."""
        r, where = self.round, f"annotation {ann.get('id')} of task {ann.get('task')}"
        name = task_name((task or {}).get("data") or {}, cfg.image_key)
        aid = _id(ann, "an annotation")
        if self.state not in ("waiting", "error"):
            raise BadRequest(f"{where} ({name!r}) came while round {r} is {self.state} with the masks it had; "
                             "a trained round's masks cannot change (start a new run to train on corrections)", 409)
        if self.store.row(r, name) is None:
            raise BadRequest(f"{where} is for {name!r}, which round {r} did not ask for (see its manifest); "
                             "annotate the round's tasks")
        if ann.get("was_cancelled"):
            raise BadRequest(f"{where} ({name!r}) was skipped; round {r} needs a mask for it (an empty one is fine)")
        size = self.store.size(r, name)
        check_results(ann.get("result") or [], cfg, size, where)
        meta = {"annotation": aid, "task": ann.get("task"), "name": name,
                "who": ann.get("completed_by"), "when": ann.get("updated_at") or ann.get("created_at")}
        changed = self.submit(lambda: self._keep(r, meta, ann.get("result") or [], cfg, size))
        return {"annotation": meta["annotation"], "name": name, "changed": changed}

    def _start_training(self) -> tuple[int, dict]:
        """The Start Training button: the round goes on if every mask is in (after fetching annotations
        whose webhook never arrived), else the answer says how many are missing."""
        if self.state not in ("waiting", "error"):
            return 200, {"status": self.state, "round": self.round}
        if self.studio is not None and self.studio.connected:
            self.submit(lambda: self.studio.sync(self))
        r = self.round
        missing = self.store.missing(r)
        if missing:
            return 409, {"error": f"round {r} still misses {len(missing)} of {len(self.store.requested(r))} "
                                  f"requested masks (first: {missing[0]!r}); annotate them, then train",
                         "missing": missing}
        self.jobs.put((self.advance, None))
        return 200, {"status": "training", "round": r}

    # ------------------------------------------------------------------ worker
    def start(self, first_jobs: list[Callable] = ()) -> None:
        """Start the worker; `first_jobs` run before anything else (connecting, resuming a round)."""
        for job in (*first_jobs, self.advance):
            self.jobs.put((job, None))
        self._thread = threading.Thread(target=self._work, name="dsal-serve-worker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.jobs.put((None, None))
        if self._thread is not None:
            self._thread.join(timeout=10)

    def submit(self, job: Callable, timeout: float = WAIT_S):
        """Run `job` on the worker and return its result (its `BadRequest` is raised here)."""
        if self._thread is None or threading.current_thread() is self._thread:  # no worker (tests), or on it
            return job()
        done: Future = Future()
        self.jobs.put((job, done))
        return done.result(timeout=timeout)

    def _work(self) -> None:
        while True:
            job, done = self.jobs.get()
            if job is None:
                return
            try:
                result = job()
            except BaseException as exc:  # noqa: BLE001 (the worker must outlive any job)
                if done is None:
                    self._failed(exc)
                else:
                    done.set_exception(exc)
                continue
            if done is not None:
                done.set_result(result)

    def _failed(self, exc: BaseException) -> None:
        self.problem = str(exc) if isinstance(exc, DsalError) else f"{type(exc).__name__}: {exc}"
        self.log(f"error: {self.problem}")
        if not isinstance(exc, DsalError):
            self.log(traceback.format_exc())

    def _keep(self, r: int, meta: dict, results: list, cfg: LabelConfig, size: tuple[int, int]) -> bool:
        """Worker: decode and keep one annotation's mask; the round goes on once every mask is in."""
        if self.round != r or self.state not in ("waiting", "error"):
            raise BadRequest(f"annotation {meta['annotation']} came after round {r}'s last mask; round {r} "
                             "trains with the masks it had", 409)
        changed = self.store.record(r, meta, mask_from_results(results, cfg, size))
        self.log(f"round {r}: {'kept' if changed else 'already had'} the mask of {meta['name']!r} (annotation "
                 f"{meta['annotation']}); {len(self.store.missing(r))} of {len(self.store.requested(r))} to go")
        if not self.store.missing(r):
            self.state = "training"  # from now on webhooks for this round are refused
            self.jobs.put((self.advance, None))
        return changed

    def _delete(self, ids: list[int]) -> list[str]:
        r = self.round
        if self.state not in ("waiting", "error"):
            raise BadRequest(f"round {r} is {self.state}; its masks cannot be deleted now", 409)
        gone = self.store.delete(r, ids)
        if gone:
            self.log(f"round {r}: dropped the masks of {gone} (annotations deleted)")
        return gone

    def advance(self) -> None:
        """Worker: when every requested mask is in, import them, train, score and ask for the next round."""
        r = self.round
        if self.store.missing(r):
            self.state = "waiting"
            return
        self.state, self.problem = "training", None
        try:
            self.store.import_round(r, self.log)
            run_active_learning(self.cfg, log=self.log, on_phase=self._phase)
            self.state = "finished"
        except AwaitingAnnotation as wait:
            self.log(str(wait))
            self.state = "waiting"
        except BaseException as exc:
            self.state = "error"
            self._failed(exc)
            return
        self._cache.clear()
        if self.studio is not None and self.state == "waiting":
            self.studio.publish(self)

    def _phase(self, name: str) -> None:
        """The loop's phases ("scoring", "training") are the server's state while it runs."""
        self.state = name


def _objects(value, key: str) -> list[dict]:
    """A webhook field that must be a list of JSON objects."""
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise BadRequest(f"the webhook's {key!r} must be a list of objects (Label Studio's payload)", 400)
    return value


def _id(obj: dict, what: str) -> int:
    try:
        return int(obj["id"])
    except (KeyError, TypeError, ValueError):
        raise BadRequest(f"{what} has no integer id: {str(obj)[:200]}", 400) from None
