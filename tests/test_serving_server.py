"""The local endpoint server over real HTTP: Vertex's paths and response shapes, traffic split,
registry changes served without restart, and every kind of bad input answered with Vertex's
error JSON naming the instance, while good requests keep being served concurrently."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import trainer  # noqa: F401  (legacy Keras before TensorFlow)

import httpx
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from serving.app import ServerConfig, create_app
from serving.backends import RegistryBackend
from serving.instances import Limits
from serving.models import ModelCache
from serving.registry import Registry
from serving.testing import serving_app
from trainer.schema import CLASSES, SERVING_INPUT

IG_PARAMETERS = {"integratedGradientsAttribution": {"stepCount": 4}}
LIMITS = Limits(max_body_bytes=300_000, max_instances=4, max_image_pixels=512 * 512)


def encode(array: np.ndarray, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt)
    return buffer.getvalue()


def image_bytes(seed: int = 0, size: tuple[int, int] = (40, 56), fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    return encode(rng.integers(0, 255, (*size, 3), dtype=np.uint8), fmt)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def instance(data: bytes) -> dict:
    return {SERVING_INPUT: {"b64": b64(data)}}


def png_with_header_size(width: int, height: int) -> bytes:
    """A small valid PNG whose header claims ``width x height`` (a decompression bomb's header)."""
    png = bytearray(encode(np.zeros((1, 1, 3), np.uint8), "PNG"))
    ihdr = png.index(b"IHDR")
    png[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    png[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(png[ihdr:ihdr + 17])))
    return bytes(png)


@pytest.fixture(scope="module")
def served(exported_model_dir, tmp_path_factory):
    """A registry with one model deployed to one endpoint, served over HTTP."""
    registry = Registry(tmp_path_factory.mktemp("registry"))
    model = registry.upload_model("flowers", exported_model_dir, explanation_parameters=IG_PARAMETERS)
    endpoint = registry.create_endpoint("flowers-endpoint")
    deployed = registry.deploy_model(endpoint["name"], model["name"])
    config = ServerConfig(backend=RegistryBackend(registry), cache_dir=str(tmp_path_factory.mktemp("cache")),
                          limits=LIMITS)
    app = create_app(config)
    with serving_app(app) as url:
        yield {"url": url, "registry": registry, "model": model, "endpoint": endpoint, "deployed": deployed,
               "models": app.state.models, "app_state": app.state}


def endpoint_url(served, endpoint=None) -> str:
    return f"{served['url']}/v1/{(endpoint or served['endpoint'])['name']}"


def test_get_endpoint_and_health(served):
    response = httpx.get(endpoint_url(served))
    assert response.status_code == 200
    assert response.json() == served["registry"].get_endpoint(served["endpoint"]["name"])
    assert httpx.get(served["url"] + "/health").json() == {"status": "ok"}
    missing = httpx.get(f"{served['url']}/v1/projects/local/locations/local/endpoints/404")
    assert missing.status_code == 404 and missing.json()["error"]["status"] == "NOT_FOUND"


def test_predict_matches_the_saved_model(served, exported_model_dir):
    images = [image_bytes(0), image_bytes(1, fmt="PNG")]
    response = httpx.post(endpoint_url(served) + ":predict",
                          json={"instances": [instance(images[0]), {"b64": b64(images[1])}]}, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["deployedModelId"] == served["deployed"]["id"]
    assert body["model"] == served["model"]["name"] and body["modelVersionId"] == "1"
    assert body["modelDisplayName"] == "flowers"
    predictions = np.array(body["predictions"])
    assert predictions.shape == (2, len(CLASSES))
    expected = tf.saved_model.load(exported_model_dir).signatures["serving_default"](
        **{SERVING_INPUT: tf.constant(images)})["probabilities"].numpy()
    np.testing.assert_allclose(predictions, expected, rtol=1e-5, atol=1e-6)

    raw = httpx.post(endpoint_url(served) + ":rawPredict", json={"instances": [instance(images[0])]}, timeout=60)
    assert raw.status_code == 200
    assert raw.headers["X-Vertex-AI-Deployed-Model-Id"] == served["deployed"]["id"]
    assert raw.headers["X-Vertex-AI-Model"] == served["model"]["name"]
    np.testing.assert_allclose(raw.json()["predictions"][0], expected[0], rtol=1e-5, atol=1e-6)


GOOD = instance(image_bytes(3))
_WHOLE = image_bytes(4, size=(64, 64))
TRUNCATED = _WHOLE[:len(_WHOLE) * 2 // 3]  # header intact, scan data cut off

BAD_REQUESTS = [
    # (name, raw body, HTTP code, text the message must contain)
    ("invalid json", b'{"instances": [', 400, "not valid JSON"),
    ("not an object", b"[1, 2]", 400, "must be a JSON object"),
    ("missing instances", json.dumps({"inputs": [GOOD]}).encode(), 400, "no 'instances'"),
    ("empty instances", json.dumps({"instances": []}).encode(), 400, "non-empty list"),
    ("wrong key", json.dumps({"instances": [GOOD, {"image": {"b64": "AAAA"}}]}).encode(), 400,
     "instances[1]: expected"),
    ("b64 not a string", json.dumps({"instances": [{"b64": 12}]}).encode(), 400, "instances[0].b64"),
    ("invalid base64", json.dumps({"instances": [GOOD, GOOD, {"b64": "not base64!"}]}).encode(), 400,
     "instances[2].b64: invalid base64"),
    ("no image", json.dumps({"instances": [instance(b"just some bytes")]}).encode(), 400,
     "instances[0].bytes_inputs: not an image"),
    ("truncated image", json.dumps({"instances": [GOOD, instance(TRUNCATED)]}).encode(), 400,
     "instances[1].bytes_inputs: JPEG image cannot be decoded"),
    ("unsupported format", json.dumps({"instances": [instance(image_bytes(5, fmt="TIFF"))]}).encode(), 400,
     "unsupported image format TIFF"),
    ("over the pixel budget", json.dumps({"instances": [instance(encode(np.zeros((600, 600, 3), np.uint8),
                                                                        "PNG"))]}).encode(), 400,
     "600x600 = 360000 pixels, over the server's budget of 262144 pixels"),
    ("bomb header", json.dumps({"instances": [instance(png_with_header_size(100_000, 100_000))]}).encode(), 400,
     "instances[0].bytes_inputs: image is over the server's budget of 262144 pixels"),
    ("too many instances", json.dumps({"instances": [GOOD] * 5}).encode(), 400, "too many instances: 5 > "),
    ("parameters not an object", json.dumps({"instances": [GOOD], "parameters": [1]}).encode(), 400,
     "'parameters' must be a JSON object"),
    ("body over the limit", json.dumps({"instances": [{"b64": "A" * 400_000}]}).encode(), 413,
     "over the limit of 300000 bytes"),
]


@pytest.mark.parametrize("name, body, code, message", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
@pytest.mark.parametrize("verb", [":predict", ":explain"])
def test_bad_input_is_refused_clearly(served, name, body, code, message, verb):
    response = httpx.post(endpoint_url(served) + verb, content=body,
                          headers={"Content-Type": "application/json"}, timeout=60)
    assert response.status_code == code, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["status"] == "INVALID_ARGUMENT"
    assert message in error["message"], error["message"]


def test_chunked_body_over_the_limit_is_refused(served):
    def chunks():  # no Content-Length: the limit must be enforced while streaming
        for _ in range(40):
            yield b"x" * 10_000

    response = httpx.post(endpoint_url(served) + ":predict", content=chunks(), timeout=60,
                          headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and "over the limit" in response.json()["error"]["message"]


def test_bad_and_good_requests_concurrently(served):
    good = json.dumps({"instances": [GOOD, instance(image_bytes(6, fmt="PNG"))]}).encode()
    jobs = [(good, 200)] * 6 + [(body, code) for _, body, code, _ in BAD_REQUESTS]
    with httpx.Client(timeout=120) as client, ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda job: client.post(endpoint_url(served) + ":predict", content=job[0],
                                                        headers={"Content-Type": "application/json"}), jobs))
    assert [a.status_code for a in answers] == [code for _, code in jobs]
    for answer in answers[:6]:
        assert np.array(answer.json()["predictions"]).shape == (2, len(CLASSES))
    assert httpx.get(served["url"] + "/health").status_code == 200


def test_unknown_routes_and_deployed_models(served):
    response = httpx.post(endpoint_url(served) + ":explain", timeout=60,
                          json={"instances": [GOOD], "deployedModelId": "123"})
    assert response.status_code == 400 and "no deployed model '123'" in response.json()["error"]["message"]
    response = httpx.get(served["url"] + "/v2/whatever")
    assert response.status_code == 404 and response.json()["error"]["status"] == "NOT_FOUND"
    empty = served["registry"].create_endpoint("empty")
    response = httpx.post(endpoint_url(served, empty) + ":predict", json={"instances": [GOOD]})
    assert response.status_code == 400 and response.json()["error"]["status"] == "FAILED_PRECONDITION"


def test_traffic_split_and_registry_changes_without_restart(served, exported_model_dir):
    registry = served["registry"]
    endpoint = registry.create_endpoint("canary")  # created after the server started
    v2 = registry.upload_model("flowers", exported_model_dir, parent_model=served["model"]["name"])
    first = registry.deploy_model(endpoint["name"], served["model"]["name"] + "@1")
    body = {"instances": [GOOD]}

    def deployed_ids(n: int) -> set[str]:
        with httpx.Client(timeout=60) as client:
            answers = [client.post(endpoint_url(served, endpoint) + ":predict", json=body) for _ in range(n)]
        assert all(a.status_code == 200 for a in answers), answers[0].text
        return {a.json()["deployedModelId"] for a in answers}

    assert deployed_ids(3) == {first["id"]}
    second = registry.deploy_model(endpoint["name"], f"{v2['name']}@{v2['versionId']}", traffic_percentage=50)
    assert deployed_ids(40) == {first["id"], second["id"]}  # both drawn (fails with p = 2 * 2**-40)
    third = registry.deploy_model(endpoint["name"], served["model"]["name"] + "@1", traffic_percentage=100)
    assert deployed_ids(5) == {third["id"]}  # the others now have 0%
    response = httpx.post(endpoint_url(served, endpoint) + ":predict", json=body).json()
    assert response["modelVersionId"] == "1"


def explain(served, body: dict) -> httpx.Response:
    return httpx.post(endpoint_url(served) + ":explain", json=body, timeout=120)


def test_explain_uses_the_models_explanation_spec(served):
    response = explain(served, {"instances": [GOOD, {"b64": b64(image_bytes(7, fmt="PNG"))}]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["deployedModelId"] == served["deployed"]["id"]
    assert np.array(body["predictions"]).shape == (2, len(CLASSES))
    assert len(body["explanations"]) == 2
    for explanation, probabilities in zip(body["explanations"], body["predictions"]):
        (attribution,) = explanation["attributions"]  # Vertex's default top_k = 1
        assert attribution["outputIndex"] == [int(np.argmax(probabilities))]
        assert attribution["outputDisplayName"] == CLASSES[attribution["outputIndex"][0]]
        assert attribution["instanceOutputValue"] == pytest.approx(max(probabilities), abs=1e-5)
        assert set(attribution["featureAttributions"]) == {"image"}


def test_explanation_spec_override(served):
    image = {"instances": [GOOD]}
    default = explain(served, image).json()["explanations"][0]["attributions"][0]
    override = {"parameters": {"integratedGradientsAttribution": {"stepCount": 6}, "topK": 2},
                "metadata": {"inputs": {"image": {"inputBaselines": [1.0]}}}}  # a white baseline
    for key in ("explanationSpecOverride", "explanation_spec_override"):
        response = explain(served, {**image, key: override, "deployedModelId": served["deployed"]["id"]})
        assert response.status_code == 200, response.text
        attributions = response.json()["explanations"][0]["attributions"]
        assert len(attributions) == 2  # topK from the override
        assert attributions[0]["outputIndex"] == default["outputIndex"]
        assert attributions[0]["baselineOutputValue"] != pytest.approx(default["baselineOutputValue"])


@pytest.mark.parametrize("override, message", [
    ({"parameters": {"integratedGradientsAttribution": {"stepCount": 1000}}}, "explanation parameters: "),
    ({"parameters": {"sampledShapleyAttribution": {"pathCount": 5}}}, "sampled_shapley_attribution"),
    ({"metadata": {"inputs": {"pixels": {"inputBaselines": [0]}}}}, "unknown input 'pixels'"),
    ("xrai", "must be a JSON object"),
])
def test_bad_explanation_override_is_refused(served, override, message):
    response = explain(served, {"instances": [GOOD], "explanationSpecOverride": override})
    assert response.status_code == 400 and message in response.json()["error"]["message"], response.text


def test_explain_without_explanation_spec(served, exported_model_dir):
    registry = served["registry"]
    plain = registry.upload_model("no-xai", exported_model_dir)
    endpoint = registry.create_endpoint("no-xai")
    registry.deploy_model(endpoint["name"], plain["name"])
    url = endpoint_url(served, endpoint) + ":explain"
    refused = httpx.post(url, json={"instances": [GOOD]}, timeout=60)
    assert refused.status_code == 400 and refused.json()["error"]["status"] == "FAILED_PRECONDITION"
    assert "no explanationSpec" in refused.json()["error"]["message"]
    given = httpx.post(url, timeout=120, json={"instances": [GOOD], "explanationSpecOverride": {
        "parameters": {"integratedGradientsAttribution": {"stepCount": 4}}}})
    assert given.status_code == 200, given.text


def test_a_bad_instance_costs_no_model_time(served, exported_model_dir):
    registry = served["registry"]
    version = registry.upload_model("cold", exported_model_dir)
    endpoint = registry.create_endpoint("cold")
    registry.deploy_model(endpoint["name"], version["name"])
    bad = {"instances": [GOOD, GOOD, instance(TRUNCATED)]}
    response = httpx.post(endpoint_url(served, endpoint) + ":predict", json=bad, timeout=60)
    assert response.status_code == 400 and "instances[2]" in response.json()["error"]["message"]
    cold = served["models"].get(version)
    assert not cold.loaded  # refused from the request alone: the SavedModel was never loaded
    assert httpx.post(endpoint_url(served, endpoint) + ":predict", json={"instances": [GOOD]},
                      timeout=60).status_code == 200
    assert cold.loaded


def test_models_load_once_per_version_across_threads(exported_model_dir, tmp_path):
    registry = Registry(tmp_path / "registry")
    version = registry.upload_model("flowers", exported_model_dir)
    cache = ModelCache(tmp_path / "cache")
    with ThreadPoolExecutor(6) as pool:
        served = list(pool.map(lambda _: cache.get(registry.get_model(version["name"])), range(6)))
        signatures = list(pool.map(lambda m: m.signature(), served))
    assert all(s is served[0] for s in served) and all(f is signatures[0] for f in signatures)
    assert served[0].input_name == SERVING_INPUT
    newer = registry.upload_model("flowers", exported_model_dir, parent_model=version["name"])
    assert cache.get(newer) is not served[0]  # cached per version


def _bmp(mode: str) -> bytes:
    return encode(np.asarray(Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).convert(mode)), "BMP")


def _big_png(size: int = 3000) -> bytes:
    stripes = np.zeros((size, size, 3), np.uint8)
    stripes[::50] = 255  # compresses to a few kB, decodes to size x size pixels
    return encode(stripes, "PNG")


HOSTILE = [
    # (name, path suffix, raw body, HTTP code, text the message must contain) from issue 11
    ("nested 100,000 deep", ":predict", b"[" * 100_000 + b"]" * 100_000, 400, "nests 100000 levels deep"),
    ("NaN step count", ":explain", json.dumps({"instances": [GOOD], "explanationSpecOverride": {"parameters": {
        "integratedGradientsAttribution": {"stepCount": float("nan")}}}}).encode(), 400, "NaN is not a JSON number"),
    ("1e400", ":explain", b'{"instances": [], "x": 1e400}', 400, "out of the range of a double"),
    ("seed -1", ":explain", json.dumps({"instances": [GOOD], "explanationSpecOverride": {"parameters": {
        "integratedGradientsAttribution": {"stepCount": 4, "seed": -1}}}}).encode(), 400, "seed must be in"),
    ("max blur sigma 1e30", ":explain", json.dumps({"instances": [GOOD], "explanationSpecOverride": {"parameters": {
        "integratedGradientsAttribution": {"stepCount": 4, "blurBaselineConfig": {"maxBlurSigma": 1e30}}}}}).encode(),
     400, "max_blur_sigma must be > 0 and <= 1000"),
    ("unbounded adaptive", ":explain", json.dumps({"instances": [GOOD], "explanationSpecOverride": {"parameters": {
        "integratedGradientsAttribution": {"stepCount": 1, "targetError": 1e-30, "maxStepCount": 10**9}}}}).encode(),
     400, "max_step_count must be <= 2000"),
    ("input baselines abc", ":explain", json.dumps({"instances": [GOOD], "explanationSpecOverride": {"metadata": {
        "inputs": {"image": {"inputBaselines": ["abc"]}}}}}).encode(), 400, "input_baselines[0] must be a number"),
    ("input baselines 5", ":explain", json.dumps({"instances": [GOOD], "explanationSpecOverride": {"metadata": {
        "inputs": {"image": {"inputBaselines": 5}}}}}).encode(), 400, "input_baselines must be a list"),
    ("visualization 5", ":explain", json.dumps({"instances": [GOOD], "explanationSpecOverride": {"metadata": {
        "inputs": {"image": {"visualization": 5}}}}}).encode(), 400, "visualization must be an object"),
    ("clip x", ":explain", json.dumps({"instances": [GOOD], "explanationSpecOverride": {"metadata": {
        "inputs": {"image": {"visualization": {"clipPercentUpperbound": "x"}}}}}}).encode(), 400,
     "clip_percent_upperbound must be a number in [0, 100]"),
    ("parameters []", ":explain", json.dumps({"instances": [GOOD], "explanationSpecOverride": {"parameters": []}}
                                             ).encode(), 400, "parameters must be a JSON object"),
    ("1-bit BMP", ":predict", json.dumps({"instances": [instance(_bmp("1"))]}).encode(), 400,
     "BMP with 1 bits per pixel"),
    (":explain:predict", ":explain:predict", json.dumps({"instances": [GOOD]}).encode(), 404, "not found"),
    ("trailing slash", ":predict/", json.dumps({"instances": [GOOD]}).encode(), 404, "not found"),
]


@pytest.mark.parametrize("name, suffix, body, code, message", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_requests_get_a_clear_4xx_and_keep_the_connection(served, name, suffix, body, code, message):
    with httpx.Client(timeout=60) as client:
        response = client.post(endpoint_url(served) + suffix, content=body,
                               headers={"Content-Type": "application/json"})
        assert response.status_code == code, response.text
        assert message in response.json()["error"]["message"], response.text
        assert response.headers.get("connection") != "close"
        assert client.post(endpoint_url(served) + ":predict", json={"instances": [GOOD]}).status_code == 200


def test_safe_defaults(served):
    url = endpoint_url(served)
    wrong_method = httpx.get(url + ":predict")
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["status"] == "METHOD_NOT_ALLOWED"
    assert wrong_method.headers["Allow"] == "POST"
    text = httpx.post(url + ":predict", content=json.dumps({"instances": [GOOD]}),
                      headers={"Content-Type": "text/plain"})
    assert text.status_code == 415 and "send application/json" in text.json()["error"]["message"]
    rebound = httpx.post(url + ":predict", json={"instances": [GOOD]}, headers={"Host": "evil.example:80"})
    assert rebound.status_code == 400 and "not served here" in rebound.json()["error"]["message"]
    assert httpx.get(url, headers={"Host": f"localhost:{served['url'].rsplit(':', 1)[1]}"}).status_code == 200
    for endpoint_id in ("1%00", "9" * 300, "..%2F..%2Fmodels"):
        missing = httpx.get(f"{served['url']}/v1/projects/local/locations/local/endpoints/{endpoint_id}")
        assert missing.status_code == 404, missing.text
        assert "/tmp" not in missing.text and str(served["registry"].root) not in missing.text
    gone = httpx.get(f"{served['url']}/v1/projects/local/locations/local/endpoints/404")
    assert gone.status_code == 404 and str(served["registry"].root) not in gone.text


def test_a_stalled_body_times_out(exported_model_dir, tmp_path):
    import socket

    config = ServerConfig(backend=RegistryBackend(Registry(tmp_path / "r")), cache_dir=str(tmp_path / "c"),
                          limits=Limits(body_timeout_s=0.5))
    with serving_app(create_app(config)) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(b"POST /v1/projects/p/locations/l/endpoints/1:predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"instances\"")
            received = b""
            while chunk := sock.recv(65536):  # the server closes the connection after answering
                received += chunk
            answer = received.decode()
    assert answer.startswith("HTTP/1.1 408") and "did not arrive within 0.5 s" in answer


def test_line_broken_base64_is_read_and_a_huge_integer_is_refused_in_plain_words(served):
    """MIME base64 (``base64`` and ``base64.encodebytes`` break lines every 76 characters) is
    the same image; a 100,000-digit number is refused without Python's advice to the server."""
    import base64

    wrapped = {"instances": [{"b64": base64.encodebytes(image_bytes(3)).decode()}]}
    assert "\n" in wrapped["instances"][0]["b64"]
    plain = httpx.post(endpoint_url(served) + ":predict", json={"instances": [GOOD]}).json()
    response = httpx.post(endpoint_url(served) + ":predict", json=wrapped)
    assert response.status_code == 200 and response.json()["predictions"] == plain["predictions"]
    spaces = httpx.post(endpoint_url(served) + ":predict", json={"instances": [{"b64": " \n "}]})
    assert spaces.status_code == 400 and "must be a non-empty base64 string" in spaces.text
    huge = b'{"instances": [' + b"1" * 100_000 + b"]}"
    response = httpx.post(endpoint_url(served) + ":predict", content=huge,
                          headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and "a number of 100000 digits" in response.text
    assert "set_int_max_str_digits" not in response.text


def test_a_client_that_leaves_mid_body_is_not_a_server_error(tmp_path, caplog):
    """A client that closes its connection halfway through its body is its own doing: no
    "internal error" with a traceback in the server's log, and the server goes on."""
    import logging
    import socket
    import time

    config = ServerConfig(backend=RegistryBackend(Registry(tmp_path / "r")), cache_dir=str(tmp_path / "c"))
    with caplog.at_level(logging.INFO, logger="serving"), serving_app(create_app(config)) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(b"POST /v1/projects/p/locations/l/endpoints/1:predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n" + b" " * 1024)
        deadline = time.monotonic() + 10
        while "closed the connection after" not in caplog.text:
            assert time.monotonic() < deadline, caplog.text
            time.sleep(0.05)
        assert httpx.get(url + "/health").status_code == 200
    assert "internal error" not in caplog.text and "Traceback" not in caplog.text


def test_a_stalled_or_silent_request_head_is_closed(tmp_path):
    """Slowloris: a connection that says nothing, or sends its head a byte at a time, is answered
    408 and closed after head_timeout_s, while requests that arrive whole are served."""
    import socket
    import time

    limits = Limits(head_timeout_s=0.5)
    config = ServerConfig(backend=RegistryBackend(Registry(tmp_path / "r")), cache_dir=str(tmp_path / "c"),
                          limits=limits)
    with serving_app(create_app(config), head_timeout_s=limits.head_timeout_s) as url:
        host, port = url.removeprefix("http://").split(":")

        def answer(send: list[bytes], pause_s: float) -> tuple[bytes, float]:
            started = time.monotonic()
            received = b""
            with socket.create_connection((host, int(port)), timeout=30) as sock:
                try:
                    for piece in send:
                        sock.sendall(piece)
                        time.sleep(pause_s)
                    while chunk := sock.recv(65536):  # until the server closes
                        received += chunk
                except (BrokenPipeError, ConnectionResetError):  # closed while we were still sending
                    pass
            return received, time.monotonic() - started

        silent, seconds = answer([], 0)
        assert silent.startswith(b"HTTP/1.1 408") and b"DEADLINE_EXCEEDED" in silent and seconds < 10
        head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 40
        dribbled, seconds = answer([head[i:i + 1] for i in range(len(head))], 0.05)  # 4 s if let through
        assert seconds < 3 and (dribbled == b"" or dribbled.startswith(b"HTTP/1.1 408"))  # closed, not served
        # a whole request, then silence: answered, then closed (keep-alive, then the head deadline)
        whole, _ = answer([b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"], 0)
        assert whole.startswith(b"HTTP/1.1 200")
        assert httpx.get(url + "/health").status_code == 200


def test_large_images_are_decoded_downscaled(served):
    from serving.instances import decode_instances

    big = _big_png()
    (prepared,) = decode_instances({"instances": [instance(big)]}, SERVING_INPUT, Limits())
    with Image.open(io.BytesIO(prepared)) as image:  # what the model decodes: at most reduced_pixels
        assert image.format == "PNG" and image.width * image.height <= Limits().reduced_pixels
    over = httpx.post(endpoint_url(served) + ":predict", timeout=60,
                      json={"instances": [instance(big)]})  # LIMITS: 512 x 512 pixels per image
    assert over.status_code == 400 and "over the server's budget of 262144 pixels" in over.text


def test_concurrent_predictions_are_batched(served):
    body = {"instances": [GOOD]}
    with httpx.Client(timeout=60) as client, ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: client.post(endpoint_url(served) + ":predict", json=body), range(48)))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200][:2]
    first = answers[0].json()["predictions"]
    for answer in answers:  # batching changes no answer (beyond float rounding of batched kernels)
        np.testing.assert_allclose(answer.json()["predictions"], first, rtol=1e-5, atol=1e-6)
    sizes = [size for batcher in served["app_state"].batchers.values() for size in batcher.batch_sizes]
    assert max(sizes) > 1  # several requests shared one model call
