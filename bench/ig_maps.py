"""1b. Integrated Gradients maps at equal approximation error: how close each attribution is to
the converged integral, not only to completeness.

Vertex's approximation error (section 1's yardstick) checks one number, the sum of the map. Two
attributions with the same sum can differ pixel by pixel: refinement converges the sum where the
model's output changes along the path, and a stretch where the output is flat but the per-pixel
integrands are not (they cancel in the sum) can stay coarse. So for each image this section
computes a converged map (ours, refined from ``map_reference_start`` grid points to completeness
error ``map_reference_target`` and estimated map error ``map_reference_map_target``, up to
``map_reference_steps`` evaluations; the uniform trapezoid at 600 steps, an independent check, is
scored against it too) and scores against it:

- ours, the default request (refined from ``ig_start_steps`` points) to 5% and to 1%: refined
  until completeness meets the target and the map's own estimate of its L1 error
  (``IntegratedGradientsOutput.map_errors``, from the grid's panels) meets the default
  ``map_target`` (:data:`explain.parameters.DEFAULT_MAP_TARGET`);
- the same requests with ``map_target: null``: completeness alone, as Vertex measures it;
- ours to 5% from XRAI's start (``XRAI_MIN_START`` points), completeness alone (XRAI's default
  until it got the map target on its segments' means; section 2);
- ours to 1% with the stricter ``map_target`` ``map_high_target``;
- the tutorial's trapezoid rule at ``map_fixed_steps`` steps (100 and 600 are what section 1
  found the references need for a median error of 5% and 1%; the steps between find where its maps
  match ours' default: equal map accuracy; ``saliency``'s sum on the same nodes gave maps
  within 0.01 of it in a trial), evaluated by our batched kernel: the same sum
  (``tests/test_bench_quick.py`` checks the rule against the tutorial). Nothing here is timed.

Scores: the relative L1 distance ``|A - A*|_1 / |A*|_1`` (and, for ours, the map's own estimate of
it) and the overlap (IoU) of the top 10% of
pixels by |attribution| summed over channels, what a viewer sees highlighted first. Black
baseline, predicted class, the first ``map_images`` validation images with an output gap of at
least 0.05 (section 1's images).
"""

from __future__ import annotations

import os

import numpy as np

from bench.common import SignatureModel, table
from bench.fixtures import Assets
from bench.ig_speed import MIN_GAP, TUTORIAL, ours_request, select_images
from bench.profiles import Profile
from bench.xrai_speed import top_area_iou


def equal_map_accuracy_steps(l1_by_steps: dict[int, float], target: float) -> tuple[int, int, float] | None:
    """The step count at which a fixed rule's median L1 distance falls to ``target``: the tried
    counts bracketing it and the count interpolated between them on log-log axes (the trapezoid's
    error falls as a power of the steps); None when the tried counts do not bracket it."""
    steps = sorted(l1_by_steps)
    for lo, hi in zip(steps, steps[1:]):
        a, b = l1_by_steps[lo], l1_by_steps[hi]
        if a > target >= b:
            slope = np.log(b / a) / np.log(hi / lo)
            return lo, hi, float(lo * (target / a) ** (1 / slope))  # b < a: the slope is negative
    if steps and l1_by_steps[steps[0]] <= target:
        return steps[0], steps[0], float(steps[0])  # the fewest tried already match: an upper bound
    return None


