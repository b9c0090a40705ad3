"""The image-folder converter: every input format, corrupt files reported (never dropped silently),
a reproducible stratified split, and the lab's schema on the way out."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import trainer  # noqa: F401

import numpy as np
import tensorflow as tf
import pytest
from PIL import Image

from trainer.convert import convert_image_folder, load_and_resize
from trainer.data import list_files, take_numpy, validate_files
from trainer.schema import IMAGE_SIZE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Colours of distinct brightness, so that grayscale files keep their class's signature.
CLASS_COLOURS = {"daisy": (230, 230, 230), "roses": (220, 40, 40), "tulips": (20, 20, 120)}
LUMA = np.array([0.299, 0.587, 0.114])
# (PIL format, extension, mode): JPEG RGB, PNG RGBA, GIF palette, BMP grayscale, PNG grayscale, JPEG grayscale.
FORMATS = [("JPEG", "jpg", "RGB"), ("PNG", "png", "RGBA"), ("GIF", "gif", "P"), ("BMP", "bmp", "L"),
           ("PNG", "png", "L"), ("JPEG", "jpeg", "L")]


def _image_folder(root, per_class: int = 6, corrupt: bool = True):
    """Per class, images in every format and mode, of different sizes, in the class's colour."""
    rng = np.random.default_rng(0)
    for name, colour in CLASS_COLOURS.items():
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            fmt, ext, mode = FORMATS[i % len(FORMATS)]
            array = np.clip(np.array(colour) + rng.integers(-10, 10, (30 + 7 * i, 50 + 5 * i, 3)), 0, 255)
            Image.fromarray(array.astype(np.uint8)).convert(mode).save(folder / f"img{i:02d}.{ext}", format=fmt)
    if corrupt:
        good = (root / "daisy" / "img00.jpg").read_bytes()
        (root / "daisy" / "truncated.jpg").write_bytes(good[: len(good) // 2])
        (root / "roses" / "notes.jpg").write_text("not an image at all")
        (root / "roses" / "README.txt").write_text("not an image, and does not claim to be")
    return root


def test_every_format_converts_and_corrupt_files_are_reported(tmp_path, capsys):
    photos = _image_folder(tmp_path / "photos")
    summary = convert_image_folder(str(photos), str(tmp_path / "out"), validation_split=0.25, seed=1, num_shards=4)
    assert summary["classes"] == ["daisy", "roses", "tulips"]
    assert summary["num_train"] + summary["num_validation"] == 18
    assert sorted(os.path.basename(f["path"]) for f in summary["failed"]) == ["notes.jpg", "truncated.jpg"]
    assert summary["num_failed"] == 2
    assert [os.path.basename(p) for p in summary["skipped_non_images"]] == ["README.txt"]
    # ... in the report file and on the console, by path.
    report = json.load(open(tmp_path / "out" / "conversion_report.json"))
    assert report["num_failed"] == 2 and report["per_class"] == summary["per_class"]
    printed = capsys.readouterr().out
    assert str(photos / "daisy" / "truncated.jpg") in printed and str(photos / "roses" / "notes.jpg") in printed
    # The output is the lab's schema at 192x192, and each label is its folder's (colour's) brightness.
    files = list_files(summary["train_pattern"]) + list_files(summary["eval_pattern"])
    validate_files(files, num_classes=3, records_per_file=100)
    images, labels = take_numpy(",".join(files), 100)
    assert images.shape == (18, *IMAGE_SIZE, 3)
    for image, label in zip(images, labels):
        expected = np.array(CLASS_COLOURS[summary["classes"][label]]) @ LUMA / 255
        assert abs(image.mean(axis=(0, 1)) @ LUMA - expected) < 0.06


def test_grayscale_rgba_palette_and_aspect_handling(tmp_path):
    gray = tmp_path / "gray.bmp"
    Image.fromarray(np.full((40, 60), 150, np.uint8)).save(gray)
    pixels = load_and_resize(str(gray))
    assert pixels.shape == (*IMAGE_SIZE, 3) and pixels.dtype == np.uint8
    assert (pixels == 150).all()  # grey stays grey in all three channels
    # 16-bit grayscale: scaled to 8 bits exactly as serving decodes the same file, not clipped to white.
    deep = tmp_path / "gray16.png"
    Image.fromarray(np.tile(np.arange(0, 65536, 256, dtype=np.uint16), (192, 1))[:, :192]).save(deep)
    served = tf.io.decode_image(deep.read_bytes(), channels=3).numpy()
    assert served.std() > 50 and (load_and_resize(str(deep)) == served).all()
    rgba = tmp_path / "rgba.png"
    Image.fromarray(np.dstack([np.full((20, 20, 3), 90, np.uint8), np.zeros((20, 20), np.uint8)])).save(rgba)
    assert (load_and_resize(str(rgba)) == 90).all()  # alpha dropped, as preprocess_image does
    # A wide image, red | green | blue in thirds: crop keeps the green centre, stretch keeps all three.
    wide = tmp_path / "wide.png"
    Image.fromarray(np.repeat(np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]]], np.uint8), 30, axis=1)
                    .repeat(30, axis=0)).save(wide)
    cropped, stretched = load_and_resize(str(wide)), load_and_resize(str(wide), crop=False)
    assert cropped[:, :, 1].mean() > 250 and cropped[:, :, 0].mean() < 5
    assert stretched[:, :20, 0].mean() > 250 and stretched[:, -20:, 2].mean() > 250


