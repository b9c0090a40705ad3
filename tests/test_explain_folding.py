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
    rows = np.arange(n, dtype=np.int32)
    sums, derivatives, values, raw = kernel(
        images, np.zeros_like(images), np.zeros(n, np.int32), rows, rows, np.ones(n, np.float32),
        np.ones(n, np.float32), np.int32(n), np.float32(0.0), np.int32(n), threads=1)
    return raw, values


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


class _LoopLayer(keras.layers.Layer):
    """A convolution summed over a ``tf.while_loop`` whose trip count depends on the input."""

    def build(self, input_shape):
        self.kernel = self.add_weight("kernel", [3, 3, int(input_shape[-1]), 4])

    def call(self, x):
        def body(i, total):
            return i + 1, total + tf.nn.conv2d(x, self.kernel * tf.cast(i + 1, tf.float32), 1, "SAME")

        trips = tf.cast(tf.reduce_sum(x) > -1.0, tf.int32) + 1
        return tf.while_loop(lambda i, _: i < trips, body, [tf.constant(0), tf.zeros_like(x[..., :1]) * tf.zeros([4])])[1]


def _export(model: keras.Model, tmp_path_factory, name: str) -> str:
    export_dir = str(tmp_path_factory.mktemp(name) / "model")
    export_model(model, export_dir, CLASSES, verbose=False)
    return export_dir


@pytest.mark.parametrize("kind", ["swish", "while_loop"])
def test_graphs_the_folded_import_cannot_differentiate_are_run_as_exported(kind, tmp_path_factory):
    """A custom gradient (Keras' swish) keeps a gradient function of the original graph, and a
    while loop is lowered to v1 loop ops: both import and run forward correctly, but a gradient
    through the import fails. Neither is folded, and IG works as on the exported graph."""
    keras.utils.set_random_seed(5)
    x = inputs = keras.Input([*IMAGE_SIZE, 3])
    x = keras.layers.BatchNormalization()(keras.layers.Conv2D(4, 3, strides=4, use_bias=False)(x))
    x = keras.layers.Activation("swish")(x) if kind == "swish" else _LoopLayer()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model_dir = _export(keras.Model(inputs, keras.layers.Dense(len(CLASSES), activation="softmax")(x)),
                        tmp_path_factory, kind)
    model = load_explainable_model(model_dir, batch_size=4)
    assert model.folded is None
    if kind == "while_loop":  # nor can its gradient be frozen into a session: it runs eagerly
        assert model._kernel("linear").eager_because
    images = _images(2, seed=2)
    result = IntegratedGradients().GetMask(images, np.zeros_like(images), np.array([0, 1]), model, step_count=8,
                                           target_error=None)
    assert np.isfinite(result.attributions).all() and np.abs(result.attributions).max() > 0


def test_a_wrong_fold_is_caught_layer_by_layer_even_where_the_softmax_saturates(tmp_path_factory, monkeypatch,
                                                                                caplog):
    """With the classifier's logits scaled 30x, every probe scores 0 or 1 and the output check
    alone cannot see a wrong fold (here: the normalizations' epsilon read 10x too large); the
    comparison of each folded normalization's output with the original's does."""
    model = _normalized_cnn()
    dense = model.layers[-1]
    kernel, bias = dense.get_weights()
    dense.set_weights([kernel * 30, bias * 30])
    model_dir = _export(model, tmp_path_factory, "saturated")
    assert load_explainable_model(model_dir, batch_size=4).folded is not None
    fold = folding.fold_graph_def

    def wrong_epsilon(graph_def):
        for node in graph_def.node:
            if node.op in ("FusedBatchNorm", "FusedBatchNormV3"):
                node.attr["epsilon"].f *= 10
        return fold(graph_def)

    monkeypatch.setattr(folding, "fold_graph_def", wrong_epsilon)
    with caplog.at_level(logging.WARNING, logger="explain.folding"):
        assert load_explainable_model(model_dir, batch_size=4).folded is None
    assert "differs from the model's" in caplog.text


def test_any_failure_while_folding_leaves_the_model_usable(normalized_model_dir, monkeypatch, caplog):
    def broken(signature):
        raise RuntimeError("TensorFlow internals changed")

    monkeypatch.setattr(folding, "_frozen_graph_def", broken)
    with caplog.at_level(logging.WARNING, logger="explain.folding"):
        model = load_explainable_model(normalized_model_dir, batch_size=4)
    assert model.folded is None and "TensorFlow internals changed" in caplog.text
    grads, values = _kernel_outputs(model, _images(2))
    np.testing.assert_allclose(values, model.predict(_images(2))[:, 0], atol=1e-6)


def test_a_folded_graph_that_cannot_be_differentiated_falls_back_at_load(tmp_path_factory, monkeypatch, caplog):
    """The second guard: were a custom gradient not recognized in the frozen graph, the load's
    first gradient through the folded graph fails, and the model falls back to the exported one."""
    keras.utils.set_random_seed(6)
    x = inputs = keras.Input([*IMAGE_SIZE, 3])
    x = keras.layers.BatchNormalization()(keras.layers.Conv2D(4, 3, strides=4, use_bias=False)(x))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Activation("swish")(x))
    model_dir = _export(keras.Model(inputs, keras.layers.Dense(len(CLASSES), activation="softmax")(x)),
                        tmp_path_factory, "swish_unrecognized")
    monkeypatch.setattr(folding, "_unsupported", lambda graph_def: None)
    with caplog.at_level(logging.WARNING, logger="explain.model"):
        model = load_explainable_model(model_dir, batch_size=4)
    assert model.folded is None and "cannot be differentiated" in caplog.text
    grads, _ = _kernel_outputs(model, _images(2))
    assert np.isfinite(grads).all() and np.abs(grads).max() > 0
