"""The Vertex AI side of the pipeline: registry, evaluations, endpoints, as plain typed functions.

Each function configures the ``google-cloud-aiplatform`` SDK itself from explicit ``project``,
``location``, ``api_endpoint`` and ``credentials`` arguments, so a component step (one process, one
call) never depends on global state set elsewhere. ``api_endpoint`` is there for private/regional
endpoints and for tests: when it is given, the SDK talks REST (``api_transport="rest"``) to it.

Why these particular behaviours:

* ``upload_model`` adds a *version* to the model that already carries the display name
  (``parent_model``), so retrains accumulate in one registry entry and the ``default`` alias says
  which version serves, as in the champion/challenger flow of vertex-pipelines-end-to-end-samples.
  The pipeline uploads *without* taking ``default`` and ``deploy_model`` moves it
  (``mergeVersionAliases``) once the new version serves: a failed deploy leaves ``default`` on the
  version that really serves, which is the one the next run's gate must beat.
* ``serving_version`` names that champion and where its exported model is, so the gate scores it
  and the challenger on the same data in the same run; stored evaluations are only a fallback.
* Its explanation metadata comes from the export step's ``explanation_metadata.json`` (the tensor
  names are read from the SavedModel, never typed by hand); a renamed tensor would otherwise only
  show up as a failed deploy 20 minutes later.
* ``import_evaluation`` stores the version's metrics as a ModelEvaluation in the keys of
  ``classification_metrics_1.0.0.yaml`` only (Vertex validates imported metrics against the schema;
  extra keys would be dropped or refused), so the console shows them; the gate's comparison rides
  in the evaluation's free-form ``metadata``.
* ``get_or_create_endpoint`` reuses the endpoint by display name: a scheduled retrain must not
  create (and pay for) one endpoint per run.
* ``deploy_model`` undeploys superseded models only once the new one is serving and carries their
  traffic, so the endpoint never has a window without a model.
"""

from __future__ import annotations

import json
import logging
import warnings
from typing import Any, Mapping, Sequence

from google.auth import credentials as auth_credentials
from google.cloud import aiplatform
from google.protobuf import json_format

from components.common import fuse_root, readable_path
from components.metrics_schema import (CLASSIFICATION_METRICS_SCHEMA, CLASSIFICATION_SCHEMA_KEYS,
                                       accuracy_from_schema_metrics, classification_schema_metrics)

_LOGGER = logging.getLogger(__name__)

#: The newest TensorFlow prediction image Vertex offers (TF 2.15); Vertex's built-in explanations need one.
from components.config import BUILTIN_EXPLANATIONS_END as BUILTIN_EXPLANATIONS_SHUTDOWN  # noqa: E402
from components.config import BUILTIN_SERVING_IMAGE as PREBUILT_TF_PREDICTION_IMAGE  # noqa: E402
BUILTIN_EXPLANATIONS_DEPRECATED = "2026-03-16"
#: Keys of the legacy AI Platform ``explanation_metadata.json`` format that Vertex's ExplanationMetadata lacks.
_LEGACY_METADATA_KEYS = ("framework", "tags")
_VISUALIZATION_ENUMS = {"type", "polarity", "color_map", "colorMap", "overlay_type", "overlayType"}


class VertexConfigError(RuntimeError):
    """Vertex AI cannot be used as configured (no project, no credentials, bad setting)."""


def warn_builtin_explanations() -> None:
    """Warn that Vertex's built-in explanations (explanation spec at upload) are being retired."""
    warnings.warn(
        f"Vertex Explainable AI is deprecated since {BUILTIN_EXPLANATIONS_DEPRECATED} and stops working on "
        f"{BUILTIN_EXPLANATIONS_SHUTDOWN}; deploy with the project's serving container (explanations carried "
        f"in predictions) instead.", FutureWarning, stacklevel=2)


def check_vertex_ready(project: str | None, location: str | None,
                       credentials: auth_credentials.Credentials | None = None) -> None:
    """Fail fast, in one sentence, before anything is compiled or uploaded, when Vertex cannot be reached
    as configured: no project, no region, or no Application Default Credentials."""
    if not project:
        raise VertexConfigError("No Google Cloud project is configured: set gcp.project in configs/vertex.yaml "
                                "or pass --set gcp.project=YOUR_PROJECT.")
    if not location:
        raise VertexConfigError("No Vertex AI region is configured: set gcp.region in configs/vertex.yaml "
                                "(for example us-central1).")
    if credentials is not None:
        return
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    try:
        google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
    except DefaultCredentialsError as err:
        raise VertexConfigError(
            "No Google Cloud credentials found: run `gcloud auth application-default login` or set "
            "GOOGLE_APPLICATION_CREDENTIALS to a service-account key file.") from err