def test_split_is_reproducible_and_stratified(tmp_path):
    photos = _image_folder(tmp_path / "photos", per_class=10, corrupt=False)

    def split(out: str, seed: int) -> tuple[np.ndarray, np.ndarray, dict]:
        summary = convert_image_folder(str(photos), str(tmp_path / out), validation_split=0.3, seed=seed)
        images, labels = take_numpy(summary["eval_pattern"], 100)
        return images, labels, summary

    a_images, a_labels, a = split("a", 9)
    b_images, b_labels, _ = split("b", 9)
    c_images, _, _ = split("c", 10)
    np.testing.assert_array_equal(a_images, b_images)
    np.testing.assert_array_equal(a_labels, b_labels)
    assert not np.array_equal(np.sort(a_images.mean(axis=(1, 2, 3))), np.sort(c_images.mean(axis=(1, 2, 3))))
    assert np.bincount(a_labels).tolist() == [3, 3, 3]
    assert a["per_class"] == {name: {"train": 7, "validation": 3} for name in CLASS_COLOURS}
    assert a["num_train"] == 21 and a["num_failed"] == 0


def test_class_order_and_layout_errors(tmp_path):
    photos = _image_folder(tmp_path / "photos", per_class=2, corrupt=False)
    summary = convert_image_folder(str(photos), str(tmp_path / "out"), validation_split=0.0, classes="tulips,daisy")
    assert summary["classes"] == ["tulips", "daisy"] and summary["num_validation"] == 0
    assert summary["eval_pattern"] is None
    _, labels = take_numpy(summary["train_pattern"], 100)
    assert sorted(labels.tolist()) == [0, 0, 1, 1]  # roses left out; tulips is class 0
    with pytest.raises(ValueError, match=r"\['sunflowers'\] not found"):
        convert_image_folder(str(photos), str(tmp_path / "x"), classes=["daisy", "sunflowers"])
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        convert_image_folder(str(tmp_path / "no_such_dir"), str(tmp_path / "x"))
    (photos / "sunflowers").mkdir()
    with pytest.raises(ValueError, match=r"\['sunflowers'\] hold no"):
        convert_image_folder(str(photos), str(tmp_path / "x"))
    with pytest.raises(ValueError, match="validation_split"):
        convert_image_folder(str(photos), str(tmp_path / "x"), validation_split=1.0)


def test_cli(tmp_path):
    photos = _image_folder(tmp_path / "photos", per_class=3)
    result = subprocess.run([sys.executable, "-m", "trainer.convert", f"--input_dir={photos}",
                             f"--output_dir={tmp_path / 'out'}", "--validation_split=0.34", "--num_shards=2"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": ROOT})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 unreadable" in result.stdout and "truncated.jpg" in result.stdout
    printed = json.loads(result.stdout[result.stdout.index("{"):])
    assert printed["num_train"] + printed["num_validation"] == 9 and printed["num_failed"] == 2
    assert len(list_files(str(tmp_path / "out" / "train" / "*.tfrec"))) == 2