def run(profile: Profile, assets: Assets, figures_dir: str) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from explain import load_explainable_model
    from explain.integrated_gradients import IntegratedGradients
    from trainer.schema import XRAI_MIN_START

    ours = load_explainable_model(assets.model_dir)
    chosen = select_images(SignatureModel(assets.model_dir), assets.eval_pattern, profile.map_images)
    images, classes = chosen["images"], chosen["classes"]
    ig = IntegratedGradients()
    low, high = sorted(profile.ig_targets, reverse=True)[:2]
    default = {target: ours_request(profile, target) for target in (low, high)}
    default_low, default_high = (f"ours, default request to {t:.0%} (map_target {default[t]['map_target']})"
                                 for t in (low, high))
    contenders = {
        default_low: default[low],
        default_high: default[high],
        f"ours to {low:.0%}, completeness only (map_target null)": ours_request(profile, low, map_target=None),
        f"ours to {high:.0%}, completeness only (map_target null)": ours_request(profile, high, map_target=None),
        f"ours from {XRAI_MIN_START} points (XRAI's start) to {low:.0%}, completeness only":
            dict(ours_request(profile, low, map_target=None), step_count=XRAI_MIN_START),
        f"ours to {high:.0%} with map_target {profile.map_high_target}":
            ours_request(profile, high, map_target=profile.map_high_target),
    }
    fixed = {steps: f"{TUTORIAL} at {steps}" for steps in profile.map_fixed_steps}
    for steps, name in fixed.items():
        contenders[name] = dict(step_count=steps, quadrature="riemann_trapezoid")

    scores: dict[str, dict[str, list[float]]] = {k: {"points": [], "error": [], "l1": [], "iou": [], "estimate": []}
                                                 for k in contenders}
    references = []
    for i in range(len(images)):
        x, c = images[i:i + 1], classes[i:i + 1]
        b = np.zeros_like(x)
        converged = ig.GetMask(x, b, c, ours, step_count=profile.map_reference_start,
                               target_error=profile.map_reference_target,
                               max_step_count=profile.map_reference_steps, min_output_gap=MIN_GAP,
                               map_target=profile.map_reference_map_target)
        target_map = converged.attributions[0]
        references.append([i, int(converged.step_counts[0]), float(converged.approximation_errors[0]),
                           float(converged.map_errors[0]), str(converged.stop_reasons[0])])
        print(f"[ig_maps] image {i + 1}/{len(images)}: converged map at {converged.step_counts[0]} points, "
              f"error {converged.approximation_errors[0]:.4f}", flush=True)
        norm = float(np.abs(target_map).sum())
        for name, kw in contenders.items():
            out = ig.GetMask(x, b, c, ours, min_output_gap=MIN_GAP, **kw)
            attr = out.attributions[0]
            s = scores[name]
            s["points"].append(int(out.step_counts[0]))
            s["error"].append(float(out.approximation_errors[0]))
            s["l1"].append(float(np.abs(attr - target_map).sum() / max(norm, 1e-12)))
            s["iou"].append(top_area_iou(np.abs(attr).sum(-1), np.abs(target_map).sum(-1), 0.1))
            s["estimate"].append(float(out.map_errors[0]) if len(out.map_errors) else float("nan"))

    rows = [[name, float(np.median(s["points"])), float(np.median(s["error"])), float(np.max(s["error"])),
             float(np.median(s["l1"])), float(np.max(s["l1"])), float(np.median(s["iou"])), float(np.min(s["iou"])),
             float(np.median(s["estimate"])), float(np.max(s["estimate"]))]
            for name, s in scores.items()]

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for name, s in scores.items():
        ax.scatter(s["points"], s["l1"], label=name, s=22)
    ax.set_xscale("log")
    ax.set_xlabel("grid points per path (gradient evaluations)")
    ax.set_ylabel("L1 distance to the converged map (relative)")
    ax.set_title("IG maps: evaluations against distance to the converged integral")
    ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(figures_dir, exist_ok=True)
    path = os.path.join(figures_dir, "ig_maps.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)

    # equal map accuracy: where the tutorial's median L1 falls to ours' default's, bracketed by the
    # step counts tried and interpolated between them on log-log axes (error ~ steps^-p)
    ours_l1 = float(np.median(scores[default_low]["l1"]))
    ours_points = np.array(scores[default_low]["points"], float)
    fixed_l1 = {steps: float(np.median(scores[name]["l1"])) for steps, name in fixed.items()}
    equal_rows = [[default_low, float(np.median(ours_points)), float(np.mean(ours_points)), ours_l1]]
    equal_rows += [[name, steps, steps, fixed_l1[steps]] for steps, name in fixed.items()]
    headline = {f"IG map L1 to the converged integral, {default_low} (median)": ours_l1}
    for steps, name in fixed.items():
        headline[f"IG map L1 to the converged integral, {name} (median)"] = fixed_l1[steps]
    equal = equal_map_accuracy_steps(fixed_l1, ours_l1)
    key = f"IG evaluations at equal map accuracy (median L1): {TUTORIAL} steps / ours' default, median (mean) points"
    if equal is None:
        headline[key] = f"not bracketed by the steps tried ({sorted(fixed)})"
    else:
        lo, hi, n = equal
        headline[key] = (f"{n:.0f} (between {lo} and {hi}) / {np.median(ours_points):g} ({np.mean(ours_points):.1f}) "
                         f"= {n / np.median(ours_points):.2f}x ({n / np.mean(ours_points):.2f}x)")
    raw_equal = None if equal is None else {"bracket": [equal[0], equal[1]], "steps": equal[2]}
    return {
        "title": "1b. Integrated Gradients maps at equal approximation error",
        "description": (__doc__.split("\n\n", 1)[1]
                        + f" Converged maps: from {profile.map_reference_start} points to error "
                          f"{profile.map_reference_target} and estimated map error "
                          f"{profile.map_reference_map_target}, at most {profile.map_reference_steps} evaluations."),
        "tables": [table("Distance of each map to the converged integral",
                         ["attribution", "median points", "median error", "worst error", "median L1",
                          "worst L1", "median IoU top 10%", "worst IoU top 10%", "median estimated L1",
                          "worst estimated L1"], rows),
                   table("Equal map accuracy: the tutorial's steps against ours' default request (grid points "
                         "are gradient evaluations; section 1 has the cost of one)",
                         ["attribution", "median points", "mean points", "median L1"], equal_rows),
                   table("The converged maps", ["image", "points", "error", "estimated map L1", "stop reason"],
                         references)],
        "figures": [path],
        "headline": headline,
        "raw": {"scores": scores, "references": references, "equal_map_accuracy": raw_equal},
    }
