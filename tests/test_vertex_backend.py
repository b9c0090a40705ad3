"""The Vertex backend (``components.vertex``, ``pipeline.submit``, ``pipeline.schedule``) driving the real
``google-cloud-aiplatform`` SDK in REST mode against the local stub in ``tests/vertex_rest_stub.py``.

Assertions are on the exact wire bodies the SDK sends (camelCase JSON; enums as integers and int64 as
strings, because the REST transport asks for ``enum-encoding=int``). Nothing here reaches the network:
an autouse guard refuses any host name other than the loopback one, and the SDK's one call outside the
Vertex API (the Resource Manager lookup of a project number, for its pipeline-bucket ownership check)
is answered with the stub's project number.
"""

import os
import re
import subprocess
import sys

import pytest
from google.auth.credentials import AnonymousCredentials
from google.cloud import aiplatform

from components.metrics_schema import accuracy_from_schema_metrics
from components.vertex import (CLASSIFICATION_METRICS_SCHEMA, PREBUILT_TF_PREDICTION_IMAGE, VertexConfigError,
                               check_vertex_ready, deploy_model, find_model, import_evaluation, serving_metrics,
                               upload_model)
from pipeline.schedule import ScheduleNotFoundError, create_or_update_schedule, pause_schedule, resume_schedule
from pipeline.submit import submit_pipeline
from tests.conftest import VERTEX_LOCATION as LOCATION, VERTEX_PROJECT as PROJECT
from trainer.export import build_explanation_metadata, inspect_signatures, read_explanation_metadata, read_labels
from trainer.schema import CLASSES, CONCRETE_INPUT, SERVING_OUTPUT

PARENT = f"projects/{PROJECT}/locations/{LOCATION}"
VISUALIZATION = aiplatform.explain.ExplanationMetadata.InputMetadata.Visualization
IG = {"integrated_gradients_attribution": {"step_count": 32, "quadrature": "gauss_legendre"}}
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("no_network")


def _bodies(stub, method: str, pattern: str) -> list[dict]:
    return [request.body for request in stub.requests_to(method, pattern)]


