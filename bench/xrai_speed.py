"""2. XRAI per image: ours (``explain_images``, batched IG for both baselines) vs
``saliency.XRAI`` with its defaults (100 Riemann steps per baseline, one image per model call),
and how much their most important regions agree.

Agreement is the intersection over union of the top-k% area of each map (the pixels a viewer
sees highlighted first), for k = 10 and 30, and the Spearman rank correlation of the two maps.
"""

from __future__ import annotations

import numpy as np

from bench.common import SignatureModel, alternate, load_eval_set, table
from bench.fixtures import Assets
from bench.profiles import Profile


def top_area_iou(a: np.ndarray, b: np.ndarray, fraction: float) -> float:
    """IoU of the ``fraction`` most important pixels of maps ``a`` and ``b`` (ties broken by rank)."""
    k = max(1, int(round(fraction * a.size)))
    top = lambda m: np.isin(np.arange(m.size), np.argsort(-m.ravel(), kind="stable")[:k])  # noqa: E731
    ta, tb = top(a), top(b)
    return float((ta & tb).sum() / max((ta | tb).sum(), 1))


def run(profile: Profile, assets: Assets, figures_dir: str) -> dict:
    import saliency.core as saliency
    from scipy.stats import spearmanr

    from explain import explain_images, load_explainable_model

    ours = load_explainable_model(assets.model_dir)
    reference = SignatureModel(assets.model_dir)
    data = load_eval_set(assets.eval_pattern, profile.xrai_images)
    classes = reference.predict(data.images).argmax(axis=1)
    parameters = {"xrai_attribution": {"step_count": profile.xrai_steps}, "output_indices": [0]}
    call = reference.saliency_call()
    xrai = saliency.XRAI()

    # the library's defaults, except in the quick smoke test, where 2 x 100 steps would dominate
    reference_parameters = saliency.XRAIParameters(steps=profile.xrai_reference_steps) \
        if profile.xrai_reference_steps else None
    reference_name = "saliency.XRAI (defaults)" if reference_parameters is None else \
        f"saliency.XRAI (steps={profile.xrai_reference_steps})"
    seconds: dict[str, list[float]] = {}
    rows, agreement = [], []
    for i, image in enumerate(data.images):
        maps = {}
        request = dict(parameters, output_indices=[int(classes[i])])

        def ours_fn(image=image, request=request):
            explanation = explain_images(ours, image[None], request, return_raw=True)[0]["attributions"][0]
            maps["ours"] = np.asarray(next(iter(explanation["featureAttributions"].values()))["raw"], np.float32)

        def saliency_fn(image=image, c=int(classes[i])):
            maps["saliency"] = xrai.GetMask(image, call, call_model_args={"class_index": c},
                                            extra_parameters=reference_parameters)

        if i == 0:  # trace both models' gradient functions outside the timings
            ours_fn()
            call(image[None], {"class_index": int(classes[i])})
        timed = alternate({"ours (explain_images, XRAI)": ours_fn, reference_name: saliency_fn},
                          repeats=1, warmup=0)
        for k, t in timed.items():
            seconds.setdefault(k, []).extend(t.seconds)
        iou10, iou30 = (top_area_iou(maps["ours"], maps["saliency"], f) for f in (0.1, 0.3))
        rho = float(spearmanr(maps["ours"].ravel(), maps["saliency"].ravel()).statistic)
        agreement.append([i, iou10, iou30, rho])
    ours_s, ref_s = (float(np.median(v)) for v in seconds.values())
    rows = [[name, float(np.median(v)), float(np.min(v)), len(v)] for name, v in seconds.items()]
    return {
        "title": "2. XRAI per image",
        "description": (f"{len(data.images)} validation images, explaining the predicted class. Ours: "
                        f"`explain_images` with `xrai_attribution.step_count={profile.xrai_steps}` "
                        f"(IG (midpoint rule) from black and white baselines in batched calls, then "
                        f"`saliency`'s region ranking), including its Vertex-style JPEG rendering. "
                        f"Reference: `saliency.core.XRAI().GetMask` with its defaults (IG with 100 steps from "
                        f"the image's min and max value baselines, `batch_size=1`)."),
        "tables": [table("Seconds per image", ["implementation", "median s", "min s", "runs"], rows),
                   table("Agreement of the two XRAI maps", ["image", "IoU top 10%", "IoU top 30%", "Spearman"],
                         agreement + [["median", *np.median(np.array(agreement)[:, 1:], axis=0).tolist()]])],
        "headline": {"XRAI speed-up vs saliency.XRAI": ref_s / ours_s,
                     "XRAI top-10% IoU with saliency.XRAI (median)": float(np.median([a[1] for a in agreement]))},
        "raw": {"seconds": seconds, "agreement": agreement},
    }
