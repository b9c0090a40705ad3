"""Unattended retraining over the steps the pipeline runs after training (evaluate -> upload_model ->
deploy_model, wired as ``pipeline/definition.py`` wires them), on both backends: the local registry on
disk, and Vertex through the real ``aiplatform`` SDK against the REST stub.

The models are tiny exported CNNs whose last layer always answers one class, so their accuracy on an
evaluation set is exactly that class's share of it: quality differences are known in advance, and the
same model scores differently on different data. Run 1 deploys model A on data E1 (A scores 0.6). The
scheduled run 2 brings new data E2 and model B: on E2, B scores 0.5 and A only 0.2. A gate that read
A's stored 0.6 would refuse B; the gate scores both on E2 and deploys B. Run 3's model C (0.1 on E2)
is refused and B keeps serving.
"""

import os
import shutil

import numpy as np
import pytest
from google.auth.credentials import AnonymousCredentials
from google.cloud import aiplatform
from google.cloud.aiplatform import initializer

from components.deploy_model import deploy_model
from components.evaluate import evaluate
from components.metrics_schema import CLASSIFICATION_METRICS_SCHEMA, accuracy_from_schema_metrics
from components.upload_model import upload_model
from serving.registry import ChampionChangedError, Registry
from tests.vertex_rest_stub import running_vertex_stub

PARAMS = {"integrated_gradients_attribution": {"step_count": 8}}
#: Records per class (daisy, dandelion, roses, ...) of the two evaluation sets.
E1 = {0: 6, 1: 2, 2: 2}
E2 = {0: 2, 1: 5, 2: 1, 3: 2}
PROJECT, LOCATION = "flowers-test", "us-central1"


def _constant_model(label: int, export_dir: str) -> str:
    """A tiny CNN exported with all three signatures, whose softmax always picks ``label``."""
    import trainer  # noqa: F401

    from tests.conftest import _tiny_cnn
    from trainer.export import export_model
    from trainer.schema import CLASSES

    model = _tiny_cnn(label)
    kernel, _ = model.layers[-1].get_weights()
    model.layers[-1].set_weights([np.zeros_like(kernel), 20.0 * np.eye(len(CLASSES), dtype=np.float32)[label]])
    export_model(model, export_dir, CLASSES, verbose=False)
    return export_dir


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    return {name: _constant_model(label, str(root / name)) for name, label in (("A", 0), ("B", 1), ("C", 2))}


def _write_subset(sample_data: dict, counts: dict[int, int], path: str) -> str:
    """A TFRecord file with ``counts[c]`` of ``sample_data``'s records of class ``c`` (bytes as they are)."""
    import tensorflow as tf

    from trainer.data import list_files
    from trainer.schema import FEATURE_CLASS

    wanted = dict(counts)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf.io.TFRecordWriter(path) as writer:
        for pattern in (sample_data["eval_pattern"], sample_data["train_pattern"]):
            for record in tf.data.TFRecordDataset(list_files(pattern)).as_numpy_iterator():
                label = tf.train.Example.FromString(record).features.feature[FEATURE_CLASS].int64_list.value[0]
                if wanted.get(label, 0) > 0:
                    writer.write(record)
                    wanted[label] -= 1
    assert not any(wanted.values()), f"sample data lacks records: {wanted}"
    return path


