"""The official ``google-cloud-aiplatform`` SDK, unchanged, against the local server over HTTP.

The SDK's REST transport keeps an ``http://`` scheme given in ``api_endpoint`` and sends
``GET /v1/{endpoint}`` then ``POST /v1/{endpoint}:predict`` / ``:explain``. ``location`` must be a
real Vertex region for ``aiplatform.init`` (it validates it); the endpoint's resource name may
still say ``locations/local``, which is what the server routes on.
"""

from __future__ import annotations

import base64
import io

import trainer  # noqa: F401  (legacy Keras before TensorFlow)

import numpy as np
import pytest
from google.auth.credentials import AnonymousCredentials
from google.cloud import aiplatform
from google.cloud.aiplatform import initializer
from PIL import Image

from serving.app import ServerConfig
from serving.backends import ModelDirBackend, RegistryBackend
from serving.registry import Registry
from serving.testing import running_server
from trainer.schema import CLASSES, SERVING_INPUT

IG = {"integratedGradientsAttribution": {"stepCount": 4}}


def _instances(n: int = 2) -> list[dict]:
    out = []
    for seed in range(n):
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(seed).integers(0, 255, (48, 64, 3), np.uint8)).save(buffer, "JPEG")
        out.append({SERVING_INPUT: {"b64": base64.b64encode(buffer.getvalue()).decode()}})
    return out


@pytest.fixture()
def sdk_against():
    """``aiplatform.init`` pointed at a local server; the SDK's global config restored afterwards."""
    def init(url: str) -> None:
        aiplatform.init(project="local", location="us-central1", api_endpoint=url, api_transport="rest",
                        credentials=AnonymousCredentials())

    try:
        yield init
    finally:  # aiplatform.init is bound to this object, so reset it in place
        initializer.global_config.__init__()


def _check_predict_and_explain(endpoint: aiplatform.Endpoint, deployed_id: str, model_name: str) -> None:
    prediction = endpoint.predict(instances=_instances())
    assert np.array(prediction.predictions).shape == (2, len(CLASSES))
    assert np.allclose(np.sum(prediction.predictions, axis=1), 1, atol=1e-4)
    assert prediction.deployed_model_id == deployed_id
    assert prediction.model_resource_name == model_name and prediction.model_version_id == "1"

    explained = endpoint.explain(instances=_instances(), deployed_model_id=deployed_id)
    assert explained.deployed_model_id == deployed_id
    assert np.allclose(explained.predictions, prediction.predictions, atol=1e-5)
    assert len(explained.explanations) == 2
    for explanation, probabilities in zip(explained.explanations, prediction.predictions):
        (attribution,) = explanation.attributions  # parsed into the SDK's Attribution message
        assert list(attribution.output_index) == [int(np.argmax(probabilities))]
        assert attribution.output_display_name == CLASSES[int(np.argmax(probabilities))]
        assert attribution.instance_output_value == pytest.approx(max(probabilities), abs=1e-5)
        assert "image" in dict(attribution.feature_attributions)


def test_sdk_registry_mode(sdk_against, exported_model_dir, tmp_path):
    registry = Registry(tmp_path / "registry")
    model = registry.upload_model("flowers", exported_model_dir, explanation_parameters=IG)
    endpoint = registry.create_endpoint("flowers-endpoint")
    deployed = registry.deploy_model(endpoint["name"], model["name"])
    config = ServerConfig(backend=RegistryBackend(registry), cache_dir=str(tmp_path / "cache"))
    with running_server(config) as url:
        sdk_against(url)
        remote = aiplatform.Endpoint(endpoint["name"])
        assert remote.display_name == "flowers-endpoint"
        assert remote.traffic_split == {deployed["id"]: 100}
        assert [d.id for d in remote.list_models()] == [deployed["id"]]
        _check_predict_and_explain(remote, deployed["id"], model["name"])


def test_sdk_model_dir_mode(sdk_against, exported_model_dir, tmp_path):
    config = ServerConfig(backend=ModelDirBackend(exported_model_dir, IG), cache_dir=str(tmp_path / "cache"))
    with running_server(config) as url:
        sdk_against(url)
        name = "projects/my-project/locations/us-central1/endpoints/1234"
        remote = aiplatform.Endpoint(name)
        assert remote.resource_name == name
        _check_predict_and_explain(remote, "1", "projects/local/locations/local/models/1")


def test_sdk_users_see_the_warnings(sdk_against, exported_model_dir, tmp_path):
    """Vertex's protos have no field for warnings, so the SDK drops the explanation's own list; each
    attribution's warnings also ride in its feature map (a Struct), which the SDK keeps."""
    capped = {"integratedGradientsAttribution": {"stepCount": 4, "targetError": 1e-9, "maxStepCount": 6}}
    config = ServerConfig(backend=ModelDirBackend(exported_model_dir, capped), cache_dir=str(tmp_path / "cache"))
    with running_server(config) as url:
        sdk_against(url)
        explained = aiplatform.Endpoint("projects/local/locations/us-central1/endpoints/1").explain(
            instances=_instances())
    for explanation in explained.explanations:
        (attribution,) = explanation.attributions
        warnings = list(dict(attribution.feature_attributions)["image"]["warnings"])
        assert warnings and all(attribution.output_display_name in w for w in warnings)
        assert any("max_step_count" in w or "not refined" in w for w in warnings), warnings
