"""The classifier trained on the real network (MobileNetV2 1.0 @ 192), once per test session and
in one file (so one test process trains it): its accuracy and metrics, the train/serve parity of
its export, and its explanations: faithful by default (Vertex's 0.05 approximation error, or a
warning saying why not), the degenerate-baseline case, and whether the attributions point at
the flower, whose mask the synthetic data knows."""

from __future__ import annotations

import trainer  # noqa: F401

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from explain import explain_images, load_explainable_model
from explain.integrated_gradients import DEGENERATE, DEGENERATE_STEP_COUNT, IntegratedGradients
from explain.parameters import DEFAULT_ADAPTIVE_START, DEFAULT_MAP_TARGET
from trainer.data import load_masks, take_numpy


def test_training_reaches_real_accuracy_and_writes_metrics(trained_run):
    run_dir, metrics = trained_run
    assert metrics["accuracy"] >= 0.8, metrics  # 5 classes: chance is 0.2
    on_disk = json.load(open(os.path.join(run_dir, "metrics.json")))
    assert on_disk["accuracy"] == pytest.approx(metrics["accuracy"])
    cm = np.array(on_disk["confusion_matrix"])
    assert cm.shape == (5, 5) and cm.sum() == on_disk["num_examples"]
    assert np.trace(cm) / cm.sum() == pytest.approx(on_disk["accuracy"])
    assert set(on_disk["per_class"]) == {"daisy", "dandelion", "roses", "sunflowers", "tulips"}
    for name in ("confusion_matrix.png", "training_history.png"):
        assert open(os.path.join(run_dir, name), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(os.path.join(run_dir, "logs"))  # TensorBoard
    assert metrics["cached_features"] is True


def test_exported_trained_model_has_train_serve_parity(trained_model_dir, sample_data):
    """The same image bytes through the training input pipeline and through serving_default."""
    from trainer.data import list_files, parse_example
    from trainer.export import load_keras_model
    from trainer.schema import FEATURE_IMAGE

    keras_model = load_keras_model(os.path.join(os.path.dirname(trained_model_dir), "keras_model"))
    records = list(tf.data.TFRecordDataset(list_files(sample_data["eval_pattern"])).take(8))
    images = tf.stack([parse_example(r, 5)[0] for r in records])
    train_path = keras_model(images, training=False).numpy()
    raw = [tf.io.parse_single_example(r, {FEATURE_IMAGE: tf.io.FixedLenFeature([], tf.string)})[FEATURE_IMAGE]
           for r in records]
    served = tf.saved_model.load(trained_model_dir).signatures["serving_default"](
        bytes_inputs=tf.stack(raw))["probabilities"].numpy()
    np.testing.assert_allclose(served, train_path, atol=1e-5)


@pytest.fixture(scope="module")
def model_images_masks(trained_model_dir, sample_data):
    """The trained model, loaded once, and the first five validation images with their masks."""
    return (load_explainable_model(trained_model_dir), take_numpy(sample_data["eval_pattern"], 5)[0],
            load_masks(sample_data["eval_pattern"], 5))


def _misses_are_explained(explanations) -> list[float]:
    """Every attribution over 0.05 carries a warning naming the cause; returns the errors of the
    attributions whose output gap makes Vertex's relative error meaningful."""
    errors = []
    for explanation in explanations:
        for attribution in explanation["attributions"]:
            gap = abs(attribution["instanceOutputValue"] - attribution["baselineOutputValue"])
            if attribution["approximationError"] > 0.05 or gap < 0.05:
                assert any(attribution["outputDisplayName"] in w for w in explanation["warnings"]), explanation
            if gap >= 0.05:
                errors.append(attribution["approximationError"])
    return errors


def _errors_as_a_user_checks_them(explanations) -> None:
    """Each IG attribution's approximationError is the one its response shows: the raw
    attribution's sum against instanceOutputValue - baselineOutputValue (the baselines' mean)."""
    for explanation in explanations:
        for attribution in explanation["attributions"]:
            gap = attribution["instanceOutputValue"] - attribution["baselineOutputValue"]
            total = float(np.sum(attribution["featureAttributions"]["image"]["raw"], dtype=np.float64))
            assert attribution["approximationError"] == pytest.approx(abs(total - gap) / abs(gap), rel=1e-3, abs=1e-4)


def test_default_ig_is_faithful_and_points_at_the_flower(model_images_masks):
    model, images, masks = model_images_masks
    # the default request: refinement to 0.05 from the default start (configs/local.yaml's)
    explanations = explain_images(model, images,
                                  {"integrated_gradients_attribution": {"step_count": DEFAULT_ADAPTIVE_START}},
                                  return_raw=True)
    assert max(_misses_are_explained(explanations)) <= 0.05
    errors, inside, chance = [], [], []
    for explanation, mask in zip(explanations, masks):
        attribution = explanation["attributions"][0]
        errors.append(attribution["approximationError"])
        raw = np.asarray(attribution["featureAttributions"]["image"]["raw"]).sum(axis=-1)
        positive = np.clip(raw, 0, None)
        inside.append(positive[mask].sum() / positive.sum())
        chance.append(mask.mean())
    assert np.median(errors) <= 0.05, errors
    # more of the positive attribution falls on the flower than its share of the image
    lifts = np.array(inside) / np.array(chance)
    assert np.median(lifts) > 1.25, (inside, chance)


def test_map_target_refines_the_map_on_the_trained_model(model_images_masks):
    """``map_target`` flows from the request to the refinement and buys a map whose own error
    estimate meets it, where completeness alone stops earlier; an IG request that names none gets
    DEFAULT_MAP_TARGET, and ``mapTarget: null`` asks for completeness alone."""
    model, images, _ = model_images_masks
    x = images[:1]
    classes = model.predict(x).argmax(axis=1)
    ig = IntegratedGradients()
    plain = ig.GetMask(x, np.zeros_like(x), classes, model, step_count=DEFAULT_ADAPTIVE_START, target_error=0.05)
    assert plain.map_errors.max() > DEFAULT_MAP_TARGET, plain.map_errors  # what makes the default matter here
    target = round(0.5 * float(plain.map_errors.max()), 4)  # half of what completeness alone left
    mapped = ig.GetMask(x, np.zeros_like(x), classes, model, step_count=DEFAULT_ADAPTIVE_START, target_error=0.05,
                        map_target=target)
    assert all(e <= 1.01 * target or r != "converged" for e, r in zip(mapped.map_errors, mapped.stop_reasons))
    assert mapped.map_errors.max() < plain.map_errors.max()
    assert mapped.step_counts.sum() > plain.step_counts.sum()

    def cost(method: dict) -> tuple[int, list]:
        before = model.evaluations
        explanations = explain_images(model, x, {"integratedGradientsAttribution": method}, return_raw=True)
        return model.evaluations - before, explanations

    completeness_cost, _ = cost({"stepCount": DEFAULT_ADAPTIVE_START, "mapTarget": None})
    default_cost, explanations = cost({"stepCount": DEFAULT_ADAPTIVE_START})
    assert completeness_cost == plain.step_counts.sum() - 1  # the same path; the black end was kept
    assert default_cost > completeness_cost
    assert max(_misses_are_explained(explanations)) <= 0.05
    _, explanations = cost({"stepCount": DEFAULT_ADAPTIVE_START, "mapTarget": target})
    assert max(_misses_are_explained(explanations)) <= 0.05


def test_xrai_top_regions_cover_the_flower(model_images_masks):
    """XRAI's most important regions (the top 20% of the image by its ranking) lie on the flower
    clearly more often than the flower's share of the image. Region-level, not a pointing game:
    every pixel of a region shares one value, so an argmax picks an arbitrary pixel of it."""
    model, images, masks = model_images_masks
    explanations = explain_images(model, images, {"xrai_attribution": {"step_count": DEFAULT_ADAPTIVE_START}}, return_raw=True)
    # XRAI's IG from both baselines is held to the same standard
    assert max(_misses_are_explained(explanations)) <= 0.05
    lifts = []
    for explanation, mask in zip(explanations, masks):
        raw = np.asarray(explanation["attributions"][0]["featureAttributions"]["image"]["raw"])
        raw = raw.sum(axis=-1) if raw.ndim == 3 else raw
        assert raw.shape == mask.shape
        top = raw >= np.quantile(raw, 0.8)
        lifts.append(mask[top].mean() / mask.mean())
    assert np.median(lifts) > 2.0, lifts


def test_xrai_refines_the_region_means_it_ranks_by_default_on_the_trained_model(model_images_masks):
    """XRAI's default request carries DEFAULT_MAP_TARGET, judged on each segment's mean attribution
    (what its regions are ranked by): the IG core's estimate on that summary meets it wherever the
    path converged, it is below the pixels' estimate of the same grid (errors that average out
    within a segment cannot move a region), and ``mapTarget: null`` asks for completeness alone."""
    from explain.xrai import region_means, segment

    model, images, _ = model_images_masks
    x = np.repeat(images[:1], 2, axis=0)
    c = model.predict(x[:1]).argmax(axis=1)
    baselines = np.stack([np.zeros_like(x[0]), np.ones_like(x[0])])
    summary = region_means(segment(x[0]))
    ig = IntegratedGradients()
    common = dict(step_count=17, target_error=0.05, path_groups=np.array([0, 0]))
    regions = ig.GetMask(x, baselines, np.repeat(c, 2), model, map_target=DEFAULT_MAP_TARGET,
                         map_features=lambda r, v: summary(v), **common)
    assert all(e <= 1.01 * DEFAULT_MAP_TARGET or r != "converged"
               for e, r in zip(regions.map_errors, regions.stop_reasons))
    # a target every grid meets leaves completeness alone to shape the grid: the same grid, judged both ways
    loose_regions = ig.GetMask(x, baselines, np.repeat(c, 2), model, map_target=1.0,
                               map_features=lambda r, v: summary(v), **common)
    loose_pixels = ig.GetMask(x, baselines, np.repeat(c, 2), model, map_target=1.0, **common)
    assert list(loose_regions.step_counts) == list(loose_pixels.step_counts)
    # the pixels' attribution is the map the refinement kept split by split, the regions' a sum over
    # the grid: equal up to float32 rounding (a different grid differs by percents)
    scale = np.abs(loose_pixels.attributions).max()
    np.testing.assert_allclose(loose_regions.attributions, loose_pixels.attributions, rtol=0, atol=1e-5 * scale)
    assert loose_regions.map_errors[0] < loose_pixels.map_errors[0] <= 1.0

    def cost(method: dict) -> tuple[int, list]:
        before = model.evaluations
        explanations = explain_images(model, x[:1], {"xraiAttribution": method}, return_raw=True)
        return model.evaluations - before, explanations

    completeness_cost, _ = cost({"stepCount": 17, "mapTarget": None})
    default_cost, explanations = cost({"stepCount": 17})
    assert default_cost >= completeness_cost
    assert max(_misses_are_explained(explanations)) <= 0.05


def test_a_baseline_that_scores_like_the_input_costs_little_and_says_so(model_images_masks):
    """A metadata baseline equal to the image leaves nothing to attribute: the explanation must
    come back fast (a fixed few steps, not the refinement cap) with a warning naming the remedy."""
    model, images, _ = model_images_masks
    metadata = json.loads(json.dumps(model.metadata))
    (key, spec), = metadata["inputs"].items()
    spec["input_baselines"] = [images[0].tolist()]
    (explanation,) = explain_images(model, images[:1], {"integrated_gradients_attribution": {"step_count": 50}},
                                    metadata=metadata)
    attribution = explanation["attributions"][0]
    assert abs(attribution["instanceOutputValue"] - attribution["baselineOutputValue"]) < 1e-4
    assert any("another baseline" in w and "not refined" in w for w in explanation["warnings"])
    ig = IntegratedGradients().GetMask(images[:1], images[:1].copy(), np.array([0]), model, step_count=50,
                                       target_error=0.05, max_step_count=400, min_output_gap=0.05)
    assert ig.stop_reasons[0] == DEGENERATE and ig.step_counts[0] <= DEGENERATE_STEP_COUNT


#: Real photographs that ship inside scikit-image (no download): nothing like the synthetic flowers
#: the model learned, in sizes from 300x451 to 1600x1600, as a new user would send them.
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
          "hubble_deep_field.jpg", "retina.jpg", "ihc.png")