# ------------------------------------------------------------------------------------- registry
def test_upload_sends_export_metadata_and_retrain_adds_a_version(vertex, exported_model_dir):
    stub, kw = vertex
    # What the export step writes, plus a visualization, built by the export module from the real signatures.
    exported = read_explanation_metadata(exported_model_dir)
    metadata = build_explanation_metadata(inspect_signatures(exported_model_dir), read_labels(exported_model_dir),
                                          visualization={"type": "pixels", "polarity": "positive",
                                                         "color_map": "pink_green", "clip_percent_upperbound": 99.9,
                                                         "overlay_type": "grayscale"})
    assert metadata["inputs"] == {name: {**spec, "visualization": metadata["inputs"][name]["visualization"]}
                                  for name, spec in exported["inputs"].items()}

    assert find_model("flowers", **kw) is None
    with pytest.warns(FutureWarning, match="2027-03-16"):
        first = upload_model("flowers", "gs://bucket/runs/1/model", metadata, IG, PREBUILT_TF_PREDICTION_IMAGE,
                             labels={"app": "flowers", "run": "r1"}, version_aliases=["run-1"],
                             is_default_version=True, description="flowers classifier", **kw)
    (body,) = _bodies(stub, "POST", r"/models:upload$")
    assert "parentModel" not in body
    model = body["model"]
    assert model["displayName"] == "flowers" and model["artifactUri"] == "gs://bucket/runs/1/model"
    assert model["containerSpec"] == {"imageUri": PREBUILT_TF_PREDICTION_IMAGE}
    assert model["labels"] == {"app": "flowers", "run": "r1"}
    assert model["versionAliases"] == ["run-1", "default"]
    assert model["explanationSpec"] == {
        "parameters": {"integratedGradientsAttribution": {"stepCount": 32}},  # our extension key stripped
        "metadata": {
            "inputs": {"image": {"inputTensorName": CONCRETE_INPUT, "modality": "image",
                                 "visualization": {"type": VISUALIZATION.Type.PIXELS.value,
                                                   "polarity": VISUALIZATION.Polarity.POSITIVE.value,
                                                   "colorMap": VISUALIZATION.ColorMap.PINK_GREEN.value,
                                                   "clipPercentUpperbound": 99.9,
                                                   "overlayType": VISUALIZATION.OverlayType.GRAYSCALE.value}}},
            "outputs": {"probabilities": {"outputTensorName": SERVING_OUTPUT,
                                          "indexDisplayNameMapping": list(CLASSES)}}}}
    assert first["version_id"] == "1" and first["display_name"] == "flowers"
    assert first["versioned_resource_name"] == first["resource_name"] + "@1"

    # Retrain, own serving container: no explanation spec, a new version of the same model.
    second = upload_model("flowers", "/gcs/bucket/runs/2/model", None, None, "europe-docker.pkg.dev/p/r/serving:2",
                          labels={"app": "flowers", "run": "r2"}, version_aliases=["run-2"], is_default_version=True,
                          serving_container_env={"EXPLANATION_PARAMETERS": '{"x": 1}'}, **kw)
    body = _bodies(stub, "POST", r"/models:upload$")[1]
    assert body["parentModel"] == first["resource_name"]
    assert "explanationSpec" not in body["model"]
    assert body["model"]["artifactUri"] == "gs://bucket/runs/2/model"  # /gcs/ FUSE path -> gs://
    assert body["model"]["containerSpec"] == {"imageUri": "europe-docker.pkg.dev/p/r/serving:2",
                                              "env": [{"name": "EXPLANATION_PARAMETERS", "value": '{"x": 1}'}]}
    assert body["model"]["versionAliases"] == ["run-2", "default"]
    assert (second["resource_name"], second["version_id"]) == (first["resource_name"], "2")

    # The same artifact again (a retried step) is the version that already holds it: no second upload.
    again = upload_model("flowers", "gs://bucket/runs/2/model/", None, None, "img", **kw)
    assert again == second and len(stub.requests_to("POST", r"/models:upload$")) == 2

    # A challenger that does not take the default alias.
    third = upload_model("flowers", "gs://bucket/runs/3/model", None, None, "img", labels=None,
                         version_aliases=["challenger"], is_default_version=False, **kw)
    assert _bodies(stub, "POST", r"/models:upload$")[2]["model"]["versionAliases"] == ["challenger"]
    assert third["version_id"] == "3"
    serving = find_model("flowers", **kw)
    assert (serving.resource_name, serving.version_id) == (first["resource_name"], "2")
    assert len(stub.state.models) == 1 and len(stub.state.models[first["resource_name"]]) == 3


def test_upload_rejects_bad_inputs_before_any_request(vertex, exported_model_dir):
    stub, kw = vertex
    metadata = read_explanation_metadata(exported_model_dir)
    with pytest.raises(ValueError, match="gs://"):
        upload_model("flowers", exported_model_dir, None, None, "img", **kw)
    with pytest.raises(ValueError, match="explanation_parameters are required"):
        upload_model("flowers", "gs://b/m", metadata, None, "img", **kw)
    with pytest.raises(ValueError, match="inputTensorNmae|input_tensor_nmae"):
        upload_model("flowers", "gs://b/m", {"inputs": {"image": {"input_tensor_nmae": "x"}}}, IG, "img", **kw)
    assert stub.requests_to("POST", r"/models:upload$") == []


