"""Integrated Gradients against real exported SavedModels: completeness, quadrature, adaptive
steps, agreement with the ``saliency`` library, SmoothGrad, Blur IG and concurrency."""

from __future__ import annotations

import trainer  # noqa: F401  (legacy Keras before TensorFlow)

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tensorflow as tf
from saliency import core as saliency_core

from explain import NonFiniteAttributionError, explain_images, load_explainable_model
from explain.integrated_gradients import (CONVERGED, DEGENERATE, DEGENERATE_STEP_COUNT, LIMIT, MIN_PANEL_WIDTH, NONFINITE,
                                          RESOLUTION, GroupSums, IntegratedGradients, PathResult, _panels_to_split)
from explain.testing import export_saturating_classifier, smooth_images
from trainer.schema import DEFAULT_ADAPTIVE_START


@pytest.fixture(scope="module")
def tiny_model(exported_model_dir):
    return load_explainable_model(exported_model_dir, batch_size=8, streams=2)  # fixed: tests compare loads


@pytest.fixture(scope="module")
def saturating_model(tmp_path_factory):
    return load_explainable_model(export_saturating_classifier(str(tmp_path_factory.mktemp("sat") / "model")),
                                  batch_size=8, streams=2)


@pytest.fixture(scope="module")
def images():
    return smooth_images(2)


def _paths(model, images):
    classes = model.predict(images).argmax(axis=1)
    return images, np.zeros_like(images), classes


def test_completeness_at_default_steps_on_exported_model(tiny_model, images):
    results = explain_images(tiny_model, images, {"integrated_gradients_attribution": {"step_count": 50}},
                             return_raw=True)
    for result in results:
        (attribution,) = result["attributions"]
        raw = np.array(attribution["featureAttributions"]["image"]["raw"])
        delta = attribution["instanceOutputValue"] - attribution["baselineOutputValue"]
        assert raw.shape == (192, 192, 3)
        assert attribution["approximationError"] < 0.05
        assert abs(raw.sum() - delta) <= 0.05 * abs(delta) + 1e-6  # the reported error is the real one


def test_gauss_legendre_beats_riemann_at_equal_steps_on_a_smooth_model(saturating_model, images):
    x, b, classes = _paths(saturating_model, images)
    ig = IntegratedGradients()
    errors = {q: ig.GetMask(x, b, classes, saturating_model, step_count=16, quadrature=q).approximation_errors
              for q in ("riemann_right", "riemann_trapezoid", "gauss_legendre")}
    assert np.all(errors["gauss_legendre"] < errors["riemann_trapezoid"])
    assert np.all(errors["gauss_legendre"] < errors["riemann_right"])
    assert np.all(np.abs(saturating_model.predict(x)[np.arange(2), classes]
                         - saturating_model.predict(b)[np.arange(2), classes]) > 0.3)  # a meaningful path


def test_completeness_splits_the_largest_residuals_of_the_errors_sign_to_cover_the_excess():
    widths = np.full(4, 0.25)  # map allowance tolerance * sqrt(0.25) = 0.5, strict share 0.25 (tolerance 1)
    # the largest residuals of the error's sign until they cover the excess: here 0.7 of 1.7
    assert _panels_to_split(np.array([0.6, -0.1, 0.65, 0.55]), widths, 1.0) == [2, 0]
    assert _panels_to_split(np.array([0.45, -0.05, 0.4, 0.48]), widths, 1.0) == [3]  # excess 0.28
    # an excess of 0.05 needs one panel, though two are over the random-walk allowance the map uses
    # (splitting every such panel first is the rule that took 4-6x the evaluations to 1% on
    # MobileNetV2, and spent the whole cap on 6 of 24 validation images)
    assert _panels_to_split(np.array([0.52, 0.51, 0.06, -0.04]), widths, 1.0) == [0]
    # a large residual against the error's sign is left: splitting it would move the sum away
    fifths = np.full(5, 0.2)
    assert _panels_to_split(np.array([0.6, -0.65, 0.6, 0.6, 0.6]), fifths, 1.0) == [0, 2]
    # sizes that are not signed pieces of the error (the map's): those over the random-walk allowance,
    assert _panels_to_split(np.array([0.6, 0.1, 0.9, 0.3]), widths, 1.0, signed=False) == [2, 0]
    # else those over their strict share
    assert _panels_to_split(np.array([0.4, 0.3, 0.2, 0.1]), widths, 1.0, signed=False) == [0, 1]
    # none over either: the largest, so every round makes progress
    assert _panels_to_split(np.array([0.2, 0.24, 0.2, 0.2]), widths, 1.0, signed=False) == [1]
    # a panel at the narrowest width is never split
    narrow = np.array([2 * MIN_PANEL_WIDTH, 1 - 2 * MIN_PANEL_WIDTH])
    assert _panels_to_split(np.array([1e-7, 1e-6]), narrow, 1e-6) == [1]
    # and when the narrowest panels alone miss the target, only panels over their allowance are
    # still split (they can still shrink the error), then none: no fallback can meet the target
    stuck = np.array([2 * MIN_PANEL_WIDTH, 0.5, 0.5 - 2 * MIN_PANEL_WIDTH])
    assert _panels_to_split(np.array([1.0, 0.9, 1e-9]), stuck, 0.1) == [1]
    assert _panels_to_split(np.array([1.0, 0.05, 1e-9]), stuck, 0.1) == []
    # not stuck when the residuals against the narrowest panels' sign offset them: the others go
    assert _panels_to_split(np.array([0.12, 0.06, -0.05]), stuck, 0.1) == [1]
    assert _panels_to_split(np.array([-0.2, 0.05, 0.3]), stuck, 0.1) == [2]  # overshooting offsets shrink


class _JumpModel:
    """F(alpha) jumps from 0 to 1 at alpha = 0.3 with zero gradient everywhere: no quadrature sees it."""

    def predict(self, images):
        up = (images.reshape(len(images), -1).mean(axis=1) > 0.3).astype(np.float32)
        return np.stack([up, 1 - up], axis=1)

    def path_gradients(self, batch):
        return PathResult(np.zeros((batch.num_groups, 1, 1, 1), np.float32), np.zeros(len(batch.alphas), np.float32),
                          (batch.alphas > 0.3).astype(np.float32))


def test_a_jump_the_gradient_cannot_see_stops_at_the_resolution_and_says_more_steps_will_not_help():
    from explain.explainer import _warnings
    from explain.parameters import parse_explanation_parameters

    x, b = np.ones((1, 1, 1, 1), np.float32), np.zeros((1, 1, 1, 1), np.float32)
    out = IntegratedGradients().GetMask(x, b, np.array([0]), _JumpModel(), step_count=5, target_error=0.05)
    assert list(out.stop_reasons) == [RESOLUTION]
    assert out.step_counts[0] < 40  # one bisection per round down to the narrowest panel, not the cap
    assert out.approximation_errors[0] == pytest.approx(1.0)
    config = parse_explanation_parameters({"integrated_gradients_attribution": {"step_count": 5}}).attribution
    (warning,) = _warnings("up", float(out.approximation_errors[0]), 1.0, 0.0, out.stop_reasons, out.step_counts,
                           config)
    assert "more steps will not help" in warning and "another baseline" in warning
    assert "max_step_count" not in warning


class _SteepStepModel:
    """F(alpha) = alpha / 2 plus a smooth step of height 1/2 over [0.3, 0.3 + 1/4096]: steep, but a
    gradient sees it, so refinement resolves it (a ReLU6 network's paths have such stretches)."""

    start, width = 0.3, 1.0 / 4096

    def _t(self, alphas):
        return np.clip((np.asarray(alphas, np.float64) - self.start) / self.width, 0.0, 1.0)

    def predict(self, images):
        t = self._t(images.reshape(len(images), -1).mean(axis=1))
        up = 0.5 * images.reshape(len(images), -1).mean(axis=1) + 0.5 * (3 * t ** 2 - 2 * t ** 3)
        return np.stack([up, 1 - up], axis=1).astype(np.float32)

    def path_gradients(self, batch):
        t = self._t(batch.alphas)
        outputs = 0.5 * batch.alphas + 0.5 * (3 * t ** 2 - 2 * t ** 3)
        slopes = 0.5 + 0.5 * 6 * t * (1 - t) / self.width
        attributions = np.bincount(batch.node_groups, batch.weights * slopes, minlength=batch.num_groups)
        return PathResult(attributions.reshape(-1, 1, 1, 1).astype(np.float32), slopes.astype(np.float32),
                          outputs.astype(np.float32))


def test_a_steep_stretch_a_gradient_sees_is_resolved_not_called_a_jump():
    """As narrow as the old narrowest panel (1/4096, where this stopped as RESOLUTION at error 0.5),
    yet resolvable: refinement goes down into it and meets the target."""
    assert _SteepStepModel.width > 2 * MIN_PANEL_WIDTH
    x, b = np.ones((1, 1, 1, 1), np.float32), np.zeros((1, 1, 1, 1), np.float32)
    out = IntegratedGradients().GetMask(x, b, np.array([0]), _SteepStepModel(), step_count=5, target_error=0.01)
    assert list(out.stop_reasons) == [CONVERGED]
    assert out.approximation_errors[0] <= 0.01
    assert out.attributions.sum() == pytest.approx(1.0, abs=0.01)
    assert out.step_counts[0] < 100


class _CancellingModel:
    """Two pixels whose integrands along the path are 1/4 +- sin(5 pi alpha): they cancel in the
    sum, so F(alpha) = alpha / 2 is a straight line and completeness holds on any grid, while the
    map needs the oscillation resolved. The exact map is 1/4 +- 2 / (5 pi)."""

    exact = np.array([0.25 + 2 / (5 * np.pi), 0.25 - 2 / (5 * np.pi)])

    def predict(self, images):
        f = 0.5 * images.reshape(len(images), -1).mean(axis=1)
        return np.stack([f, 1 - f], axis=1).astype(np.float32)

    def path_gradients(self, batch):
        wave = np.sin(5 * np.pi * batch.alphas.astype(np.float64))
        nodes = np.stack([0.25 + wave, 0.25 - wave], axis=1)
        attributions = np.zeros((batch.num_groups, 2))
        np.add.at(attributions, batch.node_groups, batch.weights[:, None] * nodes)
        return PathResult(attributions.reshape(-1, 1, 1, 2).astype(np.float32),
                          np.full(len(batch.alphas), 0.5, np.float32), (0.5 * batch.alphas).astype(np.float32))


