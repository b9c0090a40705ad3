"""1. Integrated Gradients per image at equal approximation error: ours (the default request:
adaptive refinement to the target) vs ``saliency``'s ``IntegratedGradients`` vs the TensorFlow
tutorial's, plus the floor (evaluations x one forward+backward pass at the best batch size, timed
in the same alternation as the contenders, so a fast or slow period of the machine moves both).

Speed at a fixed step count says little, since the rules do not reach the same accuracy with the
same steps. So for each target of Vertex's approximation error (5% and 1%):

1. *Step search.* Each fixed rule's completeness error is measured on every image at every step
   count of a ladder (up to 600, past our cap of 400, since the references need that many for 1%;
   the midpoint rule, only compared, up to 100). The step count a rule needs is the smallest on the ladder at
   which the MEDIAN error over the images meets the target (none: it misses at 600, and any
   speed-up against it is a lower bound). The search evaluates each rule's nodes with one batched
   gradient function (``saliency``'s sum and the tutorial's trapezoid share their nodes, linspace
   (0, 1, n), so one evaluation scores both); the rules' nodes and weights are
   :mod:`explain.quadrature`'s, which ``tests/test_bench_quick.py`` checks against the tutorial.
2. *Timed runs.* Each implementation is then run, for real, on every image at its own step count
   (ours adaptive: the default request, refining from ``ig_start_steps`` grid points to the
   target with at most 400 evaluations and, by default, until the map's estimated error meets
   ``map_target`` too (section 1b); and the same request with ``map_target: null``, completeness
   alone, the speed the issue's goals are stated at; the references at the floor's best batch size), contenders
   alternating, one image per call; the error each run actually reached is measured from its
   attributions and reported beside its time. Ours also runs once on all images in one call,
   for its cost per evaluation when rounds batch many paths.
3. *Every image within the target.* The share of images each implementation brings within 5% and
   1% at its best step count up to our cap of 400 (fixed rules: the smallest ladder step up to it
   where every image is within, else the largest such step).

Images whose black baseline already scores like the input (output gap below 0.05) cannot be made
faithful in Vertex's relative sense; they are counted and set apart, and the images measured are
the first ``ig_images`` validation images that are not such.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np

from bench.common import SignatureModel, alternate, completeness_error, forward_backward_curve, load_eval_set, \
    table
from bench.fixtures import Assets
from bench.profiles import Profile

#: Output gap |F(x) - F(black)| under which an image is set apart (Vertex's error divides by it).
MIN_GAP = 0.05
ADAPTIVE = "ours (adaptive, default request)"
#: ours with ``map_target: null``: refined until completeness alone is met (the default before the
#: map was measured, section 1b); the speed the issue's goals are stated at
COMPLETENESS_ONLY = "ours (adaptive, completeness only: map_target null)"
#: ours' two requests and their short names in the headline
OURS = {ADAPTIVE: "default", COMPLETENESS_ONLY: "completeness only"}
MIDPOINT = "midpoint rule (fixed steps)"
SALIENCY = "saliency IntegratedGradients (riemann_linspace)"
TUTORIAL = "tutorial (trapezoid)"
#: fixed-step contender -> the rule of :mod:`explain.quadrature` it computes
RULES = {MIDPOINT: "riemann_middle", SALIENCY: "riemann_linspace", TUTORIAL: "riemann_trapezoid"}
REFERENCES = (SALIENCY, TUTORIAL)
#: the fixed rules timed against ours; the midpoint rule (the default of earlier versions) is only
#: in the quadrature comparison, searched up to this many steps
TIMED = REFERENCES
#: the floor, timed beside the contenders: :data:`FLOOR_EVALUATIONS` gradient evaluations as
#: forward+backward passes of the best batch size, nothing else
FLOOR = "floor (forward+backward passes at the best batch size)"
FLOOR_EVALUATIONS = 64
#: the floor of the graph ours runs: the ``xai_model`` with its batch normalizations folded
#: (:mod:`explain.folding`), forward+backward passes at that graph's best batch size; ours' cost
#: per evaluation over it is ours' own overhead, and the floor over it is what folding gains
OWN_FLOOR = "floor of the graph ours runs (batch norms folded; passes at its best batch size)"
#: the same graph's passes at exactly the batch sizes ours' run of the image called its kernel with,
#: each round's chunks as many at once as ours ran them (replayed after it, timed with the
#: contenders): ours over it is what ours' own code costs beyond the model's passes, where ours
#: over :data:`OWN_FLOOR` also holds what its smaller rounds cost
ROUND_FLOORS = {ADAPTIVE: "floor of the graph ours runs at ours' own batch sizes (default request)",
                COMPLETENESS_ONLY: "floor of the graph ours runs at ours' own batch sizes (completeness only)"}
#: the graph ours runs, as ours runs full rounds: the floor's evaluations in chunks of ours' chunk
#: size, as many at once as ours' streams, each pass in a session of its share of the cores
#: (:mod:`explain.sessions`); the machine's best throughput for that graph, which one batched
#: pass (:data:`OWN_FLOOR`, the issue's floor) does not reach on 2 cores
STREAM_FLOOR = "floor of the graph ours runs in ours' streams (full rounds of ours' chunk size)"
MIDPOINT_MAX_STEPS = 100


@contextlib.contextmanager
def recording_chunks(model, rounds: list[list[int]]):
    """Append to ``rounds``, for every call of ``model``'s path gradients while in the block, the
    node counts of its chunks (what one model pass evaluates; a call runs them
    ``model.streams`` at once)."""
    chunks = model._chunks

    def recorded(order):
        parts = chunks(order)
        rounds.append([len(part) for part in parts])
        return parts

    model._chunks = recorded
    try:
        yield rounds
    finally:
        del model._chunks  # the method again


def path_derivatives(model: SignatureModel):
    """A batched function ``(points, directions, classes) -> dF/dalpha`` per row: the gradient of
    each row's class probability dotted with its path direction (x - baseline)."""
    import tensorflow as tf

    spec = tf.TensorSpec([None, None, None, 3], tf.float32)

    @tf.function(input_signature=[spec, spec, tf.TensorSpec([None], tf.int32)])
    def derivatives(points, directions, classes):
        with tf.GradientTape() as tape:
            tape.watch(points)
            probs = model(points)
            target = tf.gather(probs, classes, axis=1, batch_dims=1)
        grads = tape.gradient(target, points)
        return tf.reduce_sum(grads * directions, axis=[1, 2, 3])

    return derivatives


