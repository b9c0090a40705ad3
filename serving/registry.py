"""A Vertex AI Model Registry and Endpoint service on local disk.

Resources are stored in Vertex's REST JSON shape (camelCase, ``projects/local/locations/local/...``
names) so the local pipeline, the local server and the official SDK all read the same documents the
cloud returns, and code written against one works against the other.

Layout under ``root``::

    models/<model id>.json         {"versions": [<Model resource of each version>]}
    evaluations/<model id>.json    {"<versionId>": [<ModelEvaluation>]}
    endpoints/<endpoint id>.json   <Endpoint resource>
    .registry.lock                 held by every read-modify-write of one file (milliseconds)
    locks/model-<hash>.lock        held by :meth:`Registry.upload_version` for one model display name
    locks/endpoint-<hash>.lock     held by :meth:`Registry.rollout` and :meth:`Registry.retire` for
                                   one endpoint display name, across their several writes

Every write is atomic (see :mod:`serving.storage`), so a crash never leaves a half-written file,
and temporary files a killed writer left are swept when a registry is opened.

Why two levels of locks: a pipeline step is several writes (find the model by display name, then
add a version; deploy, move the ``default`` alias, then undeploy the versions it replaces). Two
steps interleaving those writes created two models with one display name, or undeployed each
other's model. The display-name locks serialize whole steps, per model and per endpoint, while the
file lock keeps each single write short. Both are ``flock`` locks on files, so they hold across
processes, and the kernel releases them when a holder is killed. Steps are also idempotent (the
same artifact uploaded again is the same version; a version already deployed is not deployed
twice), so a step killed half-way is simply run again.

Usage from the shell (``fire``): ``python -m serving.registry --root=DIR list_endpoints``.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import hashlib
import json
import os
import re
import secrets
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from serving.storage import exclusive_lock, read_json, sweep_temp_files, write_json_atomic

PROJECT = "local"
LOCATION = "local"
PARENT = f"projects/{PROJECT}/locations/{LOCATION}"
DEFAULT_ALIAS = "default"
#: Vertex's rule for a version alias: lower-case start, no purely numeric aliases.
_ALIAS_RE = re.compile(r"^[a-z][a-zA-Z0-9-]{0,126}[a-z0-9]$")
#: Vertex's (GCP's) rule for label keys and values.
_LABEL_KEY_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_LABEL_VALUE_RE = re.compile(r"^[a-z0-9_-]{0,63}$")
_NAME_RE = re.compile(r"^(?:projects/[^/]+/locations/[^/]+/)?(?P<kind>models|endpoints)/(?P<id>[^/@]+)$")
_CLASSIFICATION_METRICS_SCHEMA = (
    "gs://google-cloud-aiplatform/schema/modelevaluation/classification_metrics_1.0.0.yaml")
EXPLANATION_METADATA_FILE = "explanation_metadata.json"  # == trainer.schema's; no TF import here


class ChampionChangedError(RuntimeError):
    """The champion changed since the gate compared the challenger with it: not deployed."""


def check_champion(challenger: str, champion: str, default: str, serving: Iterable[str]) -> None:
    """Refuse to deploy ``challenger`` (``<model>@<version>``) when the champion changed since this
    run's gate compared it with ``champion`` ("" for none): two runs scored against one champion
    must not both deploy, the second replacing the first's version without ever being compared
    with it. The champion is the model's ``default`` version (it moves only when a version takes all
    the traffic, so a canary changes nothing); with none, the endpoint must serve nothing else.
    ``default`` equal to the challenger is this run's own deploy, retried after a kill. The Vertex
    deploy makes the same check."""
    others = sorted(set(serving) - {challenger})
    if champion and default not in (champion, challenger):
        changed = f"the serving (default) version is now {default}, not {champion} that this run's gate compared it with"
    elif not champion and others:
        changed = (f"the endpoint now serves {', '.join(others)}, deployed after this run's evaluation, where the gate "
                   "found no serving version")
    else:
        return
    raise ChampionChangedError(f"not deploying {challenger}: {changed}; another run deployed in between. It stays "
                               "uploaded, not deployed; the next run compares against what serves")


class RegistryError(LookupError, ValueError):
    """A resource that does not exist or a request the registry refuses; the message says which."""


def now_rfc3339() -> str:
    """A timestamp as Vertex writes them (``2026-01-02T03:04:05.123456Z``)."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _new_id() -> str:
    """A numeric id like Vertex's (a model, endpoint or deployed-model id is digits only)."""
    return str(secrets.randbelow(9 * 10**17) + 10**17)


