"""``python -m serving`` as Vertex's custom prediction container: configured only by the ``AIP_*``
environment, model copied from ``AIP_STORAGE_URI``, every prediction carrying its explanation."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import trainer  # noqa: F401  (legacy Keras before TensorFlow)

import httpx
import numpy as np
import pytest
from PIL import Image

from serving.__main__ import build_config
from serving.testing import wait_until_up
from trainer.schema import CLASSES

REPO = Path(__file__).resolve().parents[1]
PREDICT_ROUTE = "/v1/endpoints/111/deployedModels/222:predict"
HEALTH_ROUTE = "/v1/endpoints/111/deployedModels/222"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _instance(seed: int) -> dict:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 60, 3), np.uint8)).save(buffer, "PNG")
    return {"bytes_inputs": {"b64": base64.b64encode(buffer.getvalue()).decode()}}


@pytest.fixture(scope="module")
def container(exported_model_dir, tmp_path_factory):
    """The server in a subprocess with the environment Vertex gives a custom container."""
    port, cache = _free_port(), tmp_path_factory.mktemp("cache")
    env = {**os.environ, "PYTHONPATH": str(REPO), "AIP_HTTP_PORT": str(port), "AIP_HEALTH_ROUTE": HEALTH_ROUTE,
           "AIP_PREDICT_ROUTE": PREDICT_ROUTE, "AIP_STORAGE_URI": f"file://{exported_model_dir}",
           "EXPLANATION_PARAMETERS": json.dumps({"integratedGradientsAttribution": {"stepCount": 4}}),
           "AIP_EXPLAIN_BUDGET": "5000"}  # 3 outputs at the adaptive cap (3 x 400) must fit
    log = tmp_path_factory.mktemp("log") / "server.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "serving", "--cache_dir", str(cache),
                                    "--log_level", "warning"], env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, timeout_s=180, path=HEALTH_ROUTE)  # 200 only once the model is loaded
        yield {"url": url, "cache": cache}
    except Exception:
        print(log.read_text()[-5000:])
        raise
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_predictions_carry_their_explanations(container):
    response = httpx.post(container["url"] + PREDICT_ROUTE, json={"instances": [_instance(0), _instance(1)]},
                          timeout=120)
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert len(predictions) == 2
    for prediction in predictions:
        probabilities = np.array(prediction["probabilities"])
        assert probabilities.shape == (len(CLASSES),)
        best = int(probabilities.argmax())
        assert prediction["label"] == CLASSES[best] and prediction["labelIndex"] == best
        (attribution,) = prediction["explanation"]["attributions"]
        assert attribution["outputIndex"] == [best] and "image" in attribution["featureAttributions"]
    # The model was copied from AIP_STORAGE_URI (a URI, as gs:// would be) into the cache.
    assert list(Path(container["cache"]).glob("*/saved_model.pb"))


def test_request_may_override_the_explanation_parameters(container):
    body = {"instances": [_instance(2)],
            "parameters": {"explanationParameters": {"integratedGradientsAttribution": {"stepCount": 3}, "topK": 3}}}
    response = httpx.post(container["url"] + PREDICT_ROUTE, json=body, timeout=120)
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"][0]["explanation"]["attributions"]) == 3


def test_container_refuses_bad_input_and_keeps_serving(container):
    response = httpx.post(container["url"] + PREDICT_ROUTE, json={"instances": [_instance(3), {"b64": "%%"}]})
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith("instances[1].b64: invalid base64")
    # The Vertex REST routes answer too, for the one model behind any endpoint name.
    endpoint = container["url"] + "/v1/projects/p/locations/l/endpoints/1"
    assert httpx.get(endpoint).json()["trafficSplit"] == {"1": 100}
    predicted = httpx.post(endpoint + ":predict", json={"instances": [_instance(3)]}, timeout=60)
    assert predicted.status_code == 200 and len(predicted.json()["predictions"][0]) == len(CLASSES)


@pytest.mark.parametrize("argv, environ, message", [
    ([], {}, "nothing to serve"),
    (["--registry", "r"], {"AIP_PREDICT_ROUTE": "/predict"}, "serves one model"),
    (["--model", "m"], {"EXPLANATION_PARAMETERS": "{\"xraiAttribution\": {\"stepCount\": 0}}"}, "step_count"),
    (["--model", "m"], {"EXPLANATION_PARAMETERS": "{not json"}, "not valid JSON"),
])
def test_configuration_errors(argv, environ, message):
    with pytest.raises(SystemExit, match=message):
        build_config(argv, environ)


def test_command_line_modes(tmp_path, exported_model_dir):
    from serving.backends import ModelDirBackend, RegistryBackend

    config, host, port, _ = build_config(["--registry", str(tmp_path), "--port", "9999", "--max_instances", "3"], {})
    assert isinstance(config.backend, RegistryBackend) and (host, port) == ("127.0.0.1", 9999)
    assert config.limits.max_instances == 3 and config.predict_route is None and not config.preload
    parameters = tmp_path / "parameters.json"
    parameters.write_text(json.dumps({"xraiAttribution": {"stepCount": 5}}))
    config, host, port, _ = build_config(["--model", exported_model_dir, "--explanation_parameters",
                                          str(parameters)], {"AIP_HTTP_PORT": "7070"})
    assert isinstance(config.backend, ModelDirBackend) and port == 7070
    spec = config.backend.version({})["explanationSpec"]
    assert spec["parameters"] == {"xraiAttribution": {"stepCount": 5}}
    assert spec["metadata"]["inputs"]["image"]["modality"] == "image"