def test_evaluation_import_and_serving_metrics(vertex):
    stub, kw = vertex
    assert serving_metrics("flowers", **kw) is None  # nothing registered: nothing to beat
    first = upload_model("flowers", "gs://b/1", None, None, "img", **kw)
    assert serving_metrics("flowers", **kw) is None  # a model without an evaluation

    metrics = {"accuracy": 0.8, "loss": 0.55, "per_class": {"daisy": {"precision": 0.75, "recall": 0.9}},
               "confusion_matrix": [[3, 1], [0, 4]], "class_names": ["daisy", "roses"], "num_examples": 8}
    name = import_evaluation(first["versioned_resource_name"], metrics, metadata={"pipeline_job_id": "run-1"},
                             **kw)
    (request,) = stub.requests_to("POST", r"/evaluations:import$")
    assert request.path == first["versioned_resource_name"] + "/evaluations:import"
    # Only the keys of classification_metrics_1.0.0.yaml (the stub refuses others, as Vertex validates).
    assert request.body == {"modelEvaluation": {
        "displayName": "pipeline evaluation",
        "metricsSchemaUri": CLASSIFICATION_METRICS_SCHEMA,
        "metrics": {"logLoss": 0.55,
                    "confidenceMetrics": [{"confidenceThreshold": 0.0, "precisionAt1": 0.8, "recallAt1": 0.8}],
                    "confusionMatrix": {"annotationSpecs": [{"id": "0", "displayName": "daisy"},
                                                            {"id": "1", "displayName": "roses"}],
                                        "rows": [[3.0, 1.0], [0.0, 4.0]]}},
        "metadata": {"pipeline_job_id": "run-1"}}}
    assert name.startswith(first["resource_name"] + "/evaluations/")
    assert accuracy_from_schema_metrics(serving_metrics("flowers", **kw)) == pytest.approx(0.8)

    # The new default version has no evaluation yet; once it has one, its figures are the ones served.
    second = upload_model("flowers", "gs://b/2", None, None, "img", **kw)
    assert serving_metrics("flowers", **kw) is None
    import_evaluation(second["versioned_resource_name"], {"accuracy": 0.9, "loss": 0.3}, **kw)
    assert accuracy_from_schema_metrics(serving_metrics("flowers", **kw)) == pytest.approx(0.9)
    # A challenger's evaluation does not change what is serving.
    third = upload_model("flowers", "gs://b/3", None, None, "img", is_default_version=False, **kw)
    import_evaluation(third["versioned_resource_name"], {"accuracy": 0.99}, **kw)
    assert accuracy_from_schema_metrics(serving_metrics("flowers", **kw)) == pytest.approx(0.9)

    with pytest.raises(ValueError, match="versioned model name"):
        import_evaluation(first["resource_name"], metrics, **kw)


# ------------------------------------------------------------------------------------- endpoints
def test_deploy_reuses_endpoint_splits_traffic_and_undeploys_superseded(vertex):
    stub, kw = vertex
    v1 = upload_model("flowers", "gs://b/1", None, None, "img", **kw)["versioned_resource_name"]
    v2 = upload_model("flowers", "gs://b/2", None, None, "img", **kw)["versioned_resource_name"]
    v3 = upload_model("flowers", "gs://b/3", None, None, "img", **kw)["versioned_resource_name"]

    first = deploy_model(v1, "flowers-endpoint", "n1-standard-4", min_replica_count=1, max_replica_count=3,
                         traffic_percentage=100, service_account="serving@p.iam.gserviceaccount.com", **kw)
    assert _bodies(stub, "POST", r"/endpoints$") == [{"displayName": "flowers-endpoint"}]
    assert _bodies(stub, "POST", r":deployModel$") == [{
        "deployedModel": {"model": v1, "serviceAccount": "serving@p.iam.gserviceaccount.com",
                          "dedicatedResources": {"machineSpec": {"machineType": "n1-standard-4"},
                                                 "minReplicaCount": 1, "maxReplicaCount": 3}},
        "trafficSplit": {"0": 100}}]
    assert first["undeployed"] == [] and first["endpoint"].startswith(PARENT + "/endpoints/")

    # The retrain (a scheduled run) reuses the endpoint and retires the version it replaces.
    second = deploy_model(v2, "flowers-endpoint", "n1-standard-4", 1, 3, 100, **kw)
    assert len(stub.requests_to("POST", r"/endpoints$")) == 1 and second["endpoint"] == first["endpoint"]
    assert _bodies(stub, "POST", r":deployModel$")[1]["trafficSplit"] == {"0": 100}
    assert _bodies(stub, "POST", r":undeployModel$") == [
        {"deployedModelId": first["deployed_model_id"], "trafficSplit": {second["deployed_model_id"]: 100}}]
    assert second["undeployed"] == [first["deployed_model_id"]]

    # A canary on a GPU keeps the serving version, which still has 80% of the traffic.
    canary = deploy_model(v3, "flowers-endpoint", "n1-standard-8", 2, 4, 20, accelerator_type="NVIDIA_TESLA_T4",
                          accelerator_count=1, **kw)
    body = _bodies(stub, "POST", r":deployModel$")[2]
    t4 = aiplatform.gapic.AcceleratorType.NVIDIA_TESLA_T4.value
    assert body["deployedModel"]["dedicatedResources"] == {
        "machineSpec": {"machineType": "n1-standard-8", "acceleratorType": t4, "acceleratorCount": 1},
        "minReplicaCount": 2, "maxReplicaCount": 4}
    assert body["trafficSplit"] == {"0": 20, second["deployed_model_id"]: 80}
    assert canary["undeployed"] == [] and len(stub.requests_to("POST", r":undeployModel$")) == 1
    (endpoint,) = stub.state.endpoints.values()
    assert endpoint["trafficSplit"] == {second["deployed_model_id"]: 80, canary["deployed_model_id"]: 20}
    assert sorted(d["modelVersionId"] for d in endpoint["deployedModels"]) == ["2", "3"]