@pytest.fixture(scope="module")
def eval_sets(sample_data, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("eval")
    return {"E1": _write_subset(sample_data, E1, str(root / "e1" / "part-0.tfrec")),
            "E2": _write_subset(sample_data, E2, str(root / "e2" / "part-0.tfrec"))}


def _run(export_dir: str, eval_data: str, backend: dict, allow_first_deploy: bool = False,
         deploy: bool = True) -> dict:
    """The pipeline after training: the gate, then (if it says so) upload and deploy."""
    gate = evaluate(export_dir, eval_data, 0.05, model_display_name="flowers", margin=0.0,
                    allow_first_deploy=allow_first_deploy, **backend["evaluate"])
    if not gate["deploy"]:
        return {"gate": gate}
    uploaded = upload_model(export_dir, "flowers", gate["metrics"], PARAMS, comparison=gate["comparison"],
                            **backend["upload"])
    if not deploy:
        return {"gate": gate, "uploaded": uploaded}
    deployed = deploy_model(uploaded["model"], "flowers-endpoint", champion=gate["comparison"]["champion"],
                            **backend["deploy"])
    return {"gate": gate, "uploaded": uploaded, "deployed": deployed}


def _serving(backend: dict) -> list[str]:
    """``<model>@<version>`` of every model deployed on the one endpoint."""
    if backend["deploy"]["backend"] == "local":
        (endpoint,) = Registry(backend["registry"]).list_endpoints()
        return [d["model"] for d in endpoint["deployedModels"]]
    (endpoint,) = backend["stub"].state.endpoints.values()
    return [f"{d['model']}@{d['modelVersionId']}" for d in endpoint["deployedModels"]]


@pytest.mark.parametrize("kind", ["local", "vertex"])
def test_two_runs_scored_against_one_champion_do_not_both_deploy(kind, request, models, eval_sets, tmp_path):
    """Two scheduled runs at once: both gates compare with A and approve, both upload. The first to
    deploy serves; the second is refused, since it was never compared with what now serves."""
    backend = request.getfixturevalue(kind)
    place = (lambda d, run: _in_bucket(backend, d, run)) if kind == "vertex" else (  # each run its own export
        lambda d, run: shutil.copytree(d, tmp_path / run))
    first = _run(place(models["A"], "run-1"), eval_sets["E1"], backend, allow_first_deploy=True)
    early, late = (_run(place(models["B"], run), eval_sets["E2"], backend, deploy=False) for run in ("run-2", "run-3"))
    champion = first["uploaded"]["model"]
    assert early["gate"]["comparison"]["champion"] == late["gate"]["comparison"]["champion"] == champion
    deploy_model(early["uploaded"]["model"], "flowers-endpoint", champion=champion, **backend["deploy"])
    with pytest.raises(ChampionChangedError, match=f"the serving \\(default\\) version is now "
                                                   f"{early['uploaded']['model']}, not {champion}"):
        deploy_model(late["uploaded"]["model"], "flowers-endpoint", champion=champion, **backend["deploy"])
    assert _serving(backend) == [early["uploaded"]["model"]]
    # A first deploy that finds another run's first version serving is refused the same way.
    with pytest.raises(ChampionChangedError, match="the gate found no serving version"):
        deploy_model(late["uploaded"]["model"], "flowers-endpoint", champion="", **backend["deploy"])
    # The retried step of the run that did deploy finishes (its own version is not "another").
    deploy_model(early["uploaded"]["model"], "flowers-endpoint", champion=champion, **backend["deploy"])
    assert _serving(backend) == [early["uploaded"]["model"]]
    # A canary does not move the champion: a run compared with it may deploy beside it.
    deploy_model(late["uploaded"]["model"], "flowers-endpoint", traffic_percentage=20,
                 champion=early["uploaded"]["model"], **backend["deploy"])
    assert sorted(_serving(backend)) == sorted([early["uploaded"]["model"], late["uploaded"]["model"]])
    # ... and a later run compared with it deploys at 100% (the canary beside it is not another run's deploy).
    deploy_model(first["uploaded"]["model"], "flowers-endpoint", champion=early["uploaded"]["model"],
                 **backend["deploy"])
    assert _serving(backend) == [first["uploaded"]["model"]]


# ------------------------------------------------------------------------------------------------ local
@pytest.fixture()
def local(tmp_path) -> dict:
    registry = str(tmp_path / "registry")
    kw = {"backend": "local", "registry_dir": registry}
    return {"registry": registry, "evaluate": kw, "upload": kw, "deploy": kw}


def test_scheduled_run_with_new_data_deploys_a_better_model_and_refuses_a_worse_one_local(local, models,
                                                                                           eval_sets):
    refused = _run(models["A"], eval_sets["E1"], local)  # no model yet, and this is not said to be the first
    assert refused["gate"]["deploy"] is False and "gate.allow_first_deploy" in refused["gate"]["reason"]

    first = _run(models["A"], eval_sets["E1"], local, allow_first_deploy=True)
    assert first["gate"]["metrics"]["accuracy"] == pytest.approx(0.6) and first["gate"]["champion"] is None

    second = _run(models["B"], eval_sets["E2"], local)  # the scheduled run: new data, a new model
    comparison = second["gate"]["comparison"]
    assert second["gate"]["deploy"] is True, second["gate"]["reason"]
    assert comparison["challenger_accuracy"] == pytest.approx(0.5)
    assert comparison["champion_accuracy"] == pytest.approx(0.2)  # A re-scored on E2, not its stored 0.6
    assert comparison["champion"] == first["uploaded"]["model"] and comparison["champion_source"] == "scored"

    registry = Registry(local["registry"])
    b = registry.get_model(second["uploaded"]["model"])
    assert registry.get_model(b["name"])["versionId"] == b["versionId"] == "2"  # default moved to B on deploy
    (endpoint,) = registry.list_endpoints()
    assert [d["model"] for d in endpoint["deployedModels"]] == [second["uploaded"]["model"]]
    assert endpoint["trafficSplit"] == {second["deployed"]["deployed_model_id"]: 100}
    (evaluation,) = registry.list_model_evaluations(second["uploaded"]["model"])
    assert evaluation["metricsSchemaUri"] == CLASSIFICATION_METRICS_SCHEMA
    assert set(evaluation["metrics"]) == {"logLoss", "confidenceMetrics", "confusionMatrix"}  # schema keys only
    assert accuracy_from_schema_metrics(evaluation["metrics"]) == pytest.approx(0.5)
    assert evaluation["metadata"]["champion_accuracy"] == pytest.approx(0.2)  # both scores recorded

    third = _run(models["C"], eval_sets["E2"], local)
    assert third["gate"]["deploy"] is False
    assert "worse than the serving version" in third["gate"]["reason"] and "0.5000 (scored)" in third["gate"]["reason"]
    assert [v["versionId"] for v in registry.list_model_versions(b["name"])] == ["1", "2"]  # nothing uploaded
    assert registry.get_model(b["name"])["versionId"] == "2"
    assert [d["model"] for d in registry.list_endpoints()[0]["deployedModels"]] == [second["uploaded"]["model"]]


def test_unreadable_champion_falls_back_to_its_evaluation_then_fails_closed(local, models, eval_sets, tmp_path):
    champion_dir = str(tmp_path / "champion")
    shutil.copytree(models["B"], champion_dir)
    assert _run(champion_dir, eval_sets["E2"], local, allow_first_deploy=True)["gate"]["deploy"]
    shutil.rmtree(champion_dir)  # the serving version's files are gone (a deleted bucket path, say)

    fallback = _run(models["C"], eval_sets["E2"], local, allow_first_deploy=True)
    assert fallback["gate"]["deploy"] is False
    assert fallback["gate"]["champion"]["source"] == "stored" and "could not be scored" in \
        fallback["gate"]["champion"]["problem"]
    assert fallback["gate"]["champion"]["accuracy"] == pytest.approx(0.5)

    # A champion with neither its model nor an evaluation (killed between upload and evaluation import,
    # then deployed by hand): the gate refuses even a perfect-looking challenger, and says why.
    registry = Registry(local["registry"])
    orphan = registry.upload_version("flowers", str(tmp_path / "never-written"))
    registry.rollout("flowers-endpoint", f"{orphan['name']}@{orphan['versionId']}")
    closed = _run(models["A"], eval_sets["E1"], local, allow_first_deploy=True)
    assert closed["gate"]["deploy"] is False
    assert "fail closed" in closed["gate"]["reason"] and "no stored evaluation" in closed["gate"]["reason"]


# ------------------------------------------------------------------------------------------------ vertex
@pytest.fixture()
def vertex(monkeypatch, tmp_path) -> dict:
    """The steps' Vertex backend against the stub. Cloud Storage is a directory standing in for the
    ``/gcs`` mount Vertex Pipelines gives every step (``GCS_FUSE_ROOT``)."""
    fuse = tmp_path / "gcs"
    fuse.mkdir()
    monkeypatch.setenv("GCS_FUSE_ROOT", str(fuse))
    with running_vertex_stub() as (url, stub):
        aiplatform.init(project=PROJECT, location=LOCATION, credentials=AnonymousCredentials())
        kw = {"backend": "vertex", "project": PROJECT, "location": LOCATION, "api_endpoint": url}
        try:
            yield {"stub": stub, "fuse": fuse, "evaluate": kw, "upload": {**kw, "serving_image": "img"},
                   "deploy": kw}
        finally:
            initializer.global_config.__init__()


def _in_bucket(vertex: dict, export_dir: str, run: str) -> str:
    """The export as a pipeline step sees its output artifact: under the bucket's mount."""
    target = vertex["fuse"] / "bucket" / "pipeline_root" / run / "model"
    shutil.copytree(export_dir, target)
    return str(target)


def test_scheduled_run_with_new_data_deploys_a_better_model_and_refuses_a_worse_one_vertex(vertex, models,
                                                                                            eval_sets):
    stub = vertex["stub"]
    first = _run(_in_bucket(vertex, models["A"], "run-1"), eval_sets["E1"], vertex, allow_first_deploy=True)
    assert first["deployed"]["undeployed"] == []
    (body,) = [r.body for r in stub.requests_to("POST", r"/models:upload$")]
    assert body["model"]["artifactUri"] == "gs://bucket/pipeline_root/run-1/model"

    second = _run(_in_bucket(vertex, models["B"], "run-2"), eval_sets["E2"], vertex)
    comparison = second["gate"]["comparison"]
    assert second["gate"]["deploy"] is True, second["gate"]["reason"]
    assert (comparison["challenger_accuracy"], comparison["champion_accuracy"]) == (pytest.approx(0.5),
                                                                                   pytest.approx(0.2))
    assert comparison["champion"] == first["uploaded"]["model"] and comparison["champion_source"] == "scored"

    # B was uploaded without the default alias; it moved (mergeVersionAliases) after the deploy, before
    # the old version was undeployed.
    upload = [r.body for r in stub.requests_to("POST", r"/models:upload$")][1]
    assert "default" not in upload["model"].get("versionAliases", []) and upload["parentModel"]
    order = [(r.method, r.path.rsplit(":", 1)[-1]) for r in stub.requests
             if r.method == "POST" and r.path.endswith((":deployModel", ":mergeVersionAliases", ":undeployModel"))]
    assert order[-3:] == [("POST", "deployModel"), ("POST", "mergeVersionAliases"), ("POST", "undeployModel")]
    merge = stub.requests_to("POST", r":mergeVersionAliases$")[-1]  # (run 1's merge was a no-op: first version)
    assert merge.path == second["uploaded"]["model"] + ":mergeVersionAliases"
    assert merge.body == {"versionAliases": ["default"]}
    (evaluation,) = [r.body["modelEvaluation"] for r in stub.requests_to("POST", r"/evaluations:import$")][1:]
    assert set(evaluation["metrics"]) <= {"auPrc", "auRoc", "logLoss", "confidenceMetrics", "confusionMatrix"}
    assert evaluation["metadata"]["champion_accuracy"] == pytest.approx(0.2)

    third = _run(_in_bucket(vertex, models["C"], "run-3"), eval_sets["E2"], vertex)
    assert third["gate"]["deploy"] is False and "worse than the serving version" in third["gate"]["reason"]
    assert len(stub.requests_to("POST", r"/models:upload$")) == 2  # nothing uploaded
    (endpoint,) = stub.state.endpoints.values()
    assert [d["modelVersionId"] for d in endpoint["deployedModels"]] == ["2"]
    (versions,) = stub.state.models.values()
    assert [v["versionAliases"] for v in versions] == [[], ["default"]]


def test_failed_deploy_leaves_default_on_the_serving_version_vertex(vertex, models, eval_sets):
    stub = vertex["stub"]
    first = _run(_in_bucket(vertex, models["A"], "run-1"), eval_sets["E1"], vertex, allow_first_deploy=True)
    merges = len(stub.requests_to("POST", r":mergeVersionAliases$"))
    stub.fail_next("POST", r":deployModel$")
    with pytest.raises(Exception, match="injected failure"):
        _run(_in_bucket(vertex, models["B"], "run-2"), eval_sets["E2"], vertex)
    assert len(stub.requests_to("POST", r":mergeVersionAliases$")) == merges  # no alias moved
    (versions,) = stub.state.models.values()
    assert [v["versionAliases"] for v in versions] == [["default"], []]  # B uploaded, never served
    # The next run compares with A, the version that serves, scored on the new data.
    again = _run(_in_bucket(vertex, models["C"], "run-3"), eval_sets["E2"], vertex)
    assert again["gate"]["comparison"]["champion"] == first["uploaded"]["model"]
    assert again["gate"]["comparison"]["champion_accuracy"] == pytest.approx(0.2)
