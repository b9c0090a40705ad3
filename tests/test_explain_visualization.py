"""Attribution images for every Vertex visualization option, XRAI, the figure and the CLI."""

from __future__ import annotations

import trainer  # noqa: F401  (legacy Keras before TensorFlow)

import io
import itertools
import json

import numpy as np
import pytest
from PIL import Image

from explain import explain_images, load_explainable_model, render_attribution, save_explanation_figure
from explain.__main__ import main as cli_main
from explain.visualization import (COLOR_MAPS, OVERLAY_TYPES, POLARITIES, TYPES, VisualizationConfig,
                                   decode_jpeg_b64, encode_jpeg_b64)
from explain.testing import smooth_images


@pytest.fixture(scope="module")
def image_and_attribution():
    image = smooth_images(1, seed=3)[0]
    yy, xx = np.mgrid[0:192, 0:192]
    signed = np.exp(-((yy - 70) ** 2 + (xx - 70) ** 2) / 300.0) - np.exp(-((yy - 130) ** 2 + (xx - 130) ** 2) / 300.0)
    noise = np.random.default_rng(0).normal(0, 0.02, (192, 192, 3))
    return image, signed[..., None] / 3 + noise


def test_every_visualization_option_renders_a_jpeg(image_and_attribution):
    image, attribution = image_and_attribution
    rendered = {}
    for kind, polarity, color_map, overlay in itertools.product(TYPES, POLARITIES, COLOR_MAPS, OVERLAY_TYPES):
        config = VisualizationConfig(kind, polarity, color_map, 99.9, 62, overlay)
        rgb = render_attribution(image, attribution, config)
        decoded = np.asarray(Image.open(io.BytesIO(__import__("base64").b64decode(encode_jpeg_b64(rgb)))))
        assert decoded.shape == (192, 192, 3) and rgb.dtype == np.uint8
        rendered[kind, polarity, color_map, overlay] = rgb.astype(int)
    base = ("PIXELS", "BOTH", "PINK_GREEN", "NONE")  # BOTH: every colour map shows both signs
    for i, options in enumerate((TYPES, POLARITIES, COLOR_MAPS, OVERLAY_TYPES)):
        for option in options:  # changing any one option changes the picture
            variant = list(base)
            variant[i] = option
            if tuple(variant) != base:
                assert np.abs(rendered[tuple(variant)] - rendered[base]).mean() > 0.5, variant
    # Polarity selects the sign: the positive blob is green at (70, 70), the negative one pink at (130, 130).
    both = rendered["PIXELS", "BOTH", "PINK_GREEN", "NONE"]
    assert both[70, 70, 1] > both[70, 70, 0] and both[130, 130, 0] > both[130, 130, 1]
    assert rendered["PIXELS", "POSITIVE", "PINK_GREEN", "NONE"][130, 130].sum() == 0
    # A higher lower clip hides more pixels.
    strict = render_attribution(image, attribution, VisualizationConfig("PIXELS", clip_percent_lowerbound=95))
    assert (strict.sum(-1) > 0).sum() < (rendered["PIXELS", "POSITIVE", "PINK_GREEN", "NONE"].sum(-1) > 0).sum()


def test_xrai_regions_image_and_figure(exported_model_dir, tmp_path):
    model = load_explainable_model(exported_model_dir)
    images = smooth_images(1, seed=5)
    (result,) = explain_images(model, images, {"xrai_attribution": {"step_count": 8}}, return_raw=True)
    (attribution,) = result["attributions"]
    regions = np.array(attribution["featureAttributions"]["image"]["raw"])
    assert regions.shape == (192, 192) and 1 < len(np.unique(regions)) < 192 * 192 / 50  # piecewise constant
    rgb = decode_jpeg_b64(attribution["featureAttributions"]["image"]["b64_jpeg"])
    assert rgb.shape == (192, 192, 3) and rgb.std() > 5  # VIRIDIS pixels, not blank
    path = save_explanation_figure(images[0], rgb, str(tmp_path / "figure.png"), "xrai")
    with Image.open(path) as figure:
        assert figure.format == "PNG" and figure.width > 3 * 192