def test_the_map_error_is_estimated_and_map_target_refines_what_completeness_cannot_see():
    x, b = np.ones((1, 1, 1, 2), np.float32), np.zeros((1, 1, 1, 2), np.float32)
    ig, model = IntegratedGradients(), _CancellingModel()

    def true_error(out):
        return np.abs(out.attributions[0].ravel() - model.exact).sum() / np.abs(model.exact).sum()

    plain = ig.GetMask(x, b, np.array([0]), model, step_count=5, target_error=0.01)
    assert plain.step_counts[0] == 5 and plain.approximation_errors[0] < 1e-6  # completeness is blind here
    assert true_error(plain) > 0.5 and plain.map_errors[0] > 0.1  # the estimate is not

    refined = ig.GetMask(x, b, np.array([0]), model, step_count=5, target_error=0.01, map_target=0.02)
    assert list(refined.stop_reasons) == [CONVERGED]
    assert refined.map_errors[0] <= 0.02  # recomputed from the final grid: the running bookkeeping agrees
    assert true_error(refined) < 0.02
    assert refined.step_counts[0] < 200
    assert len(ig.GetMask(x, b, np.array([0]), model, step_count=5).map_errors) == 0  # fixed mode: none
    with pytest.raises(ValueError, match="map_target"):
        ig.GetMask(x, b, np.array([0]), model, step_count=5, map_target=0.1)  # fixed steps cannot refine


def test_map_target_judges_the_summary_a_user_reads_when_map_features_gives_one():
    """The two pixels' waves cancel in their sum: judged on the pixels the map needs refining, on a
    summary that sums them (as XRAI averages a segment) it is already exact at 5 points, and the
    error each path reports is the summary's."""
    x, b = np.ones((1, 1, 1, 2), np.float32), np.zeros((1, 1, 1, 2), np.float32)
    ig, model = IntegratedGradients(), _CancellingModel()
    pixels = ig.GetMask(x, b, np.array([0]), model, step_count=5, target_error=0.01, map_target=0.02)
    summed = ig.GetMask(x, b, np.array([0]), model, step_count=5, target_error=0.01, map_target=0.02,
                        map_features=lambda r, v: np.asarray(v).reshape(len(v), -1, 2).sum(axis=2))
    assert pixels.step_counts[0] > 5
    assert list(summed.stop_reasons) == [CONVERGED] and summed.step_counts[0] == 5
    assert summed.map_errors[0] < 1e-6 and pixels.map_errors[0] > 1e-3
    # a summary that needs refining (one pixel): refined on it, and what each path reports agrees
    # with the running bookkeeping the refinement stopped on
    first = ig.GetMask(x, b, np.array([0]), model, step_count=5, target_error=0.01, map_target=0.02,
                       map_features=lambda r, v: np.asarray(v).reshape(len(v), -1)[:, :1])
    assert list(first.stop_reasons) == [CONVERGED] and first.step_counts[0] > 5
    assert first.map_errors[0] <= 0.02
    pixel_error = lambda out: abs(out.attributions[0].ravel()[0] - model.exact[0]) / abs(model.exact[0])  # noqa: E731
    assert pixel_error(first) < 0.05 < 0.2 < pixel_error(summed)  # the estimate reads under the truth (_map_error)


def _two_pixel_result(batch, h: np.ndarray, w: np.ndarray, f: np.ndarray) -> PathResult:
    """The callback's answer for two pixels whose integrands are h/2 + w and h/2 - w at each node
    (so dF/dalpha = h, and w only moves the map), F = f: each group's weighted sum of them."""
    attributions = np.zeros((batch.num_groups, 2))
    np.add.at(attributions, batch.node_groups, batch.weights[:, None] * np.stack([h / 2 + w, h / 2 - w], axis=1))
    return PathResult(attributions.reshape(-1, 1, 1, 2).astype(np.float32), h.astype(np.float32), f.astype(np.float32))


class _SymmetricCurveModel:
    """Two pixels whose integrands are h/2 +- w along the path: h = 1 + cos(pi alpha) / 2 makes the
    trapezoid's panel residuals cancel in pairs on any grid symmetric about 1/2 (completeness holds
    at 5 points), and w = sin(6 pi alpha) on the first half only draws the map's splits there,
    which breaks that cancellation (on the paths of ``wavy_rows``; None: every path)."""

    wavy_rows: tuple[int, ...] | None = None

    def predict(self, images):
        a = images.reshape(len(images), -1).mean(axis=1).astype(np.float64)
        f = a + 0.5 * np.sin(np.pi * a) / np.pi
        return np.stack([f, 1 - f], axis=1).astype(np.float32)

    def path_gradients(self, batch):
        a = batch.alphas.astype(np.float64)
        h = 1 + 0.5 * np.cos(np.pi * a)
        wavy = True if self.wavy_rows is None else np.isin(batch.node_rows, self.wavy_rows)
        w = np.where((a < 0.5) & wavy, np.sin(6 * np.pi * a), 0.0)
        return _two_pixel_result(batch, h, w, a + 0.5 * np.sin(np.pi * a) / np.pi)


class _WideCurveModel(_SymmetricCurveModel):
    """The symmetric-curve model's two integrands, each repeated over a 128x128 image (128 KB per
    integrand vector), to measure what a refinement holds."""

    size = 128

    def path_gradients(self, batch):
        small = super().path_gradients(batch)
        wide = np.repeat(np.repeat(small.group_attributions, self.size, axis=1), self.size, axis=2)
        return PathResult(wide, small.node_derivatives, small.node_outputs)


def test_a_refined_map_holds_each_integrand_vector_once():
    """With the map refined on the pixels, the bookkeeping reads the integrand vectors the grid
    keeps, not copies of them: a 400-point grid of 192x192x3 is 177 MB, twice that with copies."""
    import tracemalloc

    model = _WideCurveModel()
    shape = (1, model.size, model.size, 2)
    x, b = np.ones(shape, np.float32), np.zeros(shape, np.float32)
    tracemalloc.start()
    try:
        out = IntegratedGradients().GetMask(x, b, np.array([0]), model, step_count=5, target_error=0.001,
                                            max_step_count=400, map_target=0.0005)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    vector = model.size * model.size * 2 * 4
    assert out.step_counts[0] >= 100  # many points, so the 32-point chunks of the final sums are small beside them
    assert peak < 1.6 * out.step_counts[0] * vector, (peak / vector, out.step_counts[0])


class _ScaledWideCurveModel(_WideCurveModel):
    """The wide model with every pixel's integrands scaled by its own fixed factor, keeping each
    node's integrand vector by its alpha (each node is its own group, at weight 1, in a refinement)."""

    size = 32
    scale = np.random.default_rng(0).uniform(0.2, 2.0, (1, 32, 32, 2)).astype(np.float32)

    def __init__(self):
        self.nodes: dict[float, np.ndarray] = {}

    def path_gradients(self, batch):
        wide = super().path_gradients(batch)
        vectors = wide.group_attributions * self.scale
        for k, alpha in enumerate(batch.alphas):
            self.nodes[float(alpha)] = vectors[batch.node_groups[k]]
        return PathResult(vectors, wide.node_derivatives, wide.node_outputs)


def test_the_maps_estimate_kept_split_by_split_is_the_final_grids(monkeypatch):
    """The refinement moves each split panel's share of the map bookkeeping (the running map, the
    per-pixel squared residuals, each panel's residual size) onto its halves in place, and the
    error it reports is read off what it kept: it must be the final grid's, recomputed whole; the
    map returned (the running one) must be the grid's trapezoid sum, and its L1 norm the one the
    last round judged by; and every round's
    panel sizes, which choose the map's splits, must be the grid's as it stands, in its order."""
    import explain.integrated_gradients as ig_module
    from explain.integrated_gradients import _grid_squares, _map_error

    norms: list[float] = []
    monkeypatch.setattr(ig_module, "_map_error", lambda squares, l1: norms.append(l1) or _map_error(squares, l1))
    model = _ScaledWideCurveModel()
    checked_sizes: list[int] = []
    panels_to_split = ig_module._panels_to_split

    def sizes_are_the_grids(residuals, widths, tolerance, signed=True):
        """Each round's map panel sizes, in grid order, against the grid evaluated so far."""
        if not signed:
            grid = np.array(sorted(model.nodes))
            np.testing.assert_allclose(widths, np.diff(grid), rtol=1e-12)
            nodes = [model.nodes[a] for a in grid]
            expected = [np.abs(nodes[k + 1] - nodes[k]).sum() * (grid[k + 1] - grid[k]) / 4
                        for k in range(len(grid) - 1)]
            np.testing.assert_allclose(residuals, expected, rtol=1e-4)
            checked_sizes.append(len(grid))
        return panels_to_split(residuals, widths, tolerance, signed)

    monkeypatch.setattr(ig_module, "_panels_to_split", sizes_are_the_grids)
    shape = (1, model.size, model.size, 2)
    x, b = np.ones(shape, np.float32), np.zeros(shape, np.float32)
    out = IntegratedGradients().GetMask(x, b, np.array([0]), model, step_count=5, target_error=0.001,
                                        max_step_count=400, map_target=0.002)
    assert norms[-2] == pytest.approx(float(np.abs(out.attributions[0]).sum()), rel=1e-5)  # the last round's
    assert len(checked_sizes) >= 5 and checked_sizes[-1] >= 40  # many rounds' sizes, on grids of many splits
    alphas = np.array(sorted(model.nodes))
    assert len(alphas) == out.step_counts[0] >= 60 and list(out.stop_reasons) == [CONVERGED]
    # the map returned is the running one: it must be the final grid's trapezoid sum, recomputed
    weights = np.zeros(len(alphas))
    weights[:-1] += np.diff(alphas) / 2
    weights[1:] += np.diff(alphas) / 2
    whole = sum(w * model.nodes[a].astype(np.float64) for w, a in zip(weights, alphas))
    np.testing.assert_allclose(out.attributions[0], whole, rtol=0, atol=1e-5 * np.abs(whole).max())
    squares = _grid_squares([model.nodes[a] for a in alphas], np.diff(alphas))
    expected = _map_error(squares, float(np.abs(out.attributions[0]).sum()))
    assert out.map_errors[0] == pytest.approx(expected, rel=1e-5)
    assert expected <= 0.002


