"""The local registry under kill -9 and races, with real processes, and the server reading it.

Workers are separate Python processes (the registry imports no TensorFlow, so one starts in a
fraction of a second) doing the pipeline's registry steps in a loop: ``upload_version`` (an upload
step), ``rollout`` (a deploy step: deploy, move ``default``, undeploy the rest) and ``retire`` (an
undeploy). They are killed with SIGKILL at random moments, several at once, round after round; after
every round the registry must hold: every file parses, no temporary file is left once a registry has
been opened, one model per display name, each endpoint's traffic covering exactly its deployed models
and summing to 100, every deployed model's version present, and the server answering predictions.
Then two uploads of a new display name, and two deploys to one endpoint, race from a common start.
"""

import base64
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from serving.registry import Registry

REPO = Path(__file__).resolve().parents[1]
ENDPOINT = "shared-endpoint"
NAMES = ("flowers", "daisies")
ROUNDS = 40

_WORKER = textwrap.dedent("""
    import random, sys
    from serving.registry import Registry, RegistryError
    root, artifacts, seed = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3])
    rng = random.Random(seed)
    r = Registry(root)
    for i in range(10**9):
        op = rng.choice(["upload", "deploy", "deploy", "undeploy"])
        name = rng.choice(%r)
        if op == "upload":
            r.upload_version(name, rng.choice(artifacts))
        elif op == "deploy" and r.list_models(name):
            versions = r.list_model_versions(r.list_models(name)[0]["name"])
            v = rng.choice(versions)
            serving = any(e["deployedModels"] for e in r.list_endpoints(%r))  # (a canary needs a model to share with)
            try:
                r.rollout(%r, v["name"] + "@" + v["versionId"], traffic_percentage=rng.choice([100, 100, 40])
                          if serving else 100)
            except RegistryError as error:  # our check raced with a killed worker's: the registry says so
                if "no traffic yet" not in str(error):
                    raise
        elif op == "undeploy" and r.list_endpoints(%r):
            endpoint = r.list_endpoints(%r)[0]
            ids = [d["id"] for d in endpoint["deployedModels"]]
            if len(ids) > 1:  # keep one serving, as a rollout would
                r.retire(endpoint["name"], [rng.choice(ids)])
        print(i, op, flush=True)
""" % (NAMES, ENDPOINT, ENDPOINT, ENDPOINT, ENDPOINT))

_RACER = textwrap.dedent("""
    import json, os, sys, time
    from serving.registry import Registry
    root, go, what, arg = sys.argv[1:5]
    r = Registry(root)
    while not os.path.exists(go):
        time.sleep(0.001)
    if what == "upload":
        v = r.upload_version("new-" + os.path.basename(go), arg)
        print(json.dumps({"model": v["name"] + "@" + v["versionId"]}))
    else:
        print(json.dumps(r.rollout(%r, arg)))
""" % ENDPOINT)


