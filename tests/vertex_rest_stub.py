"""A local, stateful stub of the Vertex AI REST API (v1), for driving the real ``aiplatform`` SDK.

The SDK in REST mode (``aiplatform.init(api_endpoint="http://127.0.0.1:PORT", api_transport="rest")``)
sends ``/v1/{resource}`` requests with ``?$alt=json;enum-encoding=int`` and camelCase JSON bodies
(enums as integers, int64 as strings). This stub answers the calls our Vertex backend makes, keeps
enough state for multi-step flows (a second upload with ``parentModel`` becomes version 2, an endpoint
keeps its deployed models and traffic split, a schedule can be patched, paused and resumed), and records
every request so tests can assert the exact wire bodies. Long-running operations are returned already
``done``. Requests it does not know get a 404 in Google's error format, so a test that drifts from the
real API fails loudly instead of passing by accident.

Also answers ``GET /storage/v1/b/{bucket}`` (point ``STORAGE_EMULATOR_HOST`` here): ``PipelineJob.submit``
checks that the pipeline root's bucket exists before it creates the job.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator
from contextlib import contextmanager
from urllib.parse import parse_qs, unquote, urlsplit

API = "type.googleapis.com/google.cloud.aiplatform.v1."
_LOCATION = r"projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)"


@dataclass
class Request:
    """One request as the stub saw it: the resource path without ``/v1/``, query and JSON body."""

    method: str
    path: str
    query: dict[str, str]
    body: dict[str, Any] | None


class ApiError(Exception):
    """Answered as ``{"error": {code, message, status}}``, which google.api_core maps to its exceptions."""

    def __init__(self, code: HTTPStatus, message: str):
        super().__init__(message)
        self.code = code


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _display_name_filter(query: dict[str, str]) -> str | None:
    """The display name in ``filter=display_name="x"`` (the only filter our code sends), or None."""
    text = query.get("filter")
    if not text:
        return None
    match = re.fullmatch(r'\s*(?:display_name|displayName)\s*=\s*"?([^"]*)"?\s*', text)
    if not match:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"stub understands only display_name filters, got {text!r}")
    return match.group(1)


#: ``classification_metrics_1.0.0.yaml``: its fields, at each level (Vertex validates imports against it).
_CLASSIFICATION_FIELDS = {"auPrc", "auRoc", "logLoss", "confidenceMetrics", "confusionMatrix"}
_CONFIDENCE_FIELDS = {"confidenceThreshold", "maxPredictions", "recall", "precision", "falsePositiveRate", "f1Score",
                      "recallAt1", "precisionAt1", "falsePositiveRateAt1", "f1ScoreAt1", "truePositiveCount",
                      "falsePositiveCount", "falseNegativeCount", "trueNegativeCount", "confusionMatrix"}
_CONFUSION_FIELDS = {"annotationSpecs", "rows"}


def _check_classification_metrics(metrics: dict) -> None:
    """Refuse metrics the schema does not define, naming them, as Vertex's validation does."""
    def unknown(found: dict, allowed: set[str], where: str) -> None:
        extra = sorted(set(found) - allowed)
        if extra:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"{where} has fields not in classification_metrics_1.0.0.yaml: "
                                                   f"{extra}")

    unknown(metrics, _CLASSIFICATION_FIELDS, "metrics")
    for i, entry in enumerate(metrics.get("confidenceMetrics") or []):
        unknown(entry, _CONFIDENCE_FIELDS, f"metrics.confidenceMetrics[{i}]")
    if "confusionMatrix" in metrics:
        unknown(metrics["confusionMatrix"], _CONFUSION_FIELDS, "metrics.confusionMatrix")


def _camel(snake: str) -> str:
    head, *rest = snake.split("_")
    return head + "".join(part.title() for part in rest)