# ------------------------------------------------------------------------------------- pipelines
@pytest.fixture(scope="module")
def tiny_template(tmp_path_factory) -> str:
    """A trivial one-step KFP pipeline compiled to YAML (the real compiler, not a hand-written spec).
    (This module avoids ``from __future__ import annotations``: KFP reads the component's real types.)"""
    from kfp import compiler, dsl

    @dsl.component(base_image="python:3.11-slim")
    def echo(message: str) -> str:
        return message

    @dsl.pipeline(name="tiny-flowers")
    def tiny(message: str = "hello", min_accuracy: float = 0.5):
        echo(message=message)

    path = str(tmp_path_factory.mktemp("spec") / "tiny.yaml")
    compiler.Compiler().compile(tiny, path)
    return path


def test_submit_pipeline_sends_run_settings_and_prints_console_link(vertex, tiny_template, capsys):
    stub, kw = vertex
    job = submit_pipeline(tiny_template, pipeline_root="gs://flowers-bucket/pipeline_root",
                          service_account="pipelines@flowers-test.iam.gserviceaccount.com",
                          parameter_values={"message": "retrain", "min_accuracy": 0.7},
                          labels={"app": "flowers"}, enable_caching=False, display_name="flowers-run",
                          network="projects/123/global/networks/vpc", **kw)
    (request,) = stub.requests_to("POST", r"/pipelineJobs$")
    assert request.query["pipelineJobId"] == job.job_id
    body = request.body
    assert body["displayName"] == "flowers-run"
    assert body["runtimeConfig"] == {"gcsOutputDirectory": "gs://flowers-bucket/pipeline_root",
                                     "parameterValues": {"message": "retrain", "min_accuracy": 0.7}}
    assert body["serviceAccount"] == "pipelines@flowers-test.iam.gserviceaccount.com"
    assert body["network"] == "projects/123/global/networks/vpc"
    assert body["labels"] == {"app": "flowers"}
    assert body["pipelineSpec"]["pipelineInfo"] == {"name": "tiny-flowers"}
    assert body["pipelineSpec"]["root"]["dag"]["tasks"]["echo"]["cachingOptions"] == {"enableCache": False}
    # The SDK checked the root's bucket (on the stub's storage endpoint) before creating the run.
    assert any(r.path == "/storage/v1/b/flowers-bucket" for r in stub.requests)
    link = (f"https://console.cloud.google.com/vertex-ai/locations/{LOCATION}/pipelines/runs/{job.job_id}"
            f"?project={PROJECT}")
    assert link in capsys.readouterr().out
    assert job.resource_name == f"{PARENT}/pipelineJobs/{job.job_id}"

    with pytest.raises(VertexConfigError, match="gs://"):
        submit_pipeline(tiny_template, pipeline_root="/tmp/root", display_name="x", **kw)


