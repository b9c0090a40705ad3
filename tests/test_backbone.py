"""The offline backbone is MobileNetV2 1.0 @ 192 behind TF Hub's feature-vector interface.

What is checked is what a user's code relies on when it swaps the offline module for
``https://tfhub.dev/google/imagenet/mobilenet_v2_100_192/feature_vector/5``: the SavedModel's
reusable-module attributes, float images in [0, 1] of any batch size in, 1280 features out,
2,257,984 parameters with MobileNetV2 1.0's variable shapes, batch norm in inference mode when
frozen, and fine-tuning of the top layers through ``hub.KerasLayer``.
"""

from __future__ import annotations

import json
import os

import trainer  # noqa: F401  (legacy Keras before TensorFlow)

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_hub as hub
import tf_keras as keras

from trainer.backbone import (MOBILENET_V2_FEATURES, MOBILENET_V2_PARAMETERS, RECIPE_FILE, BackboneRecipe,
                              ensure_backbone, read_recipe)
from trainer.model import build_model, set_fine_tune_layers
from trainer.schema import IMAGE_SIZE


@pytest.fixture(scope="module")
def loaded(backbone_dir):
    return tf.saved_model.load(backbone_dir)


def test_module_has_the_reusable_savedmodel_interface(loaded):
    for attribute in ("variables", "trainable_variables", "regularization_losses", "__call__"):
        assert hasattr(loaded, attribute), attribute
    assert len(loaded.trainable_variables) > 0


def test_parameters_and_variable_shapes_are_mobilenet_v2_1_0(loaded):
    reference = keras.applications.MobileNetV2(input_shape=(*IMAGE_SIZE, 3), alpha=1.0, include_top=False,
                                               pooling="avg", weights=None)
    assert reference.count_params() == MOBILENET_V2_PARAMETERS == 2_257_984
    assert sum(int(np.prod(v.shape)) for v in loaded.variables) == MOBILENET_V2_PARAMETERS

    def shapes(variables):
        return sorted((v.name.split("/")[-2] + "/" + v.name.split("/")[-1].split(":")[0], tuple(v.shape))
                      for v in variables)

    assert shapes(loaded.variables) == shapes(reference.variables)


@pytest.fixture(scope="module")
def frozen(backbone_dir):
    return hub.KerasLayer(backbone_dir, input_shape=[*IMAGE_SIZE, 3], trainable=False)


@pytest.mark.parametrize("batch", [1, 3])
def test_hub_keras_layer_maps_unit_range_images_to_1280_features(frozen, batch):
    images = np.random.default_rng(batch).uniform(0, 1, (batch, *IMAGE_SIZE, 3)).astype(np.float32)
    features = frozen(images).numpy()
    assert features.shape == (batch, MOBILENET_V2_FEATURES) == (batch, 1280)
    assert np.all(np.isfinite(features)) and features.std() > 0
    # ReLU6 then average pooling: every feature lies in [0, 6]
    assert features.min() >= 0 and features.max() <= 6


def test_frozen_layer_runs_batch_norm_in_inference_mode(frozen, loaded):
    images = np.random.default_rng(0).uniform(0, 1, (4, *IMAGE_SIZE, 3)).astype(np.float32)
    inference = loaded(images, training=False).numpy()
    batch_stats = loaded(images, training=True).numpy()
    assert not np.allclose(inference, batch_stats, atol=1e-4)  # the module honours `training`
    np.testing.assert_allclose(frozen(images, training=True).numpy(), inference, atol=1e-5)


def test_fine_tuning_through_hub_keras_layer_trains_only_the_top_layers(backbone_dir):
    model = build_model(backbone_dir, fine_tune_layers=4)
    extractor = model.layers[0]
    names = {v.name for v in extractor.trainable_weights}
    assert names and all("block_16_project" in n or "Conv_1" in n for n in names), sorted(names)
    assert not any("moving_" in n for n in names)
    assert set_fine_tune_layers(extractor, 0) == 0 and not extractor.trainable_weights


def test_cached_build_is_reused_only_for_its_recipe(backbone_dir, tmp_path):
    recipe = read_recipe(backbone_dir)
    assert recipe["architecture"] == "mobilenet_v2" and recipe["parameters"] == MOBILENET_V2_PARAMETERS
    assert recipe["pretrain_val_accuracy"] > 0.5  # the features are learned, not random
    # a small test network, rebuilt when its recipe changes and reused when it does not
    tiny = BackboneRecipe(architecture="small_test_network", image_size=48, pretrain_size=32, num_images=40,
                          epochs=1, calibration_images=16, batch_size=16)
    out = str(tmp_path / "hub")
    ensure_backbone(out, tiny, verbose=0)
    stamp = os.path.getmtime(os.path.join(out, "saved_model.pb"))
    ensure_backbone(out, tiny, verbose=0)
    assert os.path.getmtime(os.path.join(out, "saved_model.pb")) == stamp
    ensure_backbone(out, BackboneRecipe(**{**tiny.__dict__, "epochs": 2}), verbose=0)
    with open(os.path.join(out, RECIPE_FILE)) as f:
        assert json.load(f)["epochs"] == 2
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".backbone-")]  # no staging left behind
