"""An offline stand-in for the TF Hub MobileNetV2 feature extractor.

Tests and the demo may not download anything, so they cannot use
``https://tfhub.dev/google/imagenet/mobilenet_v2_100_192/feature_vector/5``. This module builds a
small network of MobileNetV2's inverted-residual blocks (Sandler et al., 2018), pre-trains it
briefly on synthetic flowers drawn with a seed of their own (standing in for ImageNet
pre-training: the features are learned, not random), and saves it as a TF2 SavedModel in TF Hub's
format (``__call__(images, training)`` plus ``variables`` / ``trainable_variables``). The trainer
then loads it through exactly the ``hub.KerasLayer`` path that production uses.
"""

from __future__ import annotations

import os
import tempfile

import trainer  # noqa: F401  (legacy Keras before TensorFlow)

import fire
import tensorflow as tf
import tf_keras as keras

from trainer.schema import CHANNELS, CLASSES, IMAGE_SIZE

#: Seed of the pre-training data: never the seed of the data the classifier is trained on.
PRETRAIN_SEED = 20260316
#: Batch-norm statistics must settle within a few hundred pre-training steps (Keras' 0.99 does not).
BN_MOMENTUM = 0.9


def _inverted_residual(x, expansion: int, filters: int, stride: int, name: str):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear projection (+ skip)."""
    in_channels = x.shape[-1]
    y = keras.layers.Conv2D(in_channels * expansion, 1, use_bias=False, name=f"{name}_expand")(x)
    y = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_expand_BN")(y)
    y = keras.layers.ReLU(6.0, name=f"{name}_expand_relu")(y)
    y = keras.layers.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False, name=f"{name}_depthwise")(y)
    y = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_depthwise_BN")(y)
    y = keras.layers.ReLU(6.0, name=f"{name}_depthwise_relu")(y)
    y = keras.layers.Conv2D(filters, 1, use_bias=False, name=f"{name}_project")(y)
    y = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_project_BN")(y)
    if stride == 1 and in_channels == filters:
        y = keras.layers.Add(name=f"{name}_add")([x, y])
    return y


def build_feature_network(image_size: tuple[int, int] = IMAGE_SIZE, feature_dim: int = 128) -> keras.Model:
    """A MobileNetV2-style feature extractor: images in [0, 1] -> ``feature_dim`` vector."""
    inputs = keras.Input([*image_size, CHANNELS], name="images")
    x = keras.layers.Rescaling(2.0, offset=-1.0, name="to_minus1_1")(inputs)  # as TF Hub's MobileNet expects
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", use_bias=False, name="Conv1")(x)
    x = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name="Conv1_BN")(x)
    x = keras.layers.ReLU(6.0, name="Conv1_relu")(x)
    # Downsample early (96 -> 48 px before any expansion): most of the cost of a MobileNet at
    # full resolution buys detail these synthetic flowers do not need.
    for i, (expansion, filters, stride) in enumerate([(1, 16, 2), (4, 24, 2), (4, 24, 1), (4, 32, 2),
                                                      (4, 64, 2), (4, 64, 1)]):
        x = _inverted_residual(x, expansion, filters, stride, name=f"block_{i}")
    x = keras.layers.Conv2D(feature_dim, 1, use_bias=False, name="Conv_last")(x)
    x = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name="Conv_last_BN")(x)
    x = keras.layers.ReLU(6.0, name="out_relu")(x)
    features = keras.layers.GlobalAveragePooling2D(name="feature_vector")(x)
    return keras.Model(inputs, features, name="mobilenet_v2_mini")


def build_local_backbone(output_dir: str, num_images: int = 640, epochs: int = 4, batch_size: int = 32,
                         image_size: tuple[int, int] = IMAGE_SIZE, feature_dim: int = 128,
                         seed: int = PRETRAIN_SEED, verbose: int = 2) -> str:
    """Pre-train the stand-in backbone on synthetic flowers and save it in TF Hub format.

    Returns ``output_dir``, which is then a valid ``hub_handle`` for :func:`trainer.model.build_model`.
    """
    from trainer.data import load_dataset
    from trainer.synthetic import write_dataset

    keras.utils.set_random_seed(seed)
    features = build_feature_network(image_size, feature_dim)
    classifier = keras.Sequential([features, keras.layers.Dense(len(CLASSES), activation="softmax")])
    classifier.compile(optimizer=keras.optimizers.Adam(2e-3), loss="categorical_crossentropy", metrics=["accuracy"])
    with tempfile.TemporaryDirectory() as tmp:
        data = write_dataset(tmp, num_train=num_images, num_eval=max(num_images // 10, len(CLASSES)),
                             seed=seed, image_size=image_size)
        train = load_dataset(data["train_pattern"], batch_size, training=True, seed=seed,
                             image_size=image_size).cache()
        evaluation = load_dataset(data["eval_pattern"], batch_size, training=False,
                                  image_size=image_size).cache()
        print(f"Pre-training the local backbone on {num_images} synthetic images for {epochs} epochs")
        classifier.fit(train, validation_data=evaluation, epochs=epochs, verbose=verbose)
    features.trainable = True
    tf.saved_model.save(features, output_dir)
    print(f"Saved the local backbone (TF Hub SavedModel, {feature_dim}-d features) to {output_dir}")
    return output_dir


def main(output_dir: str = "models/backbone", num_images: int = 640, epochs: int = 4, force: bool = False) -> str:
    """CLI: ``python -m trainer.backbone --output_dir=models/backbone``; skips work if it exists."""
    if not force and tf.io.gfile.exists(os.path.join(output_dir, "saved_model.pb")):
        print(f"Local backbone already at {output_dir}")
        return output_dir
    return build_local_backbone(output_dir, num_images=num_images, epochs=epochs)


if __name__ == "__main__":
    fire.Fire(main)
