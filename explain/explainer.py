"""``explain_images``: Vertex-shaped explanations for a batch of preprocessed images.

All paths of a request (images x explained classes x baselines x SmoothGrad samples) go to the IG
core together, so the model sees large batches whatever the request's shape. The result for each
image mirrors Vertex's ``Explanation``: a list of ``Attribution`` dicts in REST JSON (camelCase)
shape, plus the warnings Vertex's documentation would have a user act on.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from explain.integrated_gradients import (DEGENERATE, LIMIT, MIN_PANEL_WIDTH, RESOLUTION, IntegratedGradients,
                                          averaged_error)
from explain.model import ExplainableModel
from explain.parameters import (MAX_BASELINES, XRAI_METHOD, AttributionMethodConfig, ExplanationConfig,
                                ExplanationParametersError, parse_explanation_parameters, start_step_count)
from explain.paths import LINEAR, SCALE_SPACE, gaussian_blur
from explain.visualization import encode_jpeg_b64, parse_visualization, render_attribution
from explain.xrai import XRAI, region_means, segment

#: Vertex: "if the approximation error exceeds 5%, increase the step count".
MAX_APPROXIMATION_ERROR = 0.05
#: Vertex: if the output hardly differs between input and baseline, attributions say little.
MIN_OUTPUT_DELTA = 0.05
#: Sigma (pixels) of the ``blurred`` named baseline when no ``blur_baseline_config`` gives one.
DEFAULT_BLUR_SIGMA = 20.0
_METHOD_DEFAULT_BASELINES = {"integrated_gradients": ("black",), XRAI_METHOD: ("black", "white")}


class NonFiniteAttributionError(ValueError):
    """The model's output or gradient is NaN or infinite on an explained path: no attribution
    exists, and the request cannot fix it by itself (a server answers 500 with this message, after
    the path stopped at the first such point instead of spending its whole budget)."""


@dataclass(frozen=True)
class _Io:
    """Which metadata input and output are explained, and how outputs are named."""

    input_key: str
    input_metadata: Mapping[str, Any]
    output_key: str
    display_names: list[str]


def _io(metadata: Mapping[str, Any], labels: list[str]) -> _Io:
    inputs, outputs = metadata.get("inputs") or {}, metadata.get("outputs") or {}
    if not inputs or not outputs:
        raise ExplanationParametersError("explanation metadata needs 'inputs' and 'outputs'")
    input_key = next((k for k, v in inputs.items() if (v or {}).get("modality") == "image"), next(iter(inputs)))
    output_key = next(iter(outputs))
    output_md = outputs[output_key] or {}
    names = output_md.get("index_display_name_mapping", output_md.get("indexDisplayNameMapping")) or labels
    return _Io(input_key, inputs[input_key] or {}, output_key, [str(n) for n in names])


def _selected_outputs(probs: np.ndarray, config: ExplanationConfig) -> list[list[int]]:
    """The classes to explain for each image: ``output_indices``, else the ``top_k`` best."""
    num_classes = probs.shape[1]
    if config.output_indices is not None:
        bad = [i for i in config.output_indices if i >= num_classes]
        if bad:
            raise ExplanationParametersError(f"output_indices {bad} out of range: the model has {num_classes} outputs")
        return [list(config.output_indices) for _ in probs]
    k = num_classes if config.top_k == -1 else min(config.top_k, num_classes)
    return [list(np.argsort(-p, kind="stable")[:k]) for p in probs]


def _metadata_baselines(input_md: Mapping[str, Any], shape: tuple[int, ...], input_key: str) -> list[np.ndarray]:
    """Vertex ``input_baselines``: scalars broadcast to the input shape, or full-shape arrays."""
    raw = input_md.get("input_baselines", input_md.get("inputBaselines")) or []
    where = f"explanation metadata inputs.{input_key}.input_baselines"
    if not isinstance(raw, list):
        raise ExplanationParametersError(f"{where} must be a list of baselines (scalars or arrays), got {raw!r:.80}")
    if len(raw) > MAX_BASELINES:
        raise ExplanationParametersError(f"{where} lists {len(raw)} baselines; at most {MAX_BASELINES} are allowed")
    baselines = []
    for i, value in enumerate(raw):
        try:
            array = np.asarray(value, np.float32)
        except (TypeError, ValueError, OverflowError) as e:
            raise ExplanationParametersError(f"{where}[{i}] must be a number or a nested list of numbers "
                                             f"({type(e).__name__}: {str(e)[:80]})") from None
        if not np.isfinite(array).all():
            raise ExplanationParametersError(f"{where}[{i}] holds non-finite values")
        if array.ndim == len(shape) + 1 and array.shape[0] == 1:
            array = array[0]
        if array.ndim == 0:
            array = np.full(shape, array, np.float32)
        if array.shape != shape:
            raise ExplanationParametersError(f"explanation metadata inputs.{input_key}.input_baselines[{i}] has "
                                             f"shape {array.shape}; expected a scalar or {shape}")
        baselines.append(array)
    return baselines


def _baselines(image: np.ndarray, attribution: AttributionMethodConfig, metadata_baselines: list[np.ndarray],
               rng: np.random.Generator) -> list[np.ndarray]:
    """The linear-path baselines for one image, by precedence: blur config, named, metadata, default."""
    if attribution.blur_baseline is not None:
        return [gaussian_blur(image, attribution.blur_baseline.max_blur_sigma)]
    if attribution.baselines is None and metadata_baselines:
        return metadata_baselines
    named = attribution.baselines or _METHOD_DEFAULT_BASELINES[attribution.method]
    make = {"black": lambda: np.zeros_like(image), "white": lambda: np.ones_like(image),
            "random": lambda: rng.uniform(0, 1, image.shape).astype(np.float32),
            "blurred": lambda: gaussian_blur(image, DEFAULT_BLUR_SIGMA)}
    return [make[name]() for name in named]


def _figure(value: float) -> str:
    """A small number as a warning shows it: three decimals, or two significant digits under 0.001
    (a 1e-9 target missed at 2e-6 does not read as 0.000)."""
    return f"{value:.3f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2g}"


def _warnings(name: str, error: float, instance: float, baseline: float, reasons: np.ndarray,
              steps: np.ndarray, attribution: AttributionMethodConfig,
              map_errors: np.ndarray | None = None, explained: float | None = None,
              baseline_outputs: Sequence[float] = (), checked: float | None = None) -> list[str]:
    """What a user must know about one attribution, naming the cause and what to do.

    ``explained``: the mean output over the path ends the attribution explains (SmoothGrad's noisy
    samples; the input's ``instance`` without them); ``baseline_outputs``: each baseline's output
    when there are several (``baseline`` is their mean, as Vertex reports it); ``checked``: the
    attribution's sum against ``instance - baseline``, relative to it, as a user checks a response
    (with SmoothGrad it differs from ``error``, which is against the noisy samples' output)."""
    out = []
    explained = instance if explained is None else explained
    noisy = attribution.smooth_grad is not None
    scored = (f"SmoothGrad's noisy samples score {explained:.3f} on average (the input {instance:.3f})" if noisy
              else f"the input scores {instance:.3f}")
    scores = (f"the baselines {', '.join(f'{v:.3f}' for v in baseline_outputs)} ({baseline:.3f} on average)"
              if len(baseline_outputs) > 1 else f"the baseline {baseline:.3f}")
    # SmoothGrad: the share of the response's difference by which the noise moved the output
    shift = abs(explained - instance) / max(abs(instance - baseline), MIN_OUTPUT_DELTA) if noisy else 0.0
    # several baselines whose differences cancel in their mean (scoring on either side of the input)
    cancelling = len(baseline_outputs) > 1 and abs(explained - baseline) < 0.5 * float(
        np.mean(np.abs(explained - np.asarray(baseline_outputs, float))))
    if DEGENERATE in reasons:
        fix = ("lower noise_sigma: the noise changes the model's output" if noisy and abs(instance - baseline)
               >= MIN_OUTPUT_DELTA else "use another baseline (baseline: white, blurred or random, or "
               "input_baselines in the explanation metadata)")
        out.append(f"output {name!r}: {scored} and {scores}; a difference below {MIN_OUTPUT_DELTA} leaves almost "
                   f"nothing to attribute, so the attribution is unreliable and was not refined "
                   f"({int(steps.max())} steps); {fix}")
        return out
    small = abs(explained - baseline) < MIN_OUTPUT_DELTA  # the paths' differences cancel in their mean
    if small:
        held = (f"computed with {attribution.step_count} fixed steps" if not attribution.target_error else
                f"refined toward {attribution.target_error} of their mean difference until max_step_count "
                f"({attribution.max_step_count}) stopped them" if LIMIT in reasons else
                f"refined until the output jumps where no gradient sees it" if RESOLUTION in reasons else
                f"refined to within {attribution.target_error} of their mean difference "
                f"({int(steps.max())} gradient evaluations at most)")
        out.append(f"output {name!r}: {scored} and {scores}: the averaged paths' differences have opposite signs, "
                   f"so the averaged attribution sums to about {explained - baseline:+.3f} and approximationError "
                   f"({error:.3g}) is relative to that; the paths, each of a larger difference, were {held}; "
                   f"for an attribution whose sum can be checked, "
                   + ("use one baseline (baseline: black or white)" if len(baseline_outputs) > 1 else
                      "lower noise_sigma"))
    elif noisy and shift >= 0.005 and (error + shift if checked is None else checked) > MAX_APPROXIMATION_ERROR:
        sigma = attribution.smooth_grad.noise_sigma
        out.append(f"output {name!r}: {scored}, so the attribution explains the noisy samples: its sum differs "
                   f"from instanceOutputValue - baselineOutputValue"
                   + (f" by {checked:.3g} of it" if checked is not None else "")
                   + f" (approximationError, {error:.3g}, is against the samples' {explained:.3f}), which more "
                   f"steps do not change; lower noise_sigma ({'per feature' if sigma is None else sigma})"
                   + (f"; the input and {scores} differ by only {abs(instance - baseline):.3f}: use another "
                      f"baseline" if abs(instance - baseline) < MIN_OUTPUT_DELTA else ""))
    if attribution.map_target is not None and map_errors is not None and len(map_errors) \
            and float(np.max(map_errors)) > 1.01 * attribution.map_target:  # 1%: float32 recomputation
        judged = " (of its segments' mean attributions)" if attribution.method == XRAI_METHOD else ""
        out.append(f"output {name!r}: estimated map error{judged} {float(np.max(map_errors)):.3f} still exceeds map_target "
                   f"{attribution.map_target} after {int(steps.max())} gradient evaluations (max_step_count "
                   f"{attribution.max_step_count}); "
                   + ("the rest sits in the narrowest panels, where the first-order estimate over-rates steep "
                      "but smooth stretches" if RESOLUTION in reasons and LIMIT not in reasons else
                      "raise max_step_count")
                   + "; map_target: null asks for completeness alone")
    # Vertex's threshold, or the request's own target_error where it is stricter (a 1% request
    # that ends at 3% must say so too)
    limit = min(attribution.target_error or MAX_APPROXIMATION_ERROR, MAX_APPROXIMATION_ERROR)
    label = f"target_error {limit}" if limit < MAX_APPROXIMATION_ERROR else f"{limit}"
    if error <= limit or small:  # a sum of almost nothing: said above
        return out
    if LIMIT in reasons:
        out.append(f"output {name!r}: approximation error {_figure(error)} still exceeds {label} after "
                   f"{int(steps.max())} gradient evaluations (max_step_count {attribution.max_step_count}); "
                   + (f"{scores} score on either side of the input's {explained:.3f}, so the averaged attribution "
                      f"must sum to a small difference: one baseline asks less; or raise max_step_count"
                      if cancelling else "raise max_step_count, or use another baseline"))
    elif RESOLUTION in reasons:
        out.append(f"output {name!r}: approximation error {_figure(error)} still exceeds {label} "
                   f"after {int(steps.max())} gradient evaluations: the output jumps within "
                   f"1/{round(1 / (2 * MIN_PANEL_WIDTH))} "
                   f"of the path, where its gradient does not show it, so more steps will not help; use another "
                   f"baseline")
    elif attribution.target_error is None and DEGENERATE not in reasons and abs(instance - baseline) >= MIN_OUTPUT_DELTA:
        out.append(f"output {name!r}: approximation error {_figure(error)} exceeds {MAX_APPROXIMATION_ERROR} with "
                   f"{attribution.step_count} fixed steps; increase step_count, or remove target_error: null "
                   f"to refine the path until it is faithful")
    return out


def explain_images(model: ExplainableModel, images: np.ndarray, parameters: Mapping[str, Any] | ExplanationConfig,
                   metadata: Mapping[str, Any] | None = None, return_raw: bool = False,
                   probabilities: np.ndarray | None = None) -> list[dict[str, Any]]:
    """Explain each image (float32 ``[N, H, W, 3]``, as :meth:`ExplainableModel.preprocess` returns).

    Returns one ``{"attributions": [<Vertex Attribution JSON>, ...], "warnings": [str, ...]}`` per
    image; with ``return_raw`` each attribution's ``featureAttributions[<input>]["raw"]`` holds
    the attribution array as nested lists (IG ``[H, W, C]``; XRAI region gains ``[H, W]``).
    ``probabilities``: ``model.predict(images)`` when the caller already has it (a caller that
    returns predictions too), so no forward pass is run twice. Safe to call from several threads at once.
    """
    config = parse_explanation_parameters(parameters)
    attribution = config.attribution
    io = _io(metadata or model.metadata, model.labels)
    visualization = parse_visualization(io.input_metadata.get("visualization"), attribution.method)
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[1:] != model.image_shape:
        raise ValueError(f"images must be [N, {', '.join(map(str, model.image_shape))}], got {images.shape}")
    if not len(images):
        return []
    probs = model.predict(images) if probabilities is None else np.asarray(probabilities, np.float32)
    if probs.ndim != 2 or probs.shape[0] != len(images):
        raise ValueError(f"probabilities must be [{len(images)}, classes], got {probs.shape}")
    selected = _selected_outputs(probs, config)
    if len(io.display_names) != probs.shape[1]:
        raise ExplanationParametersError(f"explanation metadata outputs.{io.output_key}.index_display_name_mapping "
                                         f"has {len(io.display_names)} names for {probs.shape[1]} outputs")

    # Path ends: SmoothGrad (Smilkov et al. 2017) averages over noisy copies of the input.
    rng = np.random.default_rng(attribution.seed)
    smooth = attribution.smooth_grad
    samples = smooth.noisy_sample_count if smooth else 1
    if smooth:
        sigma = smooth.sigma_for(io.input_key)
        ends = images[:, None] + rng.normal(0, sigma, (len(images), samples, *images.shape[1:])).astype(np.float32)
    else:
        ends = images[:, None]
    blur = attribution.blur_baseline
    path = SCALE_SPACE if blur is not None and blur.path == "scale_space" else LINEAR
    if path == SCALE_SPACE:  # the path starts at the blurred (noisy) input itself
        starts = gaussian_blur(ends, blur.max_blur_sigma)[:, :, None]  # [N, S, 1, H, W, C]
    else:
        md_baselines = _metadata_baselines(io.input_metadata, model.image_shape, io.input_key)
        per_image = [_baselines(image, attribution, md_baselines, rng) for image in images]
        starts = np.stack([np.broadcast_to(np.stack(b)[None], (samples, *np.shape(np.stack(b))))
                           for b in per_image])  # [N, S, B, H, W, C]
    num_baselines = starts.shape[2]

    # Model outputs at every path end not yet scored, in one batch (without SmoothGrad the ends are
    # the images themselves).
    flat_ends, flat_starts = ends.reshape(-1, *images.shape[1:]), starts.reshape(-1, *images.shape[1:])
    if smooth:
        end_probs = model.predict(np.concatenate([flat_ends, flat_starts]))
        end_probs, start_probs = end_probs[:len(flat_ends)], end_probs[len(flat_ends):]
    else:
        end_probs, start_probs = probs, model.predict(flat_starts)

    keys, x_rows, b_rows, classes = [], [], [], []
    for i, chosen in enumerate(selected):
        for c in chosen:
            for s in range(samples):
                for b in range(num_baselines):
                    keys.append((i, c))
                    x_rows.append(i * samples + s)
                    b_rows.append((i * samples + s) * num_baselines + b)
                    classes.append(c)
    x_rows, b_rows, classes = np.array(x_rows), np.array(b_rows), np.array(classes)
    # XRAI's segmentation runs in the background while IG runs; an error or a cancellation
    # cancels the segmentations not started
    segments = _segment_in_background(images) if attribution.method == XRAI_METHOD else {}
    # XRAI's map target is judged on what XRAI ranks: each segment's mean attribution
    checkpoint = getattr(model, "check_cancelled", None) or (lambda: None)
    map_features = None
    if segments and attribution.map_target is not None:
        summaries: dict[int, Any] = {}

        def map_features(row: int, vectors: np.ndarray) -> np.ndarray:
            i = keys[row][0]
            if i not in summaries:  # first use is after IG's first round; segmentation ran meanwhile
                summaries[i] = region_means(_wait(segments[i], checkpoint))
            return summaries[i](vectors)
    try:
        ig = IntegratedGradients().GetMask(
            flat_ends[x_rows], flat_starts[b_rows], classes, model, step_count=start_step_count(attribution),
            quadrature=attribution.quadrature, target_error=attribution.target_error,
            max_step_count=attribution.max_step_count, map_target=attribution.map_target,
            map_features=map_features, path=path,
            max_blur_sigma=blur.max_blur_sigma if blur else 0.0,
            end_outputs=(end_probs[x_rows, classes], start_probs[b_rows, classes]), min_output_gap=MIN_OUTPUT_DELTA,
            path_groups=np.arange(len(keys)) // (samples * num_baselines))  # the paths averaged into one attribution

        results = [{"attributions": [], "warnings": []} for _ in images]
        per_path = samples * num_baselines
        xrai = XRAI() if attribution.method == XRAI_METHOD else None
        for first in range(0, len(keys), per_path):
            i, c = keys[first]
            rows = slice(first, first + per_path)
            attr = ig.attributions[rows].mean(axis=0)
            error = ig.averaged_error(rows)  # against the mean's difference, as a user checks it
            if not (np.isfinite(attr).all() and np.isfinite(error)):  # a path stopped as NONFINITE has a NaN error
                raise NonFiniteAttributionError(
                    f"instance {i}, output {io.display_names[c]!r}: the model's output or gradient is not finite "
                    f"(NaN or inf) on the path from the baseline, so it has no attribution; look for an overflow "
                    f"in the model on this input (an exp or a log at the edge of its range), or use another baseline")
            instance, baseline = float(probs[i, c]), float(ig.baseline_outputs[rows].mean())
            if xrai:
                checkpoint()  # the region steps make no model call: a wrapper's cancellation checks here
                shown = xrai.GetMask(images[i], attr, _wait(segments[i], checkpoint))[0]
            else:
                shown = attr
            image_rgb = render_attribution(images[i], shown, visualization, attribution.method)
            feature = {"b64_jpeg": encode_jpeg_b64(image_rgb)}
            if return_raw:
                feature["raw"] = shown.tolist()
            name = io.display_names[c]
            warned = _warnings(name, error, instance, baseline, ig.stop_reasons[rows], ig.step_counts[rows],
                               attribution, ig.map_errors[rows] if len(ig.map_errors) else None,
                               explained=float(ig.instance_outputs[rows].mean()),
                               baseline_outputs=ig.baseline_outputs[rows][:num_baselines].tolist(),
                               checked=averaged_error(float(attr.sum(dtype=np.float64)) - (instance - baseline),
                                                      instance - baseline))
            if warned:  # also inside the attribution, whose feature map is a Struct the SDK keeps
                feature["warnings"] = warned
            results[i]["attributions"].append({
                "outputIndex": [int(c)], "outputDisplayName": name, "instanceOutputValue": instance,
                "baselineOutputValue": baseline, "approximationError": error, "outputName": io.output_key,
                "featureAttributions": {io.input_key: feature}})
            results[i]["warnings"].extend(warned)
        return results
    finally:
        for future in segments.values():
            future.cancel()


def _wait(future: Future, checkpoint) -> Any:
    """``future.result()``, calling ``checkpoint`` (a server's cancellation check) every 0.1 s
    while waiting, so a cancelled or expired request does not wait out a segmentation."""
    while True:
        try:
            return future.result(timeout=0.1)
        except TimeoutError:
            checkpoint()


def _segment_in_background(images: np.ndarray) -> dict[int, Future]:
    """XRAI's segmentation of each image (see :data:`explain.cost.XRAI_SEGMENTATION_COST`),
    started now in one worker thread so it overlaps the batched IG calls: small IG rounds do not
    keep every core busy, and TensorFlow releases the GIL while it computes."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="xrai-segments")
    try:
        return {i: pool.submit(segment, image) for i, image in enumerate(images)}
    finally:
        pool.shutdown(wait=False)  # submitted work still runs; the thread exits when it is done
