"""The local model registry: Vertex-shaped resources, versions, aliases, traffic split,
evaluations, and durability (a crash or a failed write never loses or corrupts a file)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from serving import storage
from serving.registry import PARENT, Registry, RegistryError, allocate_traffic, unallocate_traffic

REPO = Path(__file__).resolve().parents[1]
PARAMS = {"integratedGradientsAttribution": {"stepCount": 10}}


@pytest.fixture()
def registry(tmp_path) -> Registry:
    return Registry(tmp_path / "registry")


@pytest.fixture()
def artifact(tmp_path) -> str:
    """A model directory as the exporter leaves it (only the file the registry reads)."""
    directory = tmp_path / "artifact"
    directory.mkdir()
    (directory / "explanation_metadata.json").write_text(json.dumps({"inputs": {"image": {"modality": "image"}}}))
    return str(directory)


def test_upload_versions_and_aliases(registry, artifact):
    v1 = registry.upload_model("flowers", artifact, labels={"team": "xai"}, description="first")
    assert v1["name"].startswith(f"{PARENT}/models/") and v1["versionId"] == "1"
    assert v1["versionAliases"] == ["default"] and v1["labels"] == {"team": "xai"}
    assert v1["createTime"].endswith("Z") and v1["versionCreateTime"] == v1["createTime"]

    v2 = registry.upload_model("flowers", artifact, parent_model=v1["name"], version_aliases=["champion"])
    assert v2["name"] == v1["name"] and v2["versionId"] == "2"
    assert v2["versionAliases"] == ["default", "champion"] and v2["createTime"] == v1["createTime"]
    # "default" moved to the newest version; the old one keeps no alias.
    assert [(v["versionId"], v["versionAliases"]) for v in registry.list_model_versions(v1["name"])] == \
        [("1", []), ("2", ["default", "champion"])]

    v3 = registry.upload_model("flowers", artifact, parent_model=v1["name"].rsplit("/", 1)[1],
                               version_aliases=["candidate"], is_default_version=False)
    assert v3["versionId"] == "3" and v3["versionAliases"] == ["candidate"]
    model_id = v1["name"].rsplit("/", 1)[1]
    assert registry.get_model(v1["name"])["versionId"] == "2"  # default alias
    assert registry.get_model(model_id)["versionId"] == "2"
    assert registry.get_model(f"{model_id}@1")["description"] == "first"
    assert registry.get_model(f"{v1['name']}@candidate")["versionId"] == "3"
    assert registry.get_model(f"models/{model_id}@champion")["versionId"] == "2"

    other = registry.upload_model("daisies", artifact)
    assert [m["displayName"] for m in registry.list_models()] == ["flowers", "daisies"]
    assert [m["versionId"] for m in registry.list_models("flowers")] == ["2"]
    assert registry.list_models("daisies")[0]["name"] == other["name"]


def test_explanation_spec_and_container(registry, artifact):
    version = registry.upload_model("flowers", artifact, explanation_parameters=PARAMS,
                                    serving_container={"image_uri": "us-docker.pkg.dev/p/r/serving:1",
                                                       "predict_route": "/predict"})
    assert version["explanationSpec"] == {"metadata": {"inputs": {"image": {"modality": "image"}}},
                                          "parameters": PARAMS}  # metadata read from the artifact
    assert version["containerSpec"] == {"imageUri": "us-docker.pkg.dev/p/r/serving:1", "predictRoute": "/predict"}
    with pytest.raises(RegistryError, match="explanation_metadata.json does not exist"):
        registry.upload_model("flowers", str(Path(artifact) / "missing"), explanation_parameters=PARAMS)
    with pytest.raises(RegistryError, match="without explanation_parameters"):
        registry.upload_model("flowers", artifact, explanation_metadata={"inputs": {}})


@pytest.mark.parametrize("call, message", [
    (lambda r, a: r.get_model("12345"), "not found"),
    (lambda r, a: r.get_model(f"{r.upload_model('m', a)['name']}@7"), "no version or alias '7'"),
    (lambda r, a: r.get_model("projects/local/locations/local/endpoints/1"), "not a resource name of models"),
    (lambda r, a: r.upload_model("m", a, labels={"Team": "x"}), "label key 'Team'"),
    (lambda r, a: r.upload_model("m", a, version_aliases=["42"]), "version alias '42'"),
    (lambda r, a: r.upload_model("", a), "display_name"),
    (lambda r, a: r.get_endpoint("999"), "endpoint .*999 not found"),
    (lambda r, a: r.import_model_evaluation(r.upload_model("m", a)["name"], {"x": float("nan")}), "plain JSON"),
])
def test_clear_errors(registry, artifact, call, message):
    with pytest.raises(RegistryError, match=message):
        call(registry, artifact)
    with pytest.raises(LookupError):  # also a LookupError, for callers that catch "not found"
        registry.get_model("nope")


def test_evaluations_per_version(registry, artifact):
    v1 = registry.upload_model("flowers", artifact)
    v2 = registry.upload_model("flowers", artifact, parent_model=v1["name"])
    e1 = registry.import_model_evaluation(f"{v1['name']}@1", {"auPrc": 0.5}, display_name="old")
    e2 = registry.import_model_evaluation(v1["name"], {"auPrc": 0.9, "confusionMatrix": {"rows": [[1, 0]]}})
    assert e1["name"].startswith(f"{v1['name']}@1/evaluations/") and e1["displayName"] == "old"
    assert e2["name"].startswith(f"{v2['name']}@2/evaluations/")
    assert [e["metrics"]["auPrc"] for e in registry.list_model_evaluations(f"{v1['name']}@1")] == [0.5]
    assert [e["metrics"]["auPrc"] for e in registry.list_model_evaluations(v1["name"])] == [0.9]


def test_endpoints_deploy_and_traffic_split(registry, artifact):
    model = registry.upload_model("flowers", artifact)
    endpoint = registry.get_or_create_endpoint("flowers-endpoint")
    assert registry.get_or_create_endpoint("flowers-endpoint")["name"] == endpoint["name"]
    assert endpoint["deployedModels"] == [] and endpoint["trafficSplit"] == {}
    with pytest.raises(RegistryError, match="first model needs traffic_percentage=100"):
        registry.deploy_model(endpoint["name"], model["name"], traffic_percentage=40)

    a = registry.deploy_model(endpoint["name"], model["name"], machine_type="n1-standard-2", max_replica_count=2)
    assert a["model"] == f"{model['name']}@1" and a["modelVersionId"] == "1" and a["displayName"] == "flowers"
    assert a["dedicatedResources"] == {"machineSpec": {"machineType": "n1-standard-2"},
                                       "minReplicaCount": 1, "maxReplicaCount": 2}
    v2 = registry.upload_model("flowers", artifact, parent_model=model["name"])
    b = registry.deploy_model(endpoint["name"], f"{model['name']}@{v2['versionId']}", traffic_percentage=30,
                              display_name="canary")
    c = registry.deploy_model(endpoint["name"], model["name"], traffic_percentage=10)
    split = registry.get_endpoint(endpoint["name"])["trafficSplit"]
    assert split == {a["id"]: 63, b["id"]: 27, c["id"]: 10}  # 70:30 kept within the remaining 90
    assert [d["id"] for d in registry.get_endpoint(endpoint["name"])["deployedModels"]] == [a["id"], b["id"], c["id"]]

    registry.undeploy_model(endpoint["name"], a["id"])
    split = registry.get_endpoint(endpoint["name"])["trafficSplit"]
    assert split == {b["id"]: 73, c["id"]: 27} and sum(split.values()) == 100
    with pytest.raises(RegistryError, match="no deployed model"):
        registry.undeploy_model(endpoint["name"], a["id"])
    registry.undeploy_model(endpoint["name"], b["id"])
    registry.undeploy_model(endpoint["name"], c["id"])
    assert registry.get_endpoint(endpoint["name"])["trafficSplit"] == {}
    assert [e["name"] for e in registry.list_endpoints("flowers-endpoint")] == [endpoint["name"]]
    assert registry.list_endpoints("other") == []


def test_traffic_arithmetic_matches_the_sdk():
    assert allocate_traffic({}, "a", 100) == {"a": 100}
    assert allocate_traffic({}, "a", 0) == {"a": 100}
    assert allocate_traffic({"a": 100}, "b", 0) == {"a": 100, "b": 0}
    assert allocate_traffic({"a": 100}, "b", 100) == {"a": 0, "b": 100}
    assert allocate_traffic({"a": 33, "b": 33, "c": 34}, "d", 10) == {"a": 30, "b": 30, "c": 30, "d": 10}
    assert unallocate_traffic({"a": 50, "b": 25, "c": 25}, "a") == {"b": 50, "c": 50}
    assert unallocate_traffic({"a": 100, "b": 0}, "a") == {"b": 100}  # never an endpoint serving nothing


def test_failed_write_leaves_the_old_file(registry, artifact, monkeypatch):
    endpoint = registry.create_endpoint("e")
    path = registry.root / "endpoints" / f"{endpoint['name'].rsplit('/', 1)[1]}.json"
    before = path.read_bytes()
    model = registry.upload_model("flowers", artifact)

    def crash(src, dst):  # the process dies after the temp file is written and fsync-ed
        raise OSError("simulated crash between write and replace")

    monkeypatch.setattr(storage.os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        registry.deploy_model(endpoint["name"], model["name"])
    monkeypatch.undo()
    assert path.read_bytes() == before and registry.get_endpoint(endpoint["name"])["deployedModels"] == []
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # the temp file was cleaned up
    registry.deploy_model(endpoint["name"], model["name"])  # and the registry still works
    assert len(registry.get_endpoint(endpoint["name"])["deployedModels"]) == 1


_WRITER = textwrap.dedent("""
    import sys
    from serving.registry import Registry
    r = Registry(sys.argv[1])
    endpoint = r.get_or_create_endpoint("shared")
    model = r.list_models("flowers")[0]["name"]
    count = int(sys.argv[2])
    for i in range(count if count > 0 else 10**9):
        r.deploy_model(endpoint["name"], model, traffic_percentage=0 if i % 2 else 100)
        r.upload_model("flowers", sys.argv[3], parent_model=model, version_aliases=[f"v{sys.argv[4]}x{i}"])
        print(i, flush=True)
