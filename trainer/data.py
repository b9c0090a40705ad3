"""Reading the flowers TFRecords (the lab's schema), with errors that name the file.

Every image goes through :func:`trainer.preprocess.preprocess_image`, the one preprocessing
function that serving uses too, including when records are checked before training: data that
passes :func:`validate_files` decodes in training exactly as it decoded here.

Paths are globs on local disk or ``gs://`` (everything goes through ``tf.io.gfile``).
"""

from __future__ import annotations

import io
import os
import re

import trainer  # noqa: F401  (legacy Keras before TensorFlow)

import numpy as np
import tensorflow as tf
from PIL import Image

from trainer.preprocess import preprocess_image
from trainer.schema import CLASSES, FEATURE_CLASS, FEATURE_IMAGE, FEATURE_MASK, FEATURE_ONE_HOT, IMAGE_SIZE


class DataError(ValueError):
    """Training data that cannot be used: the message names the file (and record) and the problem."""


def tf_error_reason(exc: tf.errors.OpError) -> str:
    """The human part of a TensorFlow error: in graph mode its first line is only "Graph execution
    error:", and the reason ("Unknown image file format...") comes after the node's stack; the
    ``{{function_node ...}}``, ``[[{{node ...}}]]`` and ``[Op:...]`` noise is dropped."""
    lines = [line.strip() for line in str(exc.message or exc).splitlines()]
    noise = ("Graph execution error", "Detected at node", "<stack traces unavailable>", "[[{{node", "File \"")
    text = next((line for line in lines if line and not line.startswith(noise)), lines[0] if lines else "")
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", text)
    return re.sub(r"\s*\[Op:.*$", "", text).strip()


def shard_paths(directory: str, num_shards: int) -> list[str]:
    """``directory/flowers-00000-of-0000N.tfrec`` ...: the shard names of the lab's data."""
    return [os.path.join(directory, f"flowers-{s:05d}-of-{num_shards:05d}.tfrec") for s in range(num_shards)]