def test_the_map_bookkeeping_in_two_halves_of_the_pixels_gives_the_same_refinement(monkeypatch):
    """Each round's map bookkeeping runs on two halves of the pixels, the second on a helper thread:
    on maps too small to hand off, and on the same maps handed off, every split, map and reported
    error is the same to the bit."""
    import explain.integrated_gradients as ig_module

    def refine():
        model = _ScaledWideCurveModel()
        shape = (1, model.size, model.size, 2)
        x, b = np.ones(shape, np.float32), np.zeros(shape, np.float32)
        return IntegratedGradients().GetMask(x, b, np.array([0]), model, step_count=5, target_error=0.001,
                                             max_step_count=400, map_target=0.002)

    handed_off: list[int] = []
    submit = ig_module._HELPER.submit
    monkeypatch.setattr(ig_module._HELPER, "submit", lambda *a: handed_off.append(1) or submit(*a))
    alone = refine()
    assert not handed_off  # 32x32x2 is under HALVES_MIN_SIZE
    monkeypatch.setattr(ig_module, "HALVES_MIN_SIZE", 0)
    halves = refine()
    assert len(handed_off) >= 5  # every round that split a panel
    assert alone.step_counts[0] == halves.step_counts[0] >= 60
    np.testing.assert_array_equal(alone.attributions, halves.attributions)
    np.testing.assert_array_equal(alone.map_errors, halves.map_errors)


def test_the_halves_run_on_the_helper_when_it_is_free_else_both_in_the_caller():
    """The second half runs at once on the helper (each half here waits for the other); when the
    helper is busy with another request's bookkeeping the caller runs both and does not wait for
    it; an error in either half is raised, once neither runs."""
    from explain.integrated_gradients import HALVES_MIN_SIZE, _HELPER, _in_halves

    both_running = threading.Barrier(2, timeout=30)
    threads: dict[int, int] = {}

    def together(k: int) -> int:
        threads[k] = threading.get_ident()
        both_running.wait()  # BrokenBarrierError unless the other half runs at the same time
        return 10 + k

    assert _in_halves(together, HALVES_MIN_SIZE) == (10, 11)
    assert len(set(threads.values())) == 2 and threading.get_ident() in threads.values()

    def where(k: int) -> int:
        threads[k] = threading.get_ident()
        return k

    release = threading.Event()
    busy = _HELPER.submit(release.wait, 30)
    try:
        threads.clear()
        assert _in_halves(where, HALVES_MIN_SIZE) == (0, 1)
        assert set(threads.values()) == {threading.get_ident()} and not busy.done()
    finally:
        release.set()
        busy.result()
    threads.clear()
    assert _in_halves(where, 10) == (0, 1) and set(threads.values()) == {threading.get_ident()}  # small: no hand-off

    def failing(k: int) -> int:
        if k == 1:
            raise ValueError("the second half failed")
        time.sleep(0.05)
        return k

    with pytest.raises(ValueError, match="second half"):
        _in_halves(failing, HALVES_MIN_SIZE)


def test_a_groups_first_array_is_kept_uncopied_and_never_written_into(tiny_model, images):
    """The adaptive mode's groups are single nodes: the model hands each one's gradient sum back as
    its kernel returned it (a read-only view, no copy of a map per evaluation); a group given a
    second array is summed into a copy, so the arrays given are never written into."""
    from explain.integrated_gradients import PathBatch
    from explain.paths import LINEAR

    first, second, third = (np.full((2, 2, 3), v, np.float32) for v in (1.0, 2.0, 4.0))
    for array in (first, second, third):
        array.flags.writeable = False
    sums = GroupSums(3, (2, 2, 3))
    for group, array in ((0, first), (1, first), (1, second), (1, third)):
        sums.add(group, array)
    kept, summed, empty = sums.arrays()
    assert kept is first
    np.testing.assert_array_equal(summed, 7.0)
    np.testing.assert_array_equal(empty, 0.0)
    np.testing.assert_array_equal(first, 1.0)
    np.testing.assert_array_equal(second, 2.0)

    x, b, classes = _paths(tiny_model, images)
    alphas = np.array([0.2, 0.4, 0.6, 0.8, 0.3, 0.5], np.float32)
    rows = np.array([0, 0, 0, 0, 1, 1], np.int32)
    single = tiny_model.path_gradients(PathBatch(x, b, classes, rows, np.arange(6, dtype=np.int32), alphas,
                                                 np.ones(6, np.float32), 6, LINEAR))
    assert not any(array.flags.writeable for array in single.group_attributions)  # the kernel's own outputs
    merged = tiny_model.path_gradients(PathBatch(x, b, classes, rows, rows, alphas, np.ones(6, np.float32), 2, LINEAR))
    for row in (0, 1):
        np.testing.assert_allclose(merged.group_attributions[row],
                                   sum(single.group_attributions[k] for k in np.flatnonzero(rows == row)),
                                   rtol=1e-5, atol=1e-7)


def test_completeness_comes_first_when_map_splits_break_it_at_the_cap():
    """Splitting map panels moves the sum; if the cap then stops a path with completeness broken,
    the last grid where it held is returned (the user's target_error is the contract), at the
    evaluations spent, with the map's estimate of that grid."""
    x, b = np.ones((1, 1, 1, 2), np.float32), np.zeros((1, 1, 1, 2), np.float32)
    ig, model = IntegratedGradients(), _SymmetricCurveModel()
    plain = ig.GetMask(x, b, np.array([0]), model, step_count=5, target_error=0.001)
    assert plain.step_counts[0] == 5 and plain.approximation_errors[0] < 1e-4
    capped = ig.GetMask(x, b, np.array([0]), model, step_count=5, target_error=0.001, max_step_count=7,
                        map_target=0.01)
    assert list(capped.stop_reasons) == [LIMIT] and capped.step_counts[0] == 7  # what it cost
    np.testing.assert_allclose(capped.attributions, plain.attributions, rtol=1e-6)  # the 5-point grid's
    assert capped.approximation_errors[0] < 1e-4
    np.testing.assert_allclose(capped.map_errors, plain.map_errors, rtol=1e-5)
    # with room to finish, both are met on the refined grid
    done = ig.GetMask(x, b, np.array([0]), model, step_count=5, target_error=0.001, max_step_count=400,
                      map_target=0.01)
    assert list(done.stop_reasons) == [CONVERGED] and done.approximation_errors[0] <= 0.001
    assert done.map_errors[0] <= 0.0101 and done.step_counts[0] > 7


class _SteepWavyModel:
    """Two pixels whose integrands are e^(3 alpha) / 2 +- sin(6 pi alpha): the trapezoid misses
    completeness on a coarse grid (the output is steep near the input) and the map misses too (the
    wave cancels in the sum, so only the map sees it). Records each call's alphas."""

    def __init__(self):
        self.calls: list[np.ndarray] = []

    def predict(self, images):
        a = images.reshape(len(images), -1).mean(axis=1).astype(np.float64)
        f = (np.exp(3 * a) - 1) / 3
        return np.stack([f, -f], axis=1).astype(np.float32)

    def path_gradients(self, batch):
        self.calls.append(np.sort(batch.alphas))
        a = batch.alphas.astype(np.float64)
        h = np.exp(3 * a)
        return _two_pixel_result(batch, h, np.sin(6 * np.pi * a), (h - 1) / 3)


def test_while_both_targets_miss_one_round_splits_completenesss_panels_and_the_maps():
    """Completeness alone mostly splits one or two panels a round, and on MobileNetV2 (2 cores)
    one evaluation alone costs twice one in a batch of 8: while the map misses too, its panels join
    completeness's round (they would be split once completeness holds anyway)."""
    x, b = np.ones((1, 1, 1, 2), np.float32), np.zeros((1, 1, 1, 2), np.float32)
    alone, both = _SteepWavyModel(), _SteepWavyModel()
    request = dict(step_count=5, target_error=0.02, max_step_count=400)
    first = IntegratedGradients().GetMask(x, b, np.array([0]), alone, **request)
    second = IntegratedGradients().GetMask(x, b, np.array([0]), both, map_target=0.01, **request)
    assert first.approximation_errors[0] <= 0.02 and second.approximation_errors[0] <= 0.02
    assert second.map_errors[0] <= 0.01 < first.map_errors[0]
    np.testing.assert_array_equal(alone.calls[0], both.calls[0])  # the same 5-point grid
    # the second round: completeness's splits, the same either way, and the map's beside them
    assert set(alone.calls[1]) < set(both.calls[1]), (alone.calls[1], both.calls[1])


def test_near_the_cap_the_maps_panels_leave_completeness_its_budget():
    """The map's splits join completeness's rounds only while a round leaves at least as many
    evaluations as it spends: near the cap they would take the splits completeness needs, and the
    user's target_error comes first (with them, this path ended at 0.0052 against 0.005)."""
    x, b = np.ones((1, 1, 1, 2), np.float32), np.zeros((1, 1, 1, 2), np.float32)
    request = dict(step_count=5, target_error=0.005, max_step_count=13)
    alone = IntegratedGradients().GetMask(x, b, np.array([0]), _SteepWavyModel(), **request)
    both = IntegratedGradients().GetMask(x, b, np.array([0]), _SteepWavyModel(), map_target=0.01, **request)
    assert alone.approximation_errors[0] <= 0.005
    assert both.approximation_errors[0] <= 0.005, both.approximation_errors


class _JumpWavyModel:
    """F jumps by 0.2 at alpha 0.3 where the gradient (1 everywhere) does not see it, and the
    integrands carry a wave that cancels in the sum: completeness is stuck once the jump's panel
    is as narrow as panels get, and only the map sees the wave."""

    def predict(self, images):
        a = images.reshape(len(images), -1).mean(axis=1).astype(np.float64)
        f = a + 0.2 * (a > 0.3)
        return np.stack([f, -f], axis=1).astype(np.float32)

    def path_gradients(self, batch):
        a = batch.alphas.astype(np.float64)
        return _two_pixel_result(batch, np.ones_like(a), np.sin(14 * np.pi * a), a + 0.2 * (a > 0.3))


