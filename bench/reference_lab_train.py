"""Reference: the Vertex AI explainable-image lab's ``trainer/train.py``, as written there.

Credit: Google Cloud, "Explaining an image classification model with Vertex Explainable AI"
(``shared/seeds/vertex-xai-image-lab.txt``). Kept faithful so the benchmark measures the lab's
pipeline: records parsed and JPEG-decoded with a plain ``map`` (no ``num_parallel_calls``), no
``prefetch``, no shuffle, and the frozen MobileNetV2 backbone run again on every image of every
epoch, for training and for validation.

Three changes, none of which alters the work per epoch: the backbone handle is a parameter (the
benchmark passes the same offline stand-in our trainer uses, as the lab's TF Hub URL needs the
network); the lab's ``steps_per_epoch = train_examples // (batch_size * num_epochs)`` (which
shows each image 1/num_epochs times per epoch) is replaced by a full pass over
``train_examples`` per epoch, so both trainers see the same examples for the same epochs; and
the trained model is returned, not saved, since saving is not the lab's training cost.
"""

from __future__ import annotations

import math

import trainer  # noqa: F401  (legacy Keras before TensorFlow)

import tensorflow as tf
import tensorflow_hub as hub

IMAGE_SIZE = [192, 192]


def read_tfrecord(example):
    features = {
        "image": tf.io.FixedLenFeature([], tf.string),  # tf.string means bytestring
        "class": tf.io.FixedLenFeature([], tf.int64),  # shape [] means scalar
        "one_hot_class": tf.io.VarLenFeature(tf.float32),
    }
    example = tf.io.parse_single_example(example, features)
    image = tf.image.decode_jpeg(example["image"], channels=3)
    image = tf.cast(image, tf.float32) / 255.0  # convert image to floats in [0, 1] range
    image = tf.reshape(image, [*IMAGE_SIZE, 3])
    one_hot_class = tf.sparse.to_dense(example["one_hot_class"])
    one_hot_class = tf.reshape(one_hot_class, [5])
    return image, one_hot_class


def load_dataset(gcs_pattern, batch_size=32, training=True):
    filenames = [f for part in gcs_pattern.split(",") for f in tf.io.gfile.glob(part)]  # bench: a list of shards
    ds = tf.data.TFRecordDataset(filenames).map(read_tfrecord).batch(batch_size)
    if training:
        return ds.repeat()
    else:
        return ds


def build_model(mobilenet_v2):
    # MobileNet model for feature extraction
    feature_extractor_layer = hub.KerasLayer(mobilenet_v2, input_shape=[*IMAGE_SIZE, 3], trainable=False)
    # Instantiate model
    model = tf.keras.Sequential([feature_extractor_layer, tf.keras.layers.Dense(5, activation="softmax")])
    model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
    return model


def train_and_evaluate(train_data_path, eval_data_path, batch_size, num_epochs, train_examples, hub_handle,
                       verbose=0):
    """Train as the lab does; returns ``(model, history dict)``."""
    model = build_model(hub_handle)
    train_ds = load_dataset(gcs_pattern=train_data_path, batch_size=batch_size)
    eval_ds = load_dataset(gcs_pattern=eval_data_path, training=False)
    steps_per_epoch = math.ceil(train_examples / batch_size)  # the lab: train_examples // (batch_size * num_epochs)
    history = model.fit(train_ds, validation_data=eval_ds, epochs=num_epochs, steps_per_epoch=steps_per_epoch,
                        verbose=verbose)
    return model, history.history