@dataclass
class VertexState:
    """Resources by full name. Models keep their versions in upload order."""

    models: dict[str, list[dict]] = field(default_factory=dict)
    evaluations: dict[str, list[dict]] = field(default_factory=dict)  # versioned model name -> evaluations
    endpoints: dict[str, dict] = field(default_factory=dict)
    pipeline_jobs: dict[str, dict] = field(default_factory=dict)
    schedules: dict[str, dict] = field(default_factory=dict)
    operations: dict[str, dict] = field(default_factory=dict)
    batch_prediction_jobs: dict[str, dict] = field(default_factory=dict)


class VertexRestStub:
    """The routing table and state; :func:`running_vertex_stub` serves it over HTTP."""

    def __init__(self, project_number: str = "123456789012") -> None:
        #: Owner of every bucket the storage endpoint reports (the SDK checks bucket ownership).
        self.project_number = project_number
        self.state = VertexState()
        self.requests: list[Request] = []
        self._ids = itertools.count(1000)
        self._lock = threading.Lock()
        self._routes: list[tuple[str, re.Pattern, Callable[..., Any]]] = []
        self._failures: list[tuple[str, re.Pattern]] = []
        route = self._route
        route("POST", _LOCATION + r"/models:upload", self._upload_model)
        route("GET", _LOCATION + r"/models", self._list_models)
        route("GET", _LOCATION + r"/models/(?P<model>[^/:@]+)(?:@(?P<version>[^/:]+))?", self._get_model)
        route("GET", _LOCATION + r"/models/(?P<model>[^/:@]+):listVersions", self._list_versions)
        route("POST", _LOCATION + r"/models/(?P<model>[^/:@]+)@(?P<version>[^/:]+):mergeVersionAliases",
              self._merge_version_aliases)
        route("POST", _LOCATION + r"/models/(?P<model>[^/:@]+)(?:@(?P<version>[^/:]+))?/evaluations:import",
              self._import_evaluation)
        route("GET", _LOCATION + r"/models/(?P<model>[^/:@]+)(?:@(?P<version>[^/:]+))?/evaluations",
              self._list_evaluations)
        route("GET", _LOCATION + r"/models/(?P<model>[^/:@]+)(?:@[^/:]+)?/evaluations/(?P<evaluation>[^/:]+)",
              self._get_evaluation)
        route("POST", _LOCATION + r"/endpoints", self._create_endpoint)
        route("GET", _LOCATION + r"/endpoints", self._list_endpoints)
        route("GET", _LOCATION + r"/endpoints/(?P<endpoint>[^/:]+)", self._get_endpoint)
        route("POST", _LOCATION + r"/endpoints/(?P<endpoint>[^/:]+):deployModel", self._deploy_model)
        route("POST", _LOCATION + r"/endpoints/(?P<endpoint>[^/:]+):undeployModel", self._undeploy_model)
        route("POST", _LOCATION + r"/pipelineJobs", self._create_pipeline_job)
        route("GET", _LOCATION + r"/pipelineJobs/(?P<job>[^/:]+)", self._get_pipeline_job)
        route("POST", _LOCATION + r"/schedules", self._create_schedule)
        route("GET", _LOCATION + r"/schedules", self._list_schedules)
        route("GET", _LOCATION + r"/schedules/(?P<schedule>[^/:]+)", self._get_schedule)
        route("PATCH", _LOCATION + r"/schedules/(?P<schedule>[^/:]+)", self._patch_schedule)
        route("POST", _LOCATION + r"/schedules/(?P<schedule>[^/:]+):pause", self._pause_schedule)
        route("POST", _LOCATION + r"/schedules/(?P<schedule>[^/:]+):resume", self._resume_schedule)
        route("POST", _LOCATION + r"/batchPredictionJobs", self._create_batch_prediction_job)
        route("GET", _LOCATION + r"/batchPredictionJobs/(?P<job>[^/:]+)", self._get_batch_prediction_job)
        route("GET", _LOCATION + r"/operations/(?P<operation>[^/:]+)", self._get_operation)

    # ------------------------------------------------------------------ plumbing
    def _route(self, method: str, pattern: str, handler: Callable[..., Any]) -> None:
        self._routes.append((method, re.compile(pattern), handler))

    def handle(self, method: str, raw_path: str, body: bytes) -> tuple[int, dict]:
        """Record the request, dispatch it and return (status, JSON answer)."""
        url = urlsplit(raw_path)
        query = {key: values[-1] for key, values in parse_qs(url.query, keep_blank_values=True).items()}
        try:
            payload = json.loads(body) if body else None
        except json.JSONDecodeError as err:
            return self._error(ApiError(HTTPStatus.BAD_REQUEST, f"body is not JSON: {err}"))
        with self._lock:
            if url.path.startswith("/storage/v1/b/"):
                self.requests.append(Request(method, url.path, query, payload))
                return 200, {"kind": "storage#bucket", "name": url.path.split("/")[4],
                             "projectNumber": self.project_number}
            match = re.fullmatch(r"/v1/(.+)", unquote(url.path))
            path = match.group(1) if match else unquote(url.path)
            self.requests.append(Request(method, path, query, payload))
            try:
                for i, (fail_method, fail_pattern) in enumerate(self._failures):
                    if fail_method == method and fail_pattern.search(path):
                        del self._failures[i]
                        raise ApiError(HTTPStatus.BAD_REQUEST, f"injected failure of {method} {path}")
                for route_method, pattern, handler in self._routes:
                    found = pattern.fullmatch(path)
                    if found and route_method == method:
                        return 200, handler(query=query, body=payload or {}, **found.groupdict())
                raise ApiError(HTTPStatus.NOT_FOUND, f"stub has no route for {method} {url.path}")
            except ApiError as err:
                return self._error(err)

    @staticmethod
    def _error(err: ApiError) -> tuple[int, dict]:
        return err.code.value, {"error": {"code": err.code.value, "message": str(err),
                                          "status": err.code.name if err.code != HTTPStatus.BAD_REQUEST
                                          else "INVALID_ARGUMENT"}}

    def _new_id(self) -> str:
        return str(next(self._ids))

    def _operation(self, parent: str, response: dict, response_type: str) -> dict:
        name = f"{parent}/operations/{self._new_id()}"
        operation = {"name": name, "done": True, "response": {"@type": API + response_type, **response}}
        self.state.operations[name] = operation
        return operation

    def fail_next(self, method: str, pattern: str) -> None:
        """Answer the next request matching ``method`` and ``pattern`` (re.search on the path) with a
        400 ``injected failure``, without acting on it: a deploy that fails, for instance."""
        with self._lock:
            self._failures.append((method, re.compile(pattern)))

    def requests_to(self, method: str, pattern: str) -> list[Request]:
        """Recorded requests whose method matches and whose path matches ``pattern`` (re.search)."""
        return [r for r in self.requests if r.method == method and re.search(pattern, r.path)]

    # ------------------------------------------------------------------ models
    def _model_versions(self, project: str, location: str, model: str) -> list[dict]:
        name = f"projects/{project}/locations/{location}/models/{model}"
        if name not in self.state.models:
            raise ApiError(HTTPStatus.NOT_FOUND, f"Model {name} not found")
        return self.state.models[name]

    def _version(self, project: str, location: str, model: str, version: str | None) -> dict:
        versions = self._model_versions(project, location, model)
        wanted = version or "default"
        for candidate in versions:
            if wanted == candidate["versionId"] or wanted in candidate.get("versionAliases", []):
                return candidate
        raise ApiError(HTTPStatus.NOT_FOUND, f"Model {model} has no version or alias {wanted!r}")

    def _upload_model(self, project, location, query, body):
        model = copy.deepcopy(body.get("model") or {})
        if not model.get("displayName"):
            raise ApiError(HTTPStatus.BAD_REQUEST, "model.display_name is required")
        parent = body.get("parentModel")
        if parent:
            if parent not in self.state.models:
                raise ApiError(HTTPStatus.NOT_FOUND, f"parent model {parent} not found")
            name, versions = parent, self.state.models[parent]
        else:
            name = f"projects/{project}/locations/{location}/models/{body.get('modelId') or self._new_id()}"
            versions = self.state.models.setdefault(name, [])
        aliases = list(model.get("versionAliases", []))
        if not versions and "default" not in aliases:
            aliases.append("default")  # Vertex: a model's first version is its default
        if "default" in aliases:
            for other in versions:
                other["versionAliases"] = [a for a in other.get("versionAliases", []) if a != "default"]
        version_id = str(len(versions) + 1)
        now = _now()
        # Output-only fields Vertex fills for an uploaded custom model; the SDK reads
        # supportedDeploymentResourcesTypes to decide whether machine_type etc. are sent at deploy.
        model.update(name=name, versionId=version_id, versionAliases=aliases, createTime=now, updateTime=now,
                     versionCreateTime=now, versionUpdateTime=now,
                     supportedDeploymentResourcesTypes=["DEDICATED_RESOURCES"])
        versions.append(model)
        return self._operation(f"projects/{project}/locations/{location}/models/{name.rsplit('/', 1)[1]}",
                               {"model": name, "modelVersionId": version_id}, "UploadModelResponse")

    def _list_models(self, project, location, query, body):
        wanted = _display_name_filter(query)
        prefix = f"projects/{project}/locations/{location}/models/"
        found = []
        for name, versions in self.state.models.items():
            default = next(v for v in versions if "default" in v.get("versionAliases", []))
            if name.startswith(prefix) and wanted in (None, default["displayName"]):
                found.append(default)
        return {"models": found}

    def _get_model(self, project, location, model, version, query, body):
        return self._version(project, location, model, version)

    def _list_versions(self, project, location, model, query, body):
        return {"models": self._model_versions(project, location, model)}

    def _merge_version_aliases(self, project, location, model, version, query, body):
        """Vertex: an added alias moves from the version that had it; ``-alias`` removes one; the
        ``default`` alias can only be moved."""
        target = self._version(project, location, model, version)
        changes = body.get("versionAliases") or []
        if not changes:
            raise ApiError(HTTPStatus.BAD_REQUEST, "version_aliases must not be empty")
        if "-default" in changes:
            raise ApiError(HTTPStatus.BAD_REQUEST, "the default alias cannot be removed")
        for alias in changes:
            if alias.startswith("-"):
                target["versionAliases"] = [a for a in target.get("versionAliases", []) if a != alias[1:]]
                continue
            for other in self._model_versions(project, location, model):
                other["versionAliases"] = [a for a in other.get("versionAliases", []) if a != alias]
            target.setdefault("versionAliases", []).append(alias)
        target["versionUpdateTime"] = _now()
        return target

    def _versioned_name(self, project, location, model, version) -> str:
        resolved = self._version(project, location, model, version)
        return f"{resolved['name']}@{resolved['versionId']}"

    def _import_evaluation(self, project, location, model, version, query, body):
        evaluation = copy.deepcopy(body.get("modelEvaluation") or {})
        if not evaluation.get("metricsSchemaUri"):
            raise ApiError(HTTPStatus.BAD_REQUEST, "model_evaluation.metrics_schema_uri is required")
        if evaluation["metricsSchemaUri"].endswith("/classification_metrics_1.0.0.yaml"):
            _check_classification_metrics(evaluation.get("metrics") or {})
        key = self._versioned_name(project, location, model, version)
        evaluation.update(name=f"projects/{project}/locations/{location}/models/{model}/evaluations/{self._new_id()}",
                          createTime=_now())
        self.state.evaluations.setdefault(key, []).append(evaluation)
        return evaluation

    def _list_evaluations(self, project, location, model, version, query, body):
        key = self._versioned_name(project, location, model, version)
        return {"modelEvaluations": list(reversed(self.state.evaluations.get(key, [])))}

    def _get_evaluation(self, project, location, model, evaluation, query, body):
        for evaluations in self.state.evaluations.values():
            for candidate in evaluations:
                if candidate["name"].endswith(f"/models/{model}/evaluations/{evaluation}"):
                    return candidate
        raise ApiError(HTTPStatus.NOT_FOUND, f"evaluation {evaluation} of model {model} not found")

    # ------------------------------------------------------------------ endpoints
    def _endpoint(self, project, location, endpoint) -> dict:
        name = f"projects/{project}/locations/{location}/endpoints/{endpoint}"
        if name not in self.state.endpoints:
            raise ApiError(HTTPStatus.NOT_FOUND, f"Endpoint {name} not found")
        return self.state.endpoints[name]

    def _create_endpoint(self, project, location, query, body):
        if not body.get("displayName"):
            raise ApiError(HTTPStatus.BAD_REQUEST, "endpoint.display_name is required")
        name = f"projects/{project}/locations/{location}/endpoints/{query.get('endpointId') or self._new_id()}"
        endpoint = {**copy.deepcopy(body), "name": name, "createTime": _now(), "updateTime": _now(),
                    "deployedModels": [], "trafficSplit": {}}
        self.state.endpoints[name] = endpoint
        return self._operation(name, endpoint, "Endpoint")

    def _list_endpoints(self, project, location, query, body):
        wanted = _display_name_filter(query)
        prefix = f"projects/{project}/locations/{location}/endpoints/"
        return {"endpoints": [e for n, e in self.state.endpoints.items()
                              if n.startswith(prefix) and wanted in (None, e["displayName"])]}

    def _get_endpoint(self, project, location, endpoint, query, body):
        return self._endpoint(project, location, endpoint)

    def _deploy_model(self, project, location, endpoint, query, body):
        target = self._endpoint(project, location, endpoint)
        deployed = copy.deepcopy(body.get("deployedModel") or {})
        model_name, _, version = deployed.get("model", "").partition("@")
        match = re.fullmatch(_LOCATION + r"/models/(?P<model>[^/@]+)", model_name)
        if not match:
            raise ApiError(HTTPStatus.BAD_REQUEST,
                           f"deployed_model.model is not a model name: {deployed.get('model')!r}")
        resolved = self._version(match["project"], match["location"], match["model"], version or None)
        deployed.update(id=self._new_id(), model=model_name, modelVersionId=resolved["versionId"],
                        createTime=_now())
        split = body.get("trafficSplit")
        if split:
            if sum(split.values()) != 100:
                raise ApiError(HTTPStatus.BAD_REQUEST, f"traffic_split must sum to 100, got {split}")
            target["trafficSplit"] = {deployed["id"] if key == "0" else key: value for key, value in split.items()}
        target["deployedModels"].append(deployed)
        return self._operation(target["name"], {"deployedModel": deployed}, "DeployModelResponse")

    def _undeploy_model(self, project, location, endpoint, query, body):
        target = self._endpoint(project, location, endpoint)
        deployed_id = body.get("deployedModelId")
        if deployed_id not in {d["id"] for d in target["deployedModels"]}:
            raise ApiError(HTTPStatus.NOT_FOUND, f"deployed model {deployed_id} not on {target['name']}")
        split = body.get("trafficSplit") or target["trafficSplit"]
        remaining = [d for d in target["deployedModels"] if d["id"] != deployed_id]
        if remaining and split.get(deployed_id, 0) > 0:
            raise ApiError(HTTPStatus.PRECONDITION_FAILED,
                           f"deployed model {deployed_id} still has {split[deployed_id]}% of the traffic")
        target["deployedModels"] = remaining
        target["trafficSplit"] = {k: v for k, v in split.items() if k != deployed_id} if remaining else {}
        return self._operation(target["name"], {}, "UndeployModelResponse")

    # ------------------------------------------------------------------ batch prediction
    def _create_batch_prediction_job(self, project, location, query, body):
        """Checks what Vertex checks at creation (the model version exists, formats, URIs, replicas);
        the job is created PENDING and has SUCCEEDED when next read, with Vertex's output directory."""
        job = copy.deepcopy(body)
        if not job.get("displayName"):
            raise ApiError(HTTPStatus.BAD_REQUEST, "batch_prediction_job.display_name is required")
        model_name, _, version = job.get("model", "").partition("@")
        match = re.fullmatch(_LOCATION + r"/models/(?P<model>[^/@]+)", model_name)
        if not match:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"batch_prediction_job.model is not a model: {job.get('model')!r}")
        resolved = self._version(match["project"], match["location"], match["model"], version or None)
        inputs, outputs = job.get("inputConfig") or {}, job.get("outputConfig") or {}
        if inputs.get("instancesFormat") not in ("jsonl", "csv", "tf-record", "tf-record-gzip", "file-list",
                                                 "bigquery"):
            raise ApiError(HTTPStatus.BAD_REQUEST, f"unsupported instances_format {inputs.get('instancesFormat')!r}")
        uris = (inputs.get("gcsSource") or {}).get("uris") or []
        if not uris or not all(u.startswith("gs://") for u in uris):
            raise ApiError(HTTPStatus.BAD_REQUEST, f"input_config.gcs_source.uris must be gs:// URIs, got {uris}")
        prefix = (outputs.get("gcsDestination") or {}).get("outputUriPrefix", "")
        if not prefix.startswith("gs://"):
            raise ApiError(HTTPStatus.BAD_REQUEST, f"output_uri_prefix must be a gs:// URI, got {prefix!r}")
        resources = job.get("dedicatedResources") or {}
        if "DEDICATED_RESOURCES" in resolved.get("supportedDeploymentResourcesTypes", []) and not resources:
            raise ApiError(HTTPStatus.BAD_REQUEST, "this model needs dedicated_resources (machine_spec, replicas)")
        start, most = resources.get("startingReplicaCount", 1), resources.get("maxReplicaCount", 1)
        if not 1 <= int(start) <= int(most):
            raise ApiError(HTTPStatus.BAD_REQUEST, f"need 1 <= starting_replica_count ({start}) <= "
                                                   f"max_replica_count ({most})")
        name = f"projects/{project}/locations/{location}/batchPredictionJobs/{self._new_id()}"
        job.update(name=name, model=model_name, modelVersionId=resolved["versionId"], state="JOB_STATE_PENDING",
                   createTime=_now(), updateTime=_now())
        self.state.batch_prediction_jobs[name] = job
        return job

    def _get_batch_prediction_job(self, project, location, job, query, body):
        name = f"projects/{project}/locations/{location}/batchPredictionJobs/{job}"
        if name not in self.state.batch_prediction_jobs:
            raise ApiError(HTTPStatus.NOT_FOUND, f"BatchPredictionJob {name} not found")
        found = self.state.batch_prediction_jobs[name]
        if found["state"] == "JOB_STATE_PENDING":
            model = self._version(*re.fullmatch(_LOCATION + r"/models/(?P<m>[^/@]+)", found["model"]).groups(),
                                  found["modelVersionId"])
            stamp = datetime.now(timezone.utc).strftime("%Y_%m_%dT%H_%M_%S_%fZ")[:-4] + "Z"
            prefix = found["outputConfig"]["gcsDestination"]["outputUriPrefix"].rstrip("/")
            found.update(state="JOB_STATE_SUCCEEDED", startTime=_now(), endTime=_now(), updateTime=_now(),
                         outputInfo={"gcsOutputDirectory": f"{prefix}/prediction-{model['displayName']}-{stamp}"},
                         completionStats={"successfulCount": "0", "failedCount": "0", "incompleteCount": "0"})
        return found

    # ------------------------------------------------------------------ pipelines and schedules
    def _create_pipeline_job(self, project, location, query, body):
        job_id = query.get("pipelineJobId") or self._new_id()
        name = f"projects/{project}/locations/{location}/pipelineJobs/{job_id}"
        if name in self.state.pipeline_jobs:
            raise ApiError(HTTPStatus.CONFLICT, f"PipelineJob {name} already exists")
        job = {**copy.deepcopy(body), "name": name, "state": "PIPELINE_STATE_PENDING", "createTime": _now()}
        self.state.pipeline_jobs[name] = job
        return job

    def _get_pipeline_job(self, project, location, job, query, body):
        name = f"projects/{project}/locations/{location}/pipelineJobs/{job}"
        if name not in self.state.pipeline_jobs:
            raise ApiError(HTTPStatus.NOT_FOUND, f"PipelineJob {name} not found")
        return self.state.pipeline_jobs[name]

    def _schedule(self, project, location, schedule) -> dict:
        name = f"projects/{project}/locations/{location}/schedules/{schedule}"
        if name not in self.state.schedules:
            raise ApiError(HTTPStatus.NOT_FOUND, f"Schedule {name} not found")
        return self.state.schedules[name]

    def _create_schedule(self, project, location, query, body):
        if not body.get("cron") or not body.get("createPipelineJobRequest"):
            raise ApiError(HTTPStatus.BAD_REQUEST, "schedule needs cron and create_pipeline_job_request")
        name = f"projects/{project}/locations/{location}/schedules/{self._new_id()}"
        schedule = {**copy.deepcopy(body), "name": name, "state": "ACTIVE", "createTime": _now(),
                    "updateTime": _now()}
        self.state.schedules[name] = schedule
        return schedule

    def _list_schedules(self, project, location, query, body):
        wanted = _display_name_filter(query)
        prefix = f"projects/{project}/locations/{location}/schedules/"
        return {"schedules": [s for n, s in self.state.schedules.items()
                              if n.startswith(prefix) and wanted in (None, s["displayName"])]}

    def _get_schedule(self, project, location, schedule, query, body):
        return self._schedule(project, location, schedule)

    def _patch_schedule(self, project, location, schedule, query, body):
        target = self._schedule(project, location, schedule)
        mask = [p for p in query.get("updateMask", "").split(",") if p]
        if not mask:
            raise ApiError(HTTPStatus.BAD_REQUEST, "update_mask is required")
        for path in mask:
            key = _camel(path)
            if key in ("name", "state", "createTime"):
                raise ApiError(HTTPStatus.BAD_REQUEST, f"{path} cannot be updated")
            if key in body:
                target[key] = copy.deepcopy(body[key])
        target["updateTime"] = _now()
        return target

    def _pause_schedule(self, project, location, schedule, query, body):
        target = self._schedule(project, location, schedule)
        if target["state"] != "ACTIVE":
            raise ApiError(HTTPStatus.PRECONDITION_FAILED, f"schedule is {target['state']}, not ACTIVE")
        target["state"] = "PAUSED"
        return {}

    def _resume_schedule(self, project, location, schedule, query, body):
        target = self._schedule(project, location, schedule)
        if target["state"] != "PAUSED":
            raise ApiError(HTTPStatus.PRECONDITION_FAILED, f"schedule is {target['state']}, not PAUSED")
        target["state"] = "ACTIVE"
        return {}

    def _get_operation(self, project, location, operation, query, body):
        for name, found in self.state.operations.items():
            if name.endswith(f"/operations/{operation}"):
                return found
        raise ApiError(HTTPStatus.NOT_FOUND, f"operation {operation} not found")


def _handler_for(stub: VertexRestStub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            status, payload = stub.handle(self.command, self.path, self.rfile.read(length) if length else b"")
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=UTF-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PATCH = do_DELETE = _answer

        def log_message(self, format: str, *args: Any) -> None:  # keep pytest output readable
            pass

    return Handler


@contextmanager
def running_vertex_stub() -> Iterator[tuple[str, VertexRestStub]]:
    """Serve a fresh :class:`VertexRestStub` on a free 127.0.0.1 port: yields (base URL, stub)."""
    stub = VertexRestStub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(stub))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="vertex-rest-stub", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", stub
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