def test_ordinary_photographs_are_explained_faithfully_by_default(model_images_masks):
    """Photographs no test has seen, JPEG-encoded and preprocessed as the server does. The default
    request: every attribution is within 0.05 or carries a warning saying why (on this model the
    black baseline often scores like a photograph: nothing to attribute, and the warning names
    the remedy, another baseline). With the remedy, black and white baselines averaged as XRAI
    does, every photograph has an output gap and every attribution is within 0.05."""
    import io
    import os

    import skimage
    from PIL import Image

    model = model_images_masks[0]
    jpegs = []
    for name in PHOTOS:
        buffer = io.BytesIO()
        Image.open(os.path.join(os.path.dirname(skimage.__file__), "data", name)).convert("RGB").save(buffer, "JPEG")
        jpegs.append(buffer.getvalue())
    images = model.preprocess(jpegs)
    default = explain_images(model, images,
                             {"integrated_gradients_attribution": {"step_count": DEFAULT_ADAPTIVE_START}},
                             return_raw=True)
    errors = np.array(_misses_are_explained(default))  # every miss is warned about
    assert np.all(errors <= 0.05), errors
    _errors_as_a_user_checks_them(default)
    for explanation in default:
        attribution = explanation["attributions"][0]
        if abs(attribution["instanceOutputValue"] - attribution["baselineOutputValue"]) < 0.05:
            assert any("another baseline" in w for w in explanation["warnings"]), explanation["warnings"]
    remedy = explain_images(model, images, {"integrated_gradients_attribution": {
        "step_count": DEFAULT_ADAPTIVE_START, "baseline": ["black", "white"]}}, return_raw=True)
    errors = np.array(_misses_are_explained(remedy))
    assert len(errors) == len(PHOTOS) and np.all(errors <= 0.05), errors
    _errors_as_a_user_checks_them(remedy)  # averaged over two baselines, as the response shows it
