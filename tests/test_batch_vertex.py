"""Bulk explanations on Vertex: ``components.batch_predict`` creates a BatchPredictionJob with the real
``google-cloud-aiplatform`` SDK (REST) against the local stub (``tests/vertex_rest_stub.py``);
assertions are on the wire bodies. Plus the local twin of the step, the JSONL conversion for Vertex,
the configuration's resource checks and the compiled custom job's worker pools."""

from __future__ import annotations

import base64
import json
import os

import pytest
from google.api_core import exceptions as api_exceptions
from google.cloud import aiplatform

from components.batch_predict import batch_predict, create_batch_prediction_job, write_jsonl_instances
from components.config import ConfigError, load_config
from components.vertex import upload_model
from tests.conftest import VERTEX_LOCATION as LOCATION, VERTEX_PROJECT as PROJECT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IG = {"integratedGradientsAttribution": {"stepCount": 25}}
MACHINE_SPEC = aiplatform.gapic.MachineSpec

pytestmark = pytest.mark.usefixtures("no_network")


def _jobs(stub) -> list[dict]:
    return [r.body for r in stub.requests_to("POST", r"/batchPredictionJobs$")]


def test_batch_prediction_job_runs_the_serving_container_over_gcs(vertex):
    stub, kw = vertex
    model = upload_model("flowers", "gs://b/runs/1/model", None, None, "us-docker.pkg.dev/p/r/serving:1",
                         serving_container_env={"EXPLANATION_PARAMETERS": json.dumps(IG)}, **kw)
    result = create_batch_prediction_job(
        model["versioned_resource_name"], "gs://b/instances/a.jsonl, gs://b/instances/b-*.jsonl", "gs://b/batch",
        machine_type="n1-highcpu-16", starting_replica_count=2, max_replica_count=6, batch_size=16,
        explanation_parameters=IG, labels={"run": "r1"}, service_account="batch@p.iam.gserviceaccount.com", **kw)
    (body,) = _jobs(stub)
    assert body == {
        "displayName": "flowers-batch-explain",
        "model": model["versioned_resource_name"],
        "inputConfig": {"instancesFormat": "jsonl",
                        "gcsSource": {"uris": ["gs://b/instances/a.jsonl", "gs://b/instances/b-*.jsonl"]}},
        "outputConfig": {"predictionsFormat": "jsonl", "gcsDestination": {"outputUriPrefix": "gs://b/batch"}},
        "dedicatedResources": {"machineSpec": {"machineType": "n1-highcpu-16"}, "startingReplicaCount": 2,
                               "maxReplicaCount": 6},
        "manualBatchTuningParameters": {"batchSize": 16},
        "modelParameters": {"explanationParameters": IG},  # the container reads them per request
        "labels": {"run": "r1"},
        "serviceAccount": "batch@p.iam.gserviceaccount.com",
    }  # no generateExplanation: the container's predictions carry the explanations
    assert result["state"] == "JOB_STATE_SUCCEEDED" and result["job"].startswith(
        f"projects/{PROJECT}/locations/{LOCATION}/batchPredictionJobs/")
    assert result["output_directory"].startswith("gs://b/batch/prediction-flowers-")
    # The SDK waited for the job: it read it back until it was done.
    assert stub.requests_to("GET", r"/batchPredictionJobs/")


def test_builtin_target_and_gpus_on_the_wire(vertex):
    stub, kw = vertex
    model = upload_model("flowers", "gs://b/1", None, None, "img", **kw)["versioned_resource_name"]
    with pytest.warns(FutureWarning, match="2027-03-16"):
        create_batch_prediction_job(model, "gs://b/list.txt", "gs://b/out", machine_type="n1-standard-8",
                                    accelerator_type="NVIDIA_TESLA_T4", accelerator_count=1,
                                    instances_format="file-list", builtin_explanations=True, **kw)
    (body,) = _jobs(stub)
    assert body["generateExplanation"] is True and body["inputConfig"]["instancesFormat"] == "file-list"
    assert body["dedicatedResources"]["machineSpec"] == {
        "machineType": "n1-standard-8", "acceleratorType": MACHINE_SPEC().__class__.meta.fields[
            "accelerator_type"].enum.NVIDIA_TESLA_T4.value, "acceleratorCount": 1}
    assert "modelParameters" not in body


def test_bad_requests_fail_before_or_at_vertex(vertex):
    stub, kw = vertex
    model = upload_model("flowers", "gs://b/1", None, None, "img", **kw)["versioned_resource_name"]
    common = dict(machine_type="n1-standard-8", **kw)
    with pytest.raises(ValueError, match="gs:// URIs"):
        create_batch_prediction_job(model, "data/validation/*.jsonl", "gs://b/out", **common)
    with pytest.raises(ValueError, match="gs:// prefix"):
        create_batch_prediction_job(model, "gs://b/in.jsonl", "out", **common)
    with pytest.raises(ValueError, match="to_jsonl"):
        create_batch_prediction_job(model, "gs://b/in.tfrec", "gs://b/out", instances_format="tf-record", **common)
    with pytest.raises(ValueError, match="starting_replica_count"):
        create_batch_prediction_job(model, "gs://b/in.jsonl", "gs://b/out", starting_replica_count=3,
                                    max_replica_count=2, **common)
    with pytest.raises(ValueError, match="go together"):
        create_batch_prediction_job(model, "gs://b/in.jsonl", "gs://b/out", accelerator_type="NVIDIA_L4", **common)
    assert _jobs(stub) == []
    with pytest.raises(api_exceptions.NotFound):
        create_batch_prediction_job(model.replace("@1", "@7"), "gs://b/in.jsonl", "gs://b/out", **common)


