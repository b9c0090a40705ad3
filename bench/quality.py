"""Explanation quality on the synthetic flowers, where the object's mask is known.

* Completeness: the approximation-error distribution over validation images, per quadrature
  rule (ours: the midpoint rule and Gauss-Legendre; ``saliency``'s Riemann sum; the tutorial's
  trapezoid) and steps.
* Localization, for IG, XRAI, SmoothGrad-IG and plain gradients: the share of positive
  attribution inside the flower's mask, and the pointing-game hit rate (the map's maximum lies
  within 15 pixels of the mask; Zhang et al. 2016). The mask's share of the image is what a map
  with no information would score.
* Performance Information Curves (Kapishnikov et al. 2019, the XRAI paper), from
  ``saliency.metrics``: AUC of the Softmax (SIC) and Accuracy (AIC) Information Curves,
  median-aggregated; a random map is the floor.
* Sanity check (Adebayo et al. 2018, https://arxiv.org/abs/1810.03292): every conv and dense
  kernel re-drawn at random (same scale), the attributions recomputed, and the Spearman rank
  correlation of |attribution| with the trained model's reported. A method that explains the
  model, rather than the image, must change: correlations near 1 would fail the check.
"""

from __future__ import annotations

import os

import numpy as np

from bench.common import SignatureModel, load_eval_set, table
from bench.fixtures import Assets
from bench.profiles import Profile
from explain.quadrature import DEFAULT_QUADRATURE

METHODS = ("IG", "XRAI", "SmoothGrad-IG", "Gradients")
RULES = {"ours (midpoint)": "riemann_middle", "ours (Gauss-Legendre)": "gauss_legendre",
         "saliency (Riemann)": "riemann_linspace", "tutorial (trapezoid)": "riemann_trapezoid"}
POINTING_TOLERANCE = 15
#: Output gap to black under which an image is set apart from the completeness averages.
MIN_GAP = 0.05