def _split_version(name: str) -> tuple[str, str | None]:
    base, sep, version = name.partition("@")
    if sep and not version:
        raise RegistryError(f"{name!r}: empty version after '@'")
    return base, (version if sep else None)


def _resource_id(name: str, kind: str) -> str:
    """The id in ``projects/p/locations/l/<kind>/<id>``, ``<kind>/<id>`` or a bare ``<id>``."""
    name = str(name).strip()
    if "/" not in name:
        if not name:
            raise RegistryError(f"empty {kind[:-1]} name")
        return name
    match = _NAME_RE.match(name)
    if not match or match["kind"] != kind:
        raise RegistryError(f"{name!r} is not a resource name of {kind} "
                            f"(expected {PARENT}/{kind}/<id> or an id)")
    return match["id"]


def _camel(key: str) -> str:
    head, *rest = key.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _validate_labels(labels: Mapping[str, str] | None) -> dict[str, str]:
    labels = dict(labels or {})
    for key, value in labels.items():
        if not isinstance(key, str) or not _LABEL_KEY_RE.match(key):
            raise RegistryError(f"label key {key!r} is invalid: lower-case letters, digits, '_' or '-', "
                                "starting with a letter, at most 63 characters")
        if not isinstance(value, str) or not _LABEL_VALUE_RE.match(value):
            raise RegistryError(f"label {key}={value!r} is invalid: the value must be lower-case letters, "
                                "digits, '_' or '-', at most 63 characters")
    return labels


def _validate_aliases(aliases: Iterable[str]) -> list[str]:
    out: list[str] = []
    for alias in aliases:
        if not isinstance(alias, str) or not _ALIAS_RE.match(alias):
            raise RegistryError(f"version alias {alias!r} is invalid: it must match {_ALIAS_RE.pattern} "
                                "(a version id, being numeric, can never be mistaken for an alias)")
        if alias not in out:
            out.append(alias)
    return out


def _check_explanation_parameters(parameters: Mapping[str, Any]) -> None:
    """Refuse parameters Vertex (or our explainer) would refuse now, not at the first explain call.
    Imported here only: the registry itself must stay importable without TensorFlow."""
    from explain import ExplanationParametersError, parse_explanation_parameters

    try:
        parse_explanation_parameters(parameters)
    except ExplanationParametersError as e:
        raise RegistryError(f"upload_model: invalid explanation_parameters: {e}") from e


def _default_metadata(artifact_uri: str) -> dict[str, Any] | None:
    """The ``explanation_metadata.json`` that ``trainer.export`` wrote beside a local model."""
    path = Path(artifact_uri) / EXPLANATION_METADATA_FILE
    if "://" in artifact_uri or not path.is_file():
        return None
    return read_json(path)


def _fill_to_100(split: dict[str, int], total: int = 100) -> dict[str, int]:
    """Hand out what flooring lost, one point at a time to the first ones (as the Vertex SDK does)."""
    unallocated = total - sum(split.values())
    for key in split:
        if unallocated <= 0:
            break
        split[key] += 1
        unallocated -= 1
    return split


def allocate_traffic(traffic_split: Mapping[str, int], new_id: str, percentage: int) -> dict[str, int]:
    """The split after deploying ``new_id`` with ``percentage``, as the Vertex SDK computes it: the
    others keep their proportions, scaled to ``100 - percentage``. On an endpoint without traffic
    the new model must take 100 (0 means 100, like the SDK; anything else is refused)."""
    if not any(traffic_split.values()):
        if 0 < percentage < 100:
            raise RegistryError(f"deploy_model: the endpoint has no traffic yet, so the first model needs "
                                f"traffic_percentage=100, not {percentage}")
        return {**{k: 0 for k in traffic_split}, new_id: 100}
    rest = 100 - percentage
    scaled = _fill_to_100({k: int(v / 100 * rest) for k, v in traffic_split.items()}, rest) if rest else \
        {k: 0 for k in traffic_split}
    return {**scaled, new_id: percentage}


