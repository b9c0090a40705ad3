"""Train the flowers classifier: the lab's ``train_and_evaluate``, made fast, resumable and exact.

Runs unchanged as a Vertex AI custom training job (``python -m trainer.train ...``, output to
``AIP_MODEL_DIR`` / ``gs://``) and locally. When the backbone is frozen (the default, as in the lab)
its features do not change during training, so they are computed once and the softmax head is
trained on the cached vectors: the same model, many times less work per epoch. The full image
model is then assembled from the backbone and the trained head and evaluated on images.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import time
from typing import Any, Sequence

import trainer  # noqa: F401  (legacy Keras before TensorFlow)

import fire
import numpy as np
import tensorflow as tf
import tf_keras as keras

from trainer.data import count_records, list_files, load_dataset, validate_files
from trainer.model import MOBILENET_V2_HANDLE, assemble, build_feature_extractor, build_head, build_model, compile_model
from trainer.schema import CLASSES, IMAGE_SIZE

KERAS_MODEL_DIR = "keras_model"
METRICS_FILE = "metrics.json"
CONFUSION_FIGURE = "confusion_matrix.png"
HISTORY_FIGURE = "training_history.png"


def _join(*parts: str) -> str:
    """Join path parts for local paths and ``gs://`` URIs alike."""
    return posixpath.join(*parts) if parts[0].startswith("gs://") else os.path.join(*parts)


