"""Vertex AI ``ExplanationParameters`` for image models, parsed and validated as Vertex does.

The dict a user passes here is the same one that goes to Vertex at ``Model.upload`` (SDK
snake_case, e.g. ``{"integrated_gradients_attribution": {"step_count": 50}}``) or in a REST body
(camelCase, ``{"integratedGradientsAttribution": {"stepCount": 50}}``), so the local endpoint and
Vertex agree on what a configuration means, and a configuration Vertex would reject fails here
too, naming the field.

Our extensions (NOT Vertex fields) live in the method dict beside ``step_count`` under the keys in
:data:`EXTENSION_KEYS`; :func:`vertex_parameters` strips them before a dict is sent to Vertex:

- ``target_error``: the approximation error each path is refined to, default 0.05 (Vertex's own
  threshold: "if the approximation error exceeds 5%, increase the step count"), so an explanation
  nobody tuned is faithful: ``step_count`` is where a path starts, and steps are added where
  completeness fails until the error is at most ``target_error`` or ``max_step_count`` is spent
  (:class:`explain.integrated_gradients.IntegratedGradients`). ``target_error: null`` turns
  refinement off: exactly ``step_count`` steps, Vertex's own semantics. XRAI's paths start from
  at least :data:`XRAI_MIN_START` points when refining (:func:`start_step_count`): its regions are
  ranked by the per-pixel map, which completeness alone does not converge.
- ``max_step_count``: the cap on gradient evaluations per path (default 400): what one path can
  cost, whatever the model and the image.
- ``map_target``: with refinement on, also refine each path until its map's estimated relative
  L1 error (from the grid's own panels) is at most this: default :data:`DEFAULT_MAP_TARGET`. XRAI's
  is judged on what it ranks, each segment's mean attribution (:func:`explain.xrai.region_means`),
  not on the pixels. ``map_target: null`` asks for completeness alone, as Vertex measures it. Completeness checks the sum of the map; the pixels can still be far from the
  integral where they cancel in the sum (``make bench``, section 1b). Within ``max_step_count``,
  so it never buys more work than a request could already ask for.
- ``quadrature``: with refinement off, the rule of the fixed steps (:mod:`explain.quadrature`),
  default ``riemann_trapezoid`` (measured best of the fixed rules on MobileNetV2), or
  ``gauss_legendre`` for networks with smooth activations. Naming a rule without a ``target_error`` turns refinement off.
- ``baseline``: a named baseline (``black``, ``white``, ``random``, ``blurred``) or a list of
  them, overriding the metadata's ``input_baselines``.
- ``blur_path``: with ``blur_baseline_config``, ``scale_space`` (default: Blur IG, Xu et al. 2020,
  integrating along the Gaussian scale-space) or ``linear`` (a straight line from the maximally
  blurred image, as Vertex's reference describes it).
- ``seed``: seeds the SmoothGrad noise and the ``random`` baseline, so an explanation repeats.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

from explain.quadrature import DEFAULT_QUADRATURE, QUADRATURE_RULES
# where refinement starts, and fixed steps, when nobody chose a step_count (re-exported)
from trainer.schema import DEFAULT_ADAPTIVE_START, DEFAULT_FIXED_STEP_COUNT, XRAI_MIN_START  # noqa: F401

# Vertex's documented ranges.
MIN_STEP_COUNT, MAX_STEP_COUNT = 1, 100
MIN_NOISY_SAMPLE_COUNT, MAX_NOISY_SAMPLE_COUNT = 1, 50
DEFAULT_NOISY_SAMPLE_COUNT = 3

DEFAULT_MAX_ADAPTIVE_STEPS = 400
#: Vertex's threshold for a faithful attribution; the default refinement target.
DEFAULT_TARGET_ERROR = 0.05
#: The default ``map_target`` of both methods with refinement on (``make bench`` sections 1b and 2,
#: on the current build). IG: completeness to 5% alone leaves the maps of MobileNetV2 a median 0.86
#: (worst 2.4) in relative L1 from the converged integral, on grids of a median 10 points (the
#: refinement meets the sum partly by cancellation), where the tutorial's trapezoid at 100 steps is
#: at 0.20; with 0.1 they are at 0.080 (worst 0.090) for a median of 48.5 evaluations. XRAI, judged
#: on its segments' mean attributions: on 12 validation images its top 10% regions overlap
#: ``saliency.XRAI``'s at 200 steps from black and white at a median of 1.00, worst 0.87 (under the
#: refinement rule before, completeness alone in an untimed trial: 0.95, worst 0.63, for a median of
#: 51 evaluations per path against 54 with the target, mean 77 against 121; the same target on the
#: pixels cost a mean of 147).
DEFAULT_MAP_TARGET = 0.1
# Validation caps (not Vertex's; they keep every number finite and every list short, so a tiny
# request cannot ask for unbounded work; a server's cost budget then bounds the product).
#: The highest ``max_step_count`` accepted: well above any useful adaptive cap.
MAX_ADAPTIVE_STEP_COUNT = 2000
#: Images are in [0, 1]: a noise or blur beyond these only overflows or blurs to the mean colour.
MAX_NOISE_SIGMA = 100.0
MAX_BLUR_SIGMA = 1000.0
#: Most named baselines, and most distinct ``output_indices``, one request may list.
MAX_BASELINES = 8
MAX_OUTPUT_INDICES = 1000
MAX_SEED = 2**63 - 1
NAMED_BASELINES = ("black", "white", "random", "blurred")
BLUR_PATHS = ("scale_space", "linear")
EXTENSION_KEYS = ("quadrature", "target_error", "max_step_count", "map_target", "baseline", "blur_path", "seed")

IG_METHOD = "integrated_gradients"
XRAI_METHOD = "xrai"
_METHOD_FIELDS = {"integrated_gradients_attribution": IG_METHOD, "xrai_attribution": XRAI_METHOD}
_UNSUPPORTED_METHODS = ("sampled_shapley_attribution", "examples")
_TOP_LEVEL_FIELDS = set(_METHOD_FIELDS) | set(_UNSUPPORTED_METHODS) | {"top_k", "output_indices"}
_METHOD_KEYS = {"step_count", "smooth_grad_config", "blur_baseline_config", *EXTENSION_KEYS}


class ExplanationParametersError(ValueError):
    """The explanation parameters are invalid; the message names the offending field."""


@dataclass(frozen=True)
class SmoothGradConfig:
    """Vertex ``SmoothGradConfig``: average attributions over noisy copies of the input
    (SmoothGrad, Smilkov et al. 2017, https://arxiv.org/abs/1706.03825)."""

    noise_sigma: float | None = None
    #: ``feature_noise_sigma.noise_sigma[].{name, sigma}`` as ``{name: sigma}``.
    feature_noise_sigma: tuple[tuple[str, float], ...] = ()
    noisy_sample_count: int = DEFAULT_NOISY_SAMPLE_COUNT

    def sigma_for(self, input_key: str) -> float:
        """The noise standard deviation for one input feature."""
        if self.noise_sigma is not None:
            return self.noise_sigma
        sigmas = dict(self.feature_noise_sigma)
        if input_key not in sigmas:
            raise ExplanationParametersError(
                f"smooth_grad_config.feature_noise_sigma has no entry for input {input_key!r} "
                f"(has {sorted(sigmas)})")
        return sigmas[input_key]


@dataclass(frozen=True)
class BlurBaselineConfig:
    """Vertex ``BlurBaselineConfig``: explain relative to a Gaussian-blurred image
    (Blur IG, Xu et al. 2020, https://arxiv.org/abs/2004.03383)."""

    max_blur_sigma: float
    path: str = "scale_space"  # extension: see module docstring


@dataclass(frozen=True)
class AttributionMethodConfig:
    """Vertex ``IntegratedGradientsAttribution`` or ``XraiAttribution`` plus our extensions."""

    method: str  # IG_METHOD or XRAI_METHOD
    step_count: int
    smooth_grad: SmoothGradConfig | None = None
    blur_baseline: BlurBaselineConfig | None = None
    quadrature: str = DEFAULT_QUADRATURE
    target_error: float | None = DEFAULT_TARGET_ERROR
    max_step_count: int = DEFAULT_MAX_ADAPTIVE_STEPS
    map_target: float | None = None
    baselines: tuple[str, ...] | None = None
    seed: int = 0


@dataclass(frozen=True)
class ExplanationConfig:
    """Vertex ``ExplanationParameters`` for one model, parsed."""

    attribution: AttributionMethodConfig
    #: How many of the highest-scoring classes to explain; -1 = all (Vertex default 1).
    top_k: int = 1
    #: Classes to explain, overriding ``top_k`` when set.
    output_indices: tuple[int, ...] | None = None

    @property
    def method(self) -> str:
        return self.attribution.method


def _snake(key: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower()


def _normalize_keys(value: Any) -> Any:
    """camelCase (REST JSON) keys to snake_case (SDK), recursively; values are untouched."""
    if isinstance(value, Mapping):
        return {_snake(str(k)): _normalize_keys(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normalize_keys(v) for v in value]
    return value


def _unknown(fields: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise ExplanationParametersError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(allowed)}")


def _number(value: Any, field: str, kind: type = float) -> Any:
    if isinstance(value, float) and not math.isfinite(value):  # NaN, Infinity, 1e400 from JSON
        raise ExplanationParametersError(f"{field} must be a finite number, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise ExplanationParametersError(f"{field} must be {'an integer' if kind is int else 'a number'}, "
                                         f"got {value!r}")
    return kind(value)


def _in_range(value: Any, field: str, low: int, high: int) -> int:
    value = _number(value, field, int)
    if not low <= value <= high:
        raise ExplanationParametersError(f"{field} must be in [{low}, {high}], got {value}")
    return value


def _positive(value: Any, field: str, high: float | None = None) -> float:
    value = _number(value, field)
    if not value > 0 or (high is not None and value > high):
        raise ExplanationParametersError(f"{field} must be > 0{f' and <= {high:g}' if high is not None else ''}, "
                                         f"got {value}")
    return value


def _smooth_grad(raw: Any, where: str) -> SmoothGradConfig:
    if not isinstance(raw, Mapping):
        raise ExplanationParametersError(f"{where} must be an object, got {raw!r}")
    _unknown(raw, {"noise_sigma", "feature_noise_sigma", "noisy_sample_count"}, where)
    has_sigma, has_features = raw.get("noise_sigma") is not None, raw.get("feature_noise_sigma") is not None
    if has_sigma == has_features:  # a proto oneof: exactly one
        raise ExplanationParametersError(f"{where}: set exactly one of noise_sigma or feature_noise_sigma")
    count = raw.get("noisy_sample_count") or DEFAULT_NOISY_SAMPLE_COUNT  # proto3: 0 = unset
    count = _in_range(count, f"{where}.noisy_sample_count", MIN_NOISY_SAMPLE_COUNT, MAX_NOISY_SAMPLE_COUNT)
    if has_sigma:
        return SmoothGradConfig(noise_sigma=_positive(raw["noise_sigma"], f"{where}.noise_sigma", MAX_NOISE_SIGMA),
                                noisy_sample_count=count)
    features = raw["feature_noise_sigma"]
    entries = features.get("noise_sigma") if isinstance(features, Mapping) else None
    if not isinstance(entries, list) or not entries:
        raise ExplanationParametersError(
            f"{where}.feature_noise_sigma must be {{'noise_sigma': [{{'name': ..., 'sigma': ...}}, ...]}}")
    pairs = []
    for i, entry in enumerate(entries):
        field = f"{where}.feature_noise_sigma.noise_sigma[{i}]"
        if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
            raise ExplanationParametersError(f"{field} must have a string 'name' and a 'sigma'")
        pairs.append((entry["name"], _positive(entry.get("sigma"), f"{field}.sigma", MAX_NOISE_SIGMA)))
    return SmoothGradConfig(feature_noise_sigma=tuple(pairs), noisy_sample_count=count)


def _method(raw: Any, method: str, where: str) -> AttributionMethodConfig:
    if not isinstance(raw, Mapping):
        raise ExplanationParametersError(f"{where} must be an object, got {raw!r}")
    _unknown(raw, _METHOD_KEYS, where)
    if raw.get("step_count") in (None, 0):
        raise ExplanationParametersError(f"{where}.step_count is required "
                                         f"(in [{MIN_STEP_COUNT}, {MAX_STEP_COUNT}]; 50 is a good start)")
    step_count = _in_range(raw["step_count"], f"{where}.step_count", MIN_STEP_COUNT, MAX_STEP_COUNT)
    smooth = _smooth_grad(raw["smooth_grad_config"], f"{where}.smooth_grad_config") \
        if raw.get("smooth_grad_config") is not None else None

    blur = None
    if raw.get("blur_baseline_config") is not None:
        cfg = raw["blur_baseline_config"]
        if not isinstance(cfg, Mapping):
            raise ExplanationParametersError(f"{where}.blur_baseline_config must be an object")
        _unknown(cfg, {"max_blur_sigma"}, f"{where}.blur_baseline_config")
        sigma = _positive(cfg.get("max_blur_sigma"), f"{where}.blur_baseline_config.max_blur_sigma", MAX_BLUR_SIGMA)
        path = raw.get("blur_path", "scale_space")
        if path not in BLUR_PATHS:
            raise ExplanationParametersError(f"{where}.blur_path must be one of {BLUR_PATHS}, got {path!r}")
        blur = BlurBaselineConfig(sigma, path)
    elif "blur_path" in raw:
        raise ExplanationParametersError(f"{where}.blur_path needs blur_baseline_config")

    quadrature = raw.get("quadrature", DEFAULT_QUADRATURE)
    if not isinstance(quadrature, str) or quadrature not in QUADRATURE_RULES:
        raise ExplanationParametersError(f"{where}.quadrature must be one of {sorted(QUADRATURE_RULES)}, "
                                         f"got {quadrature!r}")
    # Refinement is on by default; an explicit `target_error: null`, or a quadrature rule named
    # without a target, asks for Vertex's fixed steps.
    fixed = ("target_error" in raw and raw["target_error"] is None) or ("quadrature" in raw and "target_error" not in raw)
    target = None if fixed else raw.get("target_error", DEFAULT_TARGET_ERROR)
    if target is not None:
        target = _positive(target, f"{where}.target_error", 1.0)
        if "quadrature" in raw:
            raise ExplanationParametersError(f"{where}.quadrature applies to fixed steps only: refinement uses "
                                             f"its own trapezoid grid; set target_error: null to choose a rule")
    max_steps = _number(raw.get("max_step_count", DEFAULT_MAX_ADAPTIVE_STEPS), f"{where}.max_step_count", int)
    if max_steps > MAX_ADAPTIVE_STEP_COUNT:
        raise ExplanationParametersError(f"{where}.max_step_count must be <= {MAX_ADAPTIVE_STEP_COUNT}, "
                                         f"got {max_steps}")
    if max_steps < step_count:
        raise ExplanationParametersError(f"{where}.max_step_count ({max_steps}) must be >= step_count "
                                         f"({step_count})")
    # explicit `map_target: null` asks for completeness alone; fixed steps have no default
    map_target = raw["map_target"] if "map_target" in raw else DEFAULT_MAP_TARGET if target is not None else None
    if map_target is not None:
        map_target = _positive(map_target, f"{where}.map_target", 1.0)
        if target is None:
            raise ExplanationParametersError(f"{where}.map_target refines the path: it needs refinement on "
                                             f"(a target_error, not target_error: null or a quadrature rule)")

    baselines = raw.get("baseline")
    if baselines is not None:
        baselines = (baselines,) if isinstance(baselines, str) else \
            tuple(baselines) if isinstance(baselines, (list, tuple)) else (baselines,)
        bad = [b for b in baselines if not isinstance(b, str) or b not in NAMED_BASELINES]
        if bad or not baselines:
            raise ExplanationParametersError(f"{where}.baseline must be one or more of {NAMED_BASELINES}, "
                                             f"got {raw['baseline']!r}")
        if blur is not None:
            raise ExplanationParametersError(f"{where}: set either baseline or blur_baseline_config, not both")
        if len(baselines) > MAX_BASELINES:
            raise ExplanationParametersError(f"{where}.baseline lists {len(baselines)} baselines; at most "
                                             f"{MAX_BASELINES} are allowed")
    seed = _number(raw.get("seed", 0), f"{where}.seed", int)
    if not 0 <= seed <= MAX_SEED:
        raise ExplanationParametersError(f"{where}.seed must be in [0, 2**63 - 1], got {seed}")
    return AttributionMethodConfig(method=method, step_count=step_count, smooth_grad=smooth,
                                   blur_baseline=blur, quadrature=quadrature, target_error=target,
                                   max_step_count=max_steps, map_target=map_target, baselines=baselines,
                                   seed=seed)


def start_step_count(attribution: AttributionMethodConfig) -> int:
    """The grid points each path starts from: ``step_count``, except that XRAI with refinement on
    starts from at least :data:`XRAI_MIN_START` (see there: below it the map its regions are
    ranked by is not converged, though completeness is), within its ``max_step_count``, which
    stays what a path can cost. Fixed steps are the user's, exactly."""
    if attribution.method == XRAI_METHOD and attribution.target_error is not None:
        return max(attribution.step_count, min(XRAI_MIN_START, attribution.max_step_count))
    return attribution.step_count


def max_path_evaluations(attribution: AttributionMethodConfig) -> int:
    """The most gradient evaluations (forward+backward passes) one IG path of this configuration
    may spend: the figure a server's cost model multiplies by the number of paths of a request
    (instances x outputs x baselines x SmoothGrad samples) before doing any work. One place for
    this fact, so the explainer's refinement and the server's budget never disagree."""
    if attribution.target_error is None:
        return attribution.step_count
    return max(start_step_count(attribution), attribution.max_step_count, 2)  # a trapezoid grid has 2 ends


def _flat_ints(value: Any, field: str) -> tuple[int, ...]:
    if isinstance(value, (list, tuple)):
        return tuple(i for v in value for i in _flat_ints(v, field))
    return (_number(value, field, int),)


def parse_explanation_parameters(params: Mapping[str, Any] | None) -> ExplanationConfig:
    """Parse a Vertex ``ExplanationParameters`` dict (snake_case or camelCase) into an
    :class:`ExplanationConfig`, raising :class:`ExplanationParametersError` naming the field."""
    if isinstance(params, ExplanationConfig):
        return params
    if not isinstance(params, Mapping):
        raise ExplanationParametersError(f"explanation parameters must be an object, got {params!r}")
    raw = _normalize_keys(params)
    _unknown(raw, _TOP_LEVEL_FIELDS, "ExplanationParameters")
    for name in _UNSUPPORTED_METHODS:
        if raw.get(name) is not None:
            raise ExplanationParametersError(f"{name} is not supported for image models here; "
                                             f"use integrated_gradients_attribution or xrai_attribution")
    chosen = [name for name in _METHOD_FIELDS if raw.get(name) is not None]
    if len(chosen) != 1:
        raise ExplanationParametersError(
            f"ExplanationParameters must set exactly one of {sorted(_METHOD_FIELDS)}, got {chosen or 'none'}")
    attribution = _method(raw[chosen[0]], _METHOD_FIELDS[chosen[0]], chosen[0])

    top_k = raw.get("top_k") or 1  # proto3: 0 = unset = 1
    top_k = _number(top_k, "top_k", int)
    if top_k < -1:
        raise ExplanationParametersError(f"top_k must be a positive integer or -1 (all outputs), got {top_k}")
    indices = raw.get("output_indices")
    if indices is not None:
        indices = _flat_ints(indices, "output_indices")
        if not indices or min(indices) < 0:
            raise ExplanationParametersError(f"output_indices must be non-negative integers, got {raw['output_indices']!r}")
        indices = tuple(dict.fromkeys(indices))  # a class explained twice is the same explanation
        if len(indices) > MAX_OUTPUT_INDICES:
            raise ExplanationParametersError(f"output_indices lists {len(indices)} distinct outputs; at most "
                                             f"{MAX_OUTPUT_INDICES} are allowed")
    return ExplanationConfig(attribution=attribution, top_k=top_k, output_indices=indices or None)


def vertex_parameters(params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` without our extension keys, ready for ``aiplatform.explain.ExplanationParameters``.

    Validates first, so a dict that would fail at Vertex fails here, before a 20-minute deploy.
    """
    parse_explanation_parameters(params)
    clean = copy.deepcopy(dict(params))
    for key, value in clean.items():
        if _snake(key) in _METHOD_FIELDS and isinstance(value, dict):
            clean[key] = {k: v for k, v in value.items() if _snake(k) not in EXTENSION_KEYS}
    return clean