""")


def _writer(root, artifact, count, tag) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", _WRITER, str(root), str(count), artifact, str(tag)],
                            stdout=subprocess.PIPE, text=True, env=env)


def _assert_consistent(registry: Registry) -> None:
    for path in registry.root.rglob("*.json"):
        json.loads(path.read_text())  # every file parses: no half-written JSON
    for endpoint in registry.list_endpoints():
        ids = {d["id"] for d in endpoint["deployedModels"]}
        assert set(endpoint["trafficSplit"]) == ids
        assert sum(endpoint["trafficSplit"].values()) == (100 if ids else 0)


def test_killed_writer_leaves_a_valid_registry(registry, artifact):
    registry.upload_model("flowers", artifact)
    writer = _writer(registry.root, artifact, 0, "k")
    for _ in range(5):  # let it get well into its writes, then kill it mid-flight
        assert writer.stdout.readline(), "writer died early"
    time.sleep(0.05)
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=30)
    _assert_consistent(registry)
    endpoint = registry.list_endpoints("shared")[0]
    assert len(endpoint["deployedModels"]) >= 5
    registry.deploy_model(endpoint["name"], registry.list_models()[0]["name"])  # still writable


def test_concurrent_writers_lose_nothing(registry, artifact):
    model = registry.upload_model("flowers", artifact)
    registry.create_endpoint("shared")
    writers = [_writer(registry.root, artifact, 4, tag) for tag in range(3)]
    for writer in writers:
        writer.communicate(timeout=120)
        assert writer.returncode == 0
    _assert_consistent(registry)
    assert len(registry.list_endpoints("shared")) == 1
    assert len(registry.list_endpoints("shared")[0]["deployedModels"]) == 12
    versions = registry.list_model_versions(model["name"])
    assert [v["versionId"] for v in versions] == [str(i) for i in range(1, 14)]
    assert sum("default" in v["versionAliases"] for v in versions) == 1


def test_invalid_explanation_parameters_are_refused_at_upload(registry, artifact):
    with pytest.raises(RegistryError, match="invalid explanation_parameters.*step_count"):
        registry.upload_model("flowers", artifact,
                              explanation_parameters={"integratedGradientsAttribution": {"stepCount": 1000}})
    assert registry.list_models() == []


def test_rollout_moves_default_after_deploy_and_is_idempotent(registry, artifact, tmp_path):
    v1 = registry.upload_version("flowers", artifact)
    assert registry.upload_version("flowers", artifact) == v1  # the same artifact again: the same version
    other = tmp_path / "artifact2"
    other.mkdir()
    v2 = registry.upload_version("flowers", str(other))
    assert (v1["versionAliases"], v2["versionAliases"]) == (["default"], [])  # not default before it serves
    first = registry.rollout("e", f"{v1['name']}@1")
    second = registry.rollout("e", f"{v1['name']}@2")
    assert second["undeployed"] == [first["deployed_model_id"]] and not second["reused"]
    assert registry.get_model(v1["name"])["versionId"] == "2"  # default moved once it served
    again = registry.rollout("e", f"{v1['name']}@2")  # a retried step: nothing deployed twice
    assert again["reused"] and again["deployed_model_id"] == second["deployed_model_id"]
    (endpoint,) = registry.list_endpoints("e")
    assert endpoint["trafficSplit"] == {second["deployed_model_id"]: 100}
    assert registry.deployed_versions() == {(v1["name"], "2")}
    canary = registry.upload_version("flowers", str(tmp_path))
    registry.rollout("e", f"{v1['name']}@{canary['versionId']}", traffic_percentage=20)
    assert registry.get_model(v1["name"])["versionId"] == "2"  # a canary does not take default
    assert registry.retire(endpoint["name"], [second["deployed_model_id"], "404"]) == [second["deployed_model_id"]]
    with pytest.raises(RegistryError, match="cannot be removed"):
        registry.merge_version_aliases(f"{v1['name']}@2", ["-default"])


def test_opening_the_registry_sweeps_temp_files_killed_writers_left(registry, artifact):
    registry.upload_model("flowers", artifact)
    orphan = registry.root / "models" / ".123.json.abcd.tmp"
    orphan.write_text('{"half": ')
    Registry(registry.root)
    assert not orphan.exists() and len(registry.list_models()) == 1


def test_model_cache_keeps_only_deployed_versions(exported_model_dir, tmp_path):
    from serving.models import ModelCache

    registry = Registry(tmp_path / "registry")
    cache = ModelCache(tmp_path / "cache", deployed=registry.deployed_versions)
    versions = []
    for i in range(3):  # three retrains of one model, each deployed in turn
        artifact = tmp_path / f"run-{i}"
        artifact.symlink_to(exported_model_dir, target_is_directory=True)
        version = registry.upload_version("flowers", str(artifact))
        registry.rollout("e", f"{version['name']}@{version['versionId']}")
        served = cache.get(registry.get_model(f"{version['name']}@{version['versionId']}"))
        assert served.predict([_jpeg()]).shape == (1, 5)
        versions.append(version)
        assert [key[1] for key in cache.keys()] == [version["versionId"]]  # the undeployed one was dropped
    canary = registry.upload_version("flowers", exported_model_dir)
    registry.rollout("e", f"{canary['name']}@{canary['versionId']}", traffic_percentage=10)
    cache.get(registry.get_model(f"{canary['name']}@{canary['versionId']}"))
    assert sorted(key[1] for key in cache.keys()) == ["3", "4"]  # both deployed: both kept
    registry.retire(registry.list_endpoints("e")[0]["name"])
    assert len(cache.prune()) == 2 and cache.keys() == []


def _jpeg() -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 90)).save(out, format="JPEG")
    return out.getvalue()


def test_a_deploy_that_fails_leaves_default_on_the_serving_version(registry, artifact, tmp_path, monkeypatch):
    v1 = registry.upload_version("flowers", artifact)
    registry.rollout("e", f"{v1['name']}@1")
    v2 = registry.upload_version("flowers", str(tmp_path))

    def crash(src, dst):  # the deploy's endpoint write dies before it lands
        raise OSError("simulated crash")

    monkeypatch.setattr(storage.os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        registry.rollout("e", f"{v2['name']}@{v2['versionId']}")
    monkeypatch.undo()
    assert registry.get_model(v1["name"])["versionId"] == "1"  # default: still the version that serves
    assert [d["modelVersionId"] for d in registry.list_endpoints("e")[0]["deployedModels"]] == ["1"]
    registry.rollout("e", f"{v2['name']}@{v2['versionId']}")  # the retried step completes
    assert registry.get_model(v1["name"])["versionId"] == "2"


def test_registry_server_keeps_only_the_deployed_versions_loaded(exported_model_dir, tmp_path):
    """Over HTTP: each retrain replaces the serving version, and the server's cache (and its
    predict batchers) let go of the old one instead of growing by a model per retrain."""
    import base64

    import httpx

    from serving.app import ServerConfig, create_app
    from serving.backends import RegistryBackend
    from serving.testing import serving_app

    registry = Registry(tmp_path / "registry")
    config = ServerConfig(backend=RegistryBackend(registry), cache_dir=str(tmp_path / "cache"))
    app = create_app(config)
    body = {"instances": [{"bytes_inputs": {"b64": base64.b64encode(_jpeg()).decode()}}]}
    with serving_app(app) as url:
        for i in range(3):
            artifact = tmp_path / f"run-{i}"
            artifact.symlink_to(exported_model_dir, target_is_directory=True)
            version = registry.upload_version("flowers", str(artifact))
            registry.rollout("e", f"{version['name']}@{version['versionId']}")
            endpoint = registry.list_endpoints("e")[0]["name"]
            answer = httpx.post(f"{url}/v1/{endpoint}:predict", json=body, timeout=60)
            assert answer.status_code == 200, answer.text
            assert [key[1] for key in app.state.models.keys()] == [version["versionId"]]
            assert [key[1] for key in app.state.batchers] == [version["versionId"]]


def test_a_damaged_registry_file_is_named(exported_model_dir, tmp_path, caplog):
    """A registry file cut short outside the registry (its own writes are atomic) is named by path,
    to the CLI's caller and in the server's log; the server answers 500 naming the file (not its
    absolute path) and serves again once the file is restored."""
    import base64

    import httpx

    from serving.app import ServerConfig, create_app
    from serving.backends import RegistryBackend
    from serving.storage import DamagedFileError
    from serving.testing import serving_app

    registry = Registry(tmp_path / "registry")
    version = registry.upload_version("flowers", exported_model_dir)
    registry.rollout("e", f"{version['name']}@1")
    endpoint = registry.list_endpoints("e")[0]["name"]
    model_file = tmp_path / "registry" / "models" / f"{version['name'].rsplit('/', 1)[1]}.json"
    whole = model_file.read_bytes()
    model_file.write_bytes(whole[:40])
    with pytest.raises(DamagedFileError, match=f"{model_file}: damaged, not valid JSON"):
        registry.get_model(version["name"])
    app = create_app(ServerConfig(backend=RegistryBackend(registry), cache_dir=str(tmp_path / "cache")))
    body = {"instances": [{"bytes_inputs": {"b64": base64.b64encode(_jpeg()).decode()}}]}
    with serving_app(app) as url:
        answer = httpx.post(f"{url}/v1/{endpoint}:predict", json=body, timeout=60)
        assert answer.status_code == 500, answer.text
        assert f"models/{model_file.name} is damaged" in answer.json()["error"]["message"]
        assert str(tmp_path) not in answer.text and f"{model_file}: damaged" in caplog.text
        model_file.write_bytes(whole)
        assert httpx.post(f"{url}/v1/{endpoint}:predict", json=body, timeout=60).status_code == 200
        endpoint_file = tmp_path / "registry" / "endpoints" / f"{endpoint.rsplit('/', 1)[1]}.json"
        endpoint_file.write_text(endpoint_file.read_text()[:30])  # the endpoint's own file: not "not found"
        answer = httpx.post(f"{url}/v1/{endpoint}:predict", json=body, timeout=60)
        assert answer.status_code == 500 and f"endpoints/{endpoint_file.name} is damaged" in answer.text, answer.text
