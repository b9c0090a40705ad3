"""Integrated Gradients, batched over many paths and adaptive in its steps.

Integrated Gradients: Sundararajan, Taly & Yan 2017, https://arxiv.org/abs/1703.01365.

Like ``saliency.core``, the method is framework-agnostic and reaches the model only through a
callback; unlike it, the callback receives every step of every path at once (a
:class:`PathBatch`) and returns the quadrature-weighted gradient sums, so a TensorFlow (or any)
backend can evaluate them inside one compiled function in memory-bounded chunks instead of one
Python call per step. See :class:`explain.model.ExplainableModel` for the TensorFlow backend.

Completeness (the IG axiom sum(attribution) = F(x) - F(baseline)) makes the approximation error
measurable, and also per piece of the path: on a panel [a, b] of alpha the integral of dF/dalpha
must equal F(b) - F(a). The adaptive mode uses that to split only the panels whose error is large,
so the steps go where the model's output changes fast along the path.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence, TypeVar

import numpy as np

from explain.lanes import run_in_lanes
from explain.paths import LINEAR
from explain.quadrature import DEFAULT_QUADRATURE, quadrature_rule

#: Refinement never splits a panel narrower than this (alpha units): a jump in the model's output
#: that no finite step resolves must not absorb the whole budget (bisection reaches it in about 15
#: rounds of one evaluation). Not wider: on MobileNetV2 1.0 @ 192 the gradient along some paths
#: changes sign within 1/2048 of alpha (ReLU6 kinks), and at 1/4096 one validation image stopped
#: as "resolution" at error 0.019 when given 500 evaluations, where finer panels reach 0.0093 at 700.
MIN_PANEL_WIDTH = 1.0 / 65536
#: Paths whose output gap |F(x) - F(baseline)| is below this cannot be made faithful in Vertex's
#: relative sense (its error divides by the gap); they get a few steps and a warning, no refinement.
MIN_OUTPUT_GAP = 0.05
#: The fixed, small number of gradient evaluations a path below :data:`MIN_OUTPUT_GAP` costs.
DEGENERATE_STEP_COUNT = 16

#: Why a path stopped (``IntegratedGradientsOutput.stop_reasons``).
FIXED, CONVERGED, LIMIT, DEGENERATE = "fixed", "converged", "limit", "degenerate"
#: The narrowest panels (at most twice :data:`MIN_PANEL_WIDTH` wide, so no longer split) miss the
#: tolerance whatever the other panels' splits do, and none of those is over its allowance: the
#: output jumps where the gradient cannot see it (a discontinuity, or float32 noise), so more
#: evaluations would not help.
RESOLUTION = "resolution"
#: The model's output or gradient is NaN or infinite somewhere on the path: nothing to refine (an
#: overflow the next split would only meet again), so the path stops at once.
NONFINITE = "non_finite"


@dataclass
class PathBatch:
    """Every step the callback must evaluate: node k lies on path ``node_rows[k]`` at
    ``alphas[k]`` with quadrature weight ``weights[k]`` and is summed into ``node_groups[k]``."""

    inputs: np.ndarray       # [R, H, W, C] path ends (the instances)
    baselines: np.ndarray    # [R, H, W, C] path starts (linear path; unused by scale_space)
    classes: np.ndarray      # [R] int32, the output explained on each path
    node_rows: np.ndarray    # [n] int32
    node_groups: np.ndarray  # [n] int32 in [0, num_groups)
    alphas: np.ndarray       # [n] float32
    weights: np.ndarray      # [n] float32
    num_groups: int
    path: str = LINEAR
    max_blur_sigma: float = 0.0


@dataclass
class PathResult:
    """``group_attributions[g]`` = sum over nodes k of group g of weights[k] * grad F * dpath/dalpha
    (for the linear path dpath/dalpha = x - baseline, so this is already the IG attribution);
    ``node_derivatives[k]`` = dF/dalpha at node k (the gradient dotted with the path direction)."""

    #: [G, H, W, C], or G arrays [H, W, C] (:class:`GroupSums`: a backend's own outputs, uncopied)
    group_attributions: np.ndarray | Sequence[np.ndarray]
    node_derivatives: np.ndarray    # [n]
    node_outputs: np.ndarray        # [n] F at the node, for the path's class


class GroupSums:
    """Per group, the sum of the arrays added to it, for a backend that computes a call's groups
    in pieces (chunks of nodes). A group's first array is kept as given, not copied (a read-only
    view of the backend's output does), and is copied only when a second is added: the adaptive
    mode's groups are single nodes, and copying each one's gradient into a [G, H, W, C] array cost
    1.5-2% of a request's time on MobileNetV2 1.0 @ 192 (a 192x192x3 map per evaluation)."""

    def __init__(self, count: int, shape: tuple[int, ...]) -> None:
        self._sums: list[np.ndarray | None] = [None] * count
        self._owned = [False] * count
        self._shape = shape

    def add(self, group: int, array: np.ndarray) -> None:
        """Add ``array`` to ``group``'s sum (kept by reference when it is the first)."""
        total = self._sums[group]
        if total is None:
            self._sums[group] = array
        elif self._owned[group]:
            total += array
        else:
            self._sums[group], self._owned[group] = total + array, True

    def add_each(self, groups: Sequence[int], arrays: Sequence[np.ndarray]) -> None:
        """:meth:`add` ``arrays[k]`` to ``groups[k]``, for a piece's sums and the groups they belong to."""
        for group, array in zip(groups, arrays):
            self.add(int(group), array)

    def arrays(self) -> list[np.ndarray]:
        """The G sums (zeros for a group nothing was added to)."""
        return [np.zeros(self._shape, np.float32) if total is None else total for total in self._sums]