def test_local_step_writes_vertex_layout_from_jsonl_made_from_tfrecords(tmp_path, exported_model_dir):
    import numpy as np
    import tensorflow as tf

    from serving.registry import Registry
    from trainer.data import make_example

    records = tmp_path / "validation.tfrec"
    with tf.io.TFRecordWriter(str(records)) as writer:
        for i in range(3):
            image = np.random.default_rng(i).integers(0, 255, (32, 32, 3), np.uint8)
            writer.write(make_example(image, i).SerializeToString())
        writer.write(b"garbage")
    files = write_jsonl_instances(str(records), str(tmp_path / "jsonl" / "validation"), instances_per_file=2)
    assert [os.path.basename(f) for f in files] == ["validation-00000.jsonl", "validation-00001.jsonl"]
    lines = [json.loads(line) for f in files for line in open(f)]
    assert len(lines) == 3 and all(set(line) == {"bytes_inputs"} for line in lines)
    assert base64.b64decode(lines[0]["bytes_inputs"]["b64"])[:2] == b"\xff\xd8"  # the record's JPEG

    registry = tmp_path / "registry"
    version = Registry(str(registry)).upload_model(
        "flowers", exported_model_dir, explanation_parameters={"integrated_gradients_attribution": {"step_count": 3}})
    result = batch_predict(f"{version['name']}@{version['versionId']}", str(tmp_path / "jsonl" / "*.jsonl"),
                           str(tmp_path / "out"), backend="local", registry_dir=str(registry))
    out = result["output_directory"]
    assert out.endswith(f"prediction-flowers-v{version['versionId']}") and result["results"] == 3
    (results,) = [f for f in os.listdir(out) if f.startswith("prediction.results-")]
    assert results == "prediction.results-00000-of-00001"
    first = json.loads(open(os.path.join(out, results)).readline())
    assert first["instance"] == lines[0]
    assert first["prediction"]["explanation"]["attributions"][0]["outputIndex"] == [first["prediction"]["labelIndex"]]


@pytest.mark.parametrize("overrides, message", [
    (["training.replica_count=3"], "training.batch_size: 32 is the global batch"),
    (["training.accelerator_type=NVIDIA_TESLA_T4"], "training.accelerator_type: .* go together"),
    (["training.accelerator_type=NVIDIA_L4", "training.accelerator_count=1"], "attaches to g2-"),
    (["training.machine_type=a2-highgpu-1g"], "comes with GPUs"),
    (["training.accelerator_type=NVIDIA_TESLA_T4", "training.accelerator_count=3"], "1, 2, 4, 8 or 16"),
    (["training.machine_type=big machine"], "machine type like"),
    (["batch_predict.starting_replica_count=5", "batch_predict.max_replica_count=2"], "starting_replica_count"),
    (["batch_predict.enabled=true"], "batch_predict.source: must be set"),
    (["batch_predict.enabled=true", "batch_predict.source=data/x.jsonl", "batch_predict.destination=gs://b/o"],
     "must be gs:// URIs on Vertex"),
])
def test_config_checks_replicas_machines_and_accelerators_together(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(os.path.join(ROOT, "configs/vertex.yaml"), ["gcp.project=p", *overrides])


def test_compiled_custom_job_has_a_chief_and_worker_pools(tmp_path):
    import yaml

    from pipeline.compile import compile_pipeline

    config = load_config(os.path.join(ROOT, "configs/vertex.yaml"), [
        "gcp.project=p", "training.replica_count=4", "training.machine_type=g2-standard-8",
        "training.accelerator_type=NVIDIA_L4", "training.accelerator_count=2", "training.batch_size=64",
        "batch_predict.enabled=true", "batch_predict.source=gs://b/in/*.jsonl", "batch_predict.destination=gs://b/o"])
    path = compile_pipeline(config, str(tmp_path / "spec.yaml"))
    with open(path) as f:
        spec = yaml.safe_load(f)
    train = next(c for name, c in spec["components"].items() if name.startswith("comp-train"))
    pools = train["inputDefinitions"]["parameters"]["worker_pool_specs"]["defaultValue"]
    machine = {"machine_type": "g2-standard-8", "accelerator_type": "NVIDIA_L4", "accelerator_count": 2}
    assert [int(p["replica_count"]) for p in pools] == [1, 3]  # the chief's pool, then the other workers'
    assert all(p["machine_spec"] == machine for p in pools)
    assert pools[0]["container_spec"] == pools[1]["container_spec"]  # every replica runs the same trainer
    tasks = spec["root"]["dag"]["tasks"]
    batch = tasks["batch-predict-op"]["inputs"]["parameters"]
    assert batch["model_name"]["taskOutputParameter"]["producerTask"].startswith("upload-model")
    assert batch["source"]["runtimeValue"]["constant"] == "gs://b/in/*.jsonl"
