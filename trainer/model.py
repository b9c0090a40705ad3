"""The classifier: a TF Hub feature extractor (MobileNetV2 in production) and a softmax head.

The backbone is always loaded through ``hub.KerasLayer``, whether its handle is the lab's TF Hub
URL, a ``gs://`` path or a local directory, so the offline stand-in built by
:mod:`trainer.backbone` exercises exactly the code path that production uses.
"""

from __future__ import annotations

import trainer  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow is imported)

import tensorflow as tf
import tensorflow_hub as hub
import tf_keras as keras

from trainer.schema import CHANNELS, CLASSES, IMAGE_SIZE

#: The lab's backbone. Needs the network; tests and the demo use a local stand-in instead.
MOBILENET_V2_HANDLE = "https://tfhub.dev/google/imagenet/mobilenet_v2_100_192/feature_vector/5"


def build_feature_extractor(handle: str, image_size: tuple[int, int] = IMAGE_SIZE,
                            trainable: bool = False) -> hub.KerasLayer:
    """Load a TF Hub image feature-vector module (URL, ``gs://`` path or local directory)."""
    return hub.KerasLayer(handle, input_shape=[*image_size, CHANNELS], trainable=trainable,
                          name="feature_extractor")


def build_head(num_classes: int, feature_dim: int) -> keras.Model:
    """The softmax head alone, trained on cached backbone features when the backbone is frozen."""
    return keras.Sequential(
        [keras.layers.InputLayer(input_shape=[feature_dim]),
         keras.layers.Dense(num_classes, activation="softmax", name="classifier")],
        name="head",
    )


def compile_model(model: keras.Model, learning_rate: float = 1e-3) -> keras.Model:
    """Compile as in the lab: adam, categorical cross-entropy, accuracy."""
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
                  loss="categorical_crossentropy", metrics=["accuracy"])
    return model


def set_fine_tune_layers(extractor: hub.KerasLayer, fine_tune_layers: int) -> int:
    """Make the top ``fine_tune_layers`` variable groups of the backbone trainable.

    A Hub module exposes variables, not layers; variables are grouped by their layer prefix
    (``.../block_16_project/kernel`` and ``.../block_16_project_BN/gamma`` are two layers) in
    the module's own order, and the last N groups are unfrozen. Batch-norm moving statistics
    are never trainable. Returns the number of variables made trainable.
    """
    if fine_tune_layers <= 0:
        extractor.trainable = False
        return 0
    extractor.trainable = True
    module = getattr(extractor, "_func", None)  # the loaded module: its variables are in layer order
    ordered = list(getattr(module, "variables", None) or extractor.variables)
    groups: dict[str, list[tf.Variable]] = {}
    for var in ordered:
        groups.setdefault(var.name.rsplit("/", 1)[0], []).append(var)
    keep = list(groups)[-fine_tune_layers:]
    trainable = [v for g in keep for v in groups[g] if v.trainable and "moving_" not in v.name]
    trainable_ids = {id(v) for v in trainable}
    # hub.KerasLayer registers the module's variables once, in __init__, as trainable or not;
    # it has no public way to unfreeze only some, so re-split its two weight lists. (Plain
    # object.__setattr__: Keras' own __setattr__ would re-track every variable as trainable.)
    object.__setattr__(extractor, "_trainable_weights", trainable)
    object.__setattr__(extractor, "_non_trainable_weights", [v for v in ordered if id(v) not in trainable_ids])
    return len(trainable)


def build_model(handle: str, num_classes: int = len(CLASSES), image_size: tuple[int, int] = IMAGE_SIZE,
                fine_tune_layers: int = 0, learning_rate: float = 1e-3) -> keras.Model:
    """Feature extractor + ``Dense(num_classes, softmax)``, compiled (the lab's ``build_model``)."""
    extractor = build_feature_extractor(handle, image_size, trainable=fine_tune_layers > 0)
    if fine_tune_layers > 0:
        set_fine_tune_layers(extractor, fine_tune_layers)
    feature_dim = int(extractor.compute_output_shape([None, *image_size, CHANNELS])[-1])
    head = build_head(num_classes, feature_dim)
    model = keras.Sequential([extractor, *head.layers], name="flowers_classifier")
    model.build([None, *image_size, CHANNELS])
    return compile_model(model, learning_rate)


def assemble(extractor: hub.KerasLayer, head: keras.Model, image_size: tuple[int, int] = IMAGE_SIZE,
             learning_rate: float = 1e-3) -> keras.Model:
    """The full image model from a backbone and a head trained on its cached features."""
    model = keras.Sequential([extractor, *head.layers], name="flowers_classifier")
    model.build([None, *image_size, CHANNELS])
    return compile_model(model, learning_rate)
