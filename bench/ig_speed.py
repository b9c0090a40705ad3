"""1. Integrated Gradients per image at equal approximation error: ours vs ``saliency`` vs the
tutorial, plus the floor (evaluations x one batched forward+backward).

Speed at a fixed step count says little, since the rules do not reach the same accuracy with the
same steps. So for each approximation-error target (Vertex's completeness error) the steps each
rule needs are found first, on every benchmark image, and each implementation is then timed at
its own step count. The search runs every rule through our batched kernel (the quadrature rule
is the only thing that differs: ``riemann_linspace`` is exactly ``saliency``'s sum and
``riemann_trapezoid`` the tutorial's); the timed runs then use the real implementations, and the
error each timed run actually reached is reported beside its time.
"""

from __future__ import annotations

import numpy as np

from bench.common import (SignatureModel, alternate, completeness_error, forward_backward_seconds, load_eval_set,
                          table)
from bench.fixtures import Assets
from bench.profiles import Profile

#: contender -> our quadrature rule that reproduces it in the step search
RULES = {"ours (midpoint, default)": "riemann_middle", "ours (Gauss-Legendre)": "gauss_legendre",
         "saliency IntegratedGradients": "riemann_linspace", "tutorial (trapezoid)": "riemann_trapezoid"}
#: our fixed-step contenders: searched on the finer ladder
OURS_FIXED = ("ours (midpoint, default)", "ours (Gauss-Legendre)")


def _ladder(profile: Profile, name: str) -> tuple[int, ...]:
    return profile.gauss_ladder if name in OURS_FIXED else profile.riemann_ladder


def steps_needed(model, images, baselines, classes, rule: str, ladder: tuple[int, ...],
                 targets: tuple[float, ...]) -> tuple[dict[float, int | None], dict[int, list[float]]]:
    """Smallest step count in ``ladder`` whose worst error over the images is <= each target."""
    from explain.integrated_gradients import IntegratedGradients

    needed: dict[float, int | None] = {t: None for t in targets}
    errors: dict[int, list[float]] = {}
    for steps in ladder:
        out = IntegratedGradients().GetMask(images, baselines, classes, model, step_count=steps, quadrature=rule)
        errors[steps] = [float(e) for e in out.approximation_errors]
        worst = max(errors[steps])
        for t in targets:
            if needed[t] is None and worst <= t:
                needed[t] = steps
        if all(v is not None for v in needed.values()):
            break
    return needed, errors


