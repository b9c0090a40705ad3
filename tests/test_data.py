"""Reading the lab's TFRecord schema: parsing, determinism, and a named error for each bad input.
Also the figures of trainer.plots."""

from __future__ import annotations

import io

import trainer  # noqa: F401

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from trainer.data import (DataError, count_records, list_files, load_dataset, load_masks, make_example,
                          parse_example, take_numpy, validate_files)
from trainer.preprocess import preprocess_image
from trainer.schema import CLASSES, FEATURE_IMAGE, IMAGE_SIZE
from trainer.synthetic import write_dataset


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> dict:
    """40 train / 10 validation synthetic records in 2 + 2 shards (lab schema + masks)."""
    return write_dataset(str(tmp_path_factory.mktemp("tiny")), num_train=40, num_eval=10, seed=3, num_shards=2)


def _write_records(path, examples) -> str:
    with tf.io.TFRecordWriter(str(path)) as writer:
        for example in examples:
            writer.write(example if isinstance(example, bytes) else example.SerializeToString())
    return str(path)


def _example(label: int = 1, num_classes: int = 5, image: bytes | None = None, drop: tuple[str, ...] = (),
             one_hot: list[float] | None = None, labels: list[int] | None = None) -> tf.train.Example:
    """A lab-schema record, then broken as asked: features dropped or replaced."""
    example = make_example(np.random.default_rng(label).integers(0, 255, (*IMAGE_SIZE, 3), dtype=np.uint8),
                           label, num_classes)
    feats = example.features.feature
    if image is not None:
        feats["image"].bytes_list.value[:] = [image]
    if one_hot is not None:
        feats["one_hot_class"].float_list.value[:] = one_hot
    if labels is not None:
        feats["class"].int64_list.value[:] = labels
    for key in drop:
        del feats[key]
    return example


def test_parsing_the_lab_schema(tiny_data):
    images, labels = take_numpy(tiny_data["eval_pattern"], 10)
    assert images.shape == (10, *IMAGE_SIZE, 3) and images.dtype == np.float32
    assert 0.0 <= images.min() and images.max() <= 1.0 and images.std() > 0.05
    assert labels.shape == (10,) and set(labels.tolist()) <= set(range(len(CLASSES)))
    # Evaluation batches come in file order: the same images and labels as take_numpy.
    batches = list(load_dataset(tiny_data["eval_pattern"], batch_size=4, training=False))
    assert [b[0].shape[0] for b in batches] == [4, 4, 2]  # finite, last batch partial
    batch_images = np.concatenate([b[0].numpy() for b in batches])
    one_hot = np.concatenate([b[1].numpy() for b in batches])
    assert one_hot.shape == (10, 5)
    np.testing.assert_array_equal(one_hot.argmax(axis=1), labels)
    np.testing.assert_allclose(one_hot.sum(axis=1), 1.0)
    np.testing.assert_array_equal(batch_images, images)
    assert count_records(tiny_data["train_pattern"]) == 40
    assert count_records(f"{tiny_data['train_pattern']},{tiny_data['eval_pattern']}") == 50


def test_parse_example_is_the_one_preprocessing_function(tiny_data):
    record = next(iter(tf.data.TFRecordDataset(list_files(tiny_data["eval_pattern"]))))
    image, one_hot = parse_example(record, 5)
    raw = tf.io.parse_single_example(record, {FEATURE_IMAGE: tf.io.FixedLenFeature([], tf.string)})[FEATURE_IMAGE]
    np.testing.assert_array_equal(image.numpy(), preprocess_image(raw).numpy())
    assert one_hot.shape == (5,) and one_hot.dtype == tf.float32


def test_training_order_is_deterministic_for_a_seed(tiny_data):
    def first_batches(seed):
        ds = load_dataset(tiny_data["train_pattern"], batch_size=8, training=True, seed=seed)
        batches = list(ds.take(3))
        return (np.concatenate([y.numpy().argmax(1) for _, y in batches]),
                np.concatenate([x.numpy() for x, _ in batches]))

    (labels_a, images_a), (labels_b, images_b) = first_batches(3), first_batches(3)
    np.testing.assert_array_equal(labels_a, labels_b)
    np.testing.assert_array_equal(images_a, images_b)
    assert not np.array_equal(first_batches(4)[1], images_a)
    # All records come out exactly once per pass, whatever the shuffle.
    labels = np.concatenate([y.numpy().argmax(1) for _, y in load_dataset(tiny_data["train_pattern"], 8, seed=3)])
    assert np.bincount(labels, minlength=5).tolist() == [8] * 5