def test_a_path_stuck_on_a_jump_stops_as_resolution_with_the_maps_splits_in_its_rounds():
    """Bisecting toward a jump no gradient sees, the map's splits ride along until completeness is
    stuck; then the path stops as RESOLUTION (its warning names the jump, not the cap), within a
    cap that mixed rounds could otherwise have spent first (LIMIT, "raise max_step_count")."""
    x, b = np.ones((1, 1, 1, 2), np.float32), np.zeros((1, 1, 1, 2), np.float32)
    out = IntegratedGradients().GetMask(x, b, np.array([0]), _JumpWavyModel(), step_count=5, target_error=0.05,
                                        max_step_count=40, map_target=0.01)
    assert list(out.stop_reasons) == [RESOLUTION] and out.step_counts[0] < 40
    assert out.approximation_errors[0] == pytest.approx(0.2 / 1.2, rel=1e-3)  # the jump, unseen


class _HalfWavyPairModel(_SymmetricCurveModel):
    """Path 0 is :class:`_SymmetricCurveModel`'s; path 1 has the same output and no map wave."""

    wavy_rows = (0,)


def test_completeness_first_at_the_cap_judges_a_group_as_the_refinement_does():
    """Two paths averaged into one attribution: at the cap, path 0's map splits left it over its
    own share of the allowance, but the group's summed error is within the group's. The group is
    complete by the refinement's rule, so its refined grid (the better map) is kept; rolling it
    back to the 5-point grid, as a check of the path's own share alone did, cost the map."""
    x, b = np.ones((2, 1, 1, 2), np.float32), np.zeros((2, 1, 1, 2), np.float32)
    out = IntegratedGradients().GetMask(x, b, np.array([0, 0]), _HalfWavyPairModel(), step_count=5,
                                        target_error=0.005, max_step_count=7, map_target=0.01,
                                        path_groups=np.array([0, 0]))
    assert list(out.stop_reasons) == [LIMIT, LIMIT] and list(out.step_counts) == [7, 7]
    gaps = np.abs(out.instance_outputs - out.baseline_outputs)
    assert out.approximation_errors[0] > 0.005  # over its own share ...
    assert out.absolute_errors.sum() / gaps.sum() <= 0.005  # ... within the group's: kept
    five = IntegratedGradients().GetMask(x, b, np.array([0, 0]), _HalfWavyPairModel(), step_count=5,
                                         target_error=0.005, max_step_count=5, map_target=0.01,
                                         path_groups=np.array([0, 0]))
    assert out.map_errors[0] < five.map_errors[0]  # the refined grid's map, not the 5-point one's
    assert not np.allclose(out.attributions[0], five.attributions[0], rtol=1e-3)


def test_a_stricter_target_error_missed_under_vertexs_threshold_says_so():
    """A 1% request that ends at 3% is within Vertex's 0.05 but not within what was asked: it warns,
    naming target_error; the default request at 3% does not."""
    from explain.explainer import _warnings
    from explain.parameters import parse_explanation_parameters

    def warnings(target_error, reason=LIMIT):
        spec = {"step_count": 5, "max_step_count": 12} | ({} if target_error is None else {"target_error": target_error})
        config = parse_explanation_parameters({"integrated_gradients_attribution": spec}).attribution
        return _warnings("up", 0.03, 0.9, 0.1, np.array([reason], object), np.array([12]), config, np.array([0.05]))

    (warning,) = warnings(0.01)
    assert "approximation error 0.030 still exceeds target_error 0.01" in warning and "raise max_step_count" in warning
    assert warnings(None) == [] and warnings(0.05) == []
    (warning,) = warnings(0.01, RESOLUTION)
    assert "still exceeds target_error 0.01" in warning and "more steps will not help" in warning


def test_map_target_is_judged_on_the_map_a_group_averages():
    """Two identical cancelling paths averaged into one attribution: the average's error is about
    1/sqrt(2) of one path's, so the group meets the target with fewer points than each path alone,
    and both paths report the group's estimate."""
    x, b = np.ones((2, 1, 1, 2), np.float32), np.zeros((2, 1, 1, 2), np.float32)
    ig, model = IntegratedGradients(), _CancellingModel()
    alone = ig.GetMask(x, b, np.array([0, 0]), model, step_count=5, target_error=0.01, map_target=0.02)
    grouped = ig.GetMask(x, b, np.array([0, 0]), model, step_count=5, target_error=0.01, map_target=0.02,
                         path_groups=np.array([0, 0]))
    assert list(grouped.stop_reasons) == [CONVERGED, CONVERGED]
    assert grouped.map_errors[0] == grouped.map_errors[1] <= 0.02
    assert grouped.step_counts.sum() < alone.step_counts.sum()
    assert alone.map_errors.max() <= 0.02


def test_a_map_target_missed_within_the_cap_says_so():
    from explain.explainer import _warnings
    from explain.parameters import parse_explanation_parameters

    x, b = np.ones((1, 1, 1, 2), np.float32), np.zeros((1, 1, 1, 2), np.float32)
    out = IntegratedGradients().GetMask(x, b, np.array([0]), _CancellingModel(), step_count=5, target_error=0.01,
                                        max_step_count=12, map_target=0.01)
    assert list(out.stop_reasons) == [LIMIT] and out.step_counts[0] == 12 and out.map_errors[0] > 0.01
    config = parse_explanation_parameters({"integrated_gradients_attribution": {
        "step_count": 5, "max_step_count": 12, "map_target": 0.01}}).attribution
    (warning,) = _warnings("up", float(out.approximation_errors[0]), 0.5, 0.0, out.stop_reasons, out.step_counts,
                           config, out.map_errors)
    assert "estimated map error" in warning and "raise max_step_count" in warning and "map_target: null" in warning
    assert _warnings("up", 0.0, 0.5, 0.0, np.array([CONVERGED], object), np.array([20]), config,
                     np.array([0.0100001])) == []  # within the float32 recomputation's 1%


class _PowerModel:
    """On path r, F(alpha) = alpha ** powers[r] (a one-pixel input), so dF/dalpha is known exactly."""

    def __init__(self, powers):
        self.powers = np.asarray(powers, float)

    def path_gradients(self, batch):
        p = self.powers[batch.node_rows]
        slopes = p * batch.alphas.astype(float) ** (p - 1)
        groups = np.bincount(batch.node_groups, batch.weights * slopes, minlength=batch.num_groups)
        return PathResult(groups.reshape(-1, 1, 1, 1).astype(np.float32), slopes.astype(np.float32),
                          (batch.alphas.astype(float) ** p).astype(np.float32))


def test_a_group_of_paths_stops_when_its_summed_error_meets_the_target():
    """XRAI's two paths are one attribution: once their summed error is within the summed
    allowance, neither is refined further, though one is over its own share."""
    x, b = np.ones((2, 1, 1, 1), np.float32), np.zeros((2, 1, 1, 1), np.float32)
    model = _PowerModel([1, 3])  # trapezoid error on 4 points: 0 on the first path, 1/18 on the second
    ends = (np.ones(2), np.zeros(2))
    kw = dict(step_count=4, target_error=0.05, end_outputs=ends)
    alone = IntegratedGradients().GetMask(x, b, np.zeros(2, int), model, **kw)
    assert alone.step_counts[0] == 4 and alone.step_counts[1] > 4  # 1/18 is over a path's 0.05
    together = IntegratedGradients().GetMask(x, b, np.zeros(2, int), model, path_groups=np.array([0, 0]), **kw)
    assert list(together.step_counts) == [4, 4] and list(together.stop_reasons) == [CONVERGED, CONVERGED]
    assert together.absolute_errors.sum() == pytest.approx(1 / 18) and 1 / 18 <= 0.05 * 2
    steep = IntegratedGradients().GetMask(x, b, np.zeros(2, int), _PowerModel([1, 6]), path_groups=np.array([0, 0]),
                                          **kw)
    assert steep.step_counts[1] > 4 and steep.absolute_errors.sum() <= 0.05 * 2  # over the group's: refined


class _EitherSideModel:
    """Two paths of one input: F = alpha ** 3 from a baseline scoring 0 to the input's 1, and
    F = drop * (alpha ** 3 - 2 alpha) from a baseline scoring ``drop`` over the input. Both
    derivatives are convex, so a trapezoid grid overstates both integrals: the errors share a sign
    while the differences do not."""

    def __init__(self, drop):
        self.drop = drop

    def path_gradients(self, batch):
        a = batch.alphas.astype(float)
        up = batch.node_rows == 0
        slopes = np.where(up, 3 * a ** 2, self.drop * (3 * a ** 2 - 2))
        values = np.where(up, a ** 3, self.drop * (a ** 3 - 2 * a))
        groups = np.bincount(batch.node_groups, batch.weights * slopes, minlength=batch.num_groups)
        return PathResult(groups.reshape(-1, 1, 1, 1).astype(np.float32), slopes.astype(np.float32),
                          values.astype(np.float32))


