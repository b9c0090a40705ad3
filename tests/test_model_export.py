"""The model builder, fine-tuning, export signatures and derived explanation metadata."""

from __future__ import annotations

import io
import json
import os

import trainer  # noqa: F401

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from trainer.export import (ExportError, export_model, inspect_signatures, read_explanation_metadata,
                            read_labels)
from trainer.model import build_model
from trainer.schema import CLASSES, CONCRETE_INPUT, IMAGE_SIZE


def _encode(array: np.ndarray, fmt: str, mode: str | None = None) -> bytes:
    image = Image.fromarray(array)
    if mode:
        image = image.convert(mode)
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def test_export_has_three_chained_signatures_and_derived_metadata(exported_model_dir):
    names = inspect_signatures(exported_model_dir)
    assert names.xai_input == CONCRETE_INPUT
    metadata = read_explanation_metadata(exported_model_dir)
    image_input = metadata["inputs"]["image"]
    assert image_input == {"input_tensor_name": names.xai_input, "modality": "image"}
    (output,) = metadata["outputs"].values()
    assert output["output_tensor_name"] == names.xai_output
    assert output["index_display_name_mapping"] == list(CLASSES)
    assert metadata["framework"] == "tensorflow"
    assert read_labels(exported_model_dir) == list(CLASSES)

    loaded = tf.saved_model.load(exported_model_dir)
    rng = np.random.default_rng(0)
    jpeg = _encode(rng.integers(0, 255, (*IMAGE_SIZE, 3), dtype=np.uint8), "JPEG")
    pre = loaded.signatures["xai_preprocess"](bytes_inputs=tf.constant([jpeg, jpeg]))[names.xai_input]
    assert pre.shape == (2, *IMAGE_SIZE, 3) and pre.dtype == tf.float32
    assert 0.0 <= float(tf.reduce_min(pre)) and float(tf.reduce_max(pre)) <= 1.0
    via_xai = loaded.signatures["xai_model"](**{names.xai_input: pre})[names.xai_output].numpy()
    via_serving = loaded.signatures["serving_default"](bytes_inputs=tf.constant([jpeg, jpeg]))[
        names.serving_output].numpy()
    np.testing.assert_allclose(via_xai, via_serving, atol=1e-6)
    np.testing.assert_allclose(via_serving.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("fmt,mode,size", [("JPEG", None, (192, 192)), ("PNG", "RGBA", (300, 120)),
                                           ("GIF", "P", (64, 64)), ("BMP", "L", (50, 400)),
                                           ("PNG", "L", (192, 192))])
def test_serving_accepts_every_format_mode_and_size(exported_model_dir, fmt, mode, size):
    loaded = tf.saved_model.load(exported_model_dir)
    rng = np.random.default_rng(1)
    data = _encode(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8), fmt, mode)
    probs = loaded.signatures["serving_default"](bytes_inputs=tf.constant([data]))["probabilities"].numpy()
    assert probs.shape == (1, len(CLASSES))
    assert np.isfinite(probs).all()


def test_export_rejects_label_count_mismatch(tmp_path):
    from tests.conftest import _tiny_cnn

    with pytest.raises(ExportError, match="5 outputs but 3 labels"):
        export_model(_tiny_cnn(), str(tmp_path / "m"), ["a", "b", "c"], verbose=False)
    assert not os.path.exists(tmp_path / "m")


def test_inspect_rejects_model_without_xai_signatures(tmp_path):
    from tests.conftest import _tiny_cnn

    model = _tiny_cnn()
    tf.saved_model.save(model, str(tmp_path / "plain"))
    with pytest.raises(ExportError, match="lacks signature"):
        inspect_signatures(str(tmp_path / "plain"))


def test_fine_tuning_unfreezes_only_the_top_layers(backbone_dir):
    frozen = build_model(backbone_dir, fine_tune_layers=0)
    assert [w.name for w in frozen.trainable_weights] == ["classifier/kernel:0", "classifier/bias:0"]
    tuned = build_model(backbone_dir, fine_tune_layers=2)
    names = [w.name for w in tuned.trainable_weights]
    assert "Conv_1_bn/gamma:0" in names and "Conv_1/kernel:0" in names  # MobileNetV2's last 1x1 conv
    assert not any("moving_" in n for n in names)
    assert len(names) == 2 + 3  # Conv_1 kernel + Conv_1_bn gamma/beta, plus the head


def test_labels_that_do_not_match_the_outputs_are_refused_by_name(tmp_path):
    from trainer.export import read_labels

    (tmp_path / "labels.txt").write_text("daisy\nroses\ntulips\n")
    assert read_labels(str(tmp_path)) == ["daisy", "roses", "tulips"] == read_labels(str(tmp_path), 3)
    with pytest.raises(ValueError, match=f"{tmp_path}/labels.txt: 3 labels for the model's 5 outputs"):
        read_labels(str(tmp_path), 5)