@pytest.mark.parametrize("case,match", [
    ("missing_image", "missing feature 'image'"),
    ("missing_class", "missing feature 'class'"),
    ("missing_one_hot", "missing feature 'one_hot_class'"),
    ("not_image", "is not an image that can be decoded"),
    ("truncated_jpeg", "is not an image that can be decoded"),
    ("one_hot_length", "class count does not match the head: 'one_hot_class' has 3 entries but the model head "
                       "has 5 classes"),
    ("label_range", r"'class' = 7 is outside \[0, 5\)"),
    ("two_labels", "'class' should hold one int64 value, holds 2"),
    ("one_hot_disagrees", "does not mark 'class' = 1"),
    ("not_tfrecord", "not a readable TFRecord"),
    ("empty_file", "holds no records"),
])
def test_each_bad_input_is_named(tmp_path, case, match):
    path = str(tmp_path / f"{case}.tfrec")
    jpeg = make_example(np.zeros((*IMAGE_SIZE, 3), np.uint8), 1).features.feature["image"].bytes_list.value[0]
    broken = {
        "missing_image": lambda: _write_records(path, [_example(drop=("image",))]),
        "missing_class": lambda: _write_records(path, [_example(drop=("class",))]),
        "missing_one_hot": lambda: _write_records(path, [_example(drop=("one_hot_class",))]),
        "not_image": lambda: _write_records(path, [_example(image=b"this is not a jpeg")]),
        "truncated_jpeg": lambda: _write_records(path, [_example(image=jpeg[: len(jpeg) // 2])]),
        "one_hot_length": lambda: _write_records(path, [_example(num_classes=3)]),
        "label_range": lambda: _write_records(path, [_example(labels=[7])]),
        "two_labels": lambda: _write_records(path, [_example(labels=[1, 2])]),
        "one_hot_disagrees": lambda: _write_records(path, [_example(one_hot=[1.0, 0, 0, 0, 0])]),
        "not_tfrecord": lambda: open(path, "wb").write(b"garbage" * 100),
        "empty_file": lambda: _write_records(path, []),
    }
    broken[case]()
    with pytest.raises(DataError, match=match) as info:
        validate_files([path], num_classes=5)
    assert path in str(info.value)


def test_a_bad_second_record_is_named_with_its_index(tmp_path):
    path = _write_records(tmp_path / "mixed.tfrec", [_example(), _example(image=b"GIF89a broken")])
    with pytest.raises(DataError, match=r"mixed\.tfrec, record 1: feature 'image'"):
        validate_files([path], num_classes=5)


def test_missing_paths_and_empty_globs_are_named(tmp_path, tiny_data):
    missing = str(tmp_path / "missing_dir" / "*.tfrec")
    with pytest.raises(DataError, match="no files match") as info:
        list_files(missing)
    assert missing in str(info.value)
    (tmp_path / "empty").mkdir()
    empty = str(tmp_path / "empty" / "*.tfrec")
    with pytest.raises(DataError) as info:
        load_dataset(empty)
    assert empty in str(info.value)
    # One bad part of a comma-separated pattern is enough, and it is the one named.
    with pytest.raises(DataError) as info:
        list_files(f"{tiny_data['train_pattern']},{missing}")
    assert missing in str(info.value) and tiny_data["train_pattern"] not in str(info.value)
    with pytest.raises(DataError, match="no file pattern"):
        list_files(" , ")


def test_load_dataset_validates_before_reading(tmp_path, tiny_data):
    bad = _write_records(tmp_path / "bad.tfrec", [_example(num_classes=3)])
    with pytest.raises(DataError, match="class count does not match the head") as info:
        load_dataset(f"{tiny_data['train_pattern']},{bad}")
    assert bad in str(info.value)
    # The same files train fine when the head matches the data.
    images, _ = next(iter(load_dataset(bad, batch_size=1, num_classes=3)))
    assert images.shape == (1, *IMAGE_SIZE, 3)


def test_masks_line_up_with_take_numpy(tiny_data, tmp_path):
    images, _ = take_numpy(tiny_data["train_pattern"], 12)
    masks = load_masks(tiny_data["train_pattern"], 12)
    assert masks.shape == (12, *IMAGE_SIZE) and masks.dtype == bool
    assert len(load_masks(tiny_data["train_pattern"])) == 40
    # Record i's mask marks record i's flower: inside, the colours differ from the clutter around it.
    for image, mask in zip(images, masks):
        assert np.abs(image[mask].mean(axis=0) - image[~mask].mean(axis=0)).max() > 0.05
    lab_schema_only = _write_records(tmp_path / "lab.tfrec", [_example()])
    with pytest.raises(DataError, match="has no 'mask' feature") as info:
        load_masks(lab_schema_only)
    assert lab_schema_only in str(info.value)


def test_make_example_round_trips():
    ramp = np.linspace(0, 255, IMAGE_SIZE[1], dtype=np.uint8)
    image = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], 255 - ramp[None, :]), axis=-1)
    example = make_example(image, 3, mask=np.eye(IMAGE_SIZE[0], dtype=bool))
    feats = example.features.feature
    assert list(feats["one_hot_class"].float_list.value) == [0, 0, 0, 1, 0]
    decoded = np.asarray(Image.open(io.BytesIO(feats["image"].bytes_list.value[0])))
    assert decoded.shape == image.shape and np.abs(decoded.astype(int) - image).mean() < 3  # JPEG is lossy
    mask = np.asarray(Image.open(io.BytesIO(feats["mask"].bytes_list.value[0])))
    np.testing.assert_array_equal(mask > 127, np.eye(IMAGE_SIZE[0], dtype=bool))  # PNG is not
    with pytest.raises(ValueError, match="outside"):
        make_example(image, 5)


def test_plots_write_pngs(tmp_path, tiny_data):
    from trainer.plots import plot_confusion_matrix, plot_history, plot_samples_grid

    images, labels = take_numpy(tiny_data["eval_pattern"], 9)
    paths = [plot_samples_grid(images, labels, CLASSES, str(tmp_path / "grid.png")),
             plot_samples_grid((images[:4] * 255).astype(np.uint8), labels[:4], CLASSES, str(tmp_path / "g4.png")),
             plot_confusion_matrix(np.eye(5, dtype=int) * 3 + 1, CLASSES, str(tmp_path / "sub" / "cm.png"),
                                   title="validation"),
             plot_history({"loss": [1.0, 0.5], "val_loss": [1.1, 0.6], "accuracy": [0.5, 0.8]},
                          str(tmp_path / "h.png"))]
    for path in paths:
        with Image.open(path) as img:
            assert img.format == "PNG" and img.size[0] > 300
    with pytest.raises(ValueError, match="shape"):
        plot_confusion_matrix(np.eye(3), CLASSES, str(tmp_path / "bad.png"))
