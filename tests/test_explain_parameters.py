"""Vertex ExplanationParameters parsing: what Vertex accepts and rejects, in SDK and REST shapes."""

from __future__ import annotations

import pytest

from explain.parameters import (ExplanationParametersError, max_path_evaluations, parse_explanation_parameters,
                                vertex_parameters)
from explain.visualization import parse_visualization


@pytest.mark.parametrize("params, field", [
    ({}, "exactly one of"),
    ({"integrated_gradients_attribution": {"step_count": 10}, "xrai_attribution": {"step_count": 10}}, "exactly one of"),
    ({"integrated_gradients_attribution": {}}, "integrated_gradients_attribution.step_count"),
    ({"integrated_gradients_attribution": {"step_count": 101}}, "integrated_gradients_attribution.step_count"),
    ({"xrai_attribution": {"step_count": 1.5}}, "xrai_attribution.step_count"),
    ({"integrated_gradients_attribution": {"step_count": 5, "smooth_grad_config": {
        "noise_sigma": 0.1, "noisy_sample_count": 51}}}, "smooth_grad_config.noisy_sample_count"),
    ({"integrated_gradients_attribution": {"step_count": 5, "smooth_grad_config": {"noisy_sample_count": 5}}},
     "noise_sigma or feature_noise_sigma"),
    ({"integrated_gradients_attribution": {"step_count": 5, "blur_baseline_config": {"max_blur_sigma": -1}}},
     "blur_baseline_config.max_blur_sigma"),
    ({"integrated_gradients_attribution": {"step_count": 5, "quadrature": "simpson_magic"}}, "quadrature"),
    ({"integrated_gradients_attribution": {"step_count": 5, "stepz": 1}}, "stepz"),
    ({"sampled_shapley_attribution": {"path_count": 5}}, "sampled_shapley_attribution"),
    ({"integrated_gradients_attribution": {"step_count": 5}, "top_k": -2}, "top_k"),
    ({"integrated_gradients_attribution": {"step_count": 5}, "output_indices": [-1]}, "output_indices"),
    ({"integrated_gradients_attribution": {"step_count": 5, "baseline": "grey"}}, "baseline"),
    ({"integrated_gradients_attribution": {"step_count": 5, "map_target": 0}}, "map_target"),
    ({"integrated_gradients_attribution": {"step_count": 5, "map_target": 0.1, "target_error": None}},
     "map_target refines the path"),
])
def test_invalid_parameters_name_the_field(params, field):
    with pytest.raises(ExplanationParametersError, match=field.replace(".", r"\.")):
        parse_explanation_parameters(params)


def test_snake_and_camel_case_parse_alike():
    snake = {"xrai_attribution": {"step_count": 20, "smooth_grad_config": {
        "feature_noise_sigma": {"noise_sigma": [{"name": "image", "sigma": 0.2}]}, "noisy_sample_count": 4}},
        "top_k": 3, "output_indices": [[1], [4]]}
    camel = {"xraiAttribution": {"stepCount": 20, "smoothGradConfig": {
        "featureNoiseSigma": {"noiseSigma": [{"name": "image", "sigma": 0.2}]}, "noisySampleCount": 4}},
        "topK": 3, "outputIndices": [[1], [4]]}
    config = parse_explanation_parameters(snake)
    assert config == parse_explanation_parameters(camel)
    assert config.method == "xrai" and config.top_k == 3 and config.output_indices == (1, 4)
    assert config.attribution.smooth_grad.sigma_for("image") == 0.2
    assert config.attribution.quadrature == "riemann_trapezoid"  # the fixed-step rule when refinement is off
    assert config.attribution.target_error == 0.05  # refined to Vertex's threshold by default


def test_vertex_defaults_and_extensions_are_stripped_for_vertex():
    config = parse_explanation_parameters({"integrated_gradients_attribution": {
        "step_count": 50, "smooth_grad_config": {"noise_sigma": 0.1}}})
    assert config.top_k == 1 and config.output_indices is None
    assert config.attribution.smooth_grad.noisy_sample_count == 3
    ours = {"integrated_gradients_attribution": {"step_count": 8, "target_error": 0.01, "max_step_count": 200,
                                                 "map_target": 0.1, "baseline": ["black", "white"]}}
    assert parse_explanation_parameters(ours).attribution.target_error == 0.01
    assert parse_explanation_parameters(ours).attribution.map_target == 0.1
    assert parse_explanation_parameters({"integratedGradientsAttribution": {
        "stepCount": 8, "mapTarget": 0.03}}).attribution.map_target == 0.03
    assert vertex_parameters(ours) == {"integrated_gradients_attribution": {"step_count": 8}}