def test_a_groups_error_is_the_one_its_averaged_attribution_shows():
    """Two baselines on either side of the input (black under it, white over): their paths' errors
    have opposite signs and partly cancel, but so do their differences, and the averaged
    attribution must sum to the mean difference within target_error of it, the check a user
    makes from the response (baselineOutputValue is the baselines' mean). Judged on the sum of
    the paths' |differences| instead, the group stopped at 0.43 of the mean's, and reported 0.048."""
    x, b = np.ones((2, 1, 1, 1), np.float32), np.zeros((2, 1, 1, 1), np.float32)
    ends = (np.array([1.0, 0.0]), np.array([0.0, 0.8]))  # F(x), F(b): differences +1 and -0.8, their mean 0.1
    out = IntegratedGradients().GetMask(x, b, np.zeros(2, int), _EitherSideModel(0.8), step_count=4,
                                        target_error=0.05, end_outputs=ends, min_output_gap=0.05,
                                        path_groups=np.array([0, 0]))
    assert out.averaged_error(slice(0, 2)) <= 0.05 and list(out.stop_reasons) == [CONVERGED, CONVERGED]
    assert out.errors[0] > 0 and out.errors[1] > 0  # both convex: both overstated
    mean = float(out.attributions.mean(axis=0).sum())  # what the response's attribution sums to
    assert abs(mean - 0.1) / 0.1 == pytest.approx(out.averaged_error(slice(0, 2)), rel=1e-3, abs=1e-5)
    # differences that cancel to a mean under min_output_gap: held to the sum of the paths' own, and
    # the group is not refined toward a share of almost nothing
    cancel = IntegratedGradients().GetMask(x, b, np.zeros(2, int), _EitherSideModel(0.98),
                                           step_count=4, target_error=0.05, max_step_count=400,
                                           end_outputs=(np.array([1.0, 0.0]), np.array([0.0, 0.98])),
                                           min_output_gap=0.05, path_groups=np.array([0, 0]))
    assert list(cancel.stop_reasons) == [CONVERGED, CONVERGED] and cancel.step_counts.max() < 40
    assert cancel.absolute_errors.sum() <= 0.05 * 1.98


def test_warnings_name_cancelling_baselines_and_smoothgrads_shifted_output():
    """The cause each warning names is the true one: baselines scoring on either side of the input
    (refined, not "not refined"), and SmoothGrad noise that changes the model's output (not the
    baseline)."""
    from explain.explainer import _warnings
    from explain.parameters import parse_explanation_parameters

    xrai = parse_explanation_parameters({"xrai_attribution": {"step_count": 5}}).attribution
    (warning,) = _warnings("up", 4.09, 0.499, 0.5, np.array([CONVERGED, CONVERGED], object), np.array([70, 100]),
                           xrai, np.array([0.05, 0.05]), baseline_outputs=[0.999, 0.0])
    assert "0.999, 0.000 (0.500 on average)" in warning and "opposite signs" in warning
    assert "use one baseline" in warning and "not refined" not in warning
    smooth = parse_explanation_parameters({"integrated_gradients_attribution": {
        "step_count": 5, "smooth_grad_config": {"noise_sigma": 0.1, "noisy_sample_count": 2}}}).attribution
    (warning,) = _warnings("up", 0.5, 0.817, 0.0, np.array([DEGENERATE, DEGENERATE], object), np.array([5, 5]),
                           smooth, explained=0.003)
    assert "noisy samples score 0.003 on average (the input 0.817)" in warning and "lower noise_sigma" in warning
    (warning,) = _warnings("up", 0.01, 0.817, 0.0, np.array([CONVERGED, CONVERGED], object), np.array([9, 9]),
                           smooth, explained=0.6, checked=0.27)
    assert "explains the noisy samples" in warning and "lower noise_sigma (0.1)" in warning
    assert "by 0.27 of it (approximationError, 0.01, is against the samples' 0.600)" in warning
    (warning,) = _warnings("up", 0.01, 0.5065, 0.4996, np.array([CONVERGED] * 6, object), np.array([9] * 6),
                           smooth, explained=0.99, baseline_outputs=[0.999, 0.0], checked=70.4)
    assert "by 70.4 of it" in warning and "differ by only 0.007: use another baseline" in warning
    assert _warnings("up", 0.01, 0.817, 0.0, np.array([CONVERGED, CONVERGED], object), np.array([9, 9]),
                     smooth, explained=0.81) == []  # a shift within 0.05 of the difference: nothing to say
    (warning,) = _warnings("up", 0.5, 0.12, 0.10, np.array([DEGENERATE, DEGENERATE], object), np.array([5, 5]),
                           smooth, explained=0.11)  # the input itself scores like the baseline: not the noise
    assert "use another baseline" in warning and "noise_sigma" not in warning
    (warning,) = _warnings("up", 3.0, 0.499, 0.5, np.array([RESOLUTION, CONVERGED], object), np.array([90, 40]),
                           xrai, baseline_outputs=[0.999, 0.0])
    assert "output jumps where no gradient sees it" in warning and "within 0.05" not in warning
    cancelled, map_missed = _warnings("up", 0.08, 0.45, 0.5, np.array([LIMIT, LIMIT], object), np.array([400, 400]),
                                      xrai, np.array([0.2, 0.2]), baseline_outputs=[0.9, 0.1])
    assert "opposite signs" in cancelled and "map_target" in map_missed  # the map's miss is said too
    (warning,) = _warnings("up", 0.08, 0.3, 0.4, np.array([LIMIT, LIMIT], object), np.array([400, 400]),
                           xrai, baseline_outputs=[0.8, 0.0])  # a mean difference of 0.1 from 0.5 and 0.3
    assert "score on either side" in warning and "one baseline asks less" in warning
    (warning,) = _warnings("up", 2e-6, 0.9, 0.1, np.array([LIMIT], object), np.array([24]),
                           parse_explanation_parameters({"integrated_gradients_attribution": {
                               "step_count": 5, "target_error": 1e-9, "max_step_count": 24}}).attribution)
    assert "approximation error 2e-06 still exceeds target_error 1e-09" in warning


def test_adaptive_mode_meets_its_target(saturating_model, images):
    x, b, classes = _paths(saturating_model, images)
    fixed = IntegratedGradients().GetMask(x, b, classes, saturating_model, step_count=8)
    adaptive = IntegratedGradients().GetMask(x, b, classes, saturating_model, step_count=8, target_error=2e-3)
    assert np.all(fixed.approximation_errors > 2e-3)  # the target is not met without refinement
    assert np.all(adaptive.approximation_errors <= 2e-3)
    assert np.all(adaptive.step_counts > 8) and np.all(adaptive.step_counts <= 400)


def test_refinement_stops_early_and_says_why(saturating_model, images):
    x, b, classes = _paths(saturating_model, images)
    ig = IntegratedGradients()
    # a baseline that scores like the input: a few steps, no refinement, the reason recorded
    same = ig.GetMask(x, x.copy(), classes, saturating_model, step_count=50, target_error=1e-6,
                      max_step_count=2000, min_output_gap=0.05)
    assert list(same.stop_reasons) == [DEGENERATE, DEGENERATE]
    assert np.all(same.step_counts <= DEGENERATE_STEP_COUNT)
    # an unreachable target stops at the cap, and says so
    capped = ig.GetMask(x, b, classes, saturating_model, step_count=4, target_error=1e-9, max_step_count=24)
    assert list(capped.stop_reasons) == [LIMIT, LIMIT] and np.all(capped.step_counts <= 24)
    met = ig.GetMask(x, b, classes, saturating_model, step_count=4, target_error=0.01)
    assert list(met.stop_reasons) == [CONVERGED, CONVERGED] and np.all(met.approximation_errors <= 0.01)
    # two paths averaged into one attribution (XRAI's two baselines): one scores like the input, so
    # alone it would be degenerate; together they are refined to the group's allowance
    pair_x, pair_b = np.concatenate([x[:1], x[:1]]), np.concatenate([b[:1], x[:1] * 0.999])
    pair = ig.GetMask(pair_x, pair_b, np.repeat(classes[:1], 2), saturating_model, step_count=4,
                      target_error=0.01, min_output_gap=0.05, path_groups=np.array([0, 0]))
    gaps = np.abs(pair.instance_outputs - pair.baseline_outputs)
    assert gaps[1] < 0.05 < gaps[0] and DEGENERATE not in pair.stop_reasons
    assert pair.absolute_errors.sum() / gaps.sum() <= 0.01
    # the error reported is the error of the attribution returned
    np.testing.assert_allclose(met.attributions.sum(axis=(1, 2, 3)),
                               met.instance_outputs - met.baseline_outputs,
                               atol=float(0.01 * np.abs(met.instance_outputs - met.baseline_outputs).max()) + 1e-6)


class _OverflowingGradients:
    """A real model whose gradient overflows on the second half of every path (fault injection)."""

    def __init__(self, model):
        self._model = model

    def __getattr__(self, name):
        return getattr(self._model, name)

    def path_gradients(self, batch):
        result = self._model.path_gradients(batch)
        result.node_derivatives[batch.alphas > 0.5] = np.nan
        return result


def test_a_gradient_that_is_not_finite_stops_the_path_at_once_and_fails_the_request_clearly(tiny_model, images):
    broken = _OverflowingGradients(tiny_model)
    x, b, classes = _paths(tiny_model, images)
    before = tiny_model.evaluations
    out = IntegratedGradients().GetMask(x, b, classes, broken, step_count=5, target_error=0.01, max_step_count=400)
    assert list(out.stop_reasons) == [NONFINITE, NONFINITE] and list(out.step_counts) == [5, 5]
    assert tiny_model.evaluations - before <= 10  # the first round only, not the cap's 400 per path
    with pytest.raises(NonFiniteAttributionError, match=r"instance 0, output .*not finite.*another baseline"):
        explain_images(broken, images[:1], {"integrated_gradients_attribution": {"step_count": 5}})


def test_default_explanations_are_refined_and_warn_only_when_they_must(saturating_model, images):
    (faithful,) = explain_images(saturating_model, images[:1], {"integrated_gradients_attribution": {"step_count": 4}})
    assert faithful["attributions"][0]["approximationError"] <= 0.05 and not faithful["warnings"]
    (fixed,) = explain_images(saturating_model, images[:1], {"integrated_gradients_attribution": {
        "step_count": 2, "target_error": None}})
    if fixed["attributions"][0]["approximationError"] > 0.05:
        assert any("fixed steps" in w and "step_count" in w for w in fixed["warnings"])
    # a white image against a white baseline: nothing to attribute, a warning naming the remedy
    white = np.ones_like(images[:1])
    (degenerate,) = explain_images(saturating_model, white, {"integrated_gradients_attribution": {
        "step_count": 50, "baseline": "white"}})
    assert any("another baseline" in w for w in degenerate["warnings"]), degenerate["warnings"]