def test_cli_writes_figures(exported_model_dir, tmp_path, monkeypatch):
    files = []
    for i, image in enumerate(smooth_images(2, seed=7)):
        files.append(str(tmp_path / f"flower{i}.jpg"))
        Image.fromarray((image * 255).astype(np.uint8)).save(files[-1])
    out = tmp_path / "out"
    figures = cli_main(*files, model_dir=exported_model_dir, output_dir=str(out), step_count=8)
    assert sorted(p.split("/")[-1] for p in figures) == ["flower0_ig.png", "flower1_ig.png"]
    summary = json.loads((out / "explanations.json").read_text())
    assert [s["attributions"][0]["outputName"] for s in summary] == ["probabilities"] * 2
    from explain.files import FilesNotExplained

    with pytest.raises(FilesNotExplained, match="1 of 1 image file.* could not be explained: .*missing.jpg: "
                                                "cannot read image file"):
        cli_main(str(tmp_path / "missing.jpg"), model_dir=exported_model_dir, output_dir=str(out))
    import explain.__main__ as cli

    sent = []
    real = cli.local_explainer
    monkeypatch.setattr(cli, "local_explainer", lambda model, parameters: sent.append(parameters) or real(model, parameters))
    plain = cli_main(files[0], model_dir=exported_model_dir, output_dir=str(tmp_path / "plain"), step_count=8,
                     completeness_only=True)
    assert [p.split("/")[-1] for p in plain] == ["flower0_ig.png"]
    assert sent[-1]["integrated_gradients_attribution"] == {"step_count": 8, "map_target": None}
    with pytest.raises(ValueError, match="contradict"):
        cli_main(files[0], model_dir=exported_model_dir, output_dir=str(out), map_target=0.1, completeness_only=True)


def test_xrai_segments_are_exactly_saliencys_with_each_mask_dilated_in_its_box():
    from saliency.core.xrai import _get_segments_felzenszwalb

    from explain.xrai import segment

    rng = np.random.default_rng(3)
    noisy = np.clip(smooth_images(1, seed=5) + rng.normal(0, 0.1, (1, *smooth_images(1).shape[1:])), 0, 1)
    for image in (*smooth_images(2), noisy[0]):  # shapes, gradients, noise: segments at every border too
        ours, theirs = segment(image), _get_segments_felzenszwalb(np.asarray(image, np.float64))
        assert len(ours) == len(theirs) > 10
        assert all(np.array_equal(a, b) for a, b in zip(ours, theirs))


def test_xrai_region_means_are_each_segments_mean_per_channel():
    from explain.xrai import region_means, segment

    image = smooth_images(1, seed=7)[0]
    masks = segment(image)
    attribution = np.random.default_rng(5).normal(size=image.shape).astype(np.float32)
    means = region_means(masks)(attribution)
    assert means.shape == (len(masks), 3)
    expected = [attribution[m].mean(axis=0) if m.any() else np.zeros(3) for m in masks]  # saliency keeps empty ones
    np.testing.assert_allclose(means, expected, rtol=1e-4, atol=1e-6)
    stacked = region_means(masks)(np.stack([attribution, 2 * attribution]))  # several at once, in order
    np.testing.assert_allclose(stacked, [means, 2 * means], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="segment"):
        region_means([])


def test_xrai_region_ranking_is_exactly_saliencys():
    """Our sparse greedy ranking returns saliency's ``_xrai`` gains and ranks bit for bit: on its own
    segments of shapes and of noise, for smooth, noisy, tied (constant) and partial-area cases."""
    from saliency.core.xrai import XRAI as SaliencyXRAI

    from explain.xrai import MIN_PIXEL_DIFF, rank_regions, segment

    rng = np.random.default_rng(4)
    images = smooth_images(2, seed=7)
    images[1] = np.clip(images[1] + rng.normal(0, 0.1, images[1].shape), 0, 1)
    for image in images:
        masks = segment(image)
        smooth = image.sum(axis=-1) + 0.1 * rng.normal(size=image.shape[:2])
        for attr, area in ((smooth, 1.0), (rng.normal(size=image.shape[:2]), 1.0), (np.ones(image.shape[:2]), 1.0),
                           (rng.normal(size=image.shape[:2]), 0.3)):
            ours = rank_regions(attr, masks, area)
            theirs = SaliencyXRAI._xrai(attr=attr, segs=masks, area_perc_th=area, min_pixel_diff=MIN_PIXEL_DIFF,
                                        integer_segments=True)
            assert np.array_equal(ours[0], theirs[0]) and np.array_equal(ours[1], theirs[1])
    with pytest.raises(ValueError, match="non-finite"):
        rank_regions(np.full(images[0].shape[:2], np.nan), masks)