class PathModel(Protocol):
    """The model as IG needs it: batched predictions and batched path gradients."""

    def predict(self, images: np.ndarray) -> np.ndarray: ...

    def path_gradients(self, batch: PathBatch) -> PathResult: ...


@dataclass
class IntegratedGradientsOutput:
    """Per path r: the attribution, F at both ends, sum(attr) - (F(x) - F(b)) and the steps used."""

    attributions: np.ndarray      # [R, H, W, C]
    instance_outputs: np.ndarray  # [R]
    baseline_outputs: np.ndarray  # [R]
    #: [R] signed: paths averaged into one attribution add up, or cancel, by their signs
    errors: np.ndarray
    step_counts: np.ndarray       # [R] gradient evaluations spent on each path
    #: [R] why each path stopped: FIXED (no refinement asked), CONVERGED (target met), LIMIT
    #: (``max_step_count`` reached first), RESOLUTION (the rest of the error is in panels too
    #: narrow to split), DEGENERATE (output gap below ``min_output_gap``) or NONFINITE (the
    #: model's output or gradient is NaN or infinite on the path)
    stop_reasons: np.ndarray = field(default_factory=lambda: np.zeros(0, object))
    #: [R] adaptive mode: the estimated relative L1 error (:func:`_map_error`) of the map each path
    #: is averaged into (its group's; its own by default), a check completeness cannot make;
    #: empty in fixed mode
    map_errors: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def absolute_errors(self) -> np.ndarray:
        """|sum(attr) - (F(x) - F(b))| per path."""
        return np.abs(self.errors)

    @property
    def approximation_errors(self) -> np.ndarray:
        """Vertex's approximation error: |sum(attr) - delta| / |delta| per path."""
        delta = np.abs(self.instance_outputs - self.baseline_outputs)
        return self.absolute_errors / np.maximum(delta, np.finfo(np.float32).tiny)

    def averaged_error(self, rows: slice | np.ndarray) -> float:
        """Vertex's approximation error of the mean of paths ``rows`` (one attribution averaged over
        baselines or SmoothGrad's samples): :func:`averaged_error`."""
        return averaged_error(self.errors[rows], self.instance_outputs[rows] - self.baseline_outputs[rows])


def averaged_error(errors: np.ndarray | float, gaps: np.ndarray | float) -> float:
    """The approximation error of an attribution averaged over paths with signed ``errors``
    (sum(attr) - (F(x) - F(b))) and ``gaps`` (F(x) - F(b)): |sum of the mean attribution -
    (mean F(x) - mean F(b))| over |mean F(x) - mean F(b)|, the check a user makes from a response,
    whose baseline output is the baselines' mean. The mean's error is the mean of the paths' signed
    errors: paths whose differences have opposite signs (a black baseline scoring under the input,
    a white one over it) leave a small difference to divide by. One path: Vertex's own error."""
    return abs(float(np.sum(errors))) / max(abs(float(np.sum(gaps))), float(np.finfo(np.float32).tiny))


def _panels_to_split(residuals: np.ndarray, widths: np.ndarray, tolerance: float, signed: bool = True) -> list[int]:
    """The panels to bisect this round, worst first.

    Completeness (``signed``: the residuals are the signed pieces of the path's error, which is
    their sum): the largest residuals of the error's sign, until they cover the excess of
    ``|sum|`` over ``tolerance``. A panel's residual mostly comes from a kink of the model's
    output along the path (ReLU6 boundaries): bisecting it leaves the kink in one half, whose
    residual takes either sign at about half the size, so a split takes about its panel's
    residual out of the sum, and splitting panels that cover the excess removes it on average.
    Sizes whose error is not their sum (``signed=False``: the map's, :func:`_map_residual`): every
    panel over a random-walk allowance ``tolerance * sqrt(w)`` (n equal panels at their allowance
    sum to about ``tolerance``), else those over the strict share ``tolerance * w``, else the
    largest: every round makes progress. Panels at most twice :data:`MIN_PANEL_WIDTH` wide are not
    split. When their residuals alone sum past ``tolerance`` (for completeness, even with every
    residual of their sign split away: those of the other sign offset them, and a split only
    shrinks a residual), no split can meet it: only panels over their random-walk allowance are
    split, and once there are none, nothing (an empty list): the output jumps where no gradient
    sees it.

    Measured on MobileNetV2 1.0 @ 192 (from 5 grid points, cap 400; the 12 validation images of
    ``make bench`` section 1 / 24 further ones), completeness alone: to 0.05 a median of 10 / 11.5
    evaluations per path (mean 13 / 13, worst 28 / 26), to 0.01 20.5 / 15.5 (mean 20 / 18, worst
    30 / 41), every path within its target. Covering twice the excess took 21 / 21 and 34.5 / 37
    (worst 113), three times 23 / 23.5 and 66 / 56.5 (3 of the 24 spent the cap). The rule before
    split every panel over the random-walk allowance first, as the map's still does: 19 / 24 to
    0.05 (worst 144 / 212), 116 / 88 to 0.01, where 6 of the 24 spent the cap, one still at error
    0.086. With the default ``map_target`` (0.1, real runs on the 12 images) the map's splits do
    most of the work: to 0.05 a median of 51 evaluations against 53 covering twice the excess,
    to 0.01 55 against 76, with completeness's rounds first; since the map's splits join them,
    48 and 53.5 (``make bench``). Completeness alone is met partly by cancellation between the panels,
    on grids this coarse: its maps are far from the integral (``make bench`` section 1b), which
    is what ``map_target`` is for."""
    splittable = widths > 2 * MIN_PANEL_WIDTH
    size = np.abs(residuals)
    order = [int(i) for i in np.argsort(-size, kind="stable") if splittable[i]]
    over = [i for i in order if size[i] > tolerance * np.sqrt(widths[i])]  # the random-walk allowance
    if _stuck(residuals, widths, tolerance, signed):
        return over
    if signed:  # splitting a panel shrinks its residual, so only those of the error's sign move it toward the target
        toward = [i for i in order if residuals[i] * residuals.sum() > 0] or order[:1]
        shares = np.cumsum(size[toward])
        return toward[:int(np.searchsorted(shares, abs(residuals.sum()) - tolerance)) + 1]
    return over or [i for i in order if size[i] > tolerance * widths[i]] or order[:1]


