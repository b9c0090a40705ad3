"""The offline stand-in for the TF Hub MobileNetV2 feature extractor: the same network, built here.

Tests, the demo and the bench may not download anything, so they cannot use
``https://tfhub.dev/google/imagenet/mobilenet_v2_100_192/feature_vector/5``. This module builds
exactly that architecture, MobileNetV2 1.0 at 192x192 (Sandler et al. 2018,
https://arxiv.org/abs/1801.04381; ``tf_keras.applications.MobileNetV2(alpha=1.0,
include_top=False, pooling="avg", weights=None)``: about 300M multiply-adds, 2,257,984
parameters, 1280-d features), behind TF Hub's image feature-vector interface (float images in
[0, 1], any batch size, ``__call__(images, training)`` plus ``variables`` /
``trainable_variables`` / ``regularization_losses``). It is pre-trained briefly on synthetic
flowers drawn with a seed of its own, standing in for ImageNet pre-training, so its features are
learned, not random; it is saved in TF Hub's SavedModel format and the trainer loads it through
exactly the ``hub.KerasLayer`` path that production uses. Every performance figure of the
project is measured on this network, so it describes what users deploy.

Pre-training takes minutes on 2 cores, so a build is cached: :func:`ensure_backbone` reuses a
directory whose ``recipe.json`` matches the requested recipe and rebuilds it otherwise, writing
to a temporary directory and renaming it into place, so a killed build never leaves a
half-written backbone that a later run would trust. The demo, the tests and the bench share it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, replace

import trainer  # noqa: F401  (legacy Keras before TensorFlow)

import fire
import tensorflow as tf
import tf_keras as keras

from trainer.schema import CHANNELS, CLASSES, IMAGE_SIZE

#: Seed of the pre-training data: never the seed of the data the classifier is trained on.
PRETRAIN_SEED = 20260316
#: Keras' MobileNetV2 uses 0.999, which lets batch-norm statistics settle only after thousands of
#: steps; pre-training here runs a few hundred, so the moving statistics follow faster.
BN_MOMENTUM = 0.9
#: What TF Hub's ``mobilenet_v2_100_192/feature_vector`` module has (and Keras' MobileNetV2 1.0).
MOBILENET_V2_PARAMETERS = 2_257_984
MOBILENET_V2_FEATURES = 1280
RECIPE_FILE = "recipe.json"
#: Bump when the build changes in a way that invalidates cached backbones.
BUILD_VERSION = 2


@dataclass(frozen=True)
class BackboneRecipe:
    """Everything a backbone build depends on: a cached build is reused only if all of it matches."""

    architecture: str = "mobilenet_v2"
    alpha: float = 1.0
    image_size: int = IMAGE_SIZE[0]
    #: pre-training runs at this size (see :func:`build_local_backbone`), the saved module at ``image_size``
    pretrain_size: int = 96
    num_images: int = 800
    epochs: int = 4
    #: images at ``image_size`` that re-estimate the batch-norm statistics after the weights are copied
    calibration_images: int = 192
    batch_size: int = 32
    learning_rate: float = 2e-3
    seed: int = PRETRAIN_SEED
    version: int = BUILD_VERSION


#: The recipe the demo, the tests and the bench share (one cached build for all of them).
DEFAULT_RECIPE = BackboneRecipe()


def build_feature_network(image_size: tuple[int, int] = IMAGE_SIZE, alpha: float = 1.0) -> keras.Model:
    """MobileNetV2 (``alpha``, no top, average pooling) taking images in [0, 1], as TF Hub's
    feature-vector modules do; the rescaling to [-1, 1] MobileNet expects is inside the model."""
    inputs = keras.Input([*image_size, CHANNELS], name="images")
    scaled = keras.layers.Rescaling(2.0, offset=-1.0, name="to_minus1_1")(inputs)
    # input_tensor makes one flat model (no nested sub-model), so variables keep Keras' layer
    # names (``block_16_project/kernel``) and fine-tuning can select the top layers by name.
    network = keras.applications.MobileNetV2(input_tensor=scaled, alpha=alpha, include_top=False,
                                             pooling="avg", weights=None)
    for layer in network.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = BN_MOMENTUM
    return keras.Model(inputs, network.output, name=f"mobilenet_v2_{alpha:g}_{image_size[0]}")


def build_small_test_network(image_size: tuple[int, int] = IMAGE_SIZE, feature_dim: int = 32) -> keras.Model:
    """A SMALL TEST NETWORK, not MobileNetV2: a few convolutions with the same interface, for unit
    tests that need a hub-format backbone in seconds (never for figures, the demo or the bench)."""
    inputs = keras.Input([*image_size, CHANNELS], name="images")
    x = keras.layers.Rescaling(2.0, offset=-1.0)(inputs)
    x = keras.layers.Conv2D(16, 3, strides=4, use_bias=False)(x)
    x = keras.layers.BatchNormalization(momentum=BN_MOMENTUM)(x)
    x = keras.layers.ReLU(6.0)(x)
    x = keras.layers.Conv2D(feature_dim, 3, strides=4, activation="relu")(x)
    return keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x), name="small_test_network")


def _network(recipe: BackboneRecipe) -> keras.Model:
    size = (recipe.image_size, recipe.image_size)
    if recipe.architecture == "mobilenet_v2":
        return build_feature_network(size, recipe.alpha)
    if recipe.architecture == "small_test_network":
        return build_small_test_network(size)
    raise ValueError(f"unknown backbone architecture {recipe.architecture!r}")


def _recalibrate_batch_norm(network: keras.Model, images: tf.data.Dataset, momentum: float = 0.8) -> None:
    """Re-estimate every batch-norm layer's moving statistics on ``images`` (forward passes in
    training mode, no weight update): statistics gathered at another resolution do not hold."""
    bn_layers = [layer for layer in network.layers if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in bn_layers:
        layer.momentum = momentum
    step = tf.function(lambda x: network(x, training=True))
    for batch in images:
        step(batch)
    for layer in bn_layers:
        layer.momentum = BN_MOMENTUM


def build_local_backbone(output_dir: str, recipe: BackboneRecipe = DEFAULT_RECIPE, verbose: int = 2) -> str:
    """Pre-train the backbone of ``recipe`` on synthetic flowers and save it in TF Hub format.

    On 2 CPU cores a training step of MobileNetV2 at 192x192 costs ~130 ms per image (the
    depthwise filters' gradients dominate), 7x more than at 96x96. The network is fully
    convolutional with global pooling, so its weights do not depend on the input size: it is
    pre-trained at ``recipe.pretrain_size`` (many more images for the same time, so better
    features), its weights are copied into the network built at ``recipe.image_size``, and the
    batch-norm statistics are re-estimated at that size before it is saved.

    Returns ``output_dir``, which is then a valid ``hub_handle`` for :func:`trainer.model.build_model`.
    Writes into a temporary sibling and renames it into place when complete.
    """
    from trainer.data import load_dataset
    from trainer.synthetic import write_dataset

    size = (recipe.image_size, recipe.image_size)
    small = (recipe.pretrain_size, recipe.pretrain_size)
    keras.utils.set_random_seed(recipe.seed)
    pretrain_net = _network(replace(recipe, image_size=recipe.pretrain_size))
    head = keras.layers.Dense(len(CLASSES), activation="softmax", name="pretrain_head")
    classifier = keras.Sequential([pretrain_net, head])
    classifier.compile(optimizer=keras.optimizers.Adam(recipe.learning_rate), loss="categorical_crossentropy",
                       metrics=["accuracy"])
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".backbone-", dir=parent)
    try:
        data = write_dataset(os.path.join(staging, "data"), num_train=recipe.num_images,
                             num_eval=max(recipe.num_images // 8, len(CLASSES)), seed=recipe.seed, image_size=small)
        full = write_dataset(os.path.join(staging, "full"), num_train=recipe.calibration_images,
                             num_eval=max(recipe.num_images // 8, len(CLASSES)), seed=recipe.seed + 1, image_size=size)
        train = load_dataset(data["train_pattern"], recipe.batch_size, training=True, seed=recipe.seed,
                             image_size=small).cache()
        evaluation = load_dataset(data["eval_pattern"], recipe.batch_size, training=False, image_size=small).cache()
        print(f"Pre-training the local {recipe.architecture} backbone ({pretrain_net.count_params():,} parameters) "
              f"on {recipe.num_images} synthetic images at {small[0]}x{small[1]} for {recipe.epochs} epochs",
              flush=True)
        classifier.fit(train, validation_data=evaluation, epochs=recipe.epochs, verbose=verbose)

        features = _network(recipe)
        features.set_weights(pretrain_net.get_weights())
        calibration = load_dataset(full["train_pattern"], recipe.batch_size, training=True, seed=recipe.seed,
                                   image_size=size).map(lambda images, _: images)
        _recalibrate_batch_norm(features, calibration)
        check = keras.Sequential([features, head])
        check.compile(loss="categorical_crossentropy", metrics=["accuracy"])
        accuracy = check.evaluate(load_dataset(full["eval_pattern"], recipe.batch_size, training=False,
                                               image_size=size), verbose=0, return_dict=True)["accuracy"]
        features.trainable = True
        module = os.path.join(staging, "module")
        tf.saved_model.save(features, module)
        summary = asdict(recipe) | {"parameters": int(features.count_params()),
                                    "feature_dim": int(features.output_shape[-1]),
                                    "pretrain_val_accuracy": float(accuracy)}
        with open(os.path.join(module, RECIPE_FILE), "w") as f:
            json.dump(summary, f, indent=2)
        if os.path.exists(output_dir):
            shutil.rmtree(output_dir)
        os.replace(module, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"Saved the local backbone (TF Hub SavedModel, {summary['feature_dim']}-d features, pre-training "
          f"validation accuracy at {size[0]}x{size[1]} {accuracy:.1%}) to {output_dir}", flush=True)
    return output_dir


def read_recipe(output_dir: str) -> dict | None:
    """The recipe a cached backbone was built with, or None when there is no complete build."""
    path = os.path.join(output_dir, RECIPE_FILE)
    if not (os.path.exists(path) and os.path.exists(os.path.join(output_dir, "saved_model.pb"))):
        return None
    with open(path) as f:
        return json.load(f)


def ensure_backbone(output_dir: str, recipe: BackboneRecipe = DEFAULT_RECIPE, verbose: int = 2) -> str:
    """``output_dir`` holding a build of ``recipe``: reused when its recipe matches, built otherwise.

    A file lock beside it makes concurrent callers (two test runs, the demo and the bench) wait
    for one build instead of each paying for their own."""
    import fcntl

    os.makedirs(os.path.dirname(os.path.abspath(output_dir)), exist_ok=True)
    with open(os.path.abspath(output_dir) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _ensure_locked(output_dir, recipe, verbose)


def _ensure_locked(output_dir: str, recipe: BackboneRecipe, verbose: int) -> str:
    cached = read_recipe(output_dir)
    if cached is not None and all(cached.get(k) == v for k, v in asdict(recipe).items()):
        print(f"Local backbone already at {output_dir} ({recipe.architecture}, built "
              f"{cached.get('num_images')} images x {cached.get('epochs')} epochs)", flush=True)
        return output_dir
    if cached is not None:
        print(f"Rebuilding {output_dir}: it was built with another recipe", flush=True)
    return build_local_backbone(output_dir, recipe, verbose=verbose)


def main(output_dir: str = "models/backbone", num_images: int = DEFAULT_RECIPE.num_images,
         epochs: int = DEFAULT_RECIPE.epochs, force: bool = False) -> str:
    """CLI: ``python -m trainer.backbone --output_dir=models/backbone``; reuses a matching build."""
    recipe = BackboneRecipe(num_images=int(num_images), epochs=int(epochs))
    if force:
        return build_local_backbone(output_dir, recipe)
    return ensure_backbone(output_dir, recipe)


if __name__ == "__main__":
    fire.Fire(main)
