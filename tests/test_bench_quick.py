"""The benchmark suite: its measuring helpers on known inputs, the tutorial reference against our
IG core, and ``python -m bench --quick`` end to end (a smoke test: timings are never asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import trainer  # noqa: F401  (legacy Keras before TensorFlow)

import numpy as np
import pytest

from bench.common import alternate, completeness_error
from bench.profiles import QUICK
from bench.quality import localization
from bench.worker import COMPARISONS
from bench.xrai_speed import top_area_iou

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_completeness_error_is_relative_to_the_output_difference():
    attributions = np.full((2, 2, 2, 1), 0.1)  # sums to 0.4 per row
    errors = completeness_error(attributions, f_input=np.array([0.9, 0.5]), f_baseline=np.array([0.5, 0.1]))
    np.testing.assert_allclose(errors, [0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(completeness_error(attributions[:1], np.array([0.7]), np.array([0.5])), [1.0])


def test_alternate_rotates_the_order_and_counts_repeats():
    calls = []
    timings = alternate({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=2, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a"]
    assert [len(t.seconds) for t in timings.values()] == [2, 2]


def test_top_area_iou_and_localization_on_known_maps():
    a = np.zeros((10, 10))
    a[:2] = 1.0  # top 20% = first two rows
    assert top_area_iou(a, a, 0.2) == pytest.approx(1.0)
    assert top_area_iou(a, a[::-1], 0.2) == pytest.approx(0.0)
    mask = np.zeros((1, 40, 40), bool)
    mask[0, :10, :10] = True
    inside = np.zeros((1, 40, 40))
    inside[0, 2, 2] = 1.0
    outside = np.zeros((1, 40, 40))
    outside[0, 39, 39] = 1.0
    shares, hits = localization(inside, mask)
    assert shares[0] == pytest.approx(1.0) and hits[0] == 1.0
    shares, hits = localization(outside, mask)
    assert shares[0] == pytest.approx(0.0) and hits[0] == 0.0


def test_tutorial_reference_matches_our_trapezoid_rule(exported_model_dir):
    """The tutorial copy and our core with its rule compute the same sum (the step search relies on it)."""
    from bench.common import SignatureModel
    from bench.reference_ig import make_integrated_gradients
    from explain import load_explainable_model
    from explain.integrated_gradients import IntegratedGradients

    rng = np.random.default_rng(0)
    image = rng.uniform(0, 1, (1, 192, 192, 3)).astype(np.float32)
    baseline = np.zeros_like(image)
    tutorial = make_integrated_gradients(SignatureModel(exported_model_dir))(baseline[0], image[0], 2, m_steps=5)
    ours = IntegratedGradients().GetMask(image, baseline, np.array([2]), load_explainable_model(exported_model_dir),
                                         step_count=6, quadrature="riemann_trapezoid").attributions[0]
    np.testing.assert_allclose(tutorial.numpy(), ours, rtol=1e-3, atol=1e-7)


def test_step_search_scores_each_rule_as_our_kernel_does(exported_model_dir):
    """The step search's batched rule errors (shared nodes for saliency's sum and the trapezoid)
    are the errors our IG kernel reports with the same rule: the search measures the real rules."""
    from bench.common import SignatureModel
    from bench.ig_speed import path_derivatives, rule_errors
    from explain import load_explainable_model
    from explain.integrated_gradients import IntegratedGradients

    rng = np.random.default_rng(1)
    images = rng.uniform(0, 1, (3, 192, 192, 3)).astype(np.float32)
    baselines = np.zeros_like(images)
    classes = np.array([0, 2, 4], np.int32)
    reference = SignatureModel(exported_model_dir)
    probs = reference.predict(np.concatenate([images, baselines]))
    f_x, f_b = probs[np.arange(3), classes], probs[3 + np.arange(3), classes]
    rules = ["riemann_middle", "riemann_linspace", "riemann_trapezoid"]
    errors = rule_errors(path_derivatives(reference), images, baselines, classes, f_x, f_b, rules, 7, batch_size=5)
    model = load_explainable_model(exported_model_dir)
    for rule in rules:
        out = IntegratedGradients().GetMask(images, baselines, classes, model, step_count=7, quadrature=rule)
        np.testing.assert_allclose(errors[rule], out.approximation_errors, rtol=1e-2, atol=1e-4)


def test_step_choice_takes_the_first_ladder_step_meeting_the_median_or_every_image():
    from bench.ig_speed import _step_choice

    errors = {16: np.array([0.2, 0.1, 0.3]), 32: np.array([0.01, 0.04, 0.2]), 64: np.array([0.01, 0.02, 0.04])}
    assert _step_choice(errors, 0.05, "median") == (32, True)
    assert _step_choice(errors, 0.05, "all") == (64, True)
    assert _step_choice(errors, 0.01, "median") == (64, False)


def test_the_report_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """The bench writes results.json and BENCHMARKS.md by replacement: a run killed while writing
    leaves the last complete file (which the next ``--only`` run keeps comparisons from)."""
    from serving import storage

    report = tmp_path / "BENCHMARKS.md"
    storage.write_text_atomic(report, "# old\n")

    def killed(src, dst):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(storage.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        storage.write_text_atomic(report, "# new, half written")
    assert report.read_text() == "# old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["BENCHMARKS.md"]  # no temporary file left behind


#: Two comparisons run in the smoke test (the runner, a worker process, the shared cached backbone,
#: cached inputs and the report are all exercised; training is tested in test_train.py);
#: BENCH_SMOKE_ALL=1 runs every comparison.
SMOKE = list(COMPARISONS) if os.environ.get("BENCH_SMOKE_ALL") == "1" else ["ig_speed", "ig_maps"]


def test_only_keeps_a_last_run_comparison_only_if_it_measured_the_same_trained_model(tmp_path, capsys):
    """``--only`` merges the other comparisons from the last run: not when the model was rebuilt
    (the same recipes train other weights on another machine), nor when that is unknown."""
    from bench.__main__ import _previous

    profile = QUICK.as_dict()
    build = {"model_fingerprint": "aaaa", "backbone": {"recipe": {"version": 2}}}
    path = tmp_path / "results.json"

    def kept(old_build: dict) -> list[str]:
        path.write_text(json.dumps({"build": old_build, "profile": profile,
                                    "comparisons": {"serving": {"profile": profile}, "ig_speed": {}}}))
        return sorted(_previous(str(path), profile, build, rerun=["ig_speed"]))

    assert kept(build) == ["serving"]
    assert kept(dict(build, model_fingerprint="bbbb")) == []
    assert "another build" in capsys.readouterr().out
    assert kept({k: v for k, v in build.items() if k != "model_fingerprint"}) == []
    assert kept(dict(build, backbone={"recipe": {"version": 1}})) == []
    build = dict(build, model_fingerprint=None)
    assert kept(build) == []  # unknown on both sides is not the same model


def test_quick_bench_writes_its_comparisons(tmp_path, backbone_dir):
    """``python -m bench --quick`` runs the comparisons and writes the report, JSON and figures
    (on the shared backbone, built by the fixture, not under the subprocess's lock wait)."""
    report = tmp_path / "BENCHMARKS.md"
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--only", *SMOKE, "--output_dir",
                           str(tmp_path), "--report", str(report)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["comparisons"]) == set(SMOKE)
    for name, result in results["comparisons"].items():
        assert "error" not in result, (name, result)
        if "skipped" in result:  # a comparison whose module is not in the tree
            continue
        assert result["tables"] and all(t["rows"] for t in result["tables"]), name
        for figure in result.get("figures", []):
            assert open(figure, "rb").read(8) == b"\x89PNG\r\n\x1a\n", figure
    # the bench measures the backbone the demo and the tests share, not a build of its own
    assert results["build"]["backbone"]["dir"] == os.path.join(ROOT, "models", "backbone") == backbone_dir
    assert results["build"]["backbone"]["parameters"] == 2_257_984
    text = report.read_text()
    assert "## Machine" in text and "## Reproduce" in text and "## Headline figures" in text
    assert "MobileNetV2 1.0 @ 192 (2,257,984 parameters" in text
    for result in results["comparisons"].values():
        assert result["title"] in text
    ig = results["comparisons"]["ig_speed"]["raw"]["timings"]
    assert all(errors for t in ig.values() for errors in t["errors"].values())
    scores = results["comparisons"]["ig_maps"]["raw"]["scores"]
    # ours: default and completeness-only requests at both targets, XRAI's start, a stricter map
    # target; and the tutorial at each of map_fixed_steps
    assert len(scores) == 6 + len(QUICK.map_fixed_steps) and all(len(s["l1"]) == 1 for s in scores.values())
    timed = set(results["comparisons"]["ig_speed"]["raw"]["timings"]["0.05"]["seconds"])
    assert {"ours (adaptive, default request)", "ours (adaptive, completeness only: map_target null)"} <= timed
    # both floors: the exported graph the references run, and the graph ours runs, every
    # normalization of MobileNetV2 folded
    from bench.ig_speed import FLOOR, OWN_FLOOR

    assert {FLOOR, OWN_FLOOR} <= timed
    assert results["comparisons"]["ig_speed"]["raw"]["folded_normalizations"] == [52, 52]
    assert all(0.0 <= s["iou"][0] <= 1.0 and s["l1"][0] >= 0.0 for s in scores.values())