def test_agrees_with_saliency_integrated_gradients(tiny_model, images):
    x, b, classes = _paths(tiny_model, images[:1])
    fn = tiny_model._xai_model

    def call_model_function(x_batch, call_model_args=None, expected_keys=None):
        points = tf.constant(x_batch, tf.float32)
        with tf.GradientTape() as tape:
            tape.watch(points)
            probs = next(iter(fn(numpy_inputs=points).values()))[:, call_model_args["class"]]
        return {saliency_core.INPUT_OUTPUT_GRADIENTS: tape.gradient(probs, points).numpy()}

    theirs = saliency_core.IntegratedGradients().GetMask(x[0], call_model_function, {"class": int(classes[0])},
                                                         x_baseline=b[0], x_steps=50, batch_size=25)
    ours = IntegratedGradients().GetMask(x, b, classes, tiny_model, step_count=50).attributions[0]
    assert np.corrcoef(ours.ravel(), theirs.ravel())[0, 1] > 0.99
    # Same method, same steps' rule: the same numbers.
    same_rule = IntegratedGradients().GetMask(x, b, classes, tiny_model, step_count=50,
                                              quadrature="riemann_linspace").attributions[0]
    np.testing.assert_allclose(same_rule, theirs, rtol=1e-3, atol=1e-6)


def test_smoothgrad_and_blur_baseline_run(saturating_model, images):
    smooth = explain_images(saturating_model, images[:1], {"integrated_gradients_attribution": {
        "step_count": 16, "smooth_grad_config": {"noise_sigma": 0.1, "noisy_sample_count": 3}}}, return_raw=True)
    plain = explain_images(saturating_model, images[:1], {"integrated_gradients_attribution": {"step_count": 16}},
                           return_raw=True)
    raw = lambda r: np.array(r[0]["attributions"][0]["featureAttributions"]["image"]["raw"])  # noqa: E731
    assert np.isfinite(raw(smooth)).all() and not np.allclose(raw(smooth), raw(plain))
    for path in ("scale_space", "linear"):
        (result,) = explain_images(saturating_model, images[:1], {"integrated_gradients_attribution": {
            "step_count": 32, "blur_baseline_config": {"max_blur_sigma": 15}, "blur_path": path}}, return_raw=True)
        attribution = result["attributions"][0]
        assert np.isfinite(attribution["approximationError"])
        assert attribution["baselineOutputValue"] != pytest.approx(plain[0]["attributions"][0]["baselineOutputValue"])


def test_top_k_output_indices_and_concurrent_calls(tiny_model, images):
    params = {"integrated_gradients_attribution": {"step_count": 8}, "top_k": -1}
    (everything,) = explain_images(tiny_model, images[:1], params)
    assert sorted(a["outputIndex"][0] for a in everything["attributions"]) == list(range(5))
    assert everything["attributions"][0]["outputDisplayName"] == tiny_model.labels[
        everything["attributions"][0]["outputIndex"][0]]
    chosen = explain_images(tiny_model, images, {"xrai_attribution": {"step_count": 4}, "output_indices": [3]})
    assert [a["outputIndex"] for r in chosen for a in r["attributions"]] == [[3], [3]]

    one = {"integrated_gradients_attribution": {"step_count": 8}}
    expected = explain_images(tiny_model, images, one, return_raw=True)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: explain_images(tiny_model, images, one, return_raw=True), range(4)))
    for result in results:
        assert result == expected


def test_the_default_budget_takes_two_default_xrai_images_and_five_default_ig_ones(tiny_model):
    """A new user's first batch is not refused: two images by default XRAI, five by default IG."""
    from explain.cost import DEFAULT_EXPLAIN_BUDGET, ExplanationCostError, check_cost, request_cost

    def cost(method: str, images: int):
        return request_cost({method: {"step_count": DEFAULT_ADAPTIVE_START}}, images, tiny_model.metadata,
                            tiny_model.labels)

    check_cost(cost("xrai_attribution", 2), DEFAULT_EXPLAIN_BUDGET)
    check_cost(cost("integrated_gradients_attribution", 5), DEFAULT_EXPLAIN_BUDGET)
    with pytest.raises(ExplanationCostError):
        check_cost(cost("xrai_attribution", 3), DEFAULT_EXPLAIN_BUDGET)


def test_xrai_region_steps_are_counted_and_can_be_stopped(tiny_model, images):
    """XRAI's segmentation and region ranking make no model call: the cost model counts them, and
    a model wrapper's ``check_cancelled`` is consulted before them, so a cancelled request stops."""
    from explain.cost import XRAI_RANKING_COST, XRAI_SEGMENTATION_COST, request_cost

    xrai = {"xrai_attribution": {"step_count": 4}, "top_k": 2}
    cost = request_cost(xrai, 3, tiny_model.metadata, tiny_model.labels)
    assert cost.region_work == 3 * (XRAI_SEGMENTATION_COST + 2 * XRAI_RANKING_COST)
    assert cost.total == 3 * 2 * 2 * cost.path_evaluations + cost.region_work
    assert request_cost({"integrated_gradients_attribution": {"step_count": 4}}, 3, tiny_model.metadata,
                        tiny_model.labels).region_work == 0

    class Stopped(Exception):
        pass

    class Wrapper:
        def __init__(self, model):
            self._model, self.checks = model, 0

        def __getattr__(self, name):
            return getattr(self._model, name)

        def check_cancelled(self):
            self.checks += 1
            raise Stopped()

    wrapper = Wrapper(tiny_model)
    with pytest.raises(Stopped):
        explain_images(wrapper, images[:1], xrai)
    assert wrapper.checks == 1


def test_xrai_of_several_images_judges_each_image_on_its_own_segments(saturating_model, images):
    """Several images in one XRAI request: each path's map target is judged on its own image's
    segments, so each image's regions and error are what it gets alone, in either order (a strict
    target, so that the segments decide where the paths are refined)."""
    request = {"xrai_attribution": {"step_count": 4, "map_target": 0.005}}

    def maps(batch):
        return [(np.asarray(r["attributions"][0]["featureAttributions"]["image"]["raw"]),
                 r["attributions"][0]["approximationError"])
                for r in explain_images(saturating_model, batch, request, return_raw=True)]

    together, swapped = maps(images), maps(images[::-1])[::-1]
    alone = [maps(images[i:i + 1])[0] for i in range(len(images))]
    for (a, error_a), (b, error_b), (c, error_c) in zip(together, swapped, alone):
        np.testing.assert_allclose(a, c, rtol=1e-3, atol=1e-6)
        np.testing.assert_allclose(b, c, rtol=1e-3, atol=1e-6)
        assert error_a == pytest.approx(error_c, rel=1e-3, abs=1e-6) and error_b == pytest.approx(error_c, rel=1e-3, abs=1e-6)


def test_xrai_paths_start_from_enough_points_for_its_regions_and_the_cost_model_agrees(saturating_model, images):
    """Refining XRAI starts each path from at least XRAI_MIN_START grid points (its regions are
    ranked by the per-pixel map, which completeness alone does not converge); fixed steps
    (``target_error: null``) stay exactly the user's, and so does ``max_step_count``, what a
    path may cost; the server's cost model counts the same."""
    from explain.cost import request_cost
    from explain.parameters import XRAI_MIN_START

    class Counting:
        def __init__(self, model):
            self._model, self.first_call = model, None

        def __getattr__(self, name):
            return getattr(self._model, name)

        def path_gradients(self, batch):
            if self.first_call is None:
                self.first_call = np.bincount(batch.node_rows)
            return self._model.path_gradients(batch)

    for spec, first in (({"step_count": 4}, XRAI_MIN_START), ({"step_count": 40}, 40),
                        ({"step_count": 4, "target_error": None}, 4), ({"step_count": 4, "max_step_count": 8}, 8)):
        counting = Counting(saturating_model)
        explain_images(counting, images[:1], {"xrai_attribution": spec})
        assert list(counting.first_call) == [first, first], spec  # the black and the white path
    tight = {"xrai_attribution": {"step_count": 4, "max_step_count": 8}}
    assert request_cost(tight, 1, saturating_model.metadata, saturating_model.labels).path_evaluations == 8
    assert request_cost({"xrai_attribution": {"step_count": 4}}, 1, saturating_model.metadata,
                        saturating_model.labels).path_evaluations == 400


