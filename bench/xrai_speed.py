"""2. XRAI per image: ours (``explain_images`` with the default XRAI request: IG from black and
white baselines, refined to approximation error 0.05 and its segments' mean attributions to the
default ``map_target``, batched) vs ``saliency.XRAI`` with its
defaults (100 Riemann steps per baseline, one image per model call), and how well our most
important regions agree with an ACCURATE ``saliency.XRAI``: one run at the smallest step count of
a ladder (100, 200, 400) at which its own IG error, measured from the completeness of its
integrated gradients for both its baselines, is <= 0.05 on the median image.

Agreement is the intersection over union of the top-k% area of each map (the pixels a viewer
sees highlighted first), for k = 10 and 30, and the Spearman rank correlation of the two maps. A
second accurate reference integrates from black and white, the baselines of ours and of Vertex's
XRAI, so that overlap measures the attributions rather than the choice of baselines.
"""

from __future__ import annotations

import numpy as np

from bench.common import SignatureModel, alternate, load_eval_set, table
from bench.fixtures import Assets
from bench.profiles import Profile

TARGET = 0.05


def top_area_iou(a: np.ndarray, b: np.ndarray, fraction: float) -> float:
    """IoU of the ``fraction`` most important pixels of maps ``a`` and ``b`` (ties broken by rank)."""
    k = max(1, int(round(fraction * a.size)))
    top = lambda m: np.isin(np.arange(m.size), np.argsort(-m.ravel(), kind="stable")[:k])  # noqa: E731
    ta, tb = top(a), top(b)
    return float((ta & tb).sum() / max((ta | tb).sum(), 1))


def saliency_ig_error(output, image: np.ndarray, c: int, reference: SignatureModel) -> float:
    """The approximation error of ``saliency.XRAI``'s integrated gradients averaged over its
    baselines, as ours reports it (:func:`explain.integrated_gradients.averaged_error`): the mean
    attribution's sum against the input's output minus the baselines' mean output."""
    from explain.integrated_gradients import averaged_error

    baselines = np.stack(output.baselines)
    probs = reference.predict(np.concatenate([image[None], baselines]))[:, c]
    gaps = probs[0] - probs[1:]
    sums = np.array([np.sum(a, dtype=np.float64) for a in output.ig_attribution])
    return averaged_error(sums - gaps, gaps)