def _python(code: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


@pytest.fixture()
def artifacts(exported_model_dir, tmp_path) -> list[str]:
    """Six artifact paths (six retrains) holding the tiny exported model."""
    paths = []
    for i in range(6):
        path = tmp_path / "artifacts" / f"run-{i}"
        path.parent.mkdir(exist_ok=True)
        path.symlink_to(exported_model_dir, target_is_directory=True)
        paths.append(str(path))
    return paths


def check_invariants(root: Path) -> dict:
    """Everything a crash or race must never break; returns the endpoint (or {})."""
    for path in root.rglob("*.json"):
        json.loads(path.read_text())  # no half-written file
    registry = Registry(root)  # opening sweeps what killed writers left
    assert not list(root.rglob("*.tmp")), "temporary files left after opening the registry"
    for name in NAMES:
        assert len(registry.list_models(name)) <= 1, f"two models called {name}"
    for model in registry.list_models():
        versions = registry.list_model_versions(model["name"])
        assert sum("default" in v["versionAliases"] for v in versions) == 1
        assert len({v["artifactUri"] for v in versions}) == len(versions), "one artifact uploaded twice"
    endpoints = registry.list_endpoints(ENDPOINT)
    assert len(endpoints) <= 1, "two endpoints with one display name"
    for endpoint in endpoints:
        ids = {d["id"] for d in endpoint["deployedModels"]}
        assert set(endpoint["trafficSplit"]) == ids
        assert sum(endpoint["trafficSplit"].values()) == (100 if ids else 0)
        for deployed in endpoint["deployedModels"]:
            registry.get_model(deployed["model"])  # raises if the version is missing
    return endpoints[0] if endpoints else {}


def _predict(url: str, endpoint: dict, image: bytes) -> httpx.Response:
    body = {"instances": [{"bytes_inputs": {"b64": base64.b64encode(image).decode()}}]}
    return httpx.post(f"{url}/v1/{endpoint['name']}:predict", json=body, timeout=60)


def test_kill_9_at_random_points_and_races_leave_a_consistent_serving_registry(tmp_path, artifacts):
    import trainer  # noqa: F401

    import tensorflow as tf

    from serving.app import ServerConfig, create_app
    from serving.backends import RegistryBackend
    from serving.testing import serving_app

    root = tmp_path / "registry"
    Registry(root).upload_version("flowers", artifacts[0])
    image = tf.io.encode_jpeg(np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8)).numpy()
    rng = random.Random(12)
    config = ServerConfig(backend=RegistryBackend(Registry(root)), cache_dir=str(tmp_path / "cache"))
    ops_done = kills = served = 0
    with serving_app(create_app(config)) as url:
        for round_ in range(ROUNDS):
            workers = [_python(_WORKER, str(root), ",".join(artifacts), str(rng.randrange(10**6)))
                       for _ in range(rng.choice([1, 2, 2, 3]))]
            started = [worker.stdout.readline() for worker in workers]  # each is at work (whatever the load)
            time.sleep(rng.uniform(0.0, 0.4))  # then a random point in its loop
            for worker in workers:
                worker.send_signal(signal.SIGKILL)
            for worker, first in zip(workers, started):
                out, err = worker.communicate(timeout=30)
                assert first and worker.returncode == -signal.SIGKILL, f"worker failed on its own:\n{err[-3000:]}"
                ops_done += 1 + len(out.splitlines())
                kills += 1
            endpoint = check_invariants(root)
            if endpoint.get("deployedModels"):
                response = _predict(url, endpoint, image)
                assert response.status_code == 200, response.text
                assert len(response.json()["predictions"][0]) == 5
                served += 1
    assert ops_done > ROUNDS and served > ROUNDS // 2, (ops_done, served)  # the kills landed mid-work
    print(f"{kills} workers killed over {ROUNDS} rounds after {ops_done} completed steps; {served} predictions")


def test_two_uploads_of_a_new_name_and_two_deploys_to_one_endpoint_race_safely(tmp_path, artifacts):
    root = tmp_path / "registry"
    registry = Registry(root)
    for round_ in range(6):
        go = tmp_path / f"go-upload-{round_}"
        racers = [_python(_RACER, str(root), str(go), "upload", artifacts[i]) for i in (0, 1)]
        time.sleep(0.3)
        go.touch()
        results = [json.loads(r.communicate(timeout=60)[0]) for r in racers]
        assert all(r.returncode == 0 for r in racers)
        (model,) = registry.list_models(f"new-{go.name}")  # one model, two versions
        assert sorted(r["model"] for r in results) == [f"{model['name']}@1", f"{model['name']}@2"]

    flowers = registry.upload_version("flowers", artifacts[0])
    versions = [f"{flowers['name']}@1"] + [
        f"{flowers['name']}@{registry.upload_version('flowers', a)['versionId']}" for a in artifacts[1:3]]
    for round_ in range(8):
        go = tmp_path / f"go-deploy-{round_}"
        pair = random.Random(round_).sample(versions, 2)
        racers = [_python(_RACER, str(root), str(go), "deploy", v) for v in pair]
        time.sleep(0.3)
        go.touch()
        outs = [r.communicate(timeout=60) for r in racers]
        assert all(r.returncode == 0 for r in racers), [err[-2000:] for _, err in outs]
        results = [json.loads(out) for out, _ in outs]
        for version, result in zip(pair, results):
            assert result["model"] == version  # each reports its own deploy, not the other's
        endpoint = check_invariants(root)
        (deployed,) = endpoint["deployedModels"]  # one serves: the one deployed last
        assert deployed["model"] in pair and endpoint["trafficSplit"] == {deployed["id"]: 100}
        last = next(r for r in results if r["deployed_model_id"] == deployed["id"])
        other = next(r for r in results if r is not last)
        assert other["deployed_model_id"] in last["undeployed"] or other["reused"] or \
            other["deployed_model_id"] == deployed["id"]
        assert registry.get_model(flowers["name"])["versionId"] == deployed["modelVersionId"]  # default serves