def unallocate_traffic(traffic_split: Mapping[str, int], removed_id: str) -> dict[str, int]:
    """The split after undeploying ``removed_id``: the others scaled back up to 100 as the SDK does.
    If the remaining models had no traffic, the most recently deployed one takes it all, so an
    endpoint with models never silently serves nothing."""
    new = {k: v for k, v in traffic_split.items() if k != removed_id}
    if not new:
        return {}
    left = sum(new.values())
    if left == 0:
        return {**new, list(new)[-1]: 100}
    return _fill_to_100({k: int(v / left * 100) for k, v in new.items()})


class Registry:
    """Models (with versions and evaluations) and endpoints (with deployed models and a traffic
    split) kept as Vertex-shaped JSON under ``root``. Safe for concurrent processes."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self._models = self.root / "models"
        self._evaluations = self.root / "evaluations"
        self._endpoints = self.root / "endpoints"
        self._lock = self.root / ".registry.lock"
        self._named_locks = self.root / "locks"
        if self.root.is_dir():
            try:
                with exclusive_lock(self._lock):  # every writer holds it: what is left is orphaned
                    sweep_temp_files(self.root)
            except PermissionError:  # a read-only registry (a server's mount): nothing to sweep there
                pass

    def __repr__(self) -> str:
        return f"Registry({str(self.root)!r})"

    # ----------------------------------------------------------------------------- models
    def upload_model(self, display_name: str, artifact_uri: str, *,
                     explanation_metadata: dict | None = None, explanation_parameters: dict | None = None,
                     labels: Mapping[str, str] | None = None, parent_model: str | None = None,
                     version_aliases: Iterable[str] = (), serving_container: Mapping[str, Any] | None = None,
                     description: str = "", is_default_version: bool = True) -> dict:
        """Register a model, or a new version of ``parent_model``; returns the new version.

        The new version gets the ``default`` alias (taken from the previous holder) unless
        ``is_default_version`` is False; other aliases move to it the same way. Explanation
        metadata defaults to the ``explanation_metadata.json`` beside a local ``artifact_uri``.
        """
        if not display_name or not str(display_name).strip():
            raise RegistryError("upload_model: display_name must not be empty")
        if not artifact_uri:
            raise RegistryError("upload_model: artifact_uri must not be empty")
        artifact_uri = os.fspath(artifact_uri)
        aliases = _validate_aliases(version_aliases)
        if is_default_version and DEFAULT_ALIAS not in aliases:
            aliases.insert(0, DEFAULT_ALIAS)
        if explanation_metadata is not None and explanation_parameters is None:
            raise RegistryError("upload_model: explanation_metadata given without explanation_parameters; "
                                "Vertex needs both for an explanationSpec")
        spec: dict[str, Any] | None = None
        if explanation_parameters is not None:
            _check_explanation_parameters(explanation_parameters)
            metadata = explanation_metadata if explanation_metadata is not None else _default_metadata(artifact_uri)
            if metadata is None:
                raise RegistryError(f"upload_model: explanation_parameters given but no explanation_metadata, and "
                                    f"{artifact_uri}/{EXPLANATION_METADATA_FILE} does not exist")
            spec = {"metadata": copy.deepcopy(dict(metadata)),
                    "parameters": copy.deepcopy(dict(explanation_parameters))}
        version: dict[str, Any] = {
            "displayName": str(display_name),
            "description": description,
            "artifactUri": artifact_uri,
            "labels": _validate_labels(labels),
            "versionAliases": aliases,
        }
        if serving_container:
            version["containerSpec"] = {_camel(k): copy.deepcopy(v) for k, v in serving_container.items()}
        if spec is not None:
            version["explanationSpec"] = spec
        with exclusive_lock(self._lock):
            stamp = now_rfc3339()
            if parent_model is None:
                model_id = self._unused_id(self._models)
                versions: list[dict] = []
                created = stamp
                if DEFAULT_ALIAS not in aliases:
                    aliases.insert(0, DEFAULT_ALIAS)  # a model's first version is always its default
            else:
                base, at = _split_version(parent_model)
                if at is not None:
                    raise RegistryError(f"parent_model {parent_model!r} must name a model, not a version")
                model_id = _resource_id(base, "models")
                versions = self._read_versions(model_id)
                created = versions[0]["createTime"]
            for other in versions:  # an alias names one version: move it to the new one
                other["versionAliases"] = [a for a in other.get("versionAliases", []) if a not in aliases]
                if set(aliases) & set(other.get("versionAliases", [])):
                    other["versionUpdateTime"] = stamp
            version_id = str(max((int(v["versionId"]) for v in versions), default=0) + 1)
            version = {"name": f"{PARENT}/models/{model_id}", "versionId": version_id, **version,
                       "createTime": created, "updateTime": stamp,
                       "versionCreateTime": stamp, "versionUpdateTime": stamp}
            versions.append(version)
            for other in versions:
                other["updateTime"] = stamp
            write_json_atomic(self._models / f"{model_id}.json", {"versions": versions})
        return copy.deepcopy(version)

    def get_model(self, name: str) -> dict:
        """A model version by ``<name or id>[@<versionId or alias>]``; the ``default`` version if
        none is named."""
        base, version = _split_version(str(name))
        model_id = _resource_id(base, "models")
        versions = self._read_versions(model_id)
        wanted = version or DEFAULT_ALIAS
        for v in versions:
            if v["versionId"] == wanted or wanted in v.get("versionAliases", []):
                return copy.deepcopy(v)
        known = [v["versionId"] for v in versions] + sorted({a for v in versions for a in v.get("versionAliases", [])})
        raise RegistryError(f"model {PARENT}/models/{model_id} has no version or alias {wanted!r} (has {known})")

    def list_models(self, display_name: str | None = None) -> list[dict]:
        """The default version of every model (as Vertex's ListModels), oldest first."""
        out = []
        for path in sorted(self._models.glob("*.json")):
            versions = read_json(path, {"versions": []})["versions"]
            default = next((v for v in versions if DEFAULT_ALIAS in v.get("versionAliases", [])), versions[-1])
            if display_name is None or default["displayName"] == display_name:
                out.append(default)
        return sorted(out, key=lambda v: v["createTime"])

    def list_model_versions(self, name: str) -> list[dict]:
        """Every version of a model, in version order."""
        base, _ = _split_version(str(name))
        return self._read_versions(_resource_id(base, "models"))

    def merge_version_aliases(self, name: str, version_aliases: Iterable[str]) -> dict:
        """Vertex's ``models.mergeVersionAliases`` on ``<model>@<version>``: each alias is added to
        that version (and taken from the version that had it); ``-alias`` removes one. ``default``
        can be moved here but not removed, so a model always has a default version."""
        base, at = _split_version(str(name))
        if at is None:
            raise RegistryError(f"merge_version_aliases needs <model>@<version>, got {name!r}")
        changes = list(version_aliases)
        _validate_aliases([a[1:] if a.startswith("-") else a for a in changes])
        if f"-{DEFAULT_ALIAS}" in changes:
            raise RegistryError(f"merge_version_aliases: the {DEFAULT_ALIAS!r} alias cannot be removed, only moved")
        model_id = _resource_id(base, "models")
        with exclusive_lock(self._lock):
            versions = self._read_versions(model_id)
            target = next((v for v in versions if at == v["versionId"] or at in v.get("versionAliases", [])), None)
            if target is None:
                raise RegistryError(f"model {PARENT}/models/{model_id} has no version or alias {at!r}")
            stamp = now_rfc3339()
            for alias in changes:
                if alias.startswith("-"):
                    target["versionAliases"] = [a for a in target["versionAliases"] if a != alias[1:]]
                    continue
                for other in versions:
                    if other is not target and alias in other.get("versionAliases", []):
                        other["versionAliases"].remove(alias)
                        other["versionUpdateTime"] = stamp
                if alias not in target["versionAliases"]:
                    target["versionAliases"].append(alias)
            target["versionUpdateTime"] = stamp
            write_json_atomic(self._models / f"{model_id}.json", {"versions": versions})
            return copy.deepcopy(target)

    def upload_version(self, display_name: str, artifact_uri: str, **kwargs: Any) -> dict:
        """The pipeline's upload: a new version of the one model called ``display_name`` (a new
        model if there is none), under that name's lock, so two runs uploading at once still make
        one model. Idempotent: the artifact already registered under that name is returned, not
        registered twice, so a step killed after its upload can be run again. The new version does
        not take ``default`` (``is_default_version=False`` unless given): that alias moves when it
        serves (:meth:`rollout`); only a model's first version is its default from the start."""
        kwargs.setdefault("is_default_version", False)
        artifact_uri = os.fspath(artifact_uri)
        with self._display_name_lock("model", display_name):
            existing = self.list_models(display_name=display_name)
            if len(existing) > 1:
                raise RegistryError(f"{len(existing)} models are called {display_name!r} in {self.root} "
                                    f"({', '.join(m['name'] for m in existing)}); keep one")
            if existing:
                for version in self.list_model_versions(existing[0]["name"]):
                    if version["artifactUri"] == artifact_uri:
                        return copy.deepcopy(version)
            return self.upload_model(display_name, artifact_uri,
                                     parent_model=existing[0]["name"] if existing else None, **kwargs)

    def _read_versions(self, model_id: str) -> list[dict]:
        data = read_json(self._models / f"{model_id}.json")
        if data is None:
            raise RegistryError(f"model {PARENT}/models/{model_id} not found in registry {self.root}")
        return data["versions"]

    # ------------------------------------------------------------------------ evaluations
    def import_model_evaluation(self, model_name: str, metrics: dict, display_name: str = "",
                                metrics_schema_uri: str = _CLASSIFICATION_METRICS_SCHEMA,
                                metadata: Mapping[str, Any] | None = None) -> dict:
        """Attach evaluation ``metrics`` (JSON values) to a model version (default if not named);
        ``metadata`` is free-form, like ModelEvaluation.metadata (e.g. the gate's comparison)."""
        if not isinstance(metrics, Mapping) or not metrics:
            raise RegistryError("import_model_evaluation: metrics must be a non-empty dict")
        try:
            metrics = json.loads(json.dumps(dict(metrics), allow_nan=False))
        except (TypeError, ValueError) as e:
            raise RegistryError(f"import_model_evaluation: metrics must be plain JSON values: {e}") from e
        with exclusive_lock(self._lock):
            version = self.get_model(model_name)
            model_id = _resource_id(version["name"], "models")
            path = self._evaluations / f"{model_id}.json"
            by_version = read_json(path, {})
            evaluation = {
                "name": f"{version['name']}@{version['versionId']}/evaluations/{_new_id()}",
                "displayName": display_name,
                "metrics": metrics,
                "metricsSchemaUri": metrics_schema_uri,
                "createTime": now_rfc3339(),
            }
            if metadata:
                evaluation["metadata"] = json.loads(json.dumps(dict(metadata)))
            by_version.setdefault(version["versionId"], []).append(evaluation)
            write_json_atomic(path, by_version)
        return copy.deepcopy(evaluation)

    def list_model_evaluations(self, model_name: str) -> list[dict]:
        """The evaluations of a model version (default if not named), oldest first."""
        version = self.get_model(model_name)
        by_version = read_json(self._evaluations / f"{_resource_id(version['name'], 'models')}.json", {})
        return by_version.get(version["versionId"], [])

    # -------------------------------------------------------------------------- endpoints
    def create_endpoint(self, display_name: str) -> dict:
        """A new endpoint without deployed models."""
        with exclusive_lock(self._lock):
            return self._create_endpoint_locked(display_name)

    def _create_endpoint_locked(self, display_name: str) -> dict:
        if not display_name or not str(display_name).strip():
            raise RegistryError("create_endpoint: display_name must not be empty")
        stamp = now_rfc3339()
        endpoint = {"name": f"{PARENT}/endpoints/{self._unused_id(self._endpoints)}",
                    "displayName": str(display_name), "deployedModels": [], "trafficSplit": {},
                    "createTime": stamp, "updateTime": stamp}
        self._write_endpoint(endpoint)
        return endpoint

    def get_or_create_endpoint(self, display_name: str) -> dict:
        """The newest endpoint called ``display_name``, created if there is none; under the lock, so
        concurrent callers get the same one."""
        with exclusive_lock(self._lock):
            found = self.list_endpoints(display_name)
            return found[-1] if found else self._create_endpoint_locked(display_name)

    def get_endpoint(self, name: str) -> dict:
        endpoint_id = _resource_id(str(name), "endpoints")
        endpoint = read_json(self._endpoints / f"{endpoint_id}.json")
        if endpoint is None:
            raise RegistryError(f"endpoint {PARENT}/endpoints/{endpoint_id} not found in registry {self.root}")
        return endpoint

    def list_endpoints(self, display_name: str | None = None) -> list[dict]:
        """Endpoints (optionally only those called ``display_name``), oldest first."""
        found = [read_json(p) for p in sorted(self._endpoints.glob("*.json"))]
        return sorted((e for e in found if e and (display_name is None or e["displayName"] == display_name)),
                      key=lambda e: e["createTime"])

    def deploy_model(self, endpoint_name: str, model_name: str, *, traffic_percentage: int = 100,
                     display_name: str = "", machine_type: str = "local", min_replica_count: int = 1,
                     max_replica_count: int = 1) -> dict:
        """Deploy a model version to an endpoint with ``traffic_percentage`` of its traffic (the
        others are scaled down proportionally); returns the DeployedModel."""
        if isinstance(traffic_percentage, bool) or not isinstance(traffic_percentage, int) \
                or not 0 <= traffic_percentage <= 100:
            raise RegistryError(f"deploy_model: traffic_percentage must be an integer in [0, 100], "
                                f"got {traffic_percentage!r}")
        if not 1 <= int(min_replica_count) <= int(max_replica_count):
            raise RegistryError(f"deploy_model: need 1 <= min_replica_count ({min_replica_count}) <= "
                                f"max_replica_count ({max_replica_count})")
        version = self.get_model(model_name)

        def deploy(endpoint: dict) -> dict:
            used = {d["id"] for d in endpoint["deployedModels"]}
            deployed_id = next(i for i in iter(_new_id, None) if i not in used)
            deployed = {
                "id": deployed_id,
                "model": f"{version['name']}@{version['versionId']}",
                "modelVersionId": version["versionId"],
                "displayName": display_name or version["displayName"],
                "dedicatedResources": {"machineSpec": {"machineType": machine_type},
                                       "minReplicaCount": int(min_replica_count),
                                       "maxReplicaCount": int(max_replica_count)},
                "createTime": now_rfc3339(),
            }
            endpoint["deployedModels"].append(deployed)
            endpoint["trafficSplit"] = allocate_traffic(endpoint["trafficSplit"], deployed_id, traffic_percentage)
            return deployed

        return self._update_endpoint(endpoint_name, deploy)

    def undeploy_model(self, endpoint_name: str, deployed_model_id: str) -> None:
        """Remove a deployed model; the remaining ones are scaled back up to 100% of the traffic."""
        def undeploy(endpoint: dict) -> None:
            ids = [d["id"] for d in endpoint["deployedModels"]]
            if str(deployed_model_id) not in ids:
                raise RegistryError(f"endpoint {endpoint['name']} has no deployed model {deployed_model_id!r} "
                                    f"(has {ids})")
            endpoint["deployedModels"] = [d for d in endpoint["deployedModels"] if d["id"] != str(deployed_model_id)]
            endpoint["trafficSplit"] = unallocate_traffic(endpoint["trafficSplit"], str(deployed_model_id))

        self._update_endpoint(endpoint_name, undeploy)

    @contextlib.contextmanager
    def _display_name_lock(self, kind: str, display_name: str) -> Iterator[None]:
        """Held across a multi-write step on the model or endpoint called ``display_name``."""
        digest = hashlib.sha256(str(display_name).encode()).hexdigest()[:24]
        with exclusive_lock(self._named_locks / f"{kind}-{digest}.lock"):
            yield

    def endpoint_lock(self, display_name: str) -> contextlib.AbstractContextManager[None]:
        """The lock :meth:`rollout` and :meth:`retire` hold on the endpoint called ``display_name``;
        hold it to read an endpoint and act on what was read without another step in between."""
        return self._display_name_lock("endpoint", display_name)

    def rollout(self, endpoint_display_name: str, model_name: str, *, traffic_percentage: int = 100,
                display_name: str = "", machine_type: str = "local", min_replica_count: int = 1,
                max_replica_count: int = 1, champion: str | None = None) -> dict:
        """The pipeline's deploy, as one step under the endpoint's lock: deploy ``model_name``
        (``<model>@<version>``) to the endpoint called ``endpoint_display_name`` (created once);
        with all the traffic, move the ``default`` alias to it (it now serves) and undeploy every
        other model there. A version already deployed is reused, so running the step again after a
        kill finishes the job instead of deploying twice.

        With ``champion`` (``<model>@<version>`` the gate compared against, ``""`` for none), the
        step is refused (:class:`ChampionChangedError`) if the champion changed since
        (:func:`check_champion`): another run deployed in between, and this challenger was never
        compared with what serves now.

        Returns ``{"endpoint", "deployed_model_id", "model", "undeployed", "reused"}``.
        """
        with self.endpoint_lock(endpoint_display_name):
            version = self.get_model(model_name)
            versioned = f"{version['name']}@{version['versionId']}"
            endpoint = self.get_or_create_endpoint(endpoint_display_name)
            if champion is not None:
                default = self.get_model(version["name"])
                check_champion(versioned, champion, f"{default['name']}@{default['versionId']}",
                               [d["model"] for d in endpoint["deployedModels"]])
            current = next((d for d in endpoint["deployedModels"] if d["model"] == versioned), None)
            reused = current is not None
            if current is None:
                current = self.deploy_model(endpoint["name"], versioned, traffic_percentage=traffic_percentage,
                                            display_name=display_name, machine_type=machine_type,
                                            min_replica_count=min_replica_count,
                                            max_replica_count=max_replica_count)
            undeployed: list[str] = []
            if traffic_percentage == 100:
                self.merge_version_aliases(versioned, [DEFAULT_ALIAS])
                undeployed = self._retire_locked(endpoint["name"], keep=current["id"])
            return {"endpoint": endpoint["name"], "deployed_model_id": current["id"], "model": versioned,
                    "undeployed": undeployed, "reused": reused}

    def retire(self, endpoint_name: str, deployed_model_ids: Iterable[str] | None = None) -> list[str]:
        """Undeploy ``deployed_model_ids`` (all, if None) from an endpoint under its lock; ids
        already gone are skipped (idempotent). Returns the ids undeployed now."""
        endpoint = self.get_endpoint(endpoint_name)
        with self.endpoint_lock(endpoint["displayName"]):
            return self._retire_locked(endpoint["name"], only=None if deployed_model_ids is None
                                       else {str(i) for i in deployed_model_ids})

    def _retire_locked(self, endpoint_name: str, keep: str | None = None, only: set[str] | None = None) -> list[str]:
        undeployed = []
        for deployed in self.get_endpoint(endpoint_name)["deployedModels"]:
            if deployed["id"] != keep and (only is None or deployed["id"] in only):
                self.undeploy_model(endpoint_name, deployed["id"])
                undeployed.append(deployed["id"])
        return undeployed

    def deployed_versions(self) -> set[tuple[str, str]]:
        """(model name, version id) of every version deployed on any endpoint: what a server must
        keep loaded, and nothing else."""
        return {(d["model"].split("@")[0], d["modelVersionId"])
                for endpoint in self.list_endpoints() for d in endpoint["deployedModels"]}

    def _update_endpoint(self, endpoint_name: str, change: Callable[[dict], Any]) -> Any:
        with exclusive_lock(self._lock):
            endpoint = self.get_endpoint(endpoint_name)
            result = change(endpoint)
            endpoint["updateTime"] = now_rfc3339()
            self._write_endpoint(endpoint)
        return copy.deepcopy(result)

    def _write_endpoint(self, endpoint: dict) -> None:
        write_json_atomic(self._endpoints / f"{_resource_id(endpoint['name'], 'endpoints')}.json", endpoint)

    @staticmethod
    def _unused_id(directory: Path) -> str:
        return next(i for i in iter(_new_id, None) if not (directory / f"{i}.json").exists())


if __name__ == "__main__":
    import fire

    fire.Fire(Registry, serialize=lambda value: json.dumps(value, indent=2))