def run(profile: Profile, assets: Assets, figures_dir: str) -> dict:
    import saliency.core as saliency
    from scipy.stats import spearmanr

    from explain import explain_images, load_explainable_model
    from explain.parameters import DEFAULT_MAP_TARGET

    ours = load_explainable_model(assets.model_dir)
    reference = SignatureModel(assets.model_dir)
    data = load_eval_set(assets.eval_pattern, profile.xrai_images)
    classes = reference.predict(data.images).argmax(axis=1)
    call = reference.saliency_call()
    xrai = saliency.XRAI()
    default_steps = profile.xrai_reference_steps or saliency.XRAIParameters().steps

    def parameters(steps: int, **kw):
        p = saliency.XRAIParameters(steps=steps, return_ig_attributions=True)
        for k, v in kw.items():
            setattr(p, k, v)
        return p

    reference_name = ("saliency.XRAI (defaults)" if profile.xrai_reference_steps is None else
                      f"saliency.XRAI (steps={default_steps})")
    ours_name = f"ours (explain_images, XRAI default request, step_count={profile.xrai_steps})"
    seconds: dict[str, list[float]] = {ours_name: [], reference_name: []}
    ours_maps, ours_errors, default_maps, default_errors = [], [], [], []
    for i, image in enumerate(data.images):
        c = int(classes[i])
        got = {}

        def ours_fn(image=image, c=c):
            cap = {} if profile.name == "full" else {"max_step_count": profile.ig_max_steps}  # quick: tiny
            request = {"xrai_attribution": {"step_count": profile.xrai_steps, **cap}, "output_indices": [c]}
            attribution = explain_images(ours, image[None], request, return_raw=True)[0]["attributions"][0]
            got["ours"] = (np.asarray(next(iter(attribution["featureAttributions"].values()))["raw"], np.float32),
                           float(attribution["approximationError"]))

        def saliency_fn(image=image, c=c):
            # return_ig_attributions only hands back what it computed anyway (to measure its error)
            got["saliency"] = xrai.GetMaskWithDetails(image, call, call_model_args={"class_index": c},
                                                      extra_parameters=parameters(default_steps))

        print(f"[xrai_speed] image {i + 1}/{len(data.images)}", flush=True)
        timed = alternate({ours_name: ours_fn, reference_name: saliency_fn}, repeats=1, warmup=1 if i == 0 else 0)
        for k, t in timed.items():
            seconds[k].extend(t.seconds)
        ours_maps.append(got["ours"][0])
        ours_errors.append(got["ours"][1])
        default_maps.append(np.asarray(got["saliency"].attribution_mask, np.float32))
        default_errors.append(saliency_ig_error(got["saliency"], image, c, reference))

    def accurate_reference(black_and_white: bool) -> tuple[int, bool, dict]:
        """The first step count whose median IG error is <= TARGET (its own min/max baselines, or
        black and white, the baselines of ours and of Vertex's XRAI)."""
        tried = {}
        for steps in profile.xrai_accurate_ladder:
            if steps == default_steps and not black_and_white:
                maps, errors = default_maps, default_errors
            else:
                print(f"[xrai_speed] accurate reference: saliency.XRAI at {steps} steps"
                      + (", black and white baselines" if black_and_white else ""), flush=True)
                maps, errors = [], []
                for image, c in zip(data.images, classes):
                    baselines = [np.zeros_like(image), np.ones_like(image)] if black_and_white else None
                    out = xrai.GetMaskWithDetails(image, call, call_model_args={"class_index": int(c)},
                                                  baselines=baselines, extra_parameters=parameters(steps),
                                                  batch_size=32)
                    maps.append(np.asarray(out.attribution_mask, np.float32))
                    errors.append(saliency_ig_error(out, image, int(c), reference))
            tried[steps] = (maps, errors)
            if np.median(errors) <= TARGET:
                return steps, True, tried
        return max(tried), False, tried

    accurate, accurate_met, tried = accurate_reference(black_and_white=False)
    accurate_maps, accurate_errors = tried[accurate]
    same_steps, same_met, same_tried = accurate_reference(black_and_white=True)
    same_maps = same_tried[same_steps][0]

    agreement = []
    for i in range(len(data.images)):
        a, b = ours_maps[i], accurate_maps[i]
        agreement.append([i, top_area_iou(a, b, 0.1), top_area_iou(a, b, 0.3),
                          float(spearmanr(a.ravel(), b.ravel()).statistic),
                          top_area_iou(default_maps[i], b, 0.1), top_area_iou(a, same_maps[i], 0.1),
                          top_area_iou(a, same_maps[i], 0.3)])
    ag = np.array(agreement)[:, 1:]
    ours_s, ref_s = (float(np.median(v)) for v in seconds.values())
    rows = [[name, float(np.median(v)), float(np.max(v)), len(v)] for name, v in seconds.items()]
    error_rows = [[ours_name, float(np.median(ours_errors)), float(np.max(ours_errors))],
                  [reference_name, float(np.median(default_errors)), float(np.max(default_errors))]]
    error_rows += [[f"saliency.XRAI at {s} steps (batch 32, untimed)", float(np.median(e)), float(np.max(e))]
                   for s, (_, e) in tried.items() if s != default_steps]
    error_rows += [[f"saliency.XRAI at {s} steps, black and white baselines (batch 32, untimed)",
                    float(np.median(e)), float(np.max(e))] for s, (_, e) in same_tried.items()]
    accurate_label = f"saliency.XRAI at {accurate} steps" + ("" if accurate_met else
                                                              f" (its median error still > {TARGET})")
    same_label = (f"saliency.XRAI at {same_steps} steps from black and white" + ("" if same_met else
                  f" (its median error still > {TARGET})"))
    return {
        "title": "2. XRAI per image",
        "description": (f"{len(data.images)} validation images, explaining the predicted class. Ours: "
                        f"`explain_images` with `xrai_attribution.step_count={profile.xrai_steps}` and nothing "
                        f"else (refined to approximation error {TARGET}, and each segment's mean attribution, "
                        f"which the regions are ranked by, to the default map_target {DEFAULT_MAP_TARGET}: IG "
                        f"from black and white baselines in batched calls, then the region ranking), including "
                        f"its Vertex-style JPEG rendering; "
                        f"its model is loaded once, as a server's, so the two paths' shared input is evaluated "
                        f"once and each baseline's gradient for a class is computed on first use and kept. "
                        f"Timed against `saliency.core.XRAI().GetMask` with its defaults ({default_steps} "
                        f"steps from the image's min and max value baselines, `batch_size=1`), alternating. "
                        f"Agreement against {accurate_label}: step counts tried "
                        f"{sorted(tried)}, the first whose median IG error is <= {TARGET}; and against "
                        f"{same_label} (the baselines ours and Vertex's XRAI use), chosen the same way, "
                        f"so that the overlap measures the attributions and not the choice of baselines."),
        "tables": [table("Seconds per image", ["implementation", "median s", "worst s", "runs"], rows),
                   table("IG approximation error behind each XRAI map (both baselines)",
                         ["implementation", "median error", "worst error"], error_rows),
                   table(f"Agreement with {accurate_label}",
                         ["image", "IoU top 10% (ours)", "IoU top 30% (ours)", "Spearman (ours)",
                          "IoU top 10% (saliency defaults)", "ours vs black-and-white reference: IoU top 10%",
                          "... IoU top 30%"],
                         agreement + [["median", *np.median(ag, axis=0).tolist()],
                                      ["worst", *ag.min(axis=0).tolist()]])],
        "headline": {"XRAI speed-up vs saliency.XRAI (its defaults)": ref_s / ours_s,
                     f"XRAI top-10% IoU with {accurate_label} (median)": float(np.median(ag[:, 0])),
                     f"XRAI top-10% IoU with {accurate_label} (worst)": float(np.min(ag[:, 0])),
                     f"XRAI top-10% IoU with {same_label} (median)": float(np.median(ag[:, 4])),
                     f"XRAI top-10% IoU with {same_label} (worst)": float(np.min(ag[:, 4]))},
        "raw": {"seconds": seconds, "agreement": agreement, "ours_errors": ours_errors,
                "default_errors": default_errors, "accurate_steps": accurate, "accurate_met": accurate_met,
                "tried": {str(s): e for s, (_, e) in tried.items()}, "same_baselines_steps": same_steps,
                "same_baselines_met": same_met, "same_baselines_tried": {str(s): e for s, (_, e) in same_tried.items()}},
    }
