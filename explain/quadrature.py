"""Quadrature rules for the Integrated Gradients path integral over alpha in [0, 1].

IG is an integral (Sundararajan et al. 2017, https://arxiv.org/abs/1703.01365); the tutorial
uses the trapezoid rule and the ``saliency`` library a Riemann sum over ``linspace(0, 1, n)``.

Which rule is best depends on the network. With smooth activations (swish, GELU, softplus) the
integrand dF/dalpha is smooth and Gauss-Legendre's error falls far faster than any Riemann sum's.
With ReLU-family activations (MobileNetV2's ReLU6) it jumps at every unit's kink and no fixed rule
converges faster than 1/n. Measured by ``make bench`` on MobileNetV2 1.0 @ 192 trained on the
flowers (BENCHMARKS.md section 1: 12 validation images, black baseline): median completeness
error at 50 steps 0.075 for the trapezoid, 0.080 for ``saliency``'s sum and 0.100 for the
midpoint rule, whose nodes never reach the ends, where a dark image's output changes fastest
(at 32 steps 0.054 / 0.063 / 0.171; at 100, 0.042 / 0.039 / 0.064). So the trapezoid is the
fixed-step default. None of them is faithful at Vertex's 50 steps on most
images, which is why explanations refine the path by default
(:mod:`explain.integrated_gradients`): a trapezoid grid bisected where completeness fails.
Every rule returns nodes in [0, 1] and weights summing
to 1, so callers never special-case a rule.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

Rule = Callable[[int], tuple[np.ndarray, np.ndarray]]

#: The rule used unless a caller names one (see the module docstring for the measurements).
DEFAULT_QUADRATURE = "riemann_trapezoid"


def riemann_left(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.arange(n) / n, np.full(n, 1.0 / n)


def riemann_right(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The tutorial's sum over k = 1..m of gradients at k/m."""
    return np.arange(1, n + 1) / n, np.full(n, 1.0 / n)


def riemann_middle(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The midpoint rule: never evaluates the ends."""
    return (np.arange(n) + 0.5) / n, np.full(n, 1.0 / n)


def riemann_linspace(n: int) -> tuple[np.ndarray, np.ndarray]:
    """``saliency``'s ``IntegratedGradients``: n points from 0 to 1 inclusive, each weighted 1/n."""
    return (np.linspace(0.0, 1.0, n) if n > 1 else np.ones(1)), np.full(n, 1.0 / n)


def riemann_trapezoid(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The tutorial's rule, and the fixed-step default: n points from 0 to 1, ends weighted half."""
    if n == 1:
        return np.full(1, 0.5), np.ones(1)
    weights = np.full(n, 1.0 / (n - 1))
    weights[[0, -1]] /= 2
    return np.linspace(0.0, 1.0, n), weights


def gauss_legendre(n: int) -> tuple[np.ndarray, np.ndarray]:
    nodes, weights = np.polynomial.legendre.leggauss(n)  # on [-1, 1], weights sum to 2
    return (nodes + 1.0) / 2.0, weights / 2.0


QUADRATURE_RULES: dict[str, Rule] = {
    "riemann_left": riemann_left,
    "riemann_right": riemann_right,
    "riemann_middle": riemann_middle,
    "riemann_linspace": riemann_linspace,
    "riemann_trapezoid": riemann_trapezoid,
    "gauss_legendre": gauss_legendre,
}


def quadrature_rule(name: str, n: int, start: float = 0.0, end: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` nodes and weights of rule ``name`` on ``[start, end]`` (weights sum to ``end - start``)."""
    if name not in QUADRATURE_RULES:
        raise ValueError(f"unknown quadrature {name!r}; one of {sorted(QUADRATURE_RULES)}")
    if n < 1:
        raise ValueError(f"quadrature needs at least one node, got {n}")
    nodes, weights = QUADRATURE_RULES[name](n)
    width = end - start
    return (start + width * nodes).astype(np.float64), (width * weights).astype(np.float64)