def test_path_ends_are_evaluated_once_and_baseline_gradients_are_kept(exported_model_dir, saturating_model, images):
    """XRAI's two paths share their input, and a baseline's gradient is a constant of the model:
    neither is evaluated twice, and the attributions are those of evaluating every node."""
    shared, unshared = (load_explainable_model(exported_model_dir, batch_size=8) for _ in range(2))
    unshared.share_ends = False
    request = {"xrai_attribution": {"step_count": 9, "target_error": None}, "output_indices": [2]}
    for i, spent in ((0, 2 * 9 - 1), (1, 2 * 9 - 3)):  # the input once; black and white cached after the first
        before = shared.evaluations
        got = explain_images(shared, images[i:i + 1], request, return_raw=True)
        assert shared.evaluations - before == spent
        before = unshared.evaluations
        want = explain_images(unshared, images[i:i + 1], request, return_raw=True)
        assert unshared.evaluations - before == 2 * 9
        (g,), (w,) = got[0]["attributions"], want[0]["attributions"]
        np.testing.assert_allclose(g["featureAttributions"]["image"]["raw"], w["featureAttributions"]["image"]["raw"],
                                   rtol=1e-5, atol=1e-9)
        assert g["approximationError"] == pytest.approx(w["approximationError"], rel=1e-4, abs=1e-7)

    # IG on a batch: every path's black baseline is one evaluation per class, each input its own
    x, b, classes = _paths(shared, images)
    classes[:] = 4
    before = shared.evaluations
    a = IntegratedGradients().GetMask(x, b, classes, shared, step_count=6, quadrature="riemann_trapezoid")
    assert shared.evaluations - before == 2 * 6 - 1
    c = IntegratedGradients().GetMask(x, b, classes, unshared, step_count=6, quadrature="riemann_trapezoid")
    np.testing.assert_allclose(a.attributions, c.attributions, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(a.absolute_errors, c.absolute_errors, rtol=1e-4, atol=1e-8)

    # an adaptive request refining the map too on a curved model: the same refinement and attributions
    shared = load_explainable_model(saturating_model.model_dir, batch_size=saturating_model.batch_size)
    x, b, classes = _paths(shared, images)
    kw = dict(step_count=5, target_error=0.01, max_step_count=200, map_target=0.1)
    a = IntegratedGradients().GetMask(x, b, classes, shared, **kw)
    a = IntegratedGradients().GetMask(x, b, classes, shared, **kw)  # now from the cached baseline
    saturating_model.share_ends = False
    try:
        c = IntegratedGradients().GetMask(x, b, classes, saturating_model, **kw)
    finally:
        saturating_model.share_ends = True
    np.testing.assert_array_equal(a.step_counts, c.step_counts)
    np.testing.assert_allclose(a.attributions, c.attributions, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(a.absolute_errors, c.absolute_errors, rtol=1e-3, atol=1e-8)


def test_the_baseline_gradient_cache_is_bounded(exported_model_dir, images):
    """Least recently used out past its bytes; a baseline that may never recur (random, blurred)
    is kept only from its second use on, so it cannot push out black and white."""
    model = load_explainable_model(exported_model_dir)
    one = int(np.prod(model.image_shape)) * 4
    model.end_cache_bytes = 2 * one
    x, b, _ = _paths(model, images[:1])
    for c in range(4):  # four classes' black-baseline gradients: only the last two are kept
        IntegratedGradients().GetMask(x, b, np.array([c]), model, step_count=3, quadrature="riemann_trapezoid")
    assert len(model._end_cache) == 2
    before = model.evaluations
    IntegratedGradients().GetMask(x, b, np.array([3]), model, step_count=3, quadrature="riemann_trapezoid")
    assert model.evaluations - before == 2  # class 3's baseline was kept
    IntegratedGradients().GetMask(x, b, np.array([0]), model, step_count=3, quadrature="riemann_trapezoid")
    assert model.evaluations - before == 2 + 3  # class 0's was dropped
    assert all(g.base is None for g, _ in model._end_cache.values())  # copies, not views of a chunk

    noise = np.random.default_rng(0).uniform(0, 1, x.shape).astype(np.float32)
    for spent in (3, 3, 2):  # seen once: not kept; seen again: kept
        before = model.evaluations
        IntegratedGradients().GetMask(x, noise, np.array([3]), model, step_count=3, quadrature="riemann_trapezoid")
        assert model.evaluations - before == spent


def test_the_chunk_size_and_streams_are_measured_on_load_unless_given(exported_model_dir, images, caplog):
    """Loading measures the number of chunks run at once and then the path kernel at every
    candidate chunk size, and keeps the fastest per node where it clearly beats the default (the
    best of both is the machine's);
    given values are used as they are, and neither changes an attribution."""
    from explain.model import BATCH_SIZE_CANDIDATES, CALIBRATION_MARGIN, DEFAULT_BATCH_SIZE, STREAM_CANDIDATES, _cores

    caplog.set_level("INFO", logger="explain.model")
    measured = load_explainable_model(exported_model_dir)
    given = load_explainable_model(exported_model_dir, 3, streams=1)
    assert set(measured.stream_seconds) == ({s for s in STREAM_CANDIDATES if s <= _cores()} or {1})
    assert measured.streams == min(measured.stream_seconds, key=measured.stream_seconds.get)
    assert set(measured.batch_seconds) == set(BATCH_SIZE_CANDIDATES)
    assert all(s > 0 for s in [*measured.batch_seconds.values(), *measured.stream_seconds.values()])
    seconds = measured.batch_seconds  # the fastest, where it beats the default by the margin
    fastest = min(seconds, key=seconds.get)
    assert measured.batch_size == (fastest if seconds[fastest] < seconds[DEFAULT_BATCH_SIZE] / (1 + CALIBRATION_MARGIN)
                                   else DEFAULT_BATCH_SIZE)
    assert (given.batch_size, given.streams) == (3, 1) and not given.batch_seconds and not given.stream_seconds
    # the server's log says what the load chose, and what it measured
    assert f"{measured.batch_size} path points in flight in {measured.streams} stream(s)" in caplog.text
    assert f"ms per point by points in flight: 4: {measured.batch_seconds[4] * 1000:.1f}" in caplog.text
    assert "3 path points in flight in 1 stream(s) (ms per point by points in flight: given; by streams: given)" \
        in caplog.text
    x, b, classes = _paths(measured, images)
    a, c = (IntegratedGradients().GetMask(x, b, classes, m, step_count=20) for m in (measured, given))
    np.testing.assert_allclose(a.attributions, c.attributions, rtol=1e-5, atol=1e-9)
    with pytest.raises(ValueError, match="streams must be >= 1"):
        load_explainable_model(exported_model_dir, 3, streams=0)


def test_calibration_times_the_candidates_in_turn(exported_model_dir, monkeypatch):
    """Each candidate runs once untimed, then the candidates are timed in turn, repeat by repeat (so a
    passing disturbance of the host hits them alike, not the repeats of one), and the model keeps
    the fastest per node; measuring streams leaves the chunk size as it was."""
    from explain.model import BATCH_SIZE_CANDIDATES, ExplainableModel, _cores, calibrate_batch_size, calibrate_streams

    model = load_explainable_model(exported_model_dir, 3, streams=1)
    timed: list[tuple[int, int, int]] = []  # (batch_size, streams, nodes) of each round timed
    run_chunks = ExplainableModel._run_chunks

    def recorded(self, run, parts, fold):
        timed.append((self.batch_size, self.streams, sum(map(len, parts))))
        return run_chunks(self, run, parts, fold)

    monkeypatch.setattr(ExplainableModel, "_run_chunks", recorded)
    per_node = calibrate_batch_size(model, repeats=3)
    # every candidate on the same round, the largest candidate's: they differ only on large rounds
    assert timed == [(n, 1, max(BATCH_SIZE_CANDIDATES)) for n in BATCH_SIZE_CANDIDATES] * 4
    assert model.batch_size in per_node and model.streams == 1
    timed.clear()
    chosen = model.batch_size
    calibrate_streams(model, candidates=(1, 2), repeats=2)
    assert [streams for _, streams, _ in timed] == ([s for s in (1, 2) if s <= _cores()] or [1]) * 3
    assert model.batch_size == chosen


def test_calibration_keeps_the_default_chunk_size_unless_another_is_clearly_faster(exported_model_dir, monkeypatch):
    """A reading within the host's noise of the default does not move the chunk size off it; one
    faster by more than the margin does, and so does the fastest when the default is not tried."""
    import explain.model as model_module
    from explain.model import CALIBRATION_MARGIN, DEFAULT_BATCH_SIZE, calibrate_batch_size

    model = load_explainable_model(exported_model_dir, 3, streams=1)
    readings: dict[int, float] = {}
    monkeypatch.setattr(model_module, "_round_seconds", lambda m, image, settings, repeats: {
        n: readings[n] * setting["nodes"] for n, setting in settings.items()})
    near = 1 / (1 + CALIBRATION_MARGIN / 2)
    readings.update({4: near, DEFAULT_BATCH_SIZE: 1.0, 16: 1.01})
    calibrate_batch_size(model, candidates=(4, DEFAULT_BATCH_SIZE, 16))
    assert model.batch_size == DEFAULT_BATCH_SIZE and model.batch_seconds[4] == pytest.approx(near)
    readings[16] = 1 / (1 + 2 * CALIBRATION_MARGIN)
    calibrate_batch_size(model, candidates=(4, DEFAULT_BATCH_SIZE, 16))
    assert model.batch_size == 16
    readings[16] = 1.01
    calibrate_batch_size(model, candidates=(4, 16))  # the default not tried: the fastest, by any margin
    assert model.batch_size == 4 and set(model.batch_seconds) == {4, 16}


def test_a_calls_chunks_run_at_once_one_per_stream_and_add_up_in_order(exported_model_dir, images):
    """A round's nodes are cut into near-equal chunks of at most ``batch_size / streams``, at
    least one per stream, and the chunks run at once on that many threads (the caller's one of
    them): each thread's first chunk waits here for the other's, so a call that ran them one
    after the other would fail. The sums add up in chunk order, so the result is the one
    stream's to float32 rounding, and the same on every call."""
    from explain.paths import LINEAR

    one, two = (load_explainable_model(exported_model_dir, batch_size=8, streams=s) for s in (1, 2))
    sizes = lambda n: [len(p) for p in two._chunks(np.arange(n))]  # noqa: E731
    assert [sizes(n) for n in (1, 2, 3, 8, 9, 17)] == [[1], [1, 1], [2, 1], [4, 4], [3, 3, 3], [4, 4, 3, 3, 3]]
    assert [len(p) for p in one._chunks(np.arange(9))] == [5, 4]

    kernel, both_running = two._kernel(LINEAR), threading.Barrier(2, timeout=30)
    threads: list[int] = []

    def in_two_threads(*args, **options):
        if threading.get_ident() not in threads:
            threads.append(threading.get_ident())
            both_running.wait()  # BrokenBarrierError if the other chunk never runs at the same time
        return kernel(*args, **options)

    two._kernels[LINEAR] = in_two_threads
    x, b, classes = _paths(two, images)
    ig = IntegratedGradients()
    result = ig.GetMask(x, b, classes, two, step_count=9, quadrature="riemann_trapezoid")
    assert len(threads) == 2 and threading.get_ident() in threads  # the caller's thread is a stream
    expected = ig.GetMask(x, b, classes, one, step_count=9, quadrature="riemann_trapezoid")
    np.testing.assert_allclose(result.attributions, expected.attributions, rtol=1e-5, atol=1e-9)
    # (the first call evaluated the black baseline, which is cached from then on)
    again, third = (ig.GetMask(x, b, classes, two, step_count=9, quadrature="riemann_trapezoid") for _ in range(2))
    np.testing.assert_array_equal(again.attributions, third.attributions)


def test_a_calls_chunk_arguments_are_made_before_its_first_chunk_runs_and_its_inputs_once(exported_model_dir, images):
    """Every chunk's kernel arguments are made in the caller before any chunk runs (the lanes
    only run the kernel), and the paths' inputs, baselines and classes are gathered once per call,
    not once per chunk: made in the lanes, a chunk's arguments took 1.2 ms per round where alone
    they take 0.15 (the other lane's chunk already had both cores), and no pass had started."""
    from explain.paths import LINEAR

    model = load_explainable_model(exported_model_dir, batch_size=2, streams=2)
    kernel, handed, calls = model._kernel(LINEAR), [], []
    run_chunks = model._run_chunks

    def recording_chunks(run, parts, fold):
        handed.append([chunk[2] for chunk in parts])  # what the lanes are given, before any runs
        return run_chunks(run, parts, fold)

    def recording(*args, **options):
        calls.append(args)
        return kernel(*args, **options)

    model._run_chunks, model._kernels[LINEAR] = recording_chunks, recording
    x, b, classes = _paths(model, images[:1])
    IntegratedGradients().GetMask(x, b, classes, model, step_count=12, quadrature="riemann_trapezoid")
    assert len(calls) == 12 and [len(arguments) for arguments in handed] == [12]  # chunks of one node
    # the very arguments handed over (in whichever order the two lanes took them)
    assert sorted(tuple(map(id, args)) for args in calls) == sorted(tuple(map(id, args)) for args in handed[0])
    assert all(len(args) == 10 and all(isinstance(a, (np.ndarray, np.generic)) for a in args) for args in calls)
    assert len({tuple(id(t) for t in args[:3]) for args in calls}) == 1  # the path's arrays, gathered once


def test_chunk_results_are_folded_in_order_and_few_wait_in_memory():
    """Results are folded in the chunks' order whichever lane ran them, as soon as those before
    them are: while the caller's first chunk is slow, the helper runs at most two rounds of lanes
    ahead, so a call of many chunks never holds all their results at once."""
    from explain.model import ExplainableModel

    model = ExplainableModel("unused", [], {}, batch_size=8, streams=2)
    state = {"done": 0, "folded": [], "most_waiting": 0}
    lock = threading.Lock()

    def run(i):
        if i == 0:
            time.sleep(0.3)
        with lock:
            state["done"] += 1
        return i * i

    def fold(i, result):
        assert result == i * i
        state["folded"].append(i)
        with lock:
            state["most_waiting"] = max(state["most_waiting"], state["done"] - len(state["folded"]))

    model._run_chunks(run, list(range(20)), fold)
    assert state["folded"] == list(range(20))
    assert state["most_waiting"] <= 4  # 2 lanes x 2 rounds; run all first and it would be 19


def test_a_kernel_being_built_does_not_hold_up_requests_on_the_other_path(exported_model_dir, images, monkeypatch):
    """The first blurred-baseline request traces and freezes its kernel (seconds on MobileNetV2):
    meanwhile a request on the linear path runs, and a second blurred request waits for the one
    kernel being built rather than building another."""
    import explain.model as model_module
    from explain.paths import LINEAR, SCALE_SPACE

    model = load_explainable_model(exported_model_dir, batch_size=8, streams=2)
    trace, entered, release, traced = model_module._trace_path_kernel, threading.Event(), threading.Event(), []

    def slow_trace(probabilities, image_shape, path):
        traced.append(path)
        entered.set()
        release.wait(30)
        return trace(probabilities, image_shape, path)

    monkeypatch.setattr(model_module, "_trace_path_kernel", slow_trace)
    with ThreadPoolExecutor(2) as pool:
        blurred = [pool.submit(model._kernel, SCALE_SPACE) for _ in range(2)]
        assert entered.wait(30)
        x, b, classes = _paths(model, images)
        out = IntegratedGradients().GetMask(x, b, classes, model, step_count=4)  # linear, while one builds
        assert np.isfinite(out.attributions).all() and not any(f.done() for f in blurred)
        release.set()
        assert blurred[0].result(timeout=60) is blurred[1].result(timeout=60)
    assert traced == [SCALE_SPACE] and model._kernel(LINEAR) is not None


def test_a_call_does_not_wait_for_helper_streams_another_request_holds(exported_model_dir, images):
    """When another request holds the model's helper threads, a call runs all its chunks in its
    own thread and returns: it does not wait for the pool to finish the other request's work."""
    model = load_explainable_model(exported_model_dir, batch_size=8, streams=2)
    x, b, classes = _paths(model, images)
    release = threading.Event()
    busy = model._helper_pool().submit(release.wait, 20)  # the pool's one thread, held
    try:
        out = IntegratedGradients().GetMask(x, b, classes, model, step_count=9)
        assert not busy.done()  # returned while the other work still runs
        assert np.isfinite(out.attributions).all()
    finally:
        release.set()
        busy.result()


def test_a_chunk_that_fails_in_a_helper_stream_fails_the_call_and_the_others_stop(exported_model_dir, images):
    """An error in another stream's chunk is raised in the caller, which does not hang on it and
    starts no further chunk once it is known; the model serves the next call."""
    from explain.paths import LINEAR

    model = load_explainable_model(exported_model_dir, batch_size=2, streams=2)
    kernel, caller, calls, failed = model._kernel(LINEAR), threading.get_ident(), [], threading.Event()

    def failing_elsewhere(*args, threads):
        calls.append(threading.get_ident())
        if threading.get_ident() != caller:
            failed.set()
            raise RuntimeError("out of memory in a helper")
        failed.wait(timeout=30)  # the helper's error is known before the caller's next chunk
        return kernel(*args, threads=threads)

    model._kernels[LINEAR] = failing_elsewhere
    x, b, classes = _paths(model, images)
    with pytest.raises(RuntimeError, match="out of memory in a helper"):
        IntegratedGradients().GetMask(x, b, classes, model, step_count=12, quadrature="riemann_trapezoid")
    assert len(calls) <= 3  # 12 chunks of one node; the caller stopped after the one it was running
    model._kernels[LINEAR] = kernel
    assert IntegratedGradients().GetMask(x, b, classes, model, step_count=4).attributions.shape == x.shape


def test_loading_a_model_keeps_blas_on_the_calling_thread_unless_told():
    """OpenBLAS's idle workers spin and took a core from the next TensorFlow passes (20-50 ms
    slower after each request on 2 cores): loading a model limits the BLAS numpy loaded to one
    thread, and leaves a count the environment gives alone."""
    import subprocess
    import sys

    code = ("import numpy, threadpoolctl; from explain.model import quiet_blas; quiet_blas(); "
            "print(max(i['num_threads'] for i in threadpoolctl.threadpool_info() if i['user_api'] == 'blas'))")
    from explain.model import BLAS_THREAD_VARIABLES

    from explain.model import _cores

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k not in BLAS_THREAD_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    run = lambda env: subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,  # noqa: E731
                                     check=True, cwd=root).stdout.strip().splitlines()[-1]
    assert run(env) == "1"
    if _cores() >= 2:  # OpenBLAS runs no more threads than the cores it may use
        assert run({**env, "OPENBLAS_NUM_THREADS": "2"}) == "2"


def test_a_refinement_reads_the_path_ends_off_its_first_round(saturating_model, images, monkeypatch):
    """Without ``end_outputs`` a refinement spends no forward pass on the ends (its first grid holds
    them), and returns what it returns when given them: the same grids, errors and stop reasons,
    a degenerate path (baseline = input) included; a start larger than a degenerate path's grid,
    and fixed steps, still predict them first."""
    x, b, classes = _paths(saturating_model, images)
    b[1] = x[1]  # no output gap: degenerate
    given = saturating_model.predict(np.concatenate([x, b]))
    ends = given[[0, 1], classes], given[[2, 3], classes]
    kw = dict(step_count=5, target_error=0.01, max_step_count=60, min_output_gap=0.05)
    want = IntegratedGradients().GetMask(x, b, classes, saturating_model, end_outputs=ends, **kw)
    calls = []
    predict = saturating_model.predict
    monkeypatch.setattr(saturating_model, "predict", lambda images: calls.append(len(images)) or predict(images))
    got = IntegratedGradients().GetMask(x, b, classes, saturating_model, **kw)
    assert calls == []
    assert list(got.stop_reasons) == list(want.stop_reasons) and want.stop_reasons[1] == DEGENERATE
    np.testing.assert_array_equal(got.step_counts, want.step_counts)
    np.testing.assert_allclose(got.attributions, want.attributions, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(got.approximation_errors, want.approximation_errors, rtol=1e-3, atol=1e-7)
    np.testing.assert_allclose(got.instance_outputs, ends[0], rtol=1e-5)
    # paths averaged in groups (XRAI's black and white) with the map refined too: the same
    xx, bb = np.repeat(x, 2, axis=0), np.stack([b[0], np.ones_like(b[0]), b[1], np.ones_like(b[1])])
    cc, groups = np.repeat(classes, 2), np.array([0, 0, 1, 1])
    kw = dict(kw, map_target=0.1, path_groups=groups)
    got = IntegratedGradients().GetMask(xx, bb, cc, saturating_model, **kw)
    probs = predict(np.concatenate([xx, bb]))
    want = IntegratedGradients().GetMask(xx, bb, cc, saturating_model, **kw,
                                         end_outputs=(probs[np.arange(4), cc], probs[4 + np.arange(4), cc]))
    assert calls == []
    assert list(got.stop_reasons) == list(want.stop_reasons)
    np.testing.assert_array_equal(got.step_counts, want.step_counts)
    np.testing.assert_allclose(got.attributions, want.attributions, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(got.map_errors, want.map_errors, rtol=1e-3, atol=1e-7)
    IntegratedGradients().GetMask(x, b, classes, saturating_model, **dict(kw, path_groups=None, map_target=None,
                                                                          step_count=DEGENERATE_STEP_COUNT + 1))
    IntegratedGradients().GetMask(x, b, classes, saturating_model, step_count=4)
    assert calls == [4, 4]


def test_the_package_gives_onednn_room_for_every_chunk_sizes_primitives_unless_told():
    """oneDNN's default cache (1024 primitives) holds about ten batch sizes of MobileNetV2's passes;
    past that one path point cost twice as much (trainer/__init__.py). Importing the package sets a
    larger default, and leaves a value the environment gives alone."""
    import subprocess
    import sys

    code = "import os, trainer; print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])"
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    run = lambda env: subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,  # noqa: E731
                                     check=True).stdout.strip()
    assert run(env) == "8192"
    assert run({**env, "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "2048"}) == "2048"