def run(profile: Profile, assets: Assets, figures_dir: str) -> dict:
    import saliency.core as saliency

    from bench.reference_ig import make_integrated_gradients
    from explain import load_explainable_model
    from explain.integrated_gradients import IntegratedGradients

    ours = load_explainable_model(assets.model_dir)
    reference = SignatureModel(assets.model_dir)
    data = load_eval_set(assets.eval_pattern, profile.ig_images)
    images = data.images
    baselines = np.zeros_like(images)
    classes = reference.predict(images).argmax(axis=1).astype(np.int32)
    f_x = reference.predict(images)[np.arange(len(images)), classes]
    f_b = reference.predict(baselines)[np.arange(len(images)), classes]

    search = {}
    for name, rule in RULES.items():
        print(f"[ig_speed] step search: {name}", flush=True)
        search[name] = steps_needed(ours, images, baselines, classes, rule, _ladder(profile, name),
                                    profile.ig_targets)

    tutorial_ig = make_integrated_gradients(reference)
    saliency_ig = saliency.IntegratedGradients()
    call = reference.saliency_call()
    ig = IntegratedGradients()
    per_eval = forward_backward_seconds(reference, images[0])

    def contenders(i: int, steps: dict[str, int], target: float) -> dict:
        x, b, c = images[i:i + 1], baselines[i:i + 1], classes[i:i + 1]
        return {
            **{name: (lambda name=name: ig.GetMask(x, b, c, ours, step_count=steps[name], quadrature=RULES[name]
                                                   ).attributions[0]) for name in OURS_FIXED},
            "ours (adaptive)": lambda: ig.GetMask(x, b, c, ours, step_count=min(profile.gauss_ladder),
                                                  target_error=target, max_step_count=max(profile.riemann_ladder)
                                                  ).attributions[0],
            "saliency IntegratedGradients": lambda: saliency_ig.GetMask(
                x[0], call, {"class_index": int(c[0])}, x_baseline=b[0],
                x_steps=steps["saliency IntegratedGradients"], batch_size=32),
            "tutorial (trapezoid)": lambda: tutorial_ig(b[0], x[0], int(c[0]),
                                                        m_steps=steps["tutorial (trapezoid)"] - 1,
                                                        batch_size=32).numpy(),
        }

    rows, raw = [], {"search": {k: {"needed": {str(t): s for t, s in v[0].items()},
                                    "errors": {str(n): e for n, e in v[1].items()}} for k, v in search.items()},
                     "per_eval_seconds": per_eval, "timings": {}}
    timed_images = range(min(2, len(images)))
    for target in profile.ig_targets:
        steps, capped = {}, {}
        for name in RULES:
            found = search[name][0][target]
            steps[name], capped[name] = (found, False) if found is not None else (max(_ladder(profile, name)), True)
        seconds: dict[str, list[float]] = {}
        errors: dict[str, list[float]] = {}
        for i in timed_images:
            fns = contenders(i, steps, target)
            results = {}
            # warm-up (tracing: the tutorial's tf.function retraces for each new step count) on the first image
            timed = alternate({k: (lambda k=k, f=f: results.__setitem__(k, f())) for k, f in fns.items()},
                              repeats=profile.ig_repeats, warmup=1 if i == 0 else 0)
            for k, t in timed.items():
                seconds.setdefault(k, []).extend(t.seconds)
                errors.setdefault(k, []).append(float(completeness_error(results[k][None], f_x[i:i + 1],
                                                                          f_b[i:i + 1])[0]))
        adaptive = ig.GetMask(images, baselines, classes, ours, step_count=min(profile.gauss_ladder),
                              target_error=target, max_step_count=max(profile.riemann_ladder))
        evaluations = {**steps, "ours (adaptive)": float(np.mean(adaptive.step_counts))}
        for name in seconds:
            label = (f"> {evaluations[name]}" if capped.get(name) else f"{evaluations[name]:g}")
            rows.append([f"<= {target:.0%}", name, label, max(errors[name]), float(np.median(seconds[name])),
                         evaluations[name] * per_eval])
        raw["timings"][str(target)] = {"seconds": seconds, "errors": errors, "evaluations": evaluations,
                                       "capped": capped}
    headline = {}
    for t in profile.ig_targets:
        timed = raw["timings"][str(t)]
        # ours = the faster of our two modes among those whose timed runs met the target on every image
        met = [k for k in (*OURS_FIXED, "ours (adaptive)") if max(timed["errors"][k]) <= t]
        if not met:
            continue
        ours_s = min(float(np.median(timed["seconds"][k])) for k in met)
        for ref in ("saliency IntegratedGradients", "tutorial (trapezoid)"):
            missed = max(timed["errors"][ref]) > t  # the reference missed the target: a lower bound
            headline[f"IG speed-up vs {ref.split()[0]} at <= {t:.0%} error"
                     + (" (lower bound: it missed the target at its largest step count)" if missed else "")] = \
                float(np.median(timed["seconds"][ref])) / ours_s
    return {
        "title": "1. Integrated Gradients per image at equal approximation error",
        "description": (f"{len(images)} validation images (192x192, black baseline, explaining the predicted class); "
                        f"steps searched on ladders {list(profile.riemann_ladder)} (Riemann rules) and "
                        f"{list(profile.gauss_ladder)} (ours) until the worst image meets the target; "
                        f"times are medians over {len(list(timed_images))} image(s) x {profile.ig_repeats} "
                        f"alternating repeat(s), one image per call. The floor is the evaluations times one "
                        f"forward+backward pass per image in batches of 32 ({per_eval * 1000:.1f} ms)."),
        "tables": [table("Steps (gradient evaluations per image) and seconds per image",
                         ["target error", "implementation", "evaluations", "worst error reached",
                          "seconds / image", "floor (s)"], rows),
                   table("Worst approximation error over the images, by rule and evaluations (step search)",
                         ["rule", "evaluations", "worst error", "median error"],
                         [[name, n, max(e), float(np.median(e))] for name, (_, errs) in search.items()
                          for n, e in errs.items()])],
        "headline": headline,
        "raw": raw,
    }
