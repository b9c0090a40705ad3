"""Train the flowers classifier: the lab's ``train_and_evaluate``, made fast, resumable and exact.

Runs unchanged as a Vertex AI custom training job (``python -m trainer.train ...``, output to
``AIP_MODEL_DIR`` / ``gs://``) and locally. When the backbone is frozen (the default, as in the lab)
its features do not change during training, so they are computed once and the softmax head is
trained on the cached vectors: the same model, many times less work per epoch. The full image
model is then assembled from the backbone and the trained head and evaluated on images.

With a cluster (``TF_CONFIG``, or Vertex's ``CLUSTER_SPEC`` for a custom job with several replicas)
it trains one model across the workers with ``MultiWorkerMirroredStrategy`` (``MirroredStrategy``
across the GPUs of one machine): each worker caches the backbone features of its own shard of the
training records, gradients are all-reduced, and only the chief evaluates and writes checkpoints,
metrics and the model (:mod:`trainer.distribute`). Without one, nothing changes: no strategy.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import shutil
import time
from typing import Any, Sequence

import trainer  # noqa: F401  (legacy Keras before TensorFlow)

import fire
import numpy as np
import tensorflow as tf
import tf_keras as keras

from trainer.data import count_records, list_files, load_dataset, parse_example, validate_files
from trainer.distribute import Cluster, make_strategy, read_cluster, write_dir
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
    cluster = read_cluster()
    strategy = make_strategy(cluster)  # first: collective ops must be set up before other TF work
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
    if strategy is not None:
        model, history = _fit_distributed(strategy, cluster, train_data_path, train_ds, class_names, size,
                                          hub_handle, batch_size, num_epochs, steps_per_epoch, learning_rate,
                                          fine_tune_layers, cache_features, seed, output_dir, verbose)
        if model is None:  # a worker: the chief evaluates and writes
            return {"accuracy": float(history.history["accuracy"][-1]), "loss": float(history.history["loss"][-1]),
                    "num_examples": 0, "train_seconds": round(time.perf_counter() - started, 3), "chief": False,
                    "task": f"{cluster.task_type}:{cluster.task_index}", "num_workers": cluster.num_workers}
    elif fine_tune_layers == 0 and cache_features:
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
    if strategy is not None:
        metrics.update({"num_workers": cluster.num_workers, "num_replicas": strategy.num_replicas_in_sync,
                        "strategy": ("MultiWorkerMirroredStrategy" if cluster.num_workers > 1
                                     else type(strategy).__name__)})
    print(f"Validation accuracy {metrics['accuracy']:.4f}, loss {metrics['loss']:.4f}")

    keras_dir = _join(output_dir, KERAS_MODEL_DIR)
    model.save(keras_dir)
    _write_json(_join(output_dir, METRICS_FILE), metrics)
    _write_json(_join(output_dir, "labels.json"), class_names)
    _write_figures(output_dir, metrics, {k: [float(v) for v in vs] for k, vs in history.history.items()})
    print(f"Exported trained model to {keras_dir}")
    return metrics


def _no_autoshard(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """Each worker already reads its own shard: tf.distribute must not shard it again."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return dataset.with_options(options)


def _sharded_records(pattern: str, cluster: Cluster, batch_size: int, num_classes: int,
                     image_size: tuple[int, int]) -> tf.data.Dataset:
    """This worker's share of the training records (every ``num_workers``-th record), decoded and
    batched, for the one pass that caches backbone features; order does not matter there."""
    ds = tf.data.TFRecordDataset(list_files(pattern), buffer_size=8 << 20)
    ds = ds.shard(cluster.num_workers, cluster.worker_index)
    ds = ds.map(lambda r: parse_example(r, num_classes, image_size), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def _fit_distributed(strategy, cluster: Cluster, train_data_path: str, train_ds: tf.data.Dataset,
                     class_names: list[str], size: tuple[int, int], hub_handle: str, batch_size: int,
                     num_epochs: int, steps_per_epoch: int, learning_rate: float, fine_tune_layers: int,
                     cache_features: bool, seed: int, output_dir: str, verbose: int):
    """Train one model on every worker of ``strategy``; returns (the model as a plain, undistributed
    Keras model on the chief or None on other workers, the Keras History).

    ``batch_size`` is the global batch (the lab's meaning): tf.distribute splits each worker's
    batches across all replicas, so N workers see the same batches per step as one process would.
    Per-epoch validation is left out (it would need equal eval shards on every worker); the chief
    evaluates the finished image model on the whole validation set, as the single process does.
    """
    replicas = strategy.num_replicas_in_sync
    if batch_size % replicas:
        raise ValueError(f"batch_size ({batch_size}) is the global batch and must be a multiple of the "
                         f"{replicas} replicas training in sync")
    own_dir = write_dir(output_dir, cluster)
    callbacks = [
        # Multi-worker aware: the chief writes the backup, other workers a temporary copy they delete.
        keras.callbacks.BackupAndRestore(_join(output_dir, "checkpoints", "backup"), save_freq="epoch",
                                         delete_checkpoint=False),
        keras.callbacks.TensorBoard(_join(own_dir, "logs"), update_freq="epoch"),
    ]
    num_classes = len(class_names)
    if fine_tune_layers == 0 and cache_features:
        extractor = build_feature_extractor(hub_handle, size, trainable=False)  # inference only: not mirrored
        t0 = time.perf_counter()
        train_x, train_y = compute_features(extractor, _sharded_records(train_data_path, cluster, batch_size,
                                                                        num_classes, size))
        print(f"Worker {cluster.worker_index}/{cluster.num_workers}: cached backbone features for its "
              f"{len(train_x)} training images in {time.perf_counter() - t0:.1f}s")
        with strategy.scope():
            head = compile_model(build_head(num_classes, train_x.shape[1]), learning_rate)
        features_ds = _no_autoshard(tf.data.Dataset.from_tensor_slices((train_x, train_y))
                                    .shuffle(len(train_x), seed=seed, reshuffle_each_iteration=True)
                                    .repeat().batch(batch_size).prefetch(tf.data.AUTOTUNE))
        history = head.fit(features_ds, epochs=num_epochs, steps_per_epoch=steps_per_epoch, callbacks=callbacks,
                           verbose=verbose)
        if not cluster.is_chief:
            shutil.rmtree(own_dir, ignore_errors=True)  # scratch: nothing of a worker's is kept
            return None, history
        plain_head = build_head(num_classes, train_x.shape[1])
        plain_head.set_weights(head.get_weights())
        return assemble(extractor, plain_head, size, learning_rate), history
    with strategy.scope():
        model = build_model(hub_handle, num_classes, size, fine_tune_layers, learning_rate)
    history = model.fit(train_ds.repeat(), epochs=num_epochs, steps_per_epoch=steps_per_epoch, callbacks=callbacks,
                        verbose=verbose)
    if not cluster.is_chief:
        shutil.rmtree(own_dir, ignore_errors=True)
        return None, history
    plain = build_model(hub_handle, num_classes, size, fine_tune_layers, learning_rate)
    plain.set_weights(model.get_weights())
    return plain, history


if __name__ == "__main__":
    fire.Fire(train_and_evaluate, serialize=lambda metrics: json.dumps(
        {k: metrics[k] for k in ("accuracy", "loss", "num_examples", "train_seconds")}))
