"""Choose the ``step_count`` Vertex's own explanation server should use, by measuring.

Vertex's built-in explanations (``deploy.target: builtin_explanations``) compute Integrated
Gradients with exactly the configured ``step_count`` and only report the approximation error
afterwards ("if it exceeds 5%, increase the step count"). A count guessed once is wrong for the
next network: on MobileNetV2 at 192x192, 50 steps miss 0.05 on most images. So the exported
model is measured before upload: fixed-step IG on validation images at increasing step counts,
from the configured baselines, and the smallest count within Vertex's range that meets
``target`` on at least ``coverage`` of the images is chosen; if none does, the largest is, with
a warning saying how many images it leaves over the target.

Images whose baseline already scores like the input (output gap below
:data:`explain.integrated_gradients.MIN_OUTPUT_GAP`) are counted and set apart: no step count
makes their relative error small, and another baseline is the remedy, not more steps.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from explain.integrated_gradients import MIN_OUTPUT_GAP, IntegratedGradients
from explain.parameters import MAX_STEP_COUNT, XRAI_METHOD, parse_explanation_parameters

#: Step counts tried, in order; Vertex accepts 1..100.
CANDIDATE_STEP_COUNTS: tuple[int, ...] = (25, 50, 75, 100)


@dataclass
class StepCountChoice:
    """The chosen ``step_count`` and the measurement behind it."""

    step_count: int
    met: bool                      # the chosen count meets the target on >= coverage of the images
    coverage: float                # required share of images
    target: float                  # approximation error target
    #: step count -> share of the (non-degenerate) images whose worst path meets the target
    shares: dict[int, float] = field(default_factory=dict)
    images: int = 0
    degenerate_images: int = 0
    warning: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def choose_step_count(model, images: np.ndarray, parameters: Mapping[str, Any], target: float = 0.05,
                      coverage: float = 0.9,
                      candidates: Sequence[int] = CANDIDATE_STEP_COUNTS) -> StepCountChoice:
    """Measure fixed-step IG errors of ``model`` (an :class:`explain.model.ExplainableModel`) on
    ``images`` (``[N, H, W, 3]`` in [0, 1]) and pick the smallest candidate step count meeting
    ``target`` on ``coverage`` of them. ``parameters`` are the model's ExplanationParameters; the
    method's baselines (XRAI: black and white; IG: black) are the paths measured."""
    config = parse_explanation_parameters(parameters)
    candidates = sorted(int(c) for c in candidates if 1 <= int(c) <= MAX_STEP_COUNT)
    if not candidates:
        raise ValueError(f"no candidate step count in Vertex's range [1, {MAX_STEP_COUNT}]")
    images = np.asarray(images, np.float32)
    probs = model.predict(images)
    classes = probs.argmax(axis=1).astype(np.int32)
    starts = [0.0, 1.0] if config.method == XRAI_METHOD else [0.0]
    x = np.concatenate([images for _ in starts])
    baselines = np.concatenate([np.full_like(images, value) for value in starts])
    path_classes = np.concatenate([classes for _ in starts])
    rows = np.arange(len(x))
    ends = (np.concatenate([probs[np.arange(len(images)), classes] for _ in starts]),
            model.predict(baselines)[rows, path_classes])
    gaps = np.abs(ends[0] - ends[1]).reshape(len(starts), len(images))
    usable = gaps.min(axis=0) >= MIN_OUTPUT_GAP
    choice = StepCountChoice(step_count=candidates[-1], met=False, coverage=coverage, target=target,
                             images=int(usable.sum()), degenerate_images=int((~usable).sum()))
    if not usable.any():
        choice.warning = (f"every one of the {len(images)} images scores like its baseline (output gap < "
                          f"{MIN_OUTPUT_GAP}); no step count can be chosen from them: use another baseline")
        return choice
    for steps in candidates:
        out = IntegratedGradients().GetMask(x, baselines, path_classes, model, step_count=steps,
                                            quadrature=config.attribution.quadrature, end_outputs=ends)
        worst = out.approximation_errors.reshape(len(starts), len(images)).max(axis=0)[usable]
        choice.shares[steps] = float(np.mean(worst <= target))
        if choice.shares[steps] >= coverage:
            choice.step_count, choice.met = steps, True
            return choice
    choice.warning = (f"no step count up to {candidates[-1]} brings {coverage:.0%} of {choice.images} validation "
                      f"images within approximation error {target} (at {candidates[-1]}: "
                      f"{choice.shares[candidates[-1]]:.0%}); Vertex's built-in explanations will exceed it on the "
                      f"rest. Deploy with target custom_container (refined to the target on every request) or "
                      f"use another baseline")
    return choice


def calibrate_parameters(model_dir: str, eval_data_path: str, parameters: Mapping[str, Any],
                         num_images: int = 16, target: float = 0.05, coverage: float = 0.9) -> tuple[dict, StepCountChoice]:
    """``parameters`` with the method's ``step_count`` replaced by the one measured on the first
    ``num_images`` records of ``eval_data_path`` (local or ``gs://``) for the exported model in
    ``model_dir``; prints the measurement, and the warning when no count meets the target."""
    import copy

    from explain.model import load_explainable_model
    from trainer.data import take_numpy

    model = load_explainable_model(model_dir)
    images, _ = take_numpy(eval_data_path, num_images, model.image_shape[:2])
    choice = choose_step_count(model, images, parameters, target=target, coverage=coverage)
    calibrated = copy.deepcopy(dict(parameters))
    method = next(k for k in calibrated if k.replace("_", "").lower() in ("integratedgradientsattribution",
                                                                           "xraiattribution"))
    key = "stepCount" if "stepCount" in calibrated[method] else "step_count"
    before = calibrated[method].get(key)
    calibrated[method][key] = choice.step_count
    shares = ", ".join(f"{steps}: {share:.0%}" for steps, share in choice.shares.items())
    print(f"step_count for Vertex's built-in explanations: {choice.step_count} (configured {before}); share of "
          f"{choice.images} validation images within approximation error {target} by step count: {shares}"
          + (f"; {choice.degenerate_images} image(s) set apart (baseline scores like the input)"
             if choice.degenerate_images else ""))
    if choice.warning:
        import warnings

        warnings.warn(choice.warning, stacklevel=2)
        print(f"WARNING: {choice.warning}")
    return calibrated, choice