def test_ours_request_follows_the_products_defaults_and_equal_accuracy_is_bracketed():
    """The bench's "default request" is what the product parses a bare request to, so it moves
    with ``explain.parameters``; equal map accuracy is interpolated between the steps that
    bracket it, never read off the first step count tried."""
    from bench.ig_maps import equal_map_accuracy_steps
    from bench.ig_speed import ours_request
    from explain.parameters import DEFAULT_MAP_TARGET

    assert ours_request(QUICK, 0.05) == dict(step_count=QUICK.ig_start_steps, target_error=0.05,
                                             max_step_count=QUICK.ig_max_steps, map_target=DEFAULT_MAP_TARGET)
    assert ours_request(QUICK, 0.05, map_target=None)["map_target"] is None
    # error ~ 16 / steps: 0.08 is met at 200, between the 100 and 300 tried
    lo, hi, n = equal_map_accuracy_steps({100: 0.16, 300: 16 / 300, 600: 16 / 600}, 0.08)
    assert (lo, hi) == (100, 300) and abs(n - 200) < 1e-6
    assert equal_map_accuracy_steps({100: 0.16, 300: 0.1}, 0.05) is None
    assert equal_map_accuracy_steps({100: 0.04, 300: 0.01}, 0.05) == (100, 100, 100.0)