def _stuck(residuals: np.ndarray, widths: np.ndarray, tolerance: float, signed: bool = True) -> bool:
    """No split can bring the residuals' sum within ``tolerance``: the narrowest panels' (at most
    twice :data:`MIN_PANEL_WIDTH` wide, no longer split) are over it with (``signed``) the residuals
    that offset them kept whole and the others gone, the nearest to 0 splits can take the sum (a
    split shrinks its panel's residual toward 0)."""
    splittable = widths > 2 * MIN_PANEL_WIDTH
    narrow = residuals[~splittable].sum()
    nearest = narrow + (residuals[splittable & (residuals * narrow < 0)].sum() if signed else 0.0)
    return bool(np.sign(narrow) * nearest > tolerance)


def _map_residual(width: float | np.ndarray, difference: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """A panel's expected per-pixel trapezoid error from ``difference = v_end - v_start``: for an
    integrand that is constant on either side of one kink at a uniform position in the panel
    (ReLU6), the error is ``(v_start - v_end) (width / 2 - t)``, of mean magnitude
    ``width / 4 |v_end - v_start|``. First order: on a smooth integrand it over-estimates (its
    error falls as width cubed). Into ``out`` when given (``difference`` itself may be it);
    ``width`` may be panels' widths shaped to broadcast against a stack of their differences."""
    residual = np.abs(difference, out=out)
    residual *= np.float32(width / 4)
    return residual


def _map_error(squares: np.ndarray, attribution_l1: float) -> float:
    """The map's estimated relative L1 error from its panels' :func:`_map_residual`: per pixel
    the panels' errors add like a random walk (root of the sum of squares), then summed over
    pixels and divided by the map's L1 norm. Calibrated, not derived (the mean magnitude in a
    root-sum-square runs about 13% under the RMS): on MobileNetV2 1.0 @ 192 (``make bench``,
    section 1b: 8 validation images, 40 grids of 10 to 400 points) it read 0-25% under the true
    distance to the converged map wherever that was under 0.16, and about half of it on coarser
    maps (0.29-0.35 for 0.49-0.76), which it still flags. So a ``map_target`` of 0.1 ends with
    true distances up to about 0.11."""
    return float(np.sqrt(np.maximum(squares, 0.0)).sum() / max(attribution_l1, np.finfo(np.float32).tiny))


def _grid_squares(nodes: Sequence[np.ndarray], widths: np.ndarray, chunk: int = 32) -> np.ndarray:
    """Per pixel, the sum of a whole grid's squared :func:`_map_residual` (``nodes[k]`` the
    integrand vector at grid point k), in float32 chunks of panels: about 2 ms per 10 panels of a
    192x192x3 map on 2 cores, under 1% of the evaluations that made them."""
    squares = np.zeros(np.shape(nodes[0]), np.float32)
    for lo in range(0, len(widths), chunk):
        hi = min(lo + chunk, len(widths))
        block = np.stack(nodes[lo:hi + 1])
        residuals = _map_residual(widths[lo:hi].reshape((-1,) + (1,) * (block.ndim - 1)), block[1:] - block[:-1])
        squares += np.einsum("i...,i...->...", residuals, residuals)
    return squares


def _weighted_sum(weights: np.ndarray, nodes: Sequence[np.ndarray], chunk: int = 32) -> np.ndarray:
    """``sum_k weights[k] * nodes[k]`` in float32, stacking ``chunk`` nodes at a time: a whole grid
    of 192x192x3 integrands is 177 MB at 400 points, and copying it into one array cost as much as
    the sum (0.65 s of a 12 s XRAI request)."""
    total = np.zeros(np.shape(nodes[0]), np.float32)
    for lo in range(0, len(nodes), chunk):
        total += np.tensordot(weights[lo:lo + chunk], np.stack(nodes[lo:lo + chunk]), axes=1)
    return total


#: Maps of fewer values than this are kept up to date in the calling thread alone: the two threads'
#: turns at the GIL between numpy's small calls cost more than the second core saves. Measured on 2
#: cores, a round's worth of bookkeeping (7 splits) alone against in halves: 2.9 against 1.7 ms at
#: 192x192x3 (110592 values), 1.7 against 1.3 at 65536, 1.0 against 1.1 at 32768.
HALVES_MIN_SIZE = 2 ** 16
#: The one helper thread the refinement's map bookkeeping shares among requests (:func:`_in_halves`).
_HELPER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ig-map-bookkeeping")

T = TypeVar("T")


def _half(size: int, k: int) -> slice:
    """The first (``k`` 0) or second (1) half of ``range(size)``."""
    return slice(0, size // 2) if k == 0 else slice(size // 2, size)


def _in_halves(work: Callable[[int], T], size: int) -> tuple[T, T]:
    """``work(0)`` and ``work(1)``, on the first and second halves of arrays of about ``size``
    values (:func:`_half`), the second on a helper thread when it is free: numpy releases the GIL
    in its array loops, so the halves run on two cores, where between a request's rounds the
    model's passes leave both idle. When the helper is busy (another request's bookkeeping), or
    the arrays are small, the calling thread runs both; the halves are the same either way, so
    the results do not depend on who ran them (:func:`explain.lanes.run_in_lanes`, which waits for
    the helper before anything is raised or returned: it writes into the caller's arrays)."""
    halves: list = [None, None]
    run_in_lanes(work, [0, 1], halves.__setitem__, 2 if size >= HALVES_MIN_SIZE else 1, lambda: _HELPER)
    return halves[0], halves[1]


def _group_gaps(f_x: np.ndarray, f_b: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Each path's share of its group's output gap: the group's mean |F(x) - F(baseline)|."""
    return (np.bincount(groups, np.abs(f_x - f_b)) / np.bincount(groups))[groups]


def _group_shares(f_x: np.ndarray, f_b: np.ndarray, groups: np.ndarray, min_output_gap: float) -> np.ndarray:
    """Each path's share of the output gap its group's error is judged against: the gap of the
    group's mean, |mean (F(x) - F(baseline))|, which the mean attribution must sum to
    (:meth:`IntegratedGradientsOutput.averaged_error`), where that is at least ``min_output_gap``;
    where the paths' differences cancel below it, the mean |F(x) - F(baseline)|: the paths' summed
    errors are held to the sum of their differences, and the average's sum, almost nothing, cannot
    be held to a share of it (its warning says so). The same as the mean |gap| when the paths'
    differences share a sign."""
    signed = np.abs(np.bincount(groups, f_x - f_b) / np.bincount(groups))[groups]
    return np.where(signed >= max(min_output_gap, np.finfo(np.float32).tiny), signed,
                    _group_gaps(f_x, f_b, groups))


class IntegratedGradients:
    """Integrated Gradients (https://arxiv.org/abs/1703.01365) over many paths at once.

    Fixed mode (``target_error=None``): ``step_count`` nodes of a quadrature rule per path, as
    Vertex computes it. Adaptive mode (``target_error`` set): a trapezoid rule on a grid that is
    refined where completeness fails. Every gradient evaluation at a grid point also yields F
    there, so each panel [a, b] carries its exact local residual
    ``(b - a) (g(a) + g(b)) / 2 - (F(b) - F(a))`` (g = dF/dalpha) at no extra cost; panels are
    bisected, one new evaluation each, the largest residuals of the error's sign first, enough of
    them to cover the excess over the target (:func:`_panels_to_split`), all paths' bisections
    batched in one model call per round, until the path's relative completeness error is at most
    ``target_error`` or ``max_step_count`` evaluations are spent. The residuals sum to the path's completeness error, so the error
    reported is exactly the error of the attribution returned.
    """

    def GetMask(self, x_values: np.ndarray, baselines: np.ndarray, class_indices: np.ndarray,
                model: PathModel, step_count: int = 50, quadrature: str = DEFAULT_QUADRATURE,
                target_error: float | None = None, max_step_count: int = 400, path: str = LINEAR,
                max_blur_sigma: float = 0.0, end_outputs: tuple[np.ndarray, np.ndarray] | None = None,
                min_output_gap: float = 0.0, path_groups: np.ndarray | None = None,
                map_target: float | None = None,
                map_features: Callable[[int, np.ndarray], np.ndarray] | None = None) -> IntegratedGradientsOutput:
        """Attributions for the paths ``baselines[r] -> x_values[r]`` explaining output
        ``class_indices[r]``.

        Args:
          x_values, baselines: ``[R, H, W, C]`` float32; for ``path="scale_space"`` the baseline
            is the input blurred by ``max_blur_sigma`` (only its model output is used, and not
            at all when a refinement reads the ends off its first round: then F at the path's
            start is the kernel's own blur).
          step_count: nodes per path (fixed mode), or grid points of the first round (adaptive).
          quadrature: the rule of :mod:`explain.quadrature` in fixed mode (adaptive mode always
            refines a trapezoid grid: its nodes are its panels' ends).
          target_error: adaptive mode when set: relative completeness error to reach per path.
          max_step_count: adaptive mode's cap on gradient evaluations per path.
          end_outputs: ``(F(x), F(baseline))`` per path when the caller already has them;
            otherwise a refinement reads them off its first round, whose grid holds both ends
            (when ``step_count`` is over :data:`DEGENERATE_STEP_COUNT`, and in fixed mode, the
            model's ``predict`` computes them first).
          min_output_gap: paths with ``|F(x) - F(baseline)|`` below this are not refined and cost
            at most :data:`DEGENERATE_STEP_COUNT` evaluations (their stop reason says so).
          path_groups: paths averaged into one attribution (XRAI's black and white baselines,
            SmoothGrad's samples) share a group id. The group's allowance is ``target_error``
            times the gap its mean attribution must sum to, |sum of (F(x) - F(b))| (what a user
            checks: :meth:`IntegratedGradientsOutput.averaged_error`); until the sum of its paths'
            absolute errors is within it, each path over its equal share is refined, and once it
            is, none (one path far under its share makes room for the other: on XRAI's default
            requests 6% fewer evaluations, the same top-10% regions on 12 validation images).
            Where the paths' differences cancel to a mean under ``min_output_gap`` (baselines
            scoring either side of the input), their summed errors are held to the sum of their
            |F(x) - F(b)| instead (:func:`_group_shares`). A group is degenerate only when its mean |F(x) - F(b)| is
            below ``min_output_gap``. By default every path is a group of its own.
          map_target: adaptive mode: also refine until the map's estimated relative L1 error
            (:func:`_map_error`) is at most this. Completeness checks one number, the sum of
            the map; a stretch of the path where the output is flat but the per-pixel integrands
            are not (they cancel in the sum) can stay coarse, and the map with it (``make bench``,
            section 1b). None: completeness alone, as Vertex measures it (here, the core's
            default; a refined request's is ``explain.parameters.DEFAULT_MAP_TARGET``). Judged on a group's
            averaged map, the one a user gets (the error of an average of n paths is about
            1/sqrt(n) of one; each path's panels get an equal share of the allowance). A path
            that cannot meet it within ``max_step_count`` stops as LIMIT (completeness first:
            a round splits its panels ahead of the map's, which join them while both miss as
            long as the round leaves at least as many evaluations as it spends and completeness
            is not stuck, and if the map's splits broke completeness again when the cap stops
            the path, the attribution of the last grid where completeness held is returned),
            one whose remaining estimate sits in the narrowest panels as RESOLUTION (the
            estimate is first order, so steep but smooth stretches can end there).
          map_features: what ``map_target`` judges, when the user reads the map through a linear
            summary of it: ``map_features(r, v)`` maps path ``r``'s integrand vectors ``v``
            (``[k, H, W, C]``, k grid points) to the summary's features ``[k, ...]``, and the
            estimate is taken on them instead of on the pixels (XRAI ranks regions by their
            mean attribution: :func:`explain.xrai.region_means`). Called once per path per
            round, for its new grid points (one sparse product for all of them costs a third
            of k products), first after the first round's evaluations. Default: the pixels
            themselves.
        """
        x_values = np.asarray(x_values, np.float32)
        baselines = np.asarray(baselines, np.float32)
        classes = np.asarray(class_indices, np.int32)
        rows = np.arange(len(classes))
        if x_values.shape != baselines.shape or len(x_values) != len(classes):
            raise ValueError(f"inputs {x_values.shape}, baselines {baselines.shape} and "
                             f"{len(classes)} classes do not match")
        groups = rows if path_groups is None else np.unique(np.asarray(path_groups), return_inverse=True)[1]
        # a refinement's first grid holds both ends and is no larger for a degenerate path: their
        # outputs come with its evaluations, and no forward pass is spent on them first (a 2-image
        # predict is 18 ms, 5-7% of a refined request to 5% on MobileNetV2 1.0 @ 192)
        ends_in_first_round = (end_outputs is None and target_error is not None
                               and max(step_count, 2) <= DEGENERATE_STEP_COUNT)
        if end_outputs is None and not ends_in_first_round:
            probs = model.predict(np.concatenate([x_values, baselines]))
            end_outputs = probs[rows, classes], probs[len(rows) + rows, classes]

        def batch(node_rows: np.ndarray, alphas: np.ndarray, weights: np.ndarray, groups: np.ndarray,
                  num_groups: int) -> PathResult:
            return model.path_gradients(PathBatch(
                inputs=x_values, baselines=baselines, classes=classes, node_rows=node_rows.astype(np.int32),
                node_groups=groups.astype(np.int32), alphas=alphas.astype(np.float32),
                weights=weights.astype(np.float32), num_groups=num_groups, path=path, max_blur_sigma=max_blur_sigma))

        if map_target is not None and (target_error is None or not map_target > 0):
            raise ValueError(f"map_target must be > 0 and needs target_error (refinement), got {map_target}")
        if target_error is None:
            f_x, f_b = (np.asarray(v, np.float64) for v in end_outputs)
            degenerate = _group_gaps(f_x, f_b, groups) < min_output_gap
            return self._fixed(rows, classes, f_x, f_b, degenerate, step_count, quadrature, batch)
        return self._adaptive(rows, end_outputs, min_output_gap, target_error, groups, step_count,
                              max_step_count, batch, map_target, map_features)

    @staticmethod
    def _fixed(rows, classes, f_x, f_b, degenerate, step_count, quadrature, batch) -> IntegratedGradientsOutput:
        """``step_count`` nodes of ``quadrature`` per path, all paths in one batched call."""
        counts = np.where(degenerate, min(step_count, DEGENERATE_STEP_COUNT), step_count)
        rules = [quadrature_rule(quadrature, int(n)) for n in counts]
        node_rows = np.concatenate([np.full(len(nodes), r) for r, (nodes, _) in zip(rows, rules)])
        alphas = np.concatenate([nodes for nodes, _ in rules])
        weights = np.concatenate([w for _, w in rules])
        result = batch(node_rows, alphas, weights, node_rows, len(rows))
        integrals = np.bincount(node_rows, weights * result.node_derivatives, minlength=len(rows))
        errors = integrals - (f_x - f_b)
        reasons = np.where(degenerate, DEGENERATE, FIXED).astype(object)
        attributions = np.stack(result.group_attributions).astype(np.float32, copy=False)
        return IntegratedGradientsOutput(attributions, f_x, f_b, errors, counts, reasons)

    @staticmethod
    def _adaptive(rows, end_outputs, min_output_gap, target_error, groups, step_count, max_step_count,
                  batch, map_target=None, map_features=None) -> IntegratedGradientsOutput:
        """Trapezoid grids refined by bisection where the local completeness residual is large
        (and, with ``map_target``, where the map's is: :func:`_map_error`). ``end_outputs`` None:
        F at the ends is read off the first round's evaluations (its grid is the same either way)."""
        if end_outputs is not None:
            f_x, f_b = (np.asarray(v, np.float64) for v in end_outputs)
            degenerate = _group_gaps(f_x, f_b, groups) < min_output_gap
        else:  # GetMask starts these no larger than a degenerate path's grid: known after the first round
            degenerate = np.zeros(len(rows), bool)
        first = np.where(degenerate, min(max(step_count, 2), DEGENERATE_STEP_COUNT), max(step_count, 2))
        cap = np.maximum(first, max_step_count)
        grids = [np.linspace(0.0, 1.0, int(n)) for n in first]
        # per path: sorted alphas, and for each the gradient vector, dF/dalpha and F
        alphas: list[np.ndarray] = [np.zeros(0) for _ in rows]
        vectors: list[list[np.ndarray]] = [[] for _ in rows]
        slopes: list[np.ndarray] = [np.zeros(0) for _ in rows]
        values: list[np.ndarray] = [np.zeros(0) for _ in rows]

        # with map_target, per path: each grid point's map features (the vector itself unless
        # map_features summarizes it), the running trapezoid map of them, the per-feature sum of
        # the panels' squared map residuals, and each panel's residual L1 (kept up to date split by split)
        features: list[list[np.ndarray]] = [[] for _ in rows]

        def featurize(r: int, new: list[np.ndarray]) -> list[np.ndarray]:
            """The map features of path ``r``'s integrand vectors ``new``: the vectors themselves
            (not copies: a 400-point grid of 192x192x3 is 177 MB), or ``map_features``' summary
            of all of them in one call."""
            if map_features is None:
                return new
            out = np.asarray(map_features(r, np.stack(new)), np.float32)
            if len(out) != len(new):
                raise ValueError(f"map_features returned {len(out)} rows for {len(new)} grid points "
                                 f"(it maps a stack [k, H, W, C] to [k, ...])")
            return list(out)

        maps: list[np.ndarray | None] = [None for _ in rows]
        squares: list[np.ndarray | None] = [None for _ in rows]
        map_sizes: list[np.ndarray] = [np.zeros(0) for _ in rows]

        def add_panel(r: int, i: int) -> None:
            """Add panel ``i`` of path ``r``'s first grid to the map bookkeeping."""
            width = alphas[r][i + 1] - alphas[r][i]
            start, end = features[r][i], features[r][i + 1]
            residual = _map_residual(width, end - start)
            map_sizes[r] = np.append(map_sizes[r], residual.sum())
            total = start + end
            total *= np.float32(width / 2)
            maps[r] += total
            residual *= residual
            squares[r] += residual

        # reused buffers, by half, and the features' size and dtype
        scratch: dict[tuple, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

        def split_panels(splits: list[tuple[int, float]]) -> None:
            """Move the map bookkeeping of each panel a round split onto its halves: ``(r, left)``
            is path ``r``'s panel from ``left`` to the point after the new one. In place, in reused
            buffers, 21 passes over the features per split where removing the panel and adding its
            halves one by one took about 27 and six fresh arrays, and on each half of the pixels at
            once (:func:`_in_halves`): on MobileNetV2 1.0 @ 192 this bookkeeping was 23 ms of a
            610 ms default request, and 14-17 ms in one thread after that. The squares are those
            :func:`_map_residual` gives, to the bit; a size is the sum of its halves' sums."""
            panels, places = [], []
            for r, left in splits:
                i = int(np.searchsorted(alphas[r], left)) + 1  # the new point
                places.append((r, i - 1))  # where the panel's size was, and its halves' go
                panels.append((r, *features[r][i - 1:i + 2], alphas[r][i] - alphas[r][i - 1],
                               alphas[r][i + 1] - alphas[r][i], alphas[r][i + 1] - alphas[r][i - 1]))

            def work(k: int) -> list[tuple[float, float]]:
                sizes = []
                for r, a, m, b, w1, w2, width in panels:
                    pixels = _half(m.size, k)
                    key = (k, m.size, m.dtype)  # XRAI's summaries differ in size by image
                    if key not in scratch:
                        scratch[key] = tuple(np.empty(pixels.stop - pixels.start, m.dtype) for _ in range(3))
                    d1, d2, t = scratch[key]
                    a, m, b = (v.ravel()[pixels] for v in (a, m, b))
                    total, squared = maps[r].reshape(-1)[pixels], squares[r].reshape(-1)[pixels]
                    np.subtract(m, a, out=d1)
                    np.subtract(b, m, out=d2)
                    # the trapezoid map gains (a + m) w1 / 2 + (m + b) w2 / 2 and loses (a + b) (w1 + w2) / 2
                    np.multiply(d1, np.float32(w2 / 2), out=t)
                    total += t
                    np.multiply(d2, np.float32(w1 / 2), out=t)
                    total -= t
                    np.subtract(b, a, out=t)  # the whole panel's squared residual out ...
                    squared -= np.square(_map_residual(width, t, out=t), out=t)
                    halves = []
                    for d, half in ((d1, w1), (d2, w2)):  # ... and each half's in
                        residual = _map_residual(half, d, out=t)
                        halves.append(float(residual.sum()))
                        squared += np.square(residual, out=residual)
                    sizes.append((halves[0], halves[1]))
                return sizes

            first, second = _in_halves(work, max(panel[2].size for panel in panels))
            for (r, i), one, other in zip(places, first, second):
                map_sizes[r][i:i + 2] = np.add(one, other)

        def evaluate(points: list[tuple[int, float]]) -> None:
            """Gradient, dF/dalpha and F at new ``(row, alpha)`` points, one batched call."""
            node_rows = np.array([r for r, _ in points])
            node_alphas = np.array([a for _, a in points])
            n = len(points)
            result = batch(node_rows, node_alphas, np.ones(n), np.arange(n), n)
            splits = []  # (path, left end) of the panels split, whose map bookkeeping moves after the inserts
            new_features = {}  # per path, its new points' features, summarized in one call
            for r in {r for r, _ in points if maps[r] is not None}:
                ks = np.flatnonzero(node_rows == r)
                new_features.update(zip(ks.tolist(), featurize(r, [result.group_attributions[k] for k in ks])))
            for k, (r, a) in enumerate(points):
                i = int(np.searchsorted(alphas[r], a))
                split = map_target is not None and maps[r] is not None and 0 < i < len(alphas[r])
                alphas[r] = np.insert(alphas[r], i, a)
                vectors[r].insert(i, result.group_attributions[k])
                if maps[r] is not None:
                    features[r].insert(i, new_features[k])
                slopes[r] = np.insert(slopes[r], i, result.node_derivatives[k])
                values[r] = np.insert(values[r], i, result.node_outputs[k])
                if split:  # panel i - 1 became two: its size's place is taken by its halves', set below
                    splits.append((r, float(alphas[r][i - 1])))
                    map_sizes[r] = np.concatenate([map_sizes[r][:i - 1], [np.nan, np.nan], map_sizes[r][i:]])
            if splits:
                split_panels(splits)

        evaluate([(r, float(a)) for r in rows for a in grids[r]])
        if map_target is not None:
            for r in rows:
                features[r] = featurize(r, list(vectors[r]))
                maps[r] = np.zeros(features[r][0].shape, np.float32)
                squares[r] = np.zeros(features[r][0].shape, np.float32)
                for i in range(len(alphas[r]) - 1):
                    add_panel(r, i)
        if end_outputs is None:
            f_x, f_b = (np.array([values[r][k] for r in rows], np.float64) for k in (-1, 0))
        for r in rows:  # the ends' outputs exactly as given (or as this round read them), not float32 recomputations
            values[r][0], values[r][-1] = f_b[r], f_x[r]
        degenerate = _group_gaps(f_x, f_b, groups) < min_output_gap
        tolerances = target_error * _group_shares(f_x, f_b, groups, min_output_gap)

        def residuals(r: int, widths: np.ndarray) -> np.ndarray:
            """Each panel's trapezoid integral of dF/dalpha minus its exact F(b) - F(a)."""
            return widths * (slopes[r][1:] + slopes[r][:-1]) / 2 - np.diff(values[r])

        reasons = np.full(len(rows), CONVERGED, object)
        reasons[degenerate] = DEGENERATE
        active = [r for r in rows if not degenerate[r]]
        # a group (paths averaged into one attribution) is done once its summed error is within
        # its summed allowance, even if one of its paths is still over its own share
        group_tolerances = np.bincount(groups, tolerances)
        errors_now = np.zeros(len(rows))

        def complete(r: int, group_errors: np.ndarray) -> bool:
            """Path ``r`` is complete: its own error, or its group's summed error, is within allowance."""
            return bool(errors_now[r] <= tolerances[r] or group_errors[groups[r]] <= group_tolerances[groups[r]])

        # the map a user gets is the group's average, so map_target is judged on it: its error
        # per pixel is the average of the paths' (squares add, then over n squared) against the
        # average map, and each path's panels get an equal share of the allowance
        members = {g: [q for q in rows if groups[q] == g] for g in set(groups.tolist())}
        group_map_met: dict[int, bool] = {}
        map_allowances: dict[int, float] = {}
        # completeness first: the last grid of each path at which completeness was met (its own, or
        # its group's as the paths stood then), before more map panels were split; if the cap then
        # stops it with completeness broken again (a split moves the sum), that grid's attribution
        # is returned (its nodes are all kept)
        complete_grids: dict[int, np.ndarray] = {}
        while active:
            points, still = [], []
            panels = {}
            for r in active:
                widths = np.diff(alphas[r])
                panels[r] = widths, residuals(r, widths)
                errors_now[r] = abs(panels[r][1].sum())
            group_errors = np.bincount(groups, errors_now, minlength=len(group_tolerances))
            if map_target is not None:
                for g in {int(groups[r]) for r in active}:
                    total_l1 = float(np.abs(sum(maps[q] for q in members[g])).sum())
                    group_map_met[g] = _map_error(sum(squares[q] for q in members[g]), total_l1) <= map_target
                    map_allowances[g] = map_target * total_l1 / np.sqrt(len(members[g]))
            for r in active:
                widths, res = panels[r]
                g = int(groups[r])
                if not np.isfinite(errors_now[r]):  # a NaN compares false to every allowance
                    reasons[r] = NONFINITE
                    continue
                tolerance = tolerances[r]
                is_complete = complete(r, group_errors)
                map_met = map_target is None or group_map_met[g]
                if is_complete and map_met:
                    continue
                budget = int(cap[r] - len(alphas[r]))
                if budget <= 0:
                    reasons[r] = LIMIT
                    continue
                # the map's own residuals, against the same kind of allowance
                map_panels = [] if map_met else _panels_to_split(map_sizes[r], widths, map_allowances[g], signed=False)
                if is_complete:
                    complete_grids[r] = alphas[r].copy()
                    chosen = map_panels
                else:
                    # completeness's panels first, and the map's in the same round: they would be
                    # split once completeness holds anyway, and completeness alone mostly splits
                    # one or two panels a round, where one evaluation alone costs twice one in a
                    # batch of 8 (MobileNetV2 1.0 @ 192, 2 cores: 18.5 ms against 9.2 ms). Not
                    # when completeness is stuck (its panels over their allowance are split, then
                    # the path stops as RESOLUTION), and not near the cap: the round must leave at
                    # least as many evaluations as it spends, so the map's splits cannot take the
                    # budget completeness needs (the user's target_error comes first)
                    chosen = _panels_to_split(res, widths, tolerance)
                    taken = set(chosen)
                    extra = [i for i in map_panels if i not in taken]
                    if chosen and extra and 2 * (len(chosen) + len(extra)) <= budget \
                            and not _stuck(res, widths, tolerance):
                        chosen += extra
                chosen = chosen[:budget]
                if not chosen:
                    reasons[r] = RESOLUTION
                    continue
                points += [(r, float((alphas[r][i] + alphas[r][i + 1]) / 2)) for i in chosen]
                still.append(r)
            if not points:
                break
            evaluate(points)
            active = still

        steps = np.array([len(a) for a in alphas])  # what each path cost, whichever grid is returned
        for r in rows:
            errors_now[r] = abs(residuals(r, np.diff(alphas[r])).sum())
        for r, grid in complete_grids.items():  # by the same rule as the refinement's, on the grids as they are now
            if reasons[r] == LIMIT and not complete(r, np.bincount(groups, errors_now, minlength=len(group_tolerances))):
                keep = np.isin(alphas[r], grid)
                alphas[r], slopes[r], values[r] = alphas[r][keep], slopes[r][keep], values[r][keep]
                vectors[r] = [v for v, k in zip(vectors[r], keep) if k]
                if maps[r] is not None:
                    features[r] = [v for v, k in zip(features[r], keep) if k]
                errors_now[r] = abs(residuals(r, np.diff(alphas[r])).sum())
        attributions, errors, summaries, path_squares = [], [], [], []
        for r in rows:
            widths = np.diff(alphas[r])
            weights = np.zeros(len(alphas[r]))
            weights[:-1] += widths / 2
            weights[1:] += widths / 2
            weights = weights.astype(np.float32)
            errors.append(residuals(r, widths).sum())  # the trapezoid integral - (F(x) - F(b)), signed
            summarized = map_features is not None and maps[r] is not None
            nodes = features[r] if summarized else vectors[r]
            # with map_target the refinement kept the grid's trapezoid map of ``nodes`` and its
            # squares up to date split by split (unless the grid was rolled back above): the map
            # judged is the map returned, and neither is summed again over the grid (on MobileNetV2
            # 1.0 @ 192, 2-3% of a default request's time for the squares, 2% for the map)
            kept = squares[r] is not None and len(alphas[r]) == steps[r]
            running = maps[r] if kept else _weighted_sum(weights, nodes)
            attributions.append(_weighted_sum(weights, vectors[r]) if summarized else running)
            summaries.append(running)
            path_squares.append(squares[r] if kept else _grid_squares(nodes, widths))
        map_errors = np.zeros(len(rows))
        for group in members.values():  # each path reports the estimate of the map it is averaged into
            map_errors[group] = _map_error(sum(path_squares[q] for q in group),
                                           float(np.abs(sum(summaries[q] for q in group)).sum()))
        return IntegratedGradientsOutput(np.stack(attributions).astype(np.float32), f_x, f_b, np.array(errors),
                                         steps, reasons, map_errors)