def rule_errors(derivatives, images: np.ndarray, baselines: np.ndarray, classes: np.ndarray, f_x: np.ndarray,
                f_b: np.ndarray, rules: list[str], n: int, batch_size: int = 32) -> dict[str, np.ndarray]:
    """Completeness error of each rule at ``n`` nodes on every image; rules with the same nodes
    share one evaluation."""
    import tensorflow as tf

    from explain.quadrature import quadrature_rule

    out: dict[str, np.ndarray] = {}
    pending = {rule: quadrature_rule(rule, n) for rule in rules}
    while pending:
        rule, (nodes, _) = next(iter(pending.items()))
        sharing = {r: w for r, (a, w) in pending.items() if len(a) == len(nodes) and np.allclose(a, nodes)}
        rows = np.repeat(np.arange(len(images)), len(nodes))
        alphas = np.tile(nodes, len(images)).astype(np.float32)
        values = np.zeros(len(rows))
        for lo in range(0, len(rows), batch_size):
            r, a = rows[lo:lo + batch_size], alphas[lo:lo + batch_size]
            direction = images[r] - baselines[r]
            points = baselines[r] + a[:, None, None, None] * direction
            values[lo:lo + batch_size] = derivatives(tf.constant(points), tf.constant(direction),
                                                     tf.constant(classes[r], tf.int32)).numpy()
        values = values.reshape(len(images), len(nodes))
        gap = f_x - f_b
        for r, weights in sharing.items():
            out[r] = np.abs(values @ weights - gap) / np.maximum(np.abs(gap), 1e-12)
            del pending[r]
    return out