def test_schedule_is_created_once_then_updated_paused_and_resumed(vertex, tiny_template):
    stub, kw = vertex
    schedule = create_or_update_schedule(tiny_template, "flowers-retrain", "TZ=Etc/UTC 0 3 * * 1", 2,
                                         pipeline_root="gs://flowers-bucket/root",
                                         service_account="pipelines@flowers-test.iam.gserviceaccount.com",
                                         parameter_values={"message": "weekly"}, labels={"app": "flowers"},
                                         enable_caching=True, **kw)
    (body,) = _bodies(stub, "POST", r"/schedules$")
    assert body["displayName"] == "flowers-retrain"
    assert body["cron"] == "TZ=Etc/UTC 0 3 * * 1"
    assert body["maxConcurrentRunCount"] == "2"  # int64: a string in proto JSON
    request = body["createPipelineJobRequest"]
    assert request["parent"] == PARENT
    job = request["pipelineJob"]
    assert job["runtimeConfig"] == {"gcsOutputDirectory": "gs://flowers-bucket/root",
                                    "parameterValues": {"message": "weekly"}}
    assert job["serviceAccount"] == "pipelines@flowers-test.iam.gserviceaccount.com"
    assert job["labels"] == {"app": "flowers"}
    assert job["pipelineSpec"]["root"]["dag"]["tasks"]["echo"]["cachingOptions"] == {"enableCache": True}

    updated = create_or_update_schedule(tiny_template, "flowers-retrain", "TZ=Etc/UTC 0 4 * * *", 1,
                                        pipeline_root="gs://flowers-bucket/root",
                                        service_account="pipelines@flowers-test.iam.gserviceaccount.com",
                                        parameter_values={"message": "daily"}, **kw)
    assert len(stub.requests_to("POST", r"/schedules$")) == 1  # updated, not a second schedule
    (patch,) = stub.requests_to("PATCH", r"/schedules/")
    assert patch.path == schedule.resource_name
    assert patch.query["updateMask"] == "cron,maxConcurrentRunCount,createPipelineJobRequest"
    assert (patch.body["cron"], patch.body["maxConcurrentRunCount"]) == ("TZ=Etc/UTC 0 4 * * *", "1")
    assert patch.body["createPipelineJobRequest"]["pipelineJob"]["runtimeConfig"]["parameterValues"] == {
        "message": "daily"}
    assert (updated.resource_name, updated.cron, updated.max_concurrent_run_count) == (
        schedule.resource_name, "TZ=Etc/UTC 0 4 * * *", 1)

    assert pause_schedule("flowers-retrain", **kw) == schedule.resource_name
    assert stub.state.schedules[schedule.resource_name]["state"] == "PAUSED"
    assert resume_schedule("flowers-retrain", **kw) == schedule.resource_name
    assert stub.state.schedules[schedule.resource_name]["state"] == "ACTIVE"
    assert [r.path for r in stub.requests if r.method == "POST" and r.path.endswith(("pause", "resume"))] == [
        schedule.resource_name + ":pause", schedule.resource_name + ":resume"]
    with pytest.raises(ScheduleNotFoundError, match="no-such-schedule"):
        pause_schedule("no-such-schedule", **kw)


# ------------------------------------------------------------------------------------- configuration errors
def _one_sentence(message: str) -> bool:
    return len(re.findall(r"[.!?](?:\s|$)", message)) == 1 and message.endswith(".")


