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

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from explain.paths import LINEAR, path_points
from explain.quadrature import DEFAULT_QUADRATURE, quadrature_rule

#: Nodes per panel in adaptive mode: few, so a split adds few evaluations where needed.
PANEL_NODES = 4
#: |F(x) - F(baseline)| below this is treated as this in the adaptive stopping rule, so a
#: baseline that scores like the input does not spin the refinement to its cap.
DELTA_FLOOR = 1e-3


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

    group_attributions: np.ndarray  # [G, H, W, C]
    node_derivatives: np.ndarray    # [n]
    node_outputs: np.ndarray        # [n] F at the node, for the path's class


class PathModel(Protocol):
    """The model as IG needs it: batched predictions and batched path gradients."""

    def predict(self, images: np.ndarray) -> np.ndarray: ...

    def path_gradients(self, batch: PathBatch) -> PathResult: ...


@dataclass
class IntegratedGradientsOutput:
    """Per path r: the attribution, F at both ends, |sum(attr) - (F(x) - F(b))| and the steps used."""

    attributions: np.ndarray      # [R, H, W, C]
    instance_outputs: np.ndarray  # [R]
    baseline_outputs: np.ndarray  # [R]
    absolute_errors: np.ndarray   # [R]
    step_counts: np.ndarray       # [R] gradient evaluations spent on each path

    @property
    def approximation_errors(self) -> np.ndarray:
        """Vertex's approximation error: |sum(attr) - delta| / |delta| per path."""
        delta = np.abs(self.instance_outputs - self.baseline_outputs)
        return self.absolute_errors / np.maximum(delta, np.finfo(np.float32).tiny)


@dataclass
class _Panel:
    row: int
    start: float
    end: float
    f_start: float
    f_end: float
    nodes: np.ndarray = field(default_factory=lambda: np.zeros(0))
    weights: np.ndarray = field(default_factory=lambda: np.zeros(0))
    vector: np.ndarray | None = None
    integral: float = 0.0

    @property
    def error(self) -> float:
        return self.integral - (self.f_end - self.f_start)