def ours_request(profile: Profile, target: float, **override) -> dict:
    """``IntegratedGradients.GetMask`` keywords of our request to ``target``: what the request
    ``{step_count, target_error, max_step_count}`` parses to (:mod:`explain.parameters`), so the
    bench follows the product's defaults (``map_target`` among them) instead of restating them."""
    from explain.parameters import parse_explanation_parameters

    a = parse_explanation_parameters({"integrated_gradients_attribution": dict(
        step_count=profile.ig_start_steps, target_error=target, max_step_count=profile.ig_max_steps,
        **override)}).attribution
    return dict(step_count=a.step_count, target_error=a.target_error, max_step_count=a.max_step_count,
                map_target=a.map_target)


def select_images(reference: SignatureModel, pattern: str, wanted: int) -> dict:
    """The first ``wanted`` validation images whose output gap to black is >= MIN_GAP, and how many
    of the images scanned were set apart."""
    from trainer.data import count_records

    data = load_eval_set(pattern, min(3 * wanted, count_records(pattern)))
    images = data.images
    probs = reference.predict(images)
    classes = probs.argmax(axis=1).astype(np.int32)
    f_b_all = reference.predict(np.zeros_like(images))
    f_x = probs[np.arange(len(images)), classes]
    f_b = f_b_all[np.arange(len(images)), classes]
    gaps = np.abs(f_x - f_b)
    keep = np.flatnonzero(gaps >= MIN_GAP)[:wanted]
    scanned = int(keep[-1]) + 1 if len(keep) == wanted else len(images)
    apart = np.flatnonzero(gaps[:scanned] < MIN_GAP)
    return {"images": images[keep], "classes": classes[keep], "f_x": f_x[keep], "f_b": f_b[keep],
            "scanned": scanned, "apart": apart, "apart_images": images[apart], "apart_classes": classes[apart],
            "apart_gaps": gaps[apart]}


def _step_choice(errors: dict[int, np.ndarray], target: float, how: str) -> tuple[int, bool]:
    """(steps, met): the smallest ladder step whose median (``how="median"``) or worst
    (``how="all"``) error meets ``target``, else the largest step and False."""
    stat = np.median if how == "median" else np.max
    for n in sorted(errors):
        if stat(errors[n]) <= target:
            return n, True
    return max(errors), False


