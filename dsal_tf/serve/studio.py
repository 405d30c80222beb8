"""Keeping a Label Studio project in step with the run (`dsal serve --connect URL --token TOKEN`).

With label-studio-sdk (extra `[labelstudio]`): create or reuse the project (a brush labelling config,
uncertainty sampling, one annotation per task, predictions shown to the annotator), and for each round
that asks for masks a local-files storage over its request folder (Label Studio serves a local file
only inside such a storage), its tasks with the prelabels as predictions, and the project's model
version; then register the backend and make sure the webhook that brings annotations back exists and
is active. Every step first looks for what is already there, so connecting again, or after a
restart, changes only what is missing. `label_studio.json` in the run folder records the project
(never the token).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import DsalError
from ..files import atomic_write_text
from .labels import BadRequest, label_config_xml, parse_label_config

WEBHOOK_ACTIONS = ["ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED"]
SERVER_SETTINGS = ("start Label Studio with LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true, "
                   "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=<a folder above the run>, ML_BLOCK_LOCAL_IP=false and "
                   "SSRF_PROTECTION_ENABLED=false (a backend on a loopback address); see docs/label-studio.md")


def _get(obj, key: str, default=None):
    """A field of an SDK object or of a plain dict."""
    return obj.get(key, default) if isinstance(obj, dict) else getattr(obj, key, default)


def _plain(obj) -> dict:
    """An SDK object as the JSON Label Studio's webhooks send."""
    return obj if isinstance(obj, dict) else obj.model_dump(mode="json")


