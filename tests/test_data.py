"""Reading the lab's TFRecord schema, the synthetic generator and the image-folder converter."""

from __future__ import annotations

import io
import json
import os

import trainer  # noqa: F401

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from trainer.convert import convert_image_folder
from trainer.data import (DataError, count_records, list_files, load_dataset, load_masks, take_numpy,
                          validate_files)
from trainer.schema import CLASSES, IMAGE_SIZE
from trainer.synthetic import render_sample, write_dataset


def _write_records(path, examples):
    with tf.io.TFRecordWriter(str(path)) as writer:
        for feature in examples:
            writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())


def _jpeg(seed=0, size=(192, 192)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _feature(image=None, label=1, one_hot_len=5, drop=()):
    feature = {"image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image if image is not None else _jpeg()])),
               "class": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
               "one_hot_class": tf.train.Feature(float_list=tf.train.FloatList(
                   value=[float(i == label) for i in range(one_hot_len)]))}
    return {k: v for k, v in feature.items() if k not in drop}


def test_parsing_the_lab_schema(sample_data):
    images, labels = take_numpy(sample_data["eval_pattern"], 10)
    assert images.shape == (10, *IMAGE_SIZE, 3) and images.dtype == np.float32
    assert 0.0 <= images.min() and images.max() <= 1.0 and images.std() > 0.05
    assert set(labels) <= set(range(5))
    batch_images, one_hot = next(iter(load_dataset(sample_data["eval_pattern"], batch_size=4, training=False)))
    assert batch_images.shape == (4, *IMAGE_SIZE, 3) and one_hot.shape == (4, 5)
    np.testing.assert_allclose(one_hot.numpy().sum(axis=1), 1.0)
    assert count_records(sample_data["train_pattern"]) == sample_data["num_train"]


def test_training_order_is_deterministic_for_a_seed(sample_data):
    def first_labels(seed):
        ds = load_dataset(sample_data["train_pattern"], batch_size=8, training=True, seed=seed)
        return np.concatenate([y.numpy().argmax(1) for _, y in ds.take(4)])

    np.testing.assert_array_equal(first_labels(3), first_labels(3))
    assert not np.array_equal(first_labels(3), first_labels(4))


@pytest.mark.parametrize("case,match", [
    ("missing_feature", "missing feature 'one_hot_class'"),
    ("not_image", "is not an image"),
    ("one_hot_len", "has 3 entries but the model head has 5 classes"),
    ("label_range", "outside \\[0, 5\\)"),
    ("not_tfrecord", "not a readable TFRecord"),
])
def test_bad_records_are_named(tmp_path, case, match):
    path = tmp_path / f"{case}.tfrec"
    if case == "missing_feature":
        _write_records(path, [_feature(drop=("one_hot_class",))])
    elif case == "not_image":
        _write_records(path, [_feature(image=b"this is not a jpeg")])
    elif case == "one_hot_len":
        _write_records(path, [_feature(one_hot_len=3)])
    elif case == "label_range":
        _write_records(path, [_feature(label=7)])
    else:
        path.write_bytes(b"garbage" * 100)
    with pytest.raises(DataError, match=match) as info:
        validate_files([str(path)], num_classes=5)
    assert str(path) in str(info.value)


def test_missing_paths_and_empty_globs(tmp_path):
    with pytest.raises(DataError, match="no files match"):
        list_files(str(tmp_path / "missing_dir" / "*.tfrec"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=str(tmp_path / "empty")):
        load_dataset(str(tmp_path / "empty" / "*.tfrec"))


def test_synthetic_data_is_deterministic_balanced_and_masked(tmp_path):
    a = write_dataset(str(tmp_path / "a"), num_train=20, num_eval=10, seed=5, num_shards=2)
    b = write_dataset(str(tmp_path / "b"), num_train=20, num_eval=10, seed=5, num_shards=2)
    for pattern in ("train_pattern", "eval_pattern"):
        for fa, fb in zip(list_files(a[pattern]), list_files(b[pattern])):
            assert open(fa, "rb").read() == open(fb, "rb").read()
    validate_files(list_files(a["train_pattern"]), 5)
    images, labels = take_numpy(a["train_pattern"], 20)
    assert np.bincount(labels, minlength=5).tolist() == [4] * 5
    masks = load_masks(a["train_pattern"])
    assert masks.shape == (20, *IMAGE_SIZE) and masks.dtype == bool
    fractions = masks.mean(axis=(1, 2))
    assert (fractions > 0.02).all() and (fractions < 0.6).all()


def test_masks_cover_the_object_not_the_background():
    rng = np.random.default_rng(0)
    for cls in range(len(CLASSES)):
        image, mask = render_sample(rng, cls)
        # inside the mask the pixels are the flower's: their mean colour differs from the surrounding
        inside, outside = image[mask].mean(axis=0), image[~mask].mean(axis=0)
        assert np.abs(inside - outside).max() > 20, CLASSES[cls]


def _image_folder(root, corrupt=True):
    rng = np.random.default_rng(0)
    for ci, name in enumerate(["daisy", "roses", "tulips"]):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(5):
            array = rng.integers(0, 255, (40 + 10 * i, 60, 3), dtype=np.uint8)
            img = Image.fromarray(array)
            fmt, ext, mode = [("JPEG", "jpg", None), ("PNG", "png", "RGBA"), ("GIF", "gif", "P"),
                              ("BMP", "bmp", "L"), ("PNG", "png", "L")][i]
            (img.convert(mode) if mode else img).save(folder / f"img{i}.{ext}", format=fmt)
    if corrupt:
        good = (root / "daisy" / "img0.jpg").read_bytes()
        (root / "daisy" / "truncated.jpg").write_bytes(good[: len(good) // 3])
        (root / "roses" / "notes.jpg").write_text("not an image at all")
        (root / "roses" / "README.txt").write_text("ignored")


def test_converter_reports_corrupt_files_and_keeps_the_rest(tmp_path):
    _image_folder(tmp_path / "photos")
    summary = convert_image_folder(str(tmp_path / "photos"), str(tmp_path / "out"), validation_split=0.2,
                                   seed=1, num_shards=2)
    assert summary["classes"] == ["daisy", "roses", "tulips"]
    assert summary["num_train"] + summary["num_validation"] == 15
    failed = sorted(os.path.basename(f["path"]) for f in summary["failed"])
    assert failed == ["notes.jpg", "truncated.jpg"] and summary["num_failed"] == 2
    report = json.load(open(tmp_path / "out" / "conversion_report.json"))
    assert report["num_failed"] == 2
    validate_files(list_files(summary["train_pattern"]), num_classes=3)
    images, labels = take_numpy(summary["train_pattern"], 12)
    assert images.shape[1:] == (*IMAGE_SIZE, 3)


def test_converter_split_is_reproducible_and_stratified(tmp_path):
    _image_folder(tmp_path / "photos", corrupt=False)

    def split(out, seed):
        convert_image_folder(str(tmp_path / "photos"), str(tmp_path / out), validation_split=0.4, seed=seed)
        return take_numpy(str(tmp_path / out / "validation" / "*.tfrec"), 100)

    (a_img, a_lab), (b_img, b_lab) = split("a", 9), split("b", 9)
    np.testing.assert_array_equal(a_img, b_img)
    assert np.bincount(a_lab).tolist() == [2, 2, 2]
    with pytest.raises(ValueError, match="not found"):
        convert_image_folder(str(tmp_path / "photos"), str(tmp_path / "c"), classes="daisy,sunflowers")


def test_plots_write_pngs(tmp_path, sample_data):
    from trainer.plots import plot_confusion_matrix, plot_history, plot_samples_grid

    images, labels = take_numpy(sample_data["eval_pattern"], 9)
    paths = [plot_samples_grid(images, labels, CLASSES, str(tmp_path / "grid.png")),
             plot_confusion_matrix(np.eye(5, dtype=int) * 3, CLASSES, str(tmp_path / "cm.png")),
             plot_history({"loss": [1.0, 0.5], "val_loss": [1.1, 0.6], "accuracy": [0.5, 0.8]},
                          str(tmp_path / "h.png"))]
    for path in paths:
        assert open(path, "rb").read(4) == b"\x89PNG"