def set_determinism(seed: int) -> None:
    """Same seed, same model: seed Python, NumPy and TF, and make TF kernels deterministic."""
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def compute_features(extractor: keras.layers.Layer, dataset: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Run the frozen backbone once over ``dataset``; returns (features, one-hot labels)."""
    run = tf.function(lambda images: extractor(images, training=False), reduce_retracing=True)
    feats, labels = [], []
    for images, one_hot in dataset:
        feats.append(run(images).numpy())
        labels.append(one_hot.numpy())
    return np.concatenate(feats), np.concatenate(labels)


def classification_metrics(y_true: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Accuracy, loss, per-class precision/recall and the confusion matrix (rows: true class)."""
    n = len(class_names)
    y_pred = probabilities.argmax(axis=1)
    cm = np.zeros((n, n), dtype=int)
    np.add.at(cm, (y_true, y_pred), 1)
    eps = 1e-7
    loss = float(-np.mean(np.log(np.clip(probabilities[np.arange(len(y_true)), y_true], eps, 1.0))))
    per_class = {}
    for i, name in enumerate(class_names):
        predicted, actual = cm[:, i].sum(), cm[i, :].sum()
        per_class[name] = {"precision": float(cm[i, i] / predicted) if predicted else 0.0,
                           "recall": float(cm[i, i] / actual) if actual else 0.0,
                           "support": int(actual)}
    return {"accuracy": float(np.trace(cm) / max(cm.sum(), 1)), "loss": loss, "num_examples": int(cm.sum()),
            "per_class": per_class, "confusion_matrix": cm.tolist(), "class_names": list(class_names)}


def predict_dataset(model: keras.Model, dataset: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """(true class indices, probabilities) of ``model`` over a batched (images, one_hot) dataset."""
    run = tf.function(lambda images: model(images, training=False), reduce_retracing=True)
    y_true, probs = [], []
    for images, one_hot in dataset:
        probs.append(run(images).numpy())
        y_true.append(one_hot.numpy().argmax(axis=1))
    return np.concatenate(y_true), np.concatenate(probs)


def _write_json(path: str, obj: Any) -> None:
    with tf.io.gfile.GFile(path, "w") as f:
        json.dump(obj, f, indent=2)


def _write_figures(output_dir: str, metrics: dict[str, Any], history: dict[str, list[float]]) -> None:
    """Confusion-matrix and training-curve PNGs (written through gfile so gs:// works)."""
    import tempfile

    from trainer.plots import plot_confusion_matrix, plot_history

    with tempfile.TemporaryDirectory() as tmp:
        for name, draw in [(CONFUSION_FIGURE, lambda p: plot_confusion_matrix(
                               np.array(metrics["confusion_matrix"]), metrics["class_names"], p,
                               title=f"Validation accuracy {metrics['accuracy']:.1%}")),
                           (HISTORY_FIGURE, lambda p: plot_history(history, p))]:
            local = os.path.join(tmp, name)
            draw(local)
            tf.io.gfile.copy(local, _join(output_dir, name), overwrite=True)


def train_and_evaluate(train_data_path: str, eval_data_path: str, output_dir: str | None = None,
                       batch_size: int = 32, num_epochs: int = 5, train_examples: int | None = None,
                       hub_handle: str = MOBILENET_V2_HANDLE, learning_rate: float = 1e-3,
                       fine_tune_layers: int = 0, seed: int = 42, cache_features: bool = True,
                       classes: Sequence[str] | str = CLASSES, image_size: int = IMAGE_SIZE[0],
                       verbose: int = 2) -> dict[str, Any]:
    """Train, evaluate and save the classifier; the lab's CLI, plus handle, learning rate,
    fine-tuning depth and seed.

    Writes to ``output_dir`` (default ``$AIP_MODEL_DIR``, as Vertex custom training sets it):
    ``keras_model/`` (the trained tf_keras SavedModel; ``trainer.export`` adds the serving and
    explanation signatures), ``metrics.json``, ``confusion_matrix.png``, ``training_history.png``,
    ``checkpoints/`` (each epoch; a killed run resumes from the last one) and ``logs/`` (TensorBoard).
    ``train_examples`` is the number of examples seen per epoch (default: the whole training set).
    """
    output_dir = output_dir or os.environ.get("AIP_MODEL_DIR")
    if not output_dir:
        raise ValueError("output_dir is required (or set AIP_MODEL_DIR, as Vertex AI custom training does)")
    if isinstance(classes, str):
        classes = [c.strip() for c in classes.split(",") if c.strip()]
    class_names = list(classes)
    size = (int(image_size), int(image_size))
    for name, value in [("batch_size", batch_size), ("num_epochs", num_epochs)]:
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    set_determinism(seed)

    # Fail in seconds on bad data, not after hours of training.
    validate_files(list_files(train_data_path), len(class_names))
    validate_files(list_files(eval_data_path), len(class_names))
    num_train = count_records(train_data_path)
    examples_per_epoch = int(train_examples) if train_examples else num_train
    steps_per_epoch = max(1, math.ceil(examples_per_epoch / batch_size))
    print(f"Training on {num_train} records ({examples_per_epoch} per epoch, {steps_per_epoch} steps of "
          f"{batch_size}) for {num_epochs} epochs; backbone {hub_handle}")

    tf.io.gfile.makedirs(output_dir)
    train_ds = load_dataset(train_data_path, batch_size, training=True, num_classes=len(class_names), seed=seed,
                            image_size=size, validate=False)
    eval_ds = load_dataset(eval_data_path, batch_size, training=False, num_classes=len(class_names),
                           image_size=size, validate=False)
    callbacks = [
        keras.callbacks.BackupAndRestore(_join(output_dir, "checkpoints", "backup"), save_freq="epoch",
                                         delete_checkpoint=False),
        keras.callbacks.TensorBoard(_join(output_dir, "logs"), update_freq="epoch"),
    ]

    started = time.perf_counter()
    if fine_tune_layers == 0 and cache_features:
        extractor = build_feature_extractor(hub_handle, size, trainable=False)
        t0 = time.perf_counter()
        train_x, train_y = compute_features(extractor, train_ds)
        eval_x, eval_y = compute_features(extractor, eval_ds)
        print(f"Cached backbone features for {len(train_x) + len(eval_x)} images in {time.perf_counter() - t0:.1f}s")
        head = compile_model(build_head(len(class_names), train_x.shape[1]), learning_rate)
        features_ds = (tf.data.Dataset.from_tensor_slices((train_x, train_y))
                       .shuffle(len(train_x), seed=seed, reshuffle_each_iteration=True)
                       .repeat().batch(batch_size).prefetch(tf.data.AUTOTUNE))
        history = head.fit(features_ds, validation_data=(eval_x, eval_y), epochs=num_epochs,
                           steps_per_epoch=steps_per_epoch, callbacks=callbacks, verbose=verbose)
        model = assemble(extractor, head, size, learning_rate)
    else:
        model = build_model(hub_handle, len(class_names), size, fine_tune_layers, learning_rate)
        history = model.fit(train_ds.repeat(), validation_data=eval_ds, epochs=num_epochs,
                            steps_per_epoch=steps_per_epoch, callbacks=callbacks, verbose=verbose)
    train_seconds = time.perf_counter() - started

    # Evaluate the assembled image model on images: these are the figures a deployment gate reads.
    y_true, probabilities = predict_dataset(model, eval_ds)
    if probabilities.shape[1] != len(class_names):
        raise ValueError(f"model has {probabilities.shape[1]} outputs but {len(class_names)} classes were given")
    metrics = classification_metrics(y_true, probabilities, class_names)
    metrics.update({"train_seconds": round(train_seconds, 3), "epochs": int(num_epochs), "seed": int(seed),
                    "hub_handle": hub_handle, "fine_tune_layers": int(fine_tune_layers),
                    "cached_features": bool(fine_tune_layers == 0 and cache_features)})
    print(f"Validation accuracy {metrics['accuracy']:.4f}, loss {metrics['loss']:.4f}")

    keras_dir = _join(output_dir, KERAS_MODEL_DIR)
    model.save(keras_dir)
    _write_json(_join(output_dir, METRICS_FILE), metrics)
    _write_json(_join(output_dir, "labels.json"), class_names)
    _write_figures(output_dir, metrics, {k: [float(v) for v in vs] for k, vs in history.history.items()})
    print(f"Exported trained model to {keras_dir}")
    return metrics


if __name__ == "__main__":
    fire.Fire(train_and_evaluate, serialize=lambda metrics: json.dumps(
        {k: metrics[k] for k in ("accuracy", "loss", "num_examples", "train_seconds")}))