class IntegratedGradients:
    """Integrated Gradients (https://arxiv.org/abs/1703.01365) over many paths at once, with a
    choice of quadrature rule and an optional adaptive mode that refines until the completeness
    error is below ``target_error``."""

    def GetMask(self, x_values: np.ndarray, baselines: np.ndarray, class_indices: np.ndarray,
                model: PathModel, step_count: int = 50, quadrature: str = DEFAULT_QUADRATURE,
                target_error: float | None = None, max_step_count: int = 400, path: str = LINEAR,
                max_blur_sigma: float = 0.0, end_outputs: tuple[np.ndarray, np.ndarray] | None = None,
                ) -> IntegratedGradientsOutput:
        """Attributions for the paths ``baselines[r] -> x_values[r]`` explaining output
        ``class_indices[r]``.

        Args:
          x_values, baselines: ``[R, H, W, C]`` float32; for ``path="scale_space"`` the baseline
            is the input blurred by ``max_blur_sigma`` (only its model output is used).
          step_count: nodes per path (non-adaptive), or the first round's nodes (adaptive).
          quadrature: a rule of :mod:`explain.quadrature`.
          target_error: adaptive mode when set: relative completeness error to reach per path.
          max_step_count: adaptive mode's cap on gradient evaluations per path.
          end_outputs: ``(F(x), F(baseline))`` per path when the caller already has them.
        """
        x_values = np.asarray(x_values, np.float32)
        baselines = np.asarray(baselines, np.float32)
        classes = np.asarray(class_indices, np.int32)
        rows = np.arange(len(classes))
        if x_values.shape != baselines.shape or len(x_values) != len(classes):
            raise ValueError(f"inputs {x_values.shape}, baselines {baselines.shape} and "
                             f"{len(classes)} classes do not match")
        if end_outputs is None:
            probs = model.predict(np.concatenate([x_values, baselines]))
            end_outputs = probs[rows, classes], probs[len(rows) + rows, classes]
        f_x, f_b = (np.asarray(v, np.float64) for v in end_outputs)

        def evaluate(panels: list[_Panel]) -> None:
            """One batched callback for the nodes of all ``panels``."""
            nodes = np.concatenate([p.nodes for p in panels])
            batch = PathBatch(
                inputs=x_values, baselines=baselines, classes=classes,
                node_rows=np.concatenate([np.full(len(p.nodes), p.row, np.int32) for p in panels]),
                node_groups=np.concatenate([np.full(len(p.nodes), g, np.int32) for g, p in enumerate(panels)]),
                alphas=nodes.astype(np.float32),
                weights=np.concatenate([p.weights for p in panels]).astype(np.float32),
                num_groups=len(panels), path=path, max_blur_sigma=max_blur_sigma)
            result = model.path_gradients(batch)
            offset = 0
            for g, panel in enumerate(panels):
                n = len(panel.nodes)
                panel.vector = result.group_attributions[g]
                panel.integral = float(np.dot(panel.weights, result.node_derivatives[offset:offset + n]))
                offset += n

        def boundary_outputs(points: list[tuple[int, float]]) -> list[float]:
            """F at interior panel boundaries: forward passes only."""
            if not points:
                return []
            r = np.array([p[0] for p in points])
            alphas = np.array([p[1] for p in points])
            images = path_points(x_values[r], baselines[r], alphas, path, max_blur_sigma)
            return list(model.predict(images)[np.arange(len(r)), classes[r]])

        def make_panels(row: int, bounds: np.ndarray, f_bounds: list[float], nodes_per_panel: int) -> list[_Panel]:
            panels = []
            for j in range(len(bounds) - 1):
                nodes, weights = quadrature_rule(quadrature, nodes_per_panel, bounds[j], bounds[j + 1])
                panels.append(_Panel(row, bounds[j], bounds[j + 1], f_bounds[j], f_bounds[j + 1], nodes, weights))
            return panels

        adaptive = target_error is not None
        per_panel = min(PANEL_NODES, step_count) if adaptive else step_count
        n_panels = max(1, step_count // per_panel)
        bounds = np.linspace(0.0, 1.0, n_panels + 1)
        interior = boundary_outputs([(r, a) for r in rows for a in bounds[1:-1]])
        panels_by_row: list[list[_Panel]] = []
        for r in rows:
            f_inner = interior[r * (n_panels - 1):(r + 1) * (n_panels - 1)]
            panels_by_row.append(make_panels(r, bounds, [f_b[r], *f_inner, f_x[r]], per_panel))
        evaluate([p for panels in panels_by_row for p in panels])
        steps = np.full(len(rows), n_panels * per_panel)

        while adaptive:
            splits: list[_Panel] = []
            for r, panels in enumerate(panels_by_row):
                error = abs(sum(p.error for p in panels))
                if error <= target_error * max(abs(f_x[r] - f_b[r]), DELTA_FLOOR):
                    continue
                worst = sorted(panels, key=lambda p: -abs(p.error))
                largest = abs(worst[0].error)
                budget = (max_step_count - steps[r]) // (2 * per_panel)
                chosen = [p for p in worst if abs(p.error) >= 0.5 * largest][:budget]
                splits.extend(chosen)
                steps[r] += 2 * per_panel * len(chosen)
            if not splits:
                break
            mids = boundary_outputs([(p.row, (p.start + p.end) / 2) for p in splits])
            children = []
            for panel, f_mid in zip(splits, mids):
                mid = (panel.start + panel.end) / 2
                halves = make_panels(panel.row, np.array([panel.start, mid, panel.end]),
                                     [panel.f_start, f_mid, panel.f_end], per_panel)
                row_panels = panels_by_row[panel.row]
                i = next(i for i, p in enumerate(row_panels) if p is panel)
                row_panels[i:i + 1] = halves
                children.extend(halves)
            evaluate(children)

        attributions = np.stack([np.sum([p.vector for p in panels], axis=0) for panels in panels_by_row])
        errors = np.array([abs(sum(p.error for p in panels)) for panels in panels_by_row])
        return IntegratedGradientsOutput(attributions.astype(np.float32), f_x, f_b, errors, steps)