def init_sdk(project: str, location: str, api_endpoint: str | None = None,
             credentials: auth_credentials.Credentials | None = None) -> None:
    """Point the SDK at ``project``/``location`` (and ``api_endpoint`` over REST, when given)."""
    aiplatform.init(project=project, location=location, api_endpoint=api_endpoint,
                    api_transport="rest" if api_endpoint else None, credentials=credentials)


def _by_display_name(resource_cls: type, kind: str, display_name: str, project: str, location: str) -> Any:
    """The one resource of ``resource_cls`` named ``display_name``, or None; several is an error, since
    a retrain could not tell which to extend."""
    found = resource_cls.list(filter=f'display_name="{display_name}"', order_by="create_time desc")
    if len(found) > 1:
        names = ", ".join(r.resource_name for r in found)
        raise VertexConfigError(f"{len(found)} {kind}s are named {display_name!r} in {project}/{location} "
                                f"({names}); keep one, so retrains reuse it.")
    return found[0] if found else None


# ---------------------------------------------------------------------------------------- registry
def find_model(display_name: str, *, project: str, location: str, api_endpoint: str | None = None,
               credentials: auth_credentials.Credentials | None = None) -> aiplatform.Model | None:
    """The registry model named ``display_name`` (its default version), or None when there is none."""
    init_sdk(project, location, api_endpoint, credentials)
    return _by_display_name(aiplatform.Model, "model", display_name, project, location)


def serving_version(display_name: str, *, project: str, location: str, api_endpoint: str | None = None,
                    credentials: auth_credentials.Credentials | None = None) -> dict[str, str] | None:
    """The champion: the ``default`` version of the model called ``display_name`` (the one that
    serves), as ``{"versioned_resource_name", "version_id", "artifact_uri"}``; None if no model has
    that name."""
    model = find_model(display_name, project=project, location=location, api_endpoint=api_endpoint,
                       credentials=credentials)
    if model is None:
        return None
    serving = aiplatform.Model(model.resource_name, version="default")
    return {"versioned_resource_name": serving.versioned_resource_name, "version_id": serving.version_id,
            "artifact_uri": serving.uri or ""}


def serving_metrics(display_name: str, *, project: str, location: str, api_endpoint: str | None = None,
                    credentials: auth_credentials.Credentials | None = None) -> dict | None:
    """The stored metrics of the version currently serving (alias ``default``), from its newest
    imported ModelEvaluation, in the schema's keys; None when there is no such model or it has no
    evaluation. The gate reads them only when the champion's model cannot be scored."""
    model = find_model(display_name, project=project, location=location, api_endpoint=api_endpoint,
                       credentials=credentials)
    if model is None:
        return None
    serving = aiplatform.Model(model.resource_name, version="default")
    evaluations = serving.list_model_evaluations()
    if not evaluations:
        _LOGGER.info("%s@default (version %s) has no model evaluation", model.resource_name, serving.version_id)
        return None
    newest = max(evaluations, key=lambda e: e.create_time.timestamp() if e.create_time else 0.0)
    return json_format.MessageToDict(newest._gca_resource._pb).get("metrics", {})


def set_default_version(model_resource_name_with_version: str, *, project: str, location: str,
                        api_endpoint: str | None = None,
                        credentials: auth_credentials.Credentials | None = None) -> None:
    """Move the ``default`` alias to one version (``mergeVersionAliases``; Vertex takes it from the
    version that had it). Called once that version serves."""
    base, sep, version = model_resource_name_with_version.partition("@")
    if not sep or not version:
        raise ValueError(f"set_default_version needs …/models/ID@VERSION, got {model_resource_name_with_version!r}")
    init_sdk(project, location, api_endpoint, credentials)
    registry = aiplatform.models.ModelRegistry(base, location=location, project=project, credentials=credentials)
    registry.add_version_aliases(["default"], version=version)