def test_both_methods_refine_their_maps_by_default_and_null_asks_for_completeness_alone():
    """IG's and XRAI's default requests are held to DEFAULT_MAP_TARGET (completeness alone left IG's
    maps far from the integral and XRAI's regions off the reference's); ``map_target: null`` (or
    camelCase ``mapTarget``) turns it off; fixed steps have none."""
    from explain.parameters import DEFAULT_MAP_TARGET

    def parsed(method: str, **spec):
        return parse_explanation_parameters({method: {"step_count": 8, **spec}}).attribution

    assert parsed("integrated_gradients_attribution").map_target == DEFAULT_MAP_TARGET
    assert parsed("integrated_gradients_attribution", smooth_grad_config={"noise_sigma": 0.1}).map_target \
        == DEFAULT_MAP_TARGET
    assert parsed("integrated_gradients_attribution", map_target=None).map_target is None
    assert parsed("integrated_gradients_attribution", mapTarget=None).map_target is None
    assert vertex_parameters({"integratedGradientsAttribution": {"stepCount": 8, "mapTarget": None}}) == {
        "integratedGradientsAttribution": {"stepCount": 8}}  # Vertex never sees the opt-out either
    assert parsed("integrated_gradients_attribution", target_error=None).map_target is None  # Vertex's fixed steps
    assert parsed("integrated_gradients_attribution", quadrature="gauss_legendre").map_target is None
    assert parsed("xrai_attribution").map_target == DEFAULT_MAP_TARGET
    assert parsed("xrai_attribution", map_target=0.2).map_target == 0.2
    assert parsed("xrai_attribution", map_target=None).map_target is None
    assert parsed("xrai_attribution", target_error=None).map_target is None


def test_refinement_to_vertex_threshold_is_the_default_and_can_be_turned_off():
    default = parse_explanation_parameters({"integrated_gradients_attribution": {"step_count": 50}}).attribution
    assert default.target_error == 0.05 and default.max_step_count == 400
    assert max_path_evaluations(default) == 400
    off = parse_explanation_parameters({"integrated_gradients_attribution": {"step_count": 50,
                                                                              "target_error": None}}).attribution
    assert off.target_error is None and max_path_evaluations(off) == 50
    # naming a fixed rule asks for fixed steps; a rule with a target is a contradiction, named
    rule = parse_explanation_parameters({"integratedGradientsAttribution": {"stepCount": 32,
                                                                             "quadrature": "gauss_legendre"}})
    assert rule.attribution.target_error is None and rule.attribution.quadrature == "gauss_legendre"
    with pytest.raises(ExplanationParametersError, match="quadrature applies to fixed steps"):
        parse_explanation_parameters({"xrai_attribution": {"step_count": 8, "quadrature": "riemann_middle",
                                                           "target_error": 0.05}})


def test_visualization_defaults_follow_the_method():
    ig, xrai = parse_visualization(None, "integrated_gradients"), parse_visualization({}, "xrai")
    assert (ig.type, ig.color_map, ig.polarity, ig.overlay_type) == ("OUTLINES", "PINK_GREEN", "POSITIVE", "NONE")
    assert (ig.clip_percent_upperbound, ig.clip_percent_lowerbound) == (99.9, 62.0)
    assert (xrai.type, xrai.color_map) == ("PIXELS", "VIRIDIS")
    assert parse_visualization({"colorMap": "red", "overlayType": "GRAYSCALE"}).color_map == "RED"
    with pytest.raises(ExplanationParametersError, match="color_map"):
        parse_visualization({"color_map": "RAINBOW"})
    with pytest.raises(ExplanationParametersError, match="clip_percent_lowerbound"):
        parse_visualization({"clip_percent_lowerbound": 99, "clip_percent_upperbound": 50})


def test_the_local_config_starts_refinement_where_the_code_does():
    """configs/local.yaml's step_count is where the code starts its method (one fact, checked in
    one place): the default start for IG, XRAI's floor for XRAI (so the config says what runs)."""
    import os

    from components.config import load_config
    from explain.parameters import DEFAULT_ADAPTIVE_START, XRAI_MIN_START, start_step_count

    config = load_config(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                      "configs", "local.yaml"))
    (method,) = config.explanation.parameters.values()
    parsed = parse_explanation_parameters(config.explanation.parameters).attribution
    assert method["step_count"] == start_step_count(parsed)
    assert method["step_count"] == (XRAI_MIN_START if parsed.method == "xrai" else DEFAULT_ADAPTIVE_START)
    assert parsed.target_error == 0.05  # refined by default
