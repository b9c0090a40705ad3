"""Batch normalizations folded into their convolutions for the gradient kernels (explain.folding),
on real exported SavedModels: a small network with every case the rewrite must get right, and
the trained MobileNetV2 the other trained-model tests use."""

from __future__ import annotations

import trainer  # noqa: F401  (legacy Keras before TensorFlow)

import logging

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from explain import folding, load_explainable_model
from explain.integrated_gradients import IntegratedGradients
from trainer.export import export_model
from trainer.schema import CLASSES, IMAGE_SIZE


def _normalized_cnn() -> keras.Model:
    """Conv + BN (foldable), depthwise conv + BN (foldable, per-channel multiplier 2), a conv with
    a bias before its BN (not folded: the bias sits between), and a conv whose output also feeds a
    residual sum (not folded: changing its filter would change the sum). Moving statistics are
    set away from 0 and 1, so a wrong fold changes the outputs."""
    keras.utils.set_random_seed(3)
    x = inputs = keras.Input([*IMAGE_SIZE, 3])
    x = keras.layers.Conv2D(8, 3, strides=4, use_bias=False)(x)
    x = keras.layers.ReLU(6.0)(keras.layers.BatchNormalization()(x))
    x = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same", use_bias=False)(x)
    x = keras.layers.ReLU(6.0)(keras.layers.BatchNormalization()(x))
    x = keras.layers.Conv2D(16, 1, use_bias=True)(x)
    x = keras.layers.BatchNormalization()(x)
    shared = keras.layers.Conv2D(16, 1, use_bias=False)(x)
    x = keras.layers.Add()([keras.layers.BatchNormalization()(shared), shared])
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.ReLU(6.0)(x))
    model = keras.Model(inputs, keras.layers.Dense(len(CLASSES), activation="softmax")(x))
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, variance = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 2, gamma.shape), rng.normal(0, 0.5, beta.shape),
                               rng.normal(0, 0.5, mean.shape), rng.uniform(0.2, 3, variance.shape)])
    return model


@pytest.fixture(scope="module")
def normalized_model_dir(tmp_path_factory) -> str:
    export_dir = str(tmp_path_factory.mktemp("normalized") / "model")
    export_model(_normalized_cnn(), export_dir, CLASSES, verbose=False)
    return export_dir


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, (n, *IMAGE_SIZE, 3)).astype(np.float32)


def _kernel_outputs(model, images):
    """Gradients of class 0 at ``images`` and the outputs, through the model's path kernel."""
    n = len(images)
    kernel = model._kernel("linear")
    sums, derivatives, values, raw = kernel(
        tf.constant(images), tf.constant(np.zeros_like(images)), tf.zeros([n], tf.int32),
        tf.range(n, dtype=tf.int32), tf.range(n, dtype=tf.int32), tf.ones([n]), tf.ones([n]),
        tf.constant(n, tf.int32), tf.constant(0.0), tf.constant(n, tf.int32))
    return raw.numpy(), values.numpy()


def test_the_foldable_normalizations_are_folded_and_the_rest_left(normalized_model_dir):
    model = load_explainable_model(normalized_model_dir, batch_size=4)
    assert model.folded is not None
    assert (model.folded.folded, model.folded.normalizations) == (2, 4)
    plain = load_explainable_model(normalized_model_dir, batch_size=4, fold_norms=False)
    assert plain.folded is None
    images = _images(3, seed=1)
    grads, values = _kernel_outputs(model, images)
    plain_grads, plain_values = _kernel_outputs(plain, images)
    np.testing.assert_allclose(values, plain_values, atol=1e-6)
    np.testing.assert_allclose(values, model.predict(images)[:, 0], atol=1e-6)
    assert np.abs(plain_grads).max() > 0
    np.testing.assert_allclose(grads, plain_grads, atol=1e-4 * np.abs(plain_grads).max())


def test_a_graph_without_normalizations_runs_as_exported(exported_model_dir):
    assert load_explainable_model(exported_model_dir, batch_size=4).folded is None


def test_a_fold_that_changes_the_outputs_is_not_used(normalized_model_dir, monkeypatch, caplog):
    """Any difference past the tolerance (here: any difference at all, or none) rejects the fold,
    says so in the log, and the kernels run the signature as exported."""
    monkeypatch.setattr(folding, "OUTPUT_TOLERANCE", -1.0)
    with caplog.at_level(logging.WARNING, logger="explain.folding"):
        model = load_explainable_model(normalized_model_dir, batch_size=4)
    assert model.folded is None
    assert "not folded" in caplog.text and "as exported" in caplog.text
    grads, values = _kernel_outputs(model, _images(2))
    np.testing.assert_allclose(values, model.predict(_images(2))[:, 0], atol=1e-6)


def test_folding_the_trained_network_keeps_its_attributions(trained_model_dir, sample_data):
    """MobileNetV2 (every normalization follows a convolution): all of them fold, and IG through
    the folded graph is IG of the same function, to the float32 rounding of another summation
    order (relative L1 difference 1e-3 on the real build, where ReLU6's kinks meet rounding)."""
    from trainer.data import take_numpy

    model = load_explainable_model(trained_model_dir, batch_size=8)
    plain = load_explainable_model(trained_model_dir, batch_size=8, fold_norms=False)
    assert model.folded is not None and model.folded.folded == model.folded.normalizations >= 50
    images = take_numpy(sample_data["eval_pattern"], 3)[0]
    classes = plain.predict(images).argmax(axis=1)
    results = [IntegratedGradients().GetMask(images, np.zeros_like(images), classes, m, step_count=16,
                                             target_error=None) for m in (model, plain)]
    folded, exported = (r.attributions for r in results)
    assert np.abs(folded - exported).sum() <= 1e-2 * np.abs(exported).sum()
    np.testing.assert_allclose(results[0].instance_outputs, results[1].instance_outputs, atol=1e-5)
    np.testing.assert_allclose(folded.reshape(3, -1).sum(axis=1), exported.reshape(3, -1).sum(axis=1), atol=5e-3)