def explanation_metadata_from_dict(metadata: Mapping[str, Any]) -> aiplatform.explain.ExplanationMetadata:
    """``explanation_metadata.json`` (snake_case or camelCase) as the SDK's ExplanationMetadata.

    The legacy ``framework`` key is dropped (Vertex infers it from the container); any other unknown
    key is an error naming it, so a typo does not silently turn into a model without visualization.
    """
    clean = {k: v for k, v in metadata.items() if k not in _LEGACY_METADATA_KEYS}
    clean["inputs"] = {name: _upper_enums(spec) for name, spec in (clean.get("inputs") or {}).items()}
    try:
        return aiplatform.explain.ExplanationMetadata.from_json(json.dumps(clean))
    except json_format.ParseError as err:
        raise ValueError(f"explanation metadata is not a valid Vertex ExplanationMetadata: {err}") from err


def _upper_enums(input_metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Enum values upper-cased (``"pixels"`` -> ``"PIXELS"``): the guide and our configs write them in
    lower case, protobuf's JSON parser accepts only the enum names."""
    out = dict(input_metadata)
    if isinstance(out.get("encoding"), str):
        out["encoding"] = out["encoding"].upper()
    if isinstance(out.get("visualization"), Mapping):
        out["visualization"] = {key: value.upper() if key in _VISUALIZATION_ENUMS and isinstance(value, str)
                                else value for key, value in out["visualization"].items()}
    return out


def explanation_parameters_from_dict(parameters: Mapping[str, Any]) -> aiplatform.explain.ExplanationParameters:
    """Vertex ``ExplanationParameters`` from the config's dict, validated and stripped of this project's
    extension keys (quadrature, seed, ...) by :func:`explain.parameters.vertex_parameters`."""
    from explain.parameters import vertex_parameters

    try:
        return aiplatform.explain.ExplanationParameters.from_json(json.dumps(vertex_parameters(parameters)))
    except json_format.ParseError as err:
        raise ValueError(f"explanation parameters are not valid Vertex ExplanationParameters: {err}") from err


def gcs_uri(path: str) -> str:
    """``path`` as a gs:// URI: Vertex Pipelines hands components artifacts as ``/gcs/BUCKET/...``
    (Cloud Storage FUSE) while the registry needs ``gs://BUCKET/...``; a local path is an error, since
    Vertex could not read it."""
    if path.startswith("gs://"):
        return path
    for root in dict.fromkeys(["/gcs", fuse_root()]):
        if path.startswith(root + "/"):
            return "gs://" + path[len(root) + 1:]
    raise ValueError(f"artifact_uri must be a gs:// (or /gcs/) path of the exported SavedModel, got {path!r}")


def upload_model(display_name: str, artifact_uri: str, explanation_metadata: dict | None,
                 explanation_parameters: dict | None, serving_container_image_uri: str,
                 labels: dict[str, str] | None = None, version_aliases: Sequence[str] = (),
                 is_default_version: bool = True, serving_container_env: dict[str, str] | None = None,
                 description: str | None = None, *, project: str, location: str,
                 api_endpoint: str | None = None, credentials: auth_credentials.Credentials | None = None,
                 serving_container_predict_route: str | None = None,
                 serving_container_health_route: str | None = None,
                 serving_container_ports: Sequence[int] | None = None) -> dict[str, str]:
    """Upload the exported SavedModel at ``artifact_uri`` (gs://, or /gcs/ inside a pipeline) to the registry.

    When a model named ``display_name`` exists, this becomes its next version (``parent_model``), unless
    one of its versions already holds ``artifact_uri`` (a retried step), which is returned instead;
    ``is_default_version`` moves the ``default`` alias to it. With ``explanation_metadata`` (the export
    step's ``explanation_metadata.json``) the model gets Vertex's built-in explanation spec, which is
    being retired (a warning says so); with None it is uploaded without one, for the project's own
    serving container that returns explanations in its predictions.

    Returns ``{"resource_name", "version_id", "display_name", "versioned_resource_name"}``.
    """
    artifact_uri = gcs_uri(artifact_uri)
    spec: dict[str, Any] = {}
    if explanation_metadata is not None:
        if not explanation_parameters:
            raise ValueError("explanation_parameters are required with explanation_metadata "
                             "(e.g. {'integrated_gradients_attribution': {'step_count': 50}})")
        warn_builtin_explanations()
        spec = {"explanation_metadata": explanation_metadata_from_dict(explanation_metadata),
                "explanation_parameters": explanation_parameters_from_dict(explanation_parameters)}
    parent = find_model(display_name, project=project, location=location, api_endpoint=api_endpoint,
                        credentials=credentials)
    if parent is not None:
        for version in parent.api_client.list_model_versions(name=parent.resource_name):
            if version.artifact_uri.rstrip("/") == artifact_uri.rstrip("/"):  # a retried step: done already
                _LOGGER.info("%s@%s already holds %s", parent.resource_name, version.version_id, artifact_uri)
                return {"resource_name": parent.resource_name, "version_id": version.version_id,
                        "display_name": display_name,
                        "versioned_resource_name": f"{parent.resource_name}@{version.version_id}"}
        _LOGGER.info("adding a version to %s (default version %s)", parent.resource_name, parent.version_id)
    model = aiplatform.Model.upload(
        display_name=display_name,
        artifact_uri=artifact_uri,
        serving_container_image_uri=serving_container_image_uri,
        serving_container_environment_variables=dict(serving_container_env) if serving_container_env else None,
        serving_container_predict_route=serving_container_predict_route,
        serving_container_health_route=serving_container_health_route,
        serving_container_ports=list(serving_container_ports) if serving_container_ports else None,
        parent_model=parent.resource_name if parent is not None else None,
        is_default_version=is_default_version,
        version_aliases=list(version_aliases) or None,  # a copy: the SDK appends "default" in place
        labels=dict(labels) if labels else None,
        description=description,
        sync=True,
        **spec,
    )
    return {"resource_name": model.resource_name, "version_id": model.version_id,
            "display_name": model.display_name, "versioned_resource_name": model.versioned_resource_name}


def import_evaluation(model_resource_name_with_version: str, metrics: Mapping[str, Any], *, project: str,
                      location: str, display_name: str = "pipeline evaluation",
                      metadata: Mapping[str, Any] | None = None, api_endpoint: str | None = None,
                      credentials: auth_credentials.Credentials | None = None) -> str:
    """Import ``metrics`` as the ModelEvaluation of one model version (``.../models/ID@VERSION``), so
    later runs can compare against it. Returns the evaluation's resource name."""
    if "@" not in model_resource_name_with_version:
        raise ValueError(f"import_evaluation needs a versioned model name (…/models/ID@VERSION), got "
                         f"{model_resource_name_with_version!r}: otherwise the default version would get it")
    init_sdk(project, location, api_endpoint, credentials)
    from google.cloud.aiplatform.compat.types import model_evaluation as gca_model_evaluation

    model = aiplatform.Model(model_resource_name_with_version)  # 404s here, clearly, if the version is gone
    evaluation = gca_model_evaluation.ModelEvaluation(display_name=display_name,
                                                      metrics_schema_uri=CLASSIFICATION_METRICS_SCHEMA)
    fields: dict[str, Any] = {"metrics": classification_schema_metrics(metrics)}
    if metadata:
        fields["metadata"] = dict(metadata)
    json_format.ParseDict(fields, evaluation._pb)
    response = model.api_client.import_model_evaluation(parent=model.versioned_resource_name,
                                                        model_evaluation=evaluation)
    _LOGGER.info("imported evaluation %s for %s", response.name, model.versioned_resource_name)
    return response.name


# ---------------------------------------------------------------------------------------- endpoints
def get_or_create_endpoint(display_name: str, *, project: str, location: str, api_endpoint: str | None = None,
                           credentials: auth_credentials.Credentials | None = None,
                           labels: dict[str, str] | None = None,
                           encryption_spec_key_name: str | None = None) -> aiplatform.Endpoint:
    """The endpoint named ``display_name``, created only when none exists (scheduled runs reuse it)."""
    init_sdk(project, location, api_endpoint, credentials)
    endpoint = _by_display_name(aiplatform.Endpoint, "endpoint", display_name, project, location)
    if endpoint is not None:
        _LOGGER.info("reusing endpoint %s", endpoint.resource_name)
        return endpoint
    return aiplatform.Endpoint.create(display_name=display_name, labels=dict(labels) if labels else None,
                                      encryption_spec_key_name=encryption_spec_key_name, sync=True)


def deploy_model(model_resource_name: str, endpoint_display_name: str, machine_type: str,
                 min_replica_count: int = 1, max_replica_count: int = 1, traffic_percentage: int = 100,
                 accelerator_type: str | None = None, accelerator_count: int = 0,
                 service_account: str | None = None, undeploy_previous: bool = True, *, project: str,
                 location: str, api_endpoint: str | None = None,
                 credentials: auth_credentials.Credentials | None = None,
                 deployed_model_display_name: str | None = None, champion: str | None = None) -> dict[str, Any]:
    """Deploy a model version (``.../models/ID@VERSION``, or the default version without ``@``) to the
    endpoint named ``endpoint_display_name`` (reused, or created), giving it ``traffic_percentage``.

    Once the deploy operation is done (Vertex returns only when the new model serves) and the version
    has all the traffic, the ``default`` alias moves to it (``set_default_version``), then deployed
    models left with no traffic are undeployed when ``undeploy_previous``; a canary below 100% keeps
    the versions that still carry traffic, and ``default`` where it was. A version already deployed
    on the endpoint is not deployed again (a retried step finishes the job instead).
    With ``champion`` (the version the gate compared with, "" for none), the deploy is refused if the
    champion changed (``serving.registry.check_champion``). Vertex has no lock to hold over the
    deploy, so the check is made before it starts: two deploys that overlap (minutes each) both pass.
    Returns ``{"endpoint", "deployed_model_id", "undeployed", "reused"}``.
    """
    if not 0 <= traffic_percentage <= 100:
        raise ValueError(f"traffic_percentage must be within 0..100, got {traffic_percentage}")
    if min_replica_count < 1 or max_replica_count < min_replica_count:
        raise ValueError(f"replica counts must satisfy 1 <= min ({min_replica_count}) <= max ({max_replica_count})")
    endpoint = get_or_create_endpoint(endpoint_display_name, project=project, location=location,
                                      api_endpoint=api_endpoint, credentials=credentials)
    model = aiplatform.Model(model_resource_name)
    deployed_before = endpoint.list_models()
    if champion is not None:
        from serving.registry import check_champion

        default = aiplatform.Model(model.resource_name, version="default")
        check_champion(f"{model.resource_name}@{model.version_id}", champion,
                       f"{default.resource_name}@{default.version_id}",
                       [f"{d.model}@{d.model_version_id}" for d in deployed_before])
    before = {deployed.id for deployed in deployed_before}
    already = [d.id for d in deployed_before
               if d.model == model.resource_name and d.model_version_id == model.version_id]
    if not already:
        endpoint.deploy(
            model=model,
            deployed_model_display_name=deployed_model_display_name,
            traffic_percentage=traffic_percentage,
            machine_type=machine_type,
            min_replica_count=min_replica_count,
            max_replica_count=max_replica_count,
            accelerator_type=accelerator_type if accelerator_type and accelerator_count else None,
            accelerator_count=accelerator_count if accelerator_type and accelerator_count else None,
            service_account=service_account,
            sync=True,
        )
    deployed_now = endpoint.list_models()  # re-reads the endpoint
    new_ids = already or [d.id for d in deployed_now if d.id not in before]
    if len(new_ids) != 1:
        raise RuntimeError(f"expected one new deployed model on {endpoint.resource_name}, found {new_ids}")
    new_id = new_ids[0]
    if traffic_percentage == 100:  # it serves everything now: it is the champion the next run must beat
        set_default_version(f"{model.resource_name}@{model.version_id}", project=project, location=location,
                            api_endpoint=api_endpoint, credentials=credentials)
    undeployed: list[str] = []
    if undeploy_previous:
        traffic = dict(endpoint.traffic_split)
        for deployed in deployed_now:
            if deployed.id != new_id and traffic.get(deployed.id, 0) == 0:
                _LOGGER.info("undeploying superseded model %s (deployed %s) from %s",
                             deployed.model, deployed.id, endpoint.resource_name)
                endpoint.undeploy(deployed_model_id=deployed.id, sync=True)
                undeployed.append(deployed.id)
    return {"endpoint": endpoint.resource_name, "deployed_model_id": new_id, "undeployed": undeployed,
            "reused": bool(already)}


__all__ = [
    "BUILTIN_EXPLANATIONS_SHUTDOWN", "CLASSIFICATION_METRICS_SCHEMA", "PREBUILT_TF_PREDICTION_IMAGE",
    "VertexConfigError", "check_vertex_ready", "deploy_model", "explanation_metadata_from_dict",
    "explanation_parameters_from_dict", "find_model", "gcs_uri", "get_or_create_endpoint", "import_evaluation",
    "init_sdk", "readable_path", "serving_metrics", "serving_version", "set_default_version", "upload_model",
    "warn_builtin_explanations", "CLASSIFICATION_SCHEMA_KEYS", "accuracy_from_schema_metrics",
    "classification_schema_metrics",
]