def attribution_maps(model_dir: str, images: np.ndarray, classes: np.ndarray, profile: Profile,
                     black_ig: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """``[n, H, W]`` maps of every method (channels summed; XRAI's region gains)."""
    from explain import explain_images, load_explainable_model
    from explain.integrated_gradients import IntegratedGradients
    from explain.xrai import XRAI, segment

    model = load_explainable_model(model_dir)
    ig = IntegratedGradients()
    if black_ig is None:
        black_ig = ig.GetMask(images, np.zeros_like(images), classes, model,
                              step_count=profile.quality_ig_steps).attributions
    white_ig = ig.GetMask(images, np.ones_like(images), classes, model,
                          step_count=profile.quality_ig_steps).attributions
    xrai = XRAI()
    xrai_maps = np.stack([xrai.GetMask(x, (b + w) / 2, segment(x))[0] for x, b, w in zip(images, black_ig, white_ig)])
    smooth = []
    for x, c in zip(images, classes):
        params = {"integrated_gradients_attribution": {
            "step_count": profile.smoothgrad_steps, "seed": profile.seed, "target_error": None,
            "smooth_grad_config": {"noise_sigma": profile.smoothgrad_sigma,
                                   "noisy_sample_count": profile.smoothgrad_samples}},
            "output_indices": [int(c)]}
        raw = explain_images(model, x[None], params, return_raw=True)[0]["attributions"][0]
        smooth.append(np.asarray(next(iter(raw["featureAttributions"].values()))["raw"], np.float32))
    signature = SignatureModel(model_dir)
    grads = np.concatenate([signature.gradients(x[None], int(c)) for x, c in zip(images, classes)])
    return {"IG": black_ig.sum(-1), "XRAI": xrai_maps, "SmoothGrad-IG": np.stack(smooth).sum(-1),
            "Gradients": grads.sum(-1)}


def localization(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image: share of positive attribution inside the mask; pointing-game hit (0/1)."""
    from scipy.ndimage import distance_transform_edt

    shares, hits = [], []
    for m, mask in zip(maps, masks):
        positive = np.maximum(m, 0)
        shares.append(float((positive * mask).sum() / max(positive.sum(), 1e-12)))
        y, x = np.unravel_index(np.argmax(m), m.shape)
        hits.append(float(distance_transform_edt(~mask)[y, x] <= POINTING_TOLERANCE))
    return np.array(shares), np.array(hits)


def _pic_skip_reason(message: str, metric: str) -> str:
    """``saliency.metrics.pic`` skips an image for one of three reasons; name it in a few words."""
    if "min_pred_value" in message:
        return "original scored below 0.5"
    if "entropy" in message:
        return "blurred image not simpler (entropy)"
    if metric == "AIC":
        return "fully blurred image still classified correctly"
    return "fully blurred image scored as high"


def pic_scores(images: np.ndarray, maps: np.ndarray, classes: np.ndarray, model: SignatureModel,
               thresholds: tuple[float, ...], seed: int) -> dict:
    """SIC and AIC (AUC of the median-aggregated curves) and the curves, via ``saliency.metrics``."""
    from saliency.metrics import pic

    out = {}
    for metric in ("SIC", "AIC"):
        results, reasons = [], {}
        for img, m, c in zip(images, maps, classes):
            np.random.seed(seed)  # pic.generate_random_mask draws from NumPy's global generator
            random_mask = pic.generate_random_mask(*img.shape[:2], fraction=0.01)
            img8 = np.round(img * 255).astype(np.uint8)

            def pred(batch, c=int(c)):
                probs = model.predict(np.asarray(batch, np.float32) / 255.0)
                return probs[:, c] if metric == "SIC" else (probs.argmax(axis=1) == c).astype(np.float32)

            try:
                results.append(pic.compute_pic_metric(img8, m, random_mask, pred, list(thresholds),
                                                      min_pred_value=0.5, keep_monotonous=True,
                                                      num_data_points=100))
            except pic.ComputePicMetricError as exc:
                reason = _pic_skip_reason(str(exc), metric)
                reasons[reason] = reasons.get(reason, 0) + 1
        out[metric] = {"auc": float("nan"), "x": [], "y": [], "images": len(results),
                       "skipped": sum(reasons.values()), "skip_reasons": reasons}
        if results:
            agg = pic.aggregate_individual_pic_results(results, method="median")
            out[metric].update(auc=float(agg.auc), x=list(agg.curve_x), y=list(agg.curve_y))
    return out


def randomized_model(assets: Assets, seed: int) -> str:
    """Export the trained model with every conv/dense kernel re-drawn: N(0, std of the trained kernel)."""
    from trainer.export import export_model, load_keras_model
    from trainer.schema import CLASSES

    directory = os.path.join(os.path.dirname(assets.model_dir), "randomized")
    if os.path.exists(os.path.join(directory, "saved_model.pb")):
        return directory
    model = load_keras_model(assets.keras_model_dir)
    rng = np.random.default_rng(seed)
    count = 0
    for var in model.variables:
        if "kernel" in var.name:
            value = var.numpy()
            var.assign(rng.normal(0, value.std() or 1e-3, value.shape).astype(value.dtype))
            count += 1
    if not count:
        raise RuntimeError(f"{assets.keras_model_dir}: found no kernels to randomize")
    export_model(model, directory, CLASSES, verbose=False)
    return directory


def _figures(figures_dir: str, data, maps, completeness, pics) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(9, 4))
    labels, values = [], []
    for name, by_steps in completeness.items():
        for steps, errors in by_steps.items():
            labels.append(f"{name.split()[0]}\n{steps}")
            values.append(np.maximum(errors, 1e-6))
    ax.boxplot(values)
    ax.set_xticks(range(1, len(labels) + 1), labels, fontsize=7)
    ax.set_yscale("log")
    ax.axhline(0.05, color="r", ls="--", lw=1, label="5% (Vertex's advice)")
    ax.axhline(0.01, color="g", ls="--", lw=1, label="1%")
    ax.set_ylabel("approximation error")
    ax.set_title("Completeness error over validation images, by rule and steps")
    ax.legend()
    fig.tight_layout()
    paths.append(os.path.join(figures_dir, "completeness.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("SIC", "AIC")):
        for name, result in pics.items():
            if result[metric]["x"]:
                ax.plot(result[metric]["x"], result[metric]["y"], label=f"{name} ({result[metric]['auc']:.3f})")
        ax.set_title(f"{metric} (median curve, AUC)")
        ax.set_xlabel("normalized estimation of entropy")
        ax.set_ylabel("normalized " + ("softmax" if metric == "SIC" else "accuracy"))
        if any(result[metric]["x"] for result in pics.values()):
            ax.legend(fontsize=8)
        else:  # say why the panel is empty instead of leaving a blank plot
            reasons = sorted({k for result in pics.values() for k in result[metric]["skip_reasons"]})
            ax.text(0.5, 0.5, "undefined: every image was skipped\n(" + "; ".join(reasons) + ")",
                    ha="center", va="center", wrap=True, fontsize=9, transform=ax.transAxes)
    fig.tight_layout()
    paths.append(os.path.join(figures_dir, "pic_curves.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    n = min(3, len(data.images))
    fig, axes = plt.subplots(n, 2 + len(METHODS), figsize=(2.2 * (2 + len(METHODS)), 2.3 * n), squeeze=False)
    for i in range(n):
        axes[i, 0].imshow(data.images[i])
        axes[i, 1].imshow(data.masks[i], cmap="gray")
        for j, name in enumerate(METHODS):
            m = maps[name][i]
            axes[i, 2 + j].imshow(np.abs(m) if name != "XRAI" else m, cmap="inferno")
        for j, title in enumerate(["image", "mask", *METHODS]):
            axes[0, j].set_title(title, fontsize=9)
    for ax in axes.ravel():
        ax.axis("off")
    fig.tight_layout()
    paths.append(os.path.join(figures_dir, "attribution_examples.png"))
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)
    return paths


def run(profile: Profile, assets: Assets, figures_dir: str) -> dict:
    from scipy.stats import spearmanr

    from explain import load_explainable_model
    from explain.integrated_gradients import IntegratedGradients

    data = load_eval_set(assets.eval_pattern, profile.quality_images)
    signature = SignatureModel(assets.model_dir)
    classes = signature.predict(data.images).argmax(axis=1).astype(np.int32)
    ours = load_explainable_model(assets.model_dir)
    black = np.zeros_like(data.images)

    print("[quality] completeness", flush=True)
    completeness: dict[str, dict[int, list[float]]] = {}
    black_ig = None
    for name, rule in RULES.items():
        for steps in profile.quality_steps:
            out = IntegratedGradients().GetMask(data.images, black, classes, ours, step_count=steps, quadrature=rule)
            completeness.setdefault(name, {})[steps] = [float(e) for e in out.approximation_errors]
            if rule == DEFAULT_QUADRATURE and steps == profile.quality_ig_steps:
                black_ig = out.attributions
    # images whose black baseline scores like the input are set apart (Vertex's error divides by the gap)
    gaps = np.abs(signature.predict(data.images)[np.arange(len(classes)), classes]
                  - signature.predict(black)[np.arange(len(classes)), classes])
    kept = gaps >= MIN_GAP
    completeness_rows = [[name, steps, float(np.median(np.array(e)[kept])), float(np.percentile(np.array(e)[kept], 90)),
                          float(np.max(np.array(e)[kept])), float(np.mean(np.array(e)[kept] <= 0.05))]
                         for name, by_steps in completeness.items() for steps, e in by_steps.items()] if kept.any() else []

    print("[quality] attribution maps", flush=True)
    maps = attribution_maps(assets.model_dir, data.images, classes, profile, black_ig)
    mask_share = data.masks.reshape(len(data.masks), -1).mean(axis=1)
    loc_rows = []
    localization_raw = {}
    for name in METHODS:
        shares, hits = localization(maps[name], data.masks)
        localization_raw[name] = {"share": shares.tolist(), "hit": hits.tolist()}
        loc_rows.append([name, float(np.mean(shares)), float(np.mean(hits))])
    rng = np.random.default_rng(profile.seed)
    random_maps = rng.uniform(-1, 1, maps["IG"].shape).astype(np.float32)
    r_shares, r_hits = localization(random_maps, data.masks)
    loc_rows.append(["random map (reference)", float(np.mean(r_shares)), float(np.mean(r_hits))])

    print("[quality] PIC", flush=True)
    n_pic = min(profile.pic_images, len(data.images))
    pics = {name: pic_scores(data.images[:n_pic], maps[name][:n_pic], classes[:n_pic], signature,
                             profile.pic_thresholds, profile.seed) for name in METHODS}
    pics["random map"] = pic_scores(data.images[:n_pic], random_maps[:n_pic], classes[:n_pic], signature,
                                    profile.pic_thresholds, profile.seed)
    pic_rows = [[name] + [x for metric in ("SIC", "AIC") for x in (r[metric]["auc"], r[metric]["images"],
                                                                   r[metric]["skipped"])]
                + ["; ".join(sorted({f"{m}: {k} ({n})" for m in ("SIC", "AIC")
                                     for k, n in r[m]["skip_reasons"].items()})) or "-"]
                for name, r in pics.items()]

    print("[quality] sanity check (randomized weights)", flush=True)
    n_sanity = min(profile.sanity_images, len(data.images))
    random_dir = randomized_model(assets, profile.seed)
    random_maps_by_method = attribution_maps(random_dir, data.images[:n_sanity], classes[:n_sanity], profile)
    sanity_rows, sanity_raw = [], {}
    for name in METHODS:
        rhos = [float(spearmanr(np.abs(a).ravel(), np.abs(b).ravel()).statistic)
                for a, b in zip(maps[name][:n_sanity], random_maps_by_method[name])]
        sanity_raw[name] = rhos
        sanity_rows.append([name, float(np.median(rhos)), float(np.max(rhos)), n_sanity])

    figures = _figures(figures_dir, data, maps, completeness, pics)
    ig_share = next(r[1] for r in loc_rows if r[0] == "IG")
    xrai_share = next(r[1] for r in loc_rows if r[0] == "XRAI")
    return {
        "title": "Explanation quality",
        "description": (f"{len(data.images)} synthetic validation images with known flower masks, explaining the "
                        f"class the trained model predicts. Completeness: fixed steps of each rule, black "
                        f"baseline, images with an output gap under {MIN_GAP} set apart. IG: ours, {profile.quality_ig_steps} midpoint-rule "
                        f"steps, black baseline. XRAI: ours, from IG averaged over black and white baselines "
                        f"({profile.quality_ig_steps} midpoint steps each). "
                        f"SmoothGrad-IG: {profile.smoothgrad_samples} noisy samples (sigma "
                        f"{profile.smoothgrad_sigma}) x {profile.smoothgrad_steps} steps. Gradients: d "
                        f"probability / d pixels. PIC on the first {n_pic} images, thresholds "
                        f"{list(profile.pic_thresholds)}; PIC skips an image whose fully blurred version (1% of "
                        f"pixels kept) the model already scores as high as the original (for AIC: still "
                        f"classifies correctly), so an AUC of n/a means no image left a curve to measure. Maps "
                        f"are summed over colour channels. The mask covers {np.mean(mask_share):.1%} of an image "
                        f"on average."),
        "tables": [
            table(f"Completeness: approximation error over the {int(kept.sum())} images whose output gap to black is "
                  f">= {MIN_GAP} ({int((~kept).sum())} set apart)",
                  ["rule", "steps", "median", "90th percentile", "max", "share <= 5%"],
                  completeness_rows or [["(every image set apart)", "-", "-", "-", "-", "-"]]),
            table("Localization on the flower mask", ["method", "positive attribution inside mask",
                                                      "pointing-game hit rate"], loc_rows),
            table("Performance Information Curves (saliency.metrics PIC; higher is better)",
                  ["method", "SIC AUC", "SIC images", "SIC skipped", "AIC AUC", "AIC images", "AIC skipped",
                   "why skipped"], pic_rows),
            table("Sanity check: Spearman rank correlation of |attribution|, trained vs randomized weights "
                  "(low = passes)", ["method", "median", "max", "images"], sanity_rows),
        ],
        "figures": figures,
        "headline": {"IG: positive attribution inside the mask": ig_share,
                     "XRAI: positive attribution inside the mask": xrai_share,
                     "mask share of the image (chance level)": float(np.mean(mask_share))},
        "raw": {"completeness": completeness, "output_gaps": gaps.tolist(), "localization": localization_raw, "mask_share": mask_share.tolist(),
                "pic": {k: {m: {key: v[m][key] for key in ("auc", "images", "skipped", "skip_reasons")} for m in v}
                        for k, v in pics.items()},
                "sanity": sanity_raw},
    }
