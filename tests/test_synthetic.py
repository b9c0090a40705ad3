"""The synthetic flowers: deterministic, in the lab's schema, balanced, masks on the object, and the
class carried by the flower, never by the background."""

from __future__ import annotations

import os
import subprocess
import sys

import trainer  # noqa: F401

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from trainer.data import list_files, load_masks, take_numpy, validate_files
from trainer.schema import CLASSES, FEATURE_CLASS, FEATURE_IMAGE, FEATURE_MASK, FEATURE_ONE_HOT, IMAGE_SIZE
from trainer.synthetic import render_sample, write_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bytes_of(pattern: str) -> list[bytes]:
    return [open(f, "rb").read() for f in list_files(pattern)]


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    a = write_dataset(str(tmp_path / "a"), num_train=10, num_eval=5, seed=5, num_shards=2)
    b = write_dataset(str(tmp_path / "b"), num_train=10, num_eval=5, seed=5, num_shards=2)
    c = write_dataset(str(tmp_path / "c"), num_train=10, num_eval=5, seed=6, num_shards=2)
    for pattern in ("train_pattern", "eval_pattern"):
        assert _bytes_of(a[pattern]) == _bytes_of(b[pattern])
        assert _bytes_of(a[pattern]) != _bytes_of(c[pattern])
    assert a == {"train_pattern": str(tmp_path / "a" / "train" / "*.tfrec"),
                 "eval_pattern": str(tmp_path / "a" / "validation" / "*.tfrec"), "num_train": 10, "num_eval": 5}


def test_lab_schema_shards_and_balance(tmp_path):
    data = write_dataset(str(tmp_path), num_train=23, num_eval=10, seed=1, num_shards=4)
    files = list_files(data["train_pattern"])
    assert [os.path.basename(f) for f in files] == [f"flowers-0000{i}-of-00004.tfrec" for i in range(4)]
    assert validate_files(files, num_classes=5, records_per_file=100) == 4
    record = next(iter(tf.data.TFRecordDataset(files)))
    feats = tf.train.Example.FromString(record.numpy()).features.feature
    assert set(feats) == {FEATURE_IMAGE, FEATURE_CLASS, FEATURE_ONE_HOT, FEATURE_MASK}
    assert feats[FEATURE_IMAGE].bytes_list.value[0][:3] == b"\xff\xd8\xff"  # JPEG
    assert feats[FEATURE_MASK].bytes_list.value[0][:4] == b"\x89PNG"
    _, labels = take_numpy(data["train_pattern"], 100)
    counts = np.bincount(labels, minlength=5)
    assert counts.sum() == 23 and counts.max() - counts.min() <= 1
    _, labels = take_numpy(data["eval_pattern"], 100)
    assert np.bincount(labels, minlength=5).tolist() == [2] * 5


# Colours that make each class (a loose test of "pixel belongs to this flower"), on uint8 RGB.
def _flower_colour(name: str, img: np.ndarray) -> np.ndarray:
    r, g, b = (img[..., i].astype(int) for i in range(3))
    yellow = (r > 170) & (g > 120) & (b < 120) & (r - b > 90)
    if name == "daisy":
        return ((r > 190) & (g > 190) & (b > 180) & (abs(r - b) < 45)) | yellow
    if name == "dandelion":
        return yellow
    if name == "roses":
        return (r - g > 70) & (r - b > 40)
    if name == "sunflowers":
        return yellow | ((r < 130) & (r - b > 25) & (g < 90))  # petals or the dark-brown seed disc
    return (r - g > 100) | (b - g > 100) | ((g - r > 60) & (g - b > 60))  # bloom or green stem and leaf


@pytest.mark.parametrize("class_index", range(len(CLASSES)))
def test_masks_sit_on_the_flower(class_index):
    name = CLASSES[class_index]
    rng = np.random.default_rng(100 + class_index)
    inside, outside = [], []
    for _ in range(8):
        image, mask = render_sample(rng, class_index)
        assert image.shape == (*IMAGE_SIZE, 3) and image.dtype == np.uint8
        assert mask.shape == IMAGE_SIZE and mask.dtype == bool
        assert 0.01 < mask.mean() < 0.5, name
        ys, xs = np.nonzero(mask)  # one compact object, not scattered pixels
        assert (np.ptp(ys) + 1) * (np.ptp(xs) + 1) < 0.6 * mask.size
        colour = _flower_colour(name, image)
        inside.append(colour[mask].mean())
        outside.append(colour[~mask].mean())
    # Most of the mask has the flower's colours; little of the clutter around it does.
    assert np.mean(inside) > 0.7 and np.mean(inside) > 6 * np.mean(outside), (name, inside, outside)


def _colour_histograms(images: np.ndarray, masks: np.ndarray, where: str) -> np.ndarray:
    """Normalised 4x4x4 RGB histograms of the flower's pixels or of the background's."""
    features = []
    for image, mask in zip(images, masks):
        pixels = image[mask] if where == "flower" else image[~mask]
        bins = (pixels // 64).astype(int) @ np.array([16, 4, 1])
        features.append(np.bincount(bins, minlength=64) / max(len(bins), 1))
    return np.array(features)


def _nearest_centroid_accuracy(x: np.ndarray, y: np.ndarray, n_train: int) -> float:
    """Accuracy on ``x[n_train:]`` of nearest-centroid over the classes present in ``y[:n_train]``."""
    classes = np.unique(y[:n_train])
    centroids = np.stack([x[:n_train][y[:n_train] == c].mean(axis=0) for c in classes])
    predicted = classes[np.argmin(((x[n_train:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)]
    return float((predicted == y[n_train:]).mean())


def test_the_class_is_in_the_flower_not_in_the_background():
    """A colour-histogram classifier does well on flower pixels and is at chance on the rest; on the
    flower it still misses many roses and tulips, which share their colours, so shape decides those."""
    rng = np.random.default_rng(7)
    labels = np.arange(250) % len(CLASSES)
    rng.shuffle(labels)
    samples = [render_sample(rng, int(c), (96, 96)) for c in labels]
    images, masks = np.stack([s[0] for s in samples]), np.stack([s[1] for s in samples])
    flower = _nearest_centroid_accuracy(_colour_histograms(images, masks, "flower"), labels, 150)
    background = _nearest_centroid_accuracy(_colour_histograms(images, masks, "background"), labels, 150)
    shared = np.isin(labels, [CLASSES.index("roses"), CLASSES.index("tulips")])
    bloom = _nearest_centroid_accuracy(_colour_histograms(images[shared], masks[shared], "flower"),
                                       labels[shared], int(shared[:150].sum()))
    print(f"colour-histogram accuracy: flower pixels {flower:.2f}, background pixels {background:.2f}, "
          f"roses vs tulips {bloom:.2f}")
    assert flower >= 0.7, flower
    assert background <= 0.4, background  # chance is 0.2
    assert bloom <= 0.85, bloom  # colour alone does not tell roses from tulips (chance is 0.5)


def test_cli_writes_data_and_sample_grid(tmp_path):
    out = tmp_path / "sample"
    result = subprocess.run([sys.executable, "-m", "trainer.synthetic", f"--output_dir={out}", "--num_train=10",
                             "--num_eval=5", "--seed=3"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": ROOT})
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(load_masks(str(out / "validation" / "*.tfrec"))) == 5
    with Image.open(out / "samples.png") as grid:
        assert grid.format == "PNG" and min(grid.size) > 500
    assert "Wrote 10 train and 5 validation images" in result.stdout
