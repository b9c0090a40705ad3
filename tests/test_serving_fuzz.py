"""Property-based tests (hypothesis): whatever a client sends, the request parser and the
explanation-parameter validation answer with a value or a named 400, never another exception;
over real HTTP no answer is a 500 and none takes longer than its budget."""

from __future__ import annotations

import base64
import io
import json
import math
import time

import trainer  # noqa: F401  (legacy Keras before TensorFlow)

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from explain import ExplanationParametersError, parse_explanation_parameters
from explain.cost import request_cost
from explain.parameters import max_path_evaluations
from explain.visualization import parse_visualization
from serving.app import ServerConfig
from serving.backends import ModelDirBackend
from serving.instances import Limits, RequestError, parse_json_body
from serving.testing import running_server
from trainer.schema import CLASSES

FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HTTP_FUZZ = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
#: Budget of one fuzzed request's work, and a generous bound on its answer time (a hang, not a timing).
EXPLAIN_BUDGET = 300
ANSWER_BOUND_S = 60.0

# Values of every JSON type, including the awkward ones: huge, negative, fractional, non-finite
# (sent as Python floats to the validators), nested, empty.
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=True),
                    st.sampled_from([0, 1, -1, 50, 101, 1e30, 1e-30, 2**63, "", "black", "abc", "NaN"]),
                    st.text(max_size=8))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=12)
METHOD_KEYS = ["stepCount", "step_count", "smoothGradConfig", "blurBaselineConfig", "quadrature", "targetError",
               "maxStepCount", "mapTarget", "baseline", "blurPath", "seed"]
method_dicts = st.dictionaries(st.sampled_from(METHOD_KEYS), values, max_size=5) | st.fixed_dictionaries(
    {"stepCount": st.integers(1, 100)},
    optional={"smoothGradConfig": st.fixed_dictionaries({"noiseSigma": values},
                                                        optional={"noisySampleCount": values}),
              "blurBaselineConfig": st.fixed_dictionaries({"maxBlurSigma": values}),
              "targetError": values, "maxStepCount": values, "baseline": values, "seed": values})
parameters = st.fixed_dictionaries(
    {}, optional={"integratedGradientsAttribution": method_dicts, "xraiAttribution": method_dicts,
                  "topK": values, "outputIndices": values}) | st.dictionaries(st.text(max_size=10), values, max_size=3)
METADATA = {"inputs": {"image": {"input_baselines": [0.0], "modality": "image"}},
            "outputs": {"probabilities": {"index_display_name_mapping": list(CLASSES)}}}


@FUZZ
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode),
                 st.recursive(scalars, lambda x: st.lists(x) | st.dictionaries(st.text(max_size=4), x),
                              max_leaves=20).map(lambda v: json.dumps(v).encode()),
                 st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n),
                 st.sampled_from([b'{"a": NaN}', b'{"a": Infinity}', b'{"a": -Infinity}', b'{"a": 1e400}',
                                  b'{"a": "\\ud800"}', b'{"a": 1' + b"0" * 5000 + b"}"])))
def test_json_parser_answers_a_dict_or_a_400(raw):
    try:
        body = parse_json_body(raw)
    except RequestError as e:
        assert e.code == 400 and e.message
    else:
        assert isinstance(body, dict)


@FUZZ
@given(parameters, st.integers(1, 64))
def test_parameter_validation_and_cost_answer_a_config_or_a_named_error(raw, instances):
    try:
        config = parse_explanation_parameters(raw)
    except ExplanationParametersError as e:
        assert str(e)
        return
    # What passed validation is finite and in range, so its cost is a finite, positive count.
    attribution = config.attribution
    assert 1 <= attribution.step_count <= 100 and 1 <= max_path_evaluations(attribution) <= 2000
    assert 0 <= attribution.seed < 2**63
    if attribution.smooth_grad and attribution.smooth_grad.noise_sigma is not None:
        assert math.isfinite(attribution.smooth_grad.noise_sigma)
    if config.output_indices is not None:
        assert len(set(config.output_indices)) == len(config.output_indices)
    cost = request_cost(config, instances, METADATA, list(CLASSES))
    assert isinstance(cost.total, int) and 1 <= cost.total <= instances * len(CLASSES) * 8 * 50 * 2000


@FUZZ
@given(st.one_of(values, st.dictionaries(st.sampled_from(["type", "polarity", "colorMap", "clipPercentUpperbound",
                                                           "clipPercentLowerbound", "overlayType"]), values)))
def test_visualization_answers_a_config_or_a_named_error(raw):
    try:
        parse_visualization(raw)
    except ExplanationParametersError as e:
        assert str(e)


def _image_b64(seed: int) -> str:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (24, 32, 3), np.uint8)).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def explain_url(exported_model_dir, tmp_path_factory):
    config = ServerConfig(backend=ModelDirBackend(exported_model_dir, {"integratedGradientsAttribution":
                                                                       {"stepCount": 4}}),
                          cache_dir=str(tmp_path_factory.mktemp("cache")), explain_budget=EXPLAIN_BUDGET,
                          limits=Limits(max_instances=8, request_deadline_s=ANSWER_BOUND_S / 2))
    with running_server(config) as url:
        yield url + "/v1/projects/p/locations/l/endpoints/1"


GOOD_IMAGE = _image_b64(0)
instances = st.lists(st.one_of(st.just({"bytes_inputs": {"b64": GOOD_IMAGE}}), st.just({"b64": GOOD_IMAGE}),
                               values), min_size=0, max_size=3)
overrides = st.fixed_dictionaries({}, optional={
    "parameters": parameters | values,
    "metadata": st.fixed_dictionaries({"inputs": st.fixed_dictionaries({"image": st.dictionaries(
        st.sampled_from(["inputBaselines", "visualization", "modality"]), values, max_size=2)})}) | values})
bodies = st.fixed_dictionaries({"instances": instances}, optional={
    "explanationSpecOverride": overrides, "parameters": values, "deployedModelId": values})


@HTTP_FUZZ
@given(bodies, st.sampled_from([":explain", ":predict"]))
def test_no_request_gets_a_500_or_a_slow_answer(explain_url, body, verb):
    started = time.monotonic()
    with httpx.Client(timeout=ANSWER_BOUND_S) as client:
        # json.dumps writes NaN/Infinity literals (not JSON): the server must refuse those too.
        response = client.post(explain_url + verb, content=json.dumps(body),
                               headers={"Content-Type": "application/json"})
        assert response.status_code in (200, 400), response.text
        if response.status_code == 400:
            error = response.json()["error"]
            assert error["code"] == 400 and error["message"] and "/tmp/" not in error["message"]
        assert time.monotonic() - started < ANSWER_BOUND_S
        # The connection survives every answer: the next request on it is served.
        assert client.get(explain_url).status_code == 200
