"""The pipeline: configuration errors, the compiled spec, the local steps (gate, versions, endpoint
reuse) and the whole pipeline under kfp.local ending with an explained prediction."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from components.config import ConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ["train-op", "export-signatures-op", "evaluate-op", "upload-model-op", "deploy-model-op", "explain-smoke-op"]


@pytest.mark.parametrize("override,message", [
    ("training.batch_size=big", "training.batch_size"),
    ("training.bogus=1", r"training: unknown field\(s\) \[.bogus.\]"),
    ("deploy.target=somewhere", "deploy.target"),
    ("explanation.parameters={integrated_gradients_attribution: {step_count: 500}}", "step_count"),
    ("schedule.cron=daily", "schedule.cron"),
])
def test_config_errors_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(os.path.join(ROOT, "configs/local.yaml"), [override])


def test_both_configs_load():
    assert load_config(os.path.join(ROOT, "configs/local.yaml")).backend == "local"
    assert load_config(os.path.join(ROOT, "configs/vertex.yaml")).backend == "vertex"


def _compile(config: str, tmp_path, overrides=()) -> dict:
    from pipeline.compile import compile_pipeline

    path = compile_pipeline(load_config(os.path.join(ROOT, config), list(overrides)), str(tmp_path / "spec.yaml"))
    return yaml.safe_load(open(path))


def _order(tasks: dict) -> list[str]:
    """Tasks in dependency order (each after everything it depends on)."""
    done: list[str] = []
    while len(done) < len(tasks):
        for name, task in sorted(tasks.items()):
            if name not in done and all(d in done for d in task.get("dependentTasks", [])):
                done.append(name)
    return done


def test_compiled_spec_wires_the_steps_the_gate_and_the_defaults(tmp_path):
    spec = _compile("configs/local.yaml", tmp_path, ["gate.min_accuracy=0.9", "training.num_epochs=7",
                                                     "explanation.parameters={xrai_attribution: {step_count: 20}}"])
    tasks = spec["root"]["dag"]["tasks"]
    assert _order(tasks) == STEPS
    upload_inputs = tasks["upload-model-op"]["inputs"]["parameters"]
    assert upload_inputs["approved"]["taskOutputParameter"] == {"outputParameterKey": "deploy",
                                                                 "producerTask": "evaluate-op"}
    assert tasks["deploy-model-op"]["inputs"]["parameters"]["model_name"]["taskOutputParameter"][
        "producerTask"] == "upload-model-op"
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["min_accuracy"]["defaultValue"] == 0.9
    assert params["num_epochs"]["defaultValue"] == 7
    assert json.loads(params["explanation_parameters"]["defaultValue"]) == {"xrai_attribution": {"step_count": 20}}
    assert params["backend"]["defaultValue"] == "local"


def test_vertex_target_trains_as_a_custom_job(tmp_path):
    spec = _compile("configs/vertex.yaml", tmp_path, ["gcp.project=my-project", "training.machine_type=n1-highmem-8"])
    tasks = spec["root"]["dag"]["tasks"]
    assert _order(tasks)[0] == "train-op"
    executor = spec["deploymentSpec"]["executors"][tasks["train-op"]["componentRef"]["name"].replace("comp-", "exec-")]
    assert "google_cloud_pipeline_components" in json.dumps(executor)  # the GCPC custom-job launcher
    train_inputs = spec["components"][tasks["train-op"]["componentRef"]["name"]]["inputDefinitions"]["parameters"]
    assert train_inputs["worker_pool_specs"]["defaultValue"][0]["machine_spec"]["machine_type"] == "n1-highmem-8"


def test_gate_refuses_below_threshold_and_worse_than_serving():
    from components.evaluate import gate

    assert gate({"accuracy": 0.7}, 0.8, None)[0] is False
    ok, reason = gate({"accuracy": 0.9}, 0.8, {"accuracy": 0.95})
    assert ok is False and "worse than the serving version" in reason
    assert gate({"accuracy": 0.9}, 0.8, {"accuracy": 0.95}, require_not_worse=False)[0] is True
    assert gate({"accuracy": 0.95}, 0.8, {"accuracy": 0.95})[0] is True


def test_local_steps_add_versions_reuse_the_endpoint_and_retire_the_old(trained_model_dir, sample_data, tmp_path):
    from components.deploy_model import deploy_model
    from components.evaluate import evaluate
    from components.upload_model import upload_model
    from serving.registry import Registry

    registry = str(tmp_path / "registry")
    params = {"integrated_gradients_attribution": {"step_count": 20}}
    first = evaluate(trained_model_dir, sample_data["eval_pattern"], 0.5, model_display_name="flowers", registry_dir=registry)
    assert first["deploy"] and first["champion"] is None
    up1 = upload_model(trained_model_dir, "flowers", first["metrics"], params, registry_dir=registry)
    dep1 = deploy_model(up1["model"], "flowers-endpoint", registry_dir=registry)

    second = evaluate(trained_model_dir, sample_data["eval_pattern"], 0.5, model_display_name="flowers", registry_dir=registry)
    assert second["champion"]["accuracy"] == first["metrics"]["accuracy"]  # read back from the registry
    up2 = upload_model(trained_model_dir, "flowers", second["metrics"], params, registry_dir=registry)
    dep2 = deploy_model(up2["model"], "flowers-endpoint", registry_dir=registry)

    reg = Registry(registry)
    assert up2["parent_model"] == up1["model"].split("@")[0]
    assert [v["versionId"] for v in reg.list_model_versions(up1["model"])] == ["1", "2"]
    assert dep2["endpoint"] == dep1["endpoint"] and len(reg.list_endpoints()) == 1
    assert dep2["undeployed"] == [dep1["deployed_model_id"]]
    endpoint = reg.get_endpoint(dep2["endpoint"])
    assert [d["id"] for d in endpoint["deployedModels"]] == [dep2["deployed_model_id"]]
    assert endpoint["trafficSplit"] == {dep2["deployed_model_id"]: 100}
    version = reg.get_model(up2["model"])
    assert version["explanationSpec"]["metadata"]["inputs"]["image"]["input_tensor_name"] == "numpy_inputs"

    # a stricter gate now refuses, naming why; the serving version keeps its traffic
    third = evaluate(trained_model_dir, sample_data["eval_pattern"], 1.01, model_display_name="flowers", registry_dir=registry)
    assert third["deploy"] is False and "below the threshold" in third["reason"]


def test_whole_pipeline_offline_ends_with_an_explained_prediction(sample_data, backbone_dir, tmp_path):
    from pipeline.run_local import run_local

    cfg = load_config(os.path.join(ROOT, "configs/local.yaml"), [
        f"data.train_data_path={sample_data['train_pattern']}", f"data.eval_data_path={sample_data['eval_pattern']}",
        f"training.hub_handle={backbone_dir}", "training.num_epochs=3", "training.batch_size=16",
        f"local.registry_dir={tmp_path / 'registry'}", f"local.work_dir={tmp_path / 'runs'}",
        "explanation.parameters={integrated_gradients_attribution: {step_count: 16}}"])
    root = run_local(cfg)
    summary = json.load(open(os.path.join(root, "explained_prediction.json")))
    assert open(os.path.join(root, "explained_prediction.png"), "rb").read(4) == b"\x89PNG"
    assert summary["predicted"] in ("daisy", "dandelion", "roses", "sunflowers", "tulips")
    assert len(summary["probabilities"]) == 5 and summary["approximation_error"] is not None
    from serving.registry import Registry

    endpoints = Registry(str(tmp_path / "registry")).list_endpoints()
    assert len(endpoints) == 1 and len(endpoints[0]["deployedModels"]) == 1


def test_make_pipeline_without_a_project_fails_in_one_sentence():
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": ROOT, "GOOGLE_APPLICATION_CREDENTIALS": "/nonexistent.json"}
    for command in (["submit"], ["schedule"], ["schedule", "--set", "gcp.project=p"]):
        out = subprocess.run([sys.executable, "-m", "pipeline.run_vertex", *command, "--config", "configs/vertex.yaml"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 1
        (line,) = [l for l in out.stderr.splitlines() if l.startswith("error:")]
        assert ("project" in line) if "gcp.project=p" not in command else ("credentials" in line)
        assert "Traceback" not in out.stderr