class Studio:
    """One Label Studio project driven by one served run."""

    def __init__(self, url: str, token: str, backend_url: str, document_root: str | Path = "/",
                 project: int | None = None):
        try:
            from label_studio_sdk import LabelStudio
        except ImportError:
            raise DsalError("dsal serve --connect needs label-studio-sdk: pip install 'dsal-tf[labelstudio]'") from None
        self.url, self.backend_url = url.rstrip("/"), backend_url.rstrip("/")
        self.document_root = Path(document_root).resolve()
        self.project = project
        self.connected = False  # set once the project, the round's tasks, the backend and the webhook are in place
        self.client = LabelStudio(base_url=self.url, api_key=token)

    def describe(self) -> dict:
        return {"url": self.url, "project": self.project, "backend_url": self.backend_url,
                "document_root": str(self.document_root), "connected": self.connected}

    def _call(self, what: str, fn, *args, **kwargs):
        """An SDK call whose failure becomes one line naming the step and the server's answer."""
        import httpx

        try:
            return fn(*args, **kwargs)
        except httpx.TransportError as exc:
            raise DsalError(f"cannot reach Label Studio at {self.url} ({exc}); start it, or fix --connect") from None
        except Exception as exc:  # the SDK's HTTP errors
            body = _get(exc, "body") or exc
            raise DsalError(f"Label Studio at {self.url} refused to {what}: {body}") from None

    # ------------------------------------------------------------------ connect
    def connect(self, backend) -> None:
        """Project, the current round's tasks, backend and webhook; records the project in the run."""
        project = self._project(backend)
        try:
            backend.label_config = parse_label_config(project.label_config, backend.label)
        except BadRequest as exc:
            raise DsalError(f"project {self.project} of {self.url}: {exc}") from None
        self.publish(backend)
        self._backend(backend)
        self._webhook()
        self.sync(backend)
        self.connected = True
        atomic_write_text(backend.store.run.label_studio_file, json.dumps(self.describe(), indent=1))
        backend.log(f"connected {backend.cfg.name} to project {self.project} of {self.url} "
                    f"({self.url}/projects/{self.project}/data)")

    def _project(self, backend):
        """The project given, or the one this run used before, or the one named after it, or a new one."""
        title = f"dsal {backend.cfg.name}"
        saved = backend.store.run.label_studio_file
        if self.project is None and saved.is_file():
            old = json.loads(saved.read_text())
            self.project = old.get("project") if old.get("url") == self.url else None
        if self.project is None:
            found = [p for p in self._call("list projects", self.client.projects.list, title=title)
                     if _get(p, "title") == title]
            self.project = _get(found[0], "id") if found else None
        settings = dict(sampling="Uncertainty sampling", maximum_annotations=1, show_collab_predictions=True,
                        model_version=backend.model_version())
        if self.project is None:
            project = self._call("create a project", self.client.projects.create, title=title,
                                 label_config=label_config_xml(backend.label or backend.label_config.label),
                                 description=f"Active learning with dsal-tf: run {backend.cfg.name}", **settings)
            self.project = project.id
            backend.log(f"created project {project.id} ({title!r}) in {self.url}")
            return project
        return self._call(f"update project {self.project}", self.client.projects.update, id=self.project, **settings)

    def _backend(self, backend) -> None:
        """Register this server as the project's ML backend (Label Studio calls /health and /setup)."""
        found = [m for m in self._call("list ML backends", self.client.ml.list, project=self.project)
                 if _get(m, "url", "").rstrip("/") == self.backend_url]
        if not found:
            self._call(f"add the ML backend {self.backend_url} ({SERVER_SETTINGS})", self.client.ml.create,
                       project=self.project, url=self.backend_url, title=f"dsal-tf {backend.cfg.name}",
                       is_interactive=False, auto_update=True)

    def _webhook(self) -> None:
        """The webhook that brings annotations back: present, active and sending them (Label Studio makes
        one with the backend, but a project whose webhooks were edited keeps training only with this)."""
        url = f"{self.backend_url}/webhook"
        hooks = [w for w in self._call("list webhooks", self.client.webhooks.list, project=str(self.project))
                 if _get(w, "url", "").rstrip("/") == url]
        ok = [w for w in hooks if _get(w, "is_active") and _get(w, "send_payload") and (
            _get(w, "send_for_all_actions") or set(WEBHOOK_ACTIONS) <= set(_get(w, "actions") or []))]
        if ok:
            return
        if hooks:
            self._call("update the webhook", self.client.webhooks.update, id=_get(hooks[0], "id"), url=url,
                       is_active=True, send_payload=True, send_for_all_actions=True)
        else:
            self._call(f"add the webhook {url} ({SERVER_SETTINGS})", self.client.webhooks.create, url=url,
                       project=self.project, is_active=True, send_payload=True, send_for_all_actions=False,
                       actions=WEBHOOK_ACTIONS)

    # ------------------------------------------------------------------ each round
    def publish(self, backend) -> None:
        """The pending round's storage, tasks (with predictions) and the project's model version."""
        store, r = backend.store, backend.round
        folder = store.run.to_annotate(r).resolve()
        if self.document_root not in folder.parents:
            raise DsalError(f"the request folder {folder} is not under Label Studio's local-files root "
                            f"{self.document_root}; pass --document-root (the server's "
                            "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT) or put the run below it")
        self._storage(folder, f"dsal {backend.cfg.name} round {r:02d}")
        version = backend.model_version(r)
        tasks = self._tasks()
        _, answer = backend.predict({"tasks": [{"data": {"name": row["name"]}} for row in store.requested(r)]})
        new, updates = [], []
        for row, pred in zip(store.requested(r), answer["results"]):
            task = tasks.get(row["name"])
            if task is None:
                data = {backend.label_config.image_key: self._url(folder / row["file"]), "name": row["name"],
                        "round": r, "rank": int(row["rank"])}
                new.append({"data": data, "predictions": [pred]})
            elif not any(_get(p, "model_version") == version for p in _get(task, "predictions") or []):
                updates.append((_get(task, "id"), pred))
        if new:
            self._call("import tasks", self.client.projects.import_tasks, self.project, request=new)
        for task_id, pred in updates:
            self._call("add a prediction", self.client.predictions.create, task=task_id, **pred)
        self._call("set the model version", self.client.projects.update, id=self.project, model_version=version)
        backend.log(f"round {r}: {len(new)} tasks imported into project {self.project} ({len(updates)} given new "
                    f"predictions); model version {version}")

    def sync(self, backend) -> None:
        """Annotations of the pending round made while no webhook reached the server (it was stopped, or
        the project's webhooks were edited) go through the webhook's own path: checked, journalled, and
        the same annotation twice changes nothing."""
        names = {row["name"] for row in backend.store.requested(backend.round)}
        pairs = [(_plain(a), {"id": _get(t, "id"), "data": _get(t, "data")}) for name, t in self._tasks().items()
                 if name in names for a in sorted(_get(t, "annotations") or [], key=lambda a: _get(a, "id"))
                 if not _get(a, "was_cancelled")]
        if not pairs:
            return
        _, answer = backend.webhook({"action": "ANNOTATIONS_CREATED", "annotation": [a for a, _ in pairs],
                                     "task": [t for _, t in pairs], "project": {"label_config": self._config()}})
        new = [a for a in answer["accepted"] if a["changed"]]
        if new:
            backend.log(f"round {backend.round}: fetched {len(new)} annotations made while no webhook arrived")

    def _config(self) -> str:
        return self._call("read the project", self.client.projects.get, self.project).label_config

    def _url(self, path: Path) -> str:
        return f"/data/local-files/?d={path.relative_to(self.document_root).as_posix()}"

    def _storage(self, folder: Path, title: str) -> None:
        found = [s for s in self._call("list storages", self.client.import_storage.local.list, project=self.project)
                 if Path(_get(s, "path", "")) == folder]
        if not found:
            self._call(f"add a local-files storage over {folder} ({SERVER_SETTINGS})",
                       self.client.import_storage.local.create, project=self.project, path=str(folder), title=title,
                       use_blob_urls=True)

    def _tasks(self) -> dict[str, object]:
        """{image name: task} of the project, with their predictions."""
        tasks = self._call("list tasks", self.client.tasks.list, project=self.project, fields="all")
        return {str((_get(t, "data") or {}).get("name")): t for t in tasks}
