"""Explanations of the TRAINED classifier: completeness at the default steps and whether the
attributions point at the flower, whose mask the synthetic data knows."""

from __future__ import annotations

import trainer  # noqa: F401

import numpy as np
import pytest

from explain import explain_images, load_explainable_model
from trainer.data import load_masks, take_numpy


@pytest.fixture(scope="module")
def model_images_masks(trained_model_dir, sample_data):
    """The trained model, loaded once, and the first six validation images with their masks."""
    return (load_explainable_model(trained_model_dir), take_numpy(sample_data["eval_pattern"], 6)[0],
            load_masks(sample_data["eval_pattern"], 6))


def test_ig_is_complete_and_points_at_the_flower(model_images_masks):
    model, images, masks = model_images_masks
    explanations = explain_images(model, images, {"integrated_gradients_attribution": {"step_count": 50}},
                                  return_raw=True)
    errors, inside, chance = [], [], []
    for explanation, mask in zip(explanations, masks):
        attribution = explanation["attributions"][0]
        errors.append(attribution["approximationError"])
        raw = np.asarray(attribution["featureAttributions"]["image"]["raw"]).sum(axis=-1)
        positive = np.clip(raw, 0, None)
        inside.append(positive[mask].sum() / positive.sum())
        chance.append(mask.mean())
    assert np.median(errors) < 0.05, errors
    # more of the positive attribution falls on the flower than its share of the image
    lifts = np.array(inside) / np.array(chance)
    assert np.median(lifts) > 1.25, (inside, chance)


def test_xrai_top_regions_cover_the_flower(model_images_masks):
    """XRAI's most important regions (the top 20% of the image by its ranking) lie on the flower
    clearly more often than the flower's share of the image. Region-level, not a pointing game:
    every pixel of a region shares one value, so an argmax picks an arbitrary pixel of it."""
    model, images, masks = model_images_masks
    explanations = explain_images(model, images, {"xrai_attribution": {"step_count": 16}}, return_raw=True)
    lifts = []
    for explanation, mask in zip(explanations, masks):
        raw = np.asarray(explanation["attributions"][0]["featureAttributions"]["image"]["raw"])
        raw = raw.sum(axis=-1) if raw.ndim == 3 else raw
        assert raw.shape == mask.shape
        top = raw >= np.quantile(raw, 0.8)
        lifts.append(mask[top].mean() / mask.mean())
    assert np.median(lifts) > 2.0, lifts