def run(profile: Profile, assets: Assets, figures_dir: str) -> dict:
    import saliency.core as saliency

    from bench.reference_ig import make_integrated_gradients
    from explain import load_explainable_model
    from explain.integrated_gradients import IntegratedGradients
    from explain.model import _interior_nodes
    from explain.paths import LINEAR

    ours = load_explainable_model(assets.model_dir)
    reference = SignatureModel(assets.model_dir)
    chosen = select_images(reference, assets.eval_pattern, profile.ig_images)
    images, classes, f_x, f_b = chosen["images"], chosen["classes"], chosen["f_x"], chosen["f_b"]
    if not len(images):
        raise RuntimeError("every validation image scanned has an output gap to black under 0.05")
    baselines = np.zeros_like(images)
    n_img = len(images)

    # the floor's curve first: the step search (untimed) and the references run at its best batch
    # size; the floor itself is then timed with the contenders (a few repeats here are one moment)
    curve = forward_backward_curve(reference, images[0], profile.floor_batches)
    best_batch = min(curve, key=curve.get)
    own_graph = SignatureModel(assets.model_dir, fold_norms=True) if ours.folded is not None else reference
    own_curve = forward_backward_curve(own_graph, images[0], profile.floor_batches)
    own_batch = min(own_curve, key=own_curve.get)
    floor_evaluations = min(FLOOR_EVALUATIONS, profile.ig_max_steps)
    print(f"[ig_speed] forward+backward ms per image by batch size: "
          f"{ {b: round(t * 1000, 1) for b, t in curve.items()} }; the references run at batch {best_batch}", flush=True)

    # 1. step search over the ladder, every rule, every image
    derivatives = path_derivatives(reference)
    search: dict[str, dict[int, np.ndarray]] = {name: {} for name in RULES}
    for n in profile.ig_ladder:
        print(f"[ig_speed] step search: {n} steps", flush=True)
        searched = {name: rule for name, rule in RULES.items() if name != MIDPOINT or n <= MIDPOINT_MAX_STEPS}
        errs = rule_errors(derivatives, images, baselines, classes, f_x, f_b, list(searched.values()), n,
                           batch_size=best_batch)
        for name, rule in searched.items():
            search[name][n] = errs[rule]
        # stop once every timed rule has every image within the smallest target
        if all(np.max(search[name][n]) <= min(profile.ig_targets) for name in TIMED):
            break

    # 2. timed runs
    tutorial_ig = make_integrated_gradients(reference)
    saliency_ig = saliency.IntegratedGradients()
    call = reference.saliency_call()
    ig = IntegratedGradients()

    chunk_limit = max(ours.batch_size, 1)

    def contenders(i: int, steps: dict[str, int], target: float, record: dict) -> dict:
        x, b, c = images[i:i + 1], baselines[i:i + 1], classes[i:i + 1]
        chunks: dict[str, list[list[int]]] = {}  # per request, per round, the batch sizes of its model passes
        repeated = {n: np.repeat(x, n, axis=0) for n in range(1, chunk_limit + 1)}

        def adaptive(name: str, request: dict):
            def run():
                before = ours.evaluations  # the model's own count: a cached baseline gradient is not one
                with recording_chunks(ours, []) as rounds:
                    out = ig.GetMask(x, b, c, ours, min_output_gap=MIN_GAP, **request)
                record[name] = (out.attributions[0], ours.evaluations - before, str(out.stop_reasons[0]))
                chunks[name] = rounds
            return run

        def round_floor(name: str):
            def run():  # after ours' run of the same image (the contenders' order; its sizes are deterministic)
                for sizes in chunks[name]:  # each round through ours' own streams
                    ours._run_chunks(lambda n: own_graph.gradients(repeated[n], int(c[0]), threads=ours._threads()),
                                     sizes, lambda n, gradients: None)
                record[ROUND_FLOORS[name]] = (None, sum(map(sum, chunks[name])), "floor")
            return run

        def stream_floor():
            chunk = max(1, ours.batch_size // ours._lanes())
            sizes = [chunk] * max(1, round(floor_evaluations / chunk))
            ours._run_chunks(lambda n: own_graph.gradients(repeated[n], int(c[0]), threads=ours._threads()),
                             sizes, lambda n, gradients: None)
            record[STREAM_FLOOR] = (None, sum(sizes), "floor")

        def lib():
            attr = saliency_ig.GetMask(x[0], call, {"class_index": int(c[0])}, x_baseline=b[0],
                                       x_steps=steps[SALIENCY], batch_size=best_batch)
            record[SALIENCY] = (attr, steps[SALIENCY], "fixed")

        def tutorial():
            attr = tutorial_ig(b[0], x[0], int(c[0]), m_steps=steps[TUTORIAL] - 1, batch_size=best_batch).numpy()
            record[TUTORIAL] = (attr, steps[TUTORIAL], "fixed")

        def floor_passes(name: str, graph: SignatureModel, size: int):
            def run():
                batch = np.repeat(x, size, axis=0)
                passes = max(1, round(floor_evaluations / size))
                for _ in range(passes):
                    graph.gradients(batch, int(c[0]))
                record[name] = (None, passes * size, "floor")
            return run

        return {ADAPTIVE: adaptive(ADAPTIVE, ours_request(profile, target)),
                COMPLETENESS_ONLY: adaptive(COMPLETENESS_ONLY, ours_request(profile, target, map_target=None)),
                SALIENCY: lib, TUTORIAL: tutorial, FLOOR: floor_passes(FLOOR, reference, best_batch),
                OWN_FLOOR: floor_passes(OWN_FLOOR, own_graph, own_batch), STREAM_FLOOR: stream_floor,
                **{ROUND_FLOORS[name]: round_floor(name) for name in OURS}}

    def pretrace_tutorial(n: int) -> None:
        """The tutorial's ``tf.function`` retraces per class (a Python int) and per batch shape;
        trace every class and shape before timing, as a long-running user would have."""
        sizes = {min(n, best_batch), n % best_batch or best_batch}
        for c in sorted(set(classes.tolist())):
            for size in sizes:
                tutorial_ig(baselines[0], images[0], int(c), m_steps=size - 1, batch_size=best_batch)

    # the black baseline's gradient per class is kept by the loaded model (as a server's): compute
    # it for every class before timing, so neither of ours' requests pays it for the other
    for c in sorted(set(classes.tolist())):
        i = int(np.flatnonzero(classes == c)[0])
        ig.GetMask(images[i:i + 1], baselines[i:i + 1], classes[i:i + 1], ours, step_count=2, target_error=None)

    # every chunk size ours can run, in both its kernel and the folded graph's passes, before timing
    # (oneDNN prepares its primitives per shape on first use), as a long-running server would have
    kernel = ours._kernel(LINEAR)
    for n in range(1, chunk_limit + 1):
        own_graph.gradients(np.repeat(images[:1], n, axis=0), int(classes[0]))
        for threads in {1, ours._threads()}:
            own_graph.gradients(np.repeat(images[:1], n, axis=0), int(classes[0]), threads=threads)
        kernel(*_interior_nodes(images[:1], n), threads=ours._threads())

    timings: dict[str, dict] = {}
    for target in profile.ig_targets:
        steps, met = {}, {}
        for name in TIMED:
            steps[name], met[name] = _step_choice(search[name], target, "median")
        for name in OURS:
            steps[name], met[name] = profile.ig_max_steps, True  # a cap, not a count
        print(f"[ig_speed] timing at <= {target:.0%}: steps {steps}", flush=True)
        pretrace_tutorial(steps[TUTORIAL])
        seconds: dict[str, list[float]] = {k: [] for k in (*OURS, *TIMED, FLOOR, OWN_FLOOR, STREAM_FLOOR,
                                                          *ROUND_FLOORS.values())}
        errors: dict[str, list[float]] = {k: [] for k in (*OURS, *TIMED)}  # the floor computes no attribution
        evaluations: dict[str, list[int]] = {k: [] for k in seconds}
        reasons: list[str] = []  # the default request's
        for i in range(n_img):
            record: dict = {}
            timed = alternate(contenders(i, steps, target, record), repeats=profile.ig_repeats,
                              warmup=1 if i == 0 else 0)
            for name, t in timed.items():
                attr, count, reason = record[name]
                seconds[name].append(float(np.median(t.seconds)))
                if attr is not None:
                    errors[name].append(float(completeness_error(np.asarray(attr)[None], f_x[i:i + 1],
                                                                 f_b[i:i + 1])[0]))
                evaluations[name].append(count)
                if name == ADAPTIVE:
                    reasons.append(reason)
        # ours on every image in one call (a multi-instance request, the batch CLI): the same
        # evaluations, as refinement is per path, but each round batches every path's splits
        t0, before = time.perf_counter(), ours.evaluations
        ig.GetMask(images, baselines, classes, ours, min_output_gap=MIN_GAP, **ours_request(profile, target))
        together_seconds = time.perf_counter() - t0
        timings[str(target)] = {"steps": steps, "met": met, "seconds": seconds, "errors": errors,
                                "evaluations": evaluations, "adaptive_stop_reasons": reasons,
                                "together": {"seconds": together_seconds,
                                             "evaluations": ours.evaluations - before}}

    # ours on the images set apart: what a degenerate path costs and says
    apart_rows = []
    if len(chosen["apart"]):
        ai, ac = chosen["apart_images"], chosen["apart_classes"]
        out = ig.GetMask(ai, np.zeros_like(ai), ac, ours, min_output_gap=MIN_GAP,
                         **ours_request(profile, min(profile.ig_targets)))
        apart_rows = [[int(idx), float(gap), int(n), str(reason)] for idx, gap, n, reason in
                      zip(chosen["apart"], chosen["apart_gaps"], out.step_counts, out.stop_reasons)]

    folded = (ours.folded.folded, ours.folded.normalizations) if ours.folded is not None else None
    return summarize(profile, search, timings, n_img, chosen, apart_rows, curve, best_batch, ours.batch_size,
                     ours.streams, own_curve, own_batch, folded)


def floor_of(timing: dict, name: str = FLOOR) -> float:
    """Seconds per evaluation of a floor timed with the contenders at one target (median over images)."""
    return float(np.median(np.array(timing["seconds"][name]) / np.array(timing["evaluations"][name])))


def summarize(profile: Profile, search: dict, timings: dict, n_img: int, chosen: dict,
              apart_rows: list, curve: dict[int, float], best_batch: int, ours_batch: int, ours_streams: int,
              own_curve: dict[int, float], own_batch: int, folded: tuple[int, int] | None) -> dict:
    """Tables, headline and raw figures from the measurements."""
    targets = profile.ig_targets
    speed_rows, within_rows, cost_rows, headline = [], [], [], {}
    floors = {str(target): floor_of(timings[str(target)]) for target in targets}
    own_floors = {str(target): floor_of(timings[str(target)], OWN_FLOOR) for target in targets}
    for target in targets:
        t = timings[str(target)]
        floor, own_floor = floors[str(target)], own_floors[str(target)]
        ours_medians = {name: float(np.median(t["seconds"][name])) for name in OURS}
        for name in (*OURS, *TIMED):
            secs, errs, evals = (np.array(t[k][name], float) for k in ("seconds", "errors", "evaluations"))
            if name in OURS:
                label = f"{np.median(evals):g} median, {np.max(evals):g} worst (cap {profile.ig_max_steps})"
            else:
                label = f"{t['steps'][name]}" if t["met"][name] else f"> {t['steps'][name]} (missed; timed at it)"
            ratios = ["-" if name in OURS else
                      (f"{float(np.median(secs)) / m:.2f}x" if t["met"][name] else f">= {float(np.median(secs)) / m:.2f}x")
                      for m in ours_medians.values()]
            speed_rows.append([f"<= {target:.0%}", name, label, float(np.median(errs)), float(np.max(errs)),
                               float(np.median(secs)), float(np.max(secs)), *ratios])
            per_eval = secs / np.maximum(evals, 1)
            cost_rows.append([f"<= {target:.0%}", name, float(np.median(evals)), float(np.median(per_eval)) * 1000,
                              float(np.median(per_eval)) / floor,
                              float(np.median(per_eval)) / own_floor if name in OURS else "-"])
        cost_rows.append([f"<= {target:.0%}", FLOOR, float(np.median(t["evaluations"][FLOOR])), floor * 1000, 1.0,
                          floor / own_floor])
        cost_rows.append([f"<= {target:.0%}", OWN_FLOOR, float(np.median(t["evaluations"][OWN_FLOOR])),
                          own_floor * 1000, own_floor / floor, 1.0])
        stream_floor = floor_of(t, STREAM_FLOOR) if STREAM_FLOOR in t["seconds"] else None
        if stream_floor is not None:
            cost_rows.append([f"<= {target:.0%}", STREAM_FLOOR, float(np.median(t["evaluations"][STREAM_FLOOR])),
                              stream_floor * 1000, stream_floor / floor, stream_floor / own_floor])
        for ours_name, replayed in ROUND_FLOORS.items():
            if replayed not in t["seconds"]:
                continue
            per_eval = np.array(t["seconds"][replayed]) / np.maximum(t["evaluations"][replayed], 1)
            cost_rows.append([f"<= {target:.0%}", replayed, float(np.median(t["evaluations"][replayed])),
                              float(np.median(per_eval)) * 1000, float(np.median(per_eval)) / floor,
                              float(np.median(per_eval)) / own_floor])
            # per image, ours over the same passes alone: what ours' own code adds to them
            headline[f"IG cost per evaluation, ours ({OURS[ours_name]}) / floor of the graph it runs at its own "
                     f"batch sizes (<= {target:.0%}, one image per call, median over images)"] = float(
                np.median(np.array(t["seconds"][ours_name]) / np.array(t["seconds"][replayed])))
        headline[f"IG floor of the exported graph / floor of the graph ours runs (batch norms folded), "
                 f"<= {target:.0%} period"] = floor / own_floor
        for ours_name, ours_median in ours_medians.items():
            short_ours = OURS[ours_name]
            ours_met = float(np.median(t["errors"][ours_name])) <= target
            for ref in REFERENCES:
                short = ref.split()[0]
                key = f"IG speed-up, ours ({short_ours}, adaptive) vs {short}, median error <= {target:.0%}"
                if not t["met"][ref]:
                    key += f" (lower bound: it misses the target at {max(profile.ig_ladder)} steps)"
                if not ours_met:
                    key += " (ours MISSED the target)"
                headline[key] = float(np.median(t["seconds"][ref])) / ours_median
            per_eval = float(np.median(np.array(t["seconds"][ours_name]) / np.array(t["evaluations"][ours_name])))
            headline[f"IG cost per evaluation, ours ({short_ours}) / floor of the exported graph (<= {target:.0%}, "
                     f"one image per call)"] = per_eval / floor
            headline[f"IG cost per evaluation, ours ({short_ours}) / floor of the graph it runs (<= {target:.0%}, "
                     f"one image per call)"] = per_eval / own_floor
            if stream_floor is not None:
                headline[f"IG cost per evaluation, ours ({short_ours}) / floor of the graph it runs in its streams "
                         f"(<= {target:.0%}, one image per call)"] = per_eval / stream_floor
        if "together" in t:
            per_eval = t["together"]["seconds"] / max(t["together"]["evaluations"], 1)
            cost_rows.append([f"<= {target:.0%}", f"{ADAPTIVE}, all {n_img} images in one call (mean; total s / "
                              "total evaluations)",
                              t["together"]["evaluations"] / n_img, per_eval * 1000, per_eval / floor,
                              per_eval / own_floor])
            headline[f"IG cost per evaluation, ours (default) / floor of the exported graph (<= {target:.0%}, "
                     f"{n_img} images per call)"] = per_eval / floor
            headline[f"IG cost per evaluation, ours (default) / floor of the graph it runs (<= {target:.0%}, "
                     f"{n_img} images per call)"] = per_eval / own_floor

    # every image within the target, at the best step count up to the cap
    for name in (*OURS, *RULES):
        if name not in OURS and not search[name]:  # a ladder starting above MIDPOINT_MAX_STEPS
            continue
        row = [name]
        for target in targets:
            if name in OURS:
                errs = np.array(timings[str(target)]["errors"][name])
                row += [f"refined, <= {profile.ig_max_steps}", float(np.mean(errs <= target))]
            else:
                n, met = _step_choice({n: e for n, e in search[name].items() if n <= profile.ig_max_steps}
                                      or search[name], target, "all")
                label = n if met else f"{n} (missed{'; not searched further' if name == MIDPOINT else ''})"
                row += [label, float(np.mean(search[name][n] <= target))]
        within_rows.append(row)
        if name in OURS:
            for target, share in zip(targets, row[2::2]):
                headline[f"IG share of images within {target:.0%}, ours ({OURS[name]}, adaptive)"] = share

    for n in (50, 100, 400):  # the quadrature-rule comparison at Vertex's usual steps and beyond
        if all(n in search[name] for name in RULES):
            headline[f"IG median error at {n} fixed steps: midpoint / saliency's sum / tutorial's trapezoid"] = \
                " / ".join(f"{np.median(search[name][n]):.3f}" for name in RULES)
    search_rows = [[name, n, float(np.median(e)), float(np.percentile(e, 90)), float(np.max(e)),
                    float(np.mean(e <= 0.05)), float(np.mean(e <= 0.01))]
                   for name, by_n in search.items() for n, e in by_n.items()]
    apart_note = (f"{len(chosen['apart'])} of the first {chosen['scanned']} validation images had an output gap "
                  f"under {MIN_GAP} and are set apart (not averaged in)")
    tables = [
        table(f"Seconds per image at the step count where the median error meets the target ({n_img} images; "
              "speed-up = that implementation's median seconds / ours')",
              ["target", "implementation", "gradient evaluations", "median error reached", "worst error reached",
               "median s", "worst s", "ours (default) is faster by", "ours (completeness only) is faster by"],
              speed_rows),
        table(f"Every image within the target: share of the {n_img} images within 5% and 1% at the best step "
              f"count up to {profile.ig_max_steps} (fixed rules: the smallest ladder step where every image is "
              f"within, else the largest up to {profile.ig_max_steps})",
              ["implementation", "steps for 5%", "share within 5%", "steps for 1%", "share within 1%"],
              within_rows),
        table(f"Cost per gradient evaluation (floor: forward+backward passes of the exported graph at batch "
              f"{best_batch}, the best size measured before the timed runs (ms per image: "
              + ", ".join(f"{b}: {t * 1000:.1f}" for b, t in curve.items())
              + f"); floor of the graph ours runs: the same with "
              + (f"{folded[0]} of its {folded[1]} batch normalizations folded into their convolutions"
                 if folded else "nothing folded (no normalization folds in this model)")
              + f", at batch {own_batch} (ms per image: " + ", ".join(f"{b}: {t * 1000:.1f}" for b, t in own_curve.items())
              + "); both timed alternating with the contenders on every image, so each row is divided by the "
                "floors of its own period; the floor at ours' own batch sizes replays, after ours' run of each "
                "image, the folded graph's passes at exactly the batch sizes that run called its kernel with, "
                "each round's chunks as many at once as ours ran them (in sessions of their share of the "
                "cores, as ours runs them), so ours over it is what ours' own code adds to the passes, and it "
                "over the folded floor is what ours' small rounds cost, net of what running their chunks at "
                "once gains; the floor in ours' streams runs the folded graph's passes as ours' full rounds "
                "do, chunks of ours' chunk size as many at once as ours' streams, the machine's best "
                "throughput for that graph, which one batched pass does not reach)", ["target", "implementation", "median evaluations",
                                              "ms per evaluation (median)", "/ floor of the exported graph",
                                              "/ floor of the graph ours runs"], cost_rows),
        table(f"Completeness error of the fixed rules by step count ({n_img} images; the quadrature-rule "
              "comparison)", ["rule", "steps", "median", "90th percentile", "worst", "share <= 5%", "share <= 1%"],
              search_rows),
    ]
    if apart_rows:
        tables.append(table(f"Images set apart (output gap to black < {MIN_GAP}): ours on them, default request "
                            f"at {min(targets):.0%}", ["validation image", "output gap", "evaluations spent",
                                                       "stop reason"], apart_rows))
    return {
        "title": "1. Integrated Gradients per image at equal approximation error",
        "description": (f"{n_img} validation images (192x192, black baseline, explaining the predicted class); "
                        f"{apart_note}. Step ladder {list(profile.ig_ladder)}. Ours adaptive = the default "
                        f"request: refinement from {profile.ig_start_steps} steps to the target, at most "
                        f"{profile.ig_max_steps} evaluations, with the default `map_target` (the map's own estimated L1 error "
                        "refined to it too; section 1b), and the same request with `map_target: null` (completeness "
                        "alone, as Vertex measures it); its model is loaded once, as a server's, so the "
                        "black baseline's gradient for a class is computed on first use and then kept, and ours' "
                        "evaluations are those the model ran. Timed: every image, one image per call, contenders "
                        f"alternating, {profile.ig_repeats} run(s) each; `saliency` and the tutorial at the "
                        "floor's best batch size (the table of costs per evaluation lists it), ours at the chunk size "
                        f"its model measured when it was loaded ({ours_batch} path nodes in flight at most, in "
                        f"{ours_streams} chunk(s) at once, the number it measured too). "
                        "Errors are Vertex's approximation error measured from each run's own attributions. "
                        f"The cost table adds ours on all {n_img} images in one call (a multi-instance request or "
                        "the batch CLI: the same evaluations, every path's splits batched per round), timed once: "
                        "its evaluations are the mean per image, its cost the total seconds over the total "
                        "evaluations."),
        "tables": tables,
        "headline": headline,
        "raw": {"search": {k: {str(n): e for n, e in v.items()} for k, v in search.items()},
                "timings": timings, "floor_seconds": floors, "floor_batch": best_batch, "ours_batch": ours_batch,
                "ours_streams": ours_streams,
                "own_floor_seconds": own_floors, "own_floor_batch": own_batch, "folded_normalizations": folded,
                "own_forward_backward_ms_by_batch": {str(b): t * 1000 for b, t in own_curve.items()},
                "forward_backward_ms_by_batch": {str(b): t * 1000 for b, t in curve.items()}, "images": n_img, "scanned": chosen["scanned"],
                "set_apart": [int(i) for i in chosen["apart"]], "set_apart_rows": apart_rows},
    }