def test_check_vertex_ready_says_what_is_missing_in_one_sentence(monkeypatch, tmp_path):
    for project in (None, ""):
        with pytest.raises(VertexConfigError, match="project") as err:
            check_vertex_ready(project, LOCATION)
        assert _one_sentence(str(err.value))
    with pytest.raises(VertexConfigError, match="region") as err:
        check_vertex_ready(PROJECT, "")
    assert _one_sentence(str(err.value))

    # ADC lookup fails on its first step (the key file named by the environment), without any network.
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing-key.json"))
    with pytest.raises(VertexConfigError, match="credentials") as err:
        check_vertex_ready(PROJECT, LOCATION)
    assert _one_sentence(str(err.value)) and "gcloud auth application-default login" in str(err.value)
    check_vertex_ready(PROJECT, LOCATION, credentials=AnonymousCredentials())  # explicit credentials: ready


def test_submit_cli_without_credentials_fails_with_one_sentence(tmp_path, tiny_template):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GOOGLE_", "CLOUDSDK_", "GCE_"))}
    env.update(PYTHONPATH=REPO_ROOT, CLOUDSDK_CONFIG=str(tmp_path / "gcloud"), NO_GCE_CHECK="true",
               GCE_METADATA_HOST="127.0.0.1:9", GCE_METADATA_IP="127.0.0.1:9")
    result = subprocess.run([sys.executable, "-m", "pipeline.submit", f"--template_path={tiny_template}",
                             f"--project={PROJECT}", f"--location={LOCATION}", "--pipeline_root=gs://b/root"],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: No Google Cloud credentials found") and _one_sentence(last), result.stderr
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------------------------- scheduled retrains
def test_scheduled_runs_retrain_caching_is_off_in_the_spec_and_the_schedule_request(vertex, monkeypatch, tmp_path):
    """Caching on, Vertex would reuse every step of a scheduled run (same spec, same parameters) and
    retrain nothing. Every compiled task has caching off, and the schedule sends enable_caching false
    even when the configuration asks for caching (it may, for hand-submitted runs)."""
    import google.auth
    import yaml

    from components.config import load_config
    from pipeline.run_vertex import schedule, submit

    stub, kw = vertex
    monkeypatch.setattr(google.auth, "default", lambda *a, **k: (AnonymousCredentials(), PROJECT))
    overrides = [f"gcp.project={PROJECT}", f"gcp.region={LOCATION}", f"gcp.api_endpoint={kw['api_endpoint']}",
                 "gcp.bucket=gs://flowers-bucket", "images.components=europe-docker.pkg.dev/p/r/components:1",
                 "images.serving=europe-docker.pkg.dev/p/r/serving:1"]
    spec_path = str(tmp_path / "spec.yaml")
    cfg = load_config(os.path.join(REPO_ROOT, "configs/vertex.yaml"), [*overrides, "pipeline.enable_caching=true"])
    schedule(cfg, spec_path)

    spec = yaml.safe_load(open(spec_path))
    tasks = spec["root"]["dag"]["tasks"]
    assert {"split-data-op", "train-op", "evaluate-op", "upload-model-op", "deploy-model-op"} <= set(tasks)
    for name, task in tasks.items():  # compiled: no task may be served from the cache
        assert not task.get("cachingOptions", {}).get("enableCache", False), name
    (body,) = _bodies(stub, "POST", r"/schedules$")
    sent = body["createPipelineJobRequest"]["pipelineJob"]["pipelineSpec"]["root"]["dag"]["tasks"]
    assert set(sent) == set(tasks)
    assert {name: task["cachingOptions"] for name, task in sent.items()} == {
        name: {"enableCache": False} for name in tasks}
    assert body["createPipelineJobRequest"]["pipelineJob"]["runtimeConfig"]["gcsOutputDirectory"] == \
        "gs://flowers-bucket/pipeline_root"

    # A hand-submitted run with the shipped config (caching off) sends the same.
    submit(load_config(os.path.join(REPO_ROOT, "configs/vertex.yaml"), overrides), spec_path)
    (job,) = _bodies(stub, "POST", r"/pipelineJobs$")
    assert {task["cachingOptions"]["enableCache"] for task in job["pipelineSpec"]["root"]["dag"]["tasks"].values()} \
        == {False}