def _encode(array: np.ndarray, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def make_example(image: np.ndarray, label: int, num_classes: int = len(CLASSES), mask: np.ndarray | None = None,
                 jpeg_quality: int = 90) -> tf.train.Example:
    """A record in the lab's schema: ``image`` (``uint8 [H, W, 3]`` encoded as JPEG), ``class`` and
    ``one_hot_class``; plus ``mask`` (PNG of a ``bool [H, W]``) when one is given. The writing twin
    of :func:`parse_example`, used by the synthetic generator and the image-folder converter."""
    if not 0 <= label < num_classes:
        raise ValueError(f"label {label} is outside [0, {num_classes})")

    def bytes_feature(value: bytes) -> tf.train.Feature:
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    feature = {
        FEATURE_IMAGE: bytes_feature(_encode(image, "JPEG", quality=jpeg_quality)),
        FEATURE_CLASS: tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
        FEATURE_ONE_HOT: tf.train.Feature(float_list=tf.train.FloatList(
            value=[float(i == label) for i in range(num_classes)])),
    }
    if mask is not None:
        feature[FEATURE_MASK] = bytes_feature(_encode(mask.astype(np.uint8) * 255, "PNG"))
    return tf.train.Example(features=tf.train.Features(feature=feature))


def list_files(pattern: str) -> list[str]:
    """Files matching a glob (local or ``gs://``); several globs may be joined by commas.

    Each glob must match something: a typo in one of two patterns would otherwise silently train
    on half the data.
    """
    parts = [p.strip() for p in str(pattern).split(",") if p.strip()]
    if not parts:
        raise DataError(f"{pattern!r}: no file pattern given")
    files: list[str] = []
    for part in parts:
        try:
            matched = tf.io.gfile.glob(part)
        except tf.errors.OpError as exc:
            raise DataError(f"{part}: cannot list files ({tf_error_reason(exc)})") from exc
        if not matched:
            raise DataError(f"{part}: no files match this pattern (missing directory or empty glob)")
        files.extend(f for f in sorted(matched) if f not in files)
    return files


def _feature_spec() -> dict[str, tf.io.FixedLenFeature | tf.io.VarLenFeature]:
    return {FEATURE_IMAGE: tf.io.FixedLenFeature([], tf.string),
            FEATURE_CLASS: tf.io.FixedLenFeature([], tf.int64),
            FEATURE_ONE_HOT: tf.io.VarLenFeature(tf.float32)}


def parse_example(serialized: tf.Tensor, num_classes: int = len(CLASSES),
                  image_size: tuple[int, int] = IMAGE_SIZE) -> tuple[tf.Tensor, tf.Tensor]:
    """One serialized ``tf.train.Example`` to ``(image float32 [H, W, 3] in [0, 1], one_hot float32 [C])``."""
    example = tf.io.parse_single_example(serialized, _feature_spec())
    image = preprocess_image(example[FEATURE_IMAGE], image_size)
    one_hot = tf.reshape(tf.sparse.to_dense(example[FEATURE_ONE_HOT]), [num_classes])
    return image, one_hot


def _single(feature: tf.train.Feature, kind: str, where: str, key: str):
    """The one value of a scalar feature, or a DataError saying what is there instead."""
    values = list(getattr(feature, kind).value)
    if len(values) != 1:
        present = feature.WhichOneof("kind") or "nothing"
        raise DataError(f"{where}: feature {key!r} should hold one {kind.split('_')[0]} value, "
                        f"holds {len(values)} (it is a {present})")
    return values[0]


def _check_record(record: bytes, num_classes: int, where: str) -> None:
    try:
        example = tf.train.Example.FromString(record)
    except Exception as exc:  # protobuf's DecodeError
        raise DataError(f"{where}: not a tf.train.Example ({exc})") from exc
    feats = example.features.feature
    for key in (FEATURE_IMAGE, FEATURE_CLASS, FEATURE_ONE_HOT):
        if key not in feats:
            raise DataError(f"{where}: missing feature {key!r} (has {sorted(feats)})")
    image_bytes = _single(feats[FEATURE_IMAGE], "bytes_list", where, FEATURE_IMAGE)
    try:
        preprocess_image(tf.constant(image_bytes))
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as exc:
        raise DataError(f"{where}: feature {FEATURE_IMAGE!r} is not an image that can be decoded "
                        f"({len(image_bytes)} bytes, starting {image_bytes[:8]!r}: "
                        f"{tf_error_reason(exc)})") from exc
    one_hot = list(feats[FEATURE_ONE_HOT].float_list.value)
    if len(one_hot) != num_classes:
        raise DataError(f"{where}: class count does not match the head: {FEATURE_ONE_HOT!r} has {len(one_hot)} "
                        f"entries but the model head has {num_classes} classes")
    label = _single(feats[FEATURE_CLASS], "int64_list", where, FEATURE_CLASS)
    if not 0 <= label < num_classes:
        raise DataError(f"{where}: {FEATURE_CLASS!r} = {label} is outside [0, {num_classes})")
    if int(np.argmax(one_hot)) != label or max(one_hot) <= 0:
        raise DataError(f"{where}: {FEATURE_ONE_HOT!r} {one_hot} does not mark {FEATURE_CLASS!r} = {label}")


def validate_files(files: list[str], num_classes: int, records_per_file: int = 2) -> int:
    """Check the first ``records_per_file`` records of every file eagerly and return the number of
    files checked.

    Meant to run before training, so that a wrong path, a file of another schema, undecodable
    image bytes or a class count that does not match the model head fail in seconds, with the
    file and record named, rather than as a shape error hours later.
    """
    if isinstance(files, str):
        files = list_files(files)
    if not files:
        raise DataError("no files to validate (empty file list)")
    for path in files:
        try:
            records = [r.numpy() for r in tf.data.TFRecordDataset(path).take(records_per_file)]
        except tf.errors.OpError as exc:
            raise DataError(f"{path}: not a readable TFRecord file ({tf_error_reason(exc)})") from exc
        if not records:
            raise DataError(f"{path}: holds no records")
        for index, record in enumerate(records):
            _check_record(record, num_classes, f"{path}, record {index}")
    return len(files)


def load_dataset(pattern: str, batch_size: int = 32, training: bool = True, num_classes: int = len(CLASSES),
                 seed: int = 42, shuffle_buffer: int = 1024, image_size: tuple[int, int] = IMAGE_SIZE,
                 validate: bool = True) -> tf.data.Dataset:
    """Batches of ``(images float32 [B, H, W, 3], one_hot float32 [B, C])``.

    Training data: files shuffled, read with a parallel interleave, records shuffled (before the
    expensive decode), all seeded, so the order depends only on ``seed``. Evaluation data
    (``training=False``) is read in file order, so batch element ``i`` is record ``i`` of
    :func:`take_numpy` and :func:`load_masks`. Decoding is a parallel map (AUTOTUNE, order kept);
    then batch and prefetch. Finite: whether and how to repeat is the trainer's decision.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    files = list_files(pattern)
    if validate:
        validate_files(files, num_classes)
    if training:
        ds = tf.data.Dataset.from_tensor_slices(files).shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
        ds = ds.interleave(tf.data.TFRecordDataset, cycle_length=min(len(files), 8),
                           num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    else:
        ds = tf.data.TFRecordDataset(files, buffer_size=8 << 20)
    ds = ds.map(lambda r: parse_example(r, num_classes, image_size), num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True)
    options = tf.data.Options()
    options.deterministic = True
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE).with_options(options)


def count_records(pattern: str) -> int:
    """Number of records in all files matching ``pattern`` (reads every file once)."""
    return int(tf.data.TFRecordDataset(list_files(pattern)).reduce(np.int64(0), lambda n, _: n + 1))


def take_numpy(pattern: str, n: int, image_size: tuple[int, int] = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` records in file order (fewer if there are fewer) as
    ``(images float32 [n, H, W, 3] in [0, 1], class indices int64 [n])``, preprocessed as in training."""
    spec = {FEATURE_IMAGE: tf.io.FixedLenFeature([], tf.string), FEATURE_CLASS: tf.io.FixedLenFeature([], tf.int64)}

    def parse(record: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        example = tf.io.parse_single_example(record, spec)
        return preprocess_image(example[FEATURE_IMAGE], image_size), example[FEATURE_CLASS]

    ds = tf.data.TFRecordDataset(list_files(pattern)).take(n).map(parse, num_parallel_calls=tf.data.AUTOTUNE,
                                                                  deterministic=True)
    images, labels = [], []
    for image_batch, label_batch in ds.batch(64):
        images.append(image_batch.numpy())
        labels.append(label_batch.numpy())
    if not images:
        return np.zeros((0, *image_size, 3), np.float32), np.zeros((0,), np.int64)
    return np.concatenate(images), np.concatenate(labels)


def load_masks(pattern: str, n: int | None = None) -> np.ndarray:
    """The synthetic data's ground-truth object masks, ``bool [n, H, W]``, in the record order of
    :func:`take_numpy` (so ``masks[i]`` belongs to ``images[i]``)."""
    spec = {FEATURE_MASK: tf.io.FixedLenFeature([], tf.string, default_value=b"")}
    masks: list[np.ndarray] = []
    for path in list_files(pattern):
        if n is not None and len(masks) >= n:
            break
        for index, record in enumerate(tf.data.TFRecordDataset(path)):
            if n is not None and len(masks) >= n:
                break
            png = tf.io.parse_single_example(record, spec)[FEATURE_MASK]
            if not png.numpy():
                raise DataError(f"{path}, record {index}: has no {FEATURE_MASK!r} feature (not synthetic data)")
            masks.append(tf.io.decode_png(png, channels=1).numpy()[..., 0] > 127)
    if not masks:
        return np.zeros((0, 0, 0), bool)
    return np.stack(masks)
